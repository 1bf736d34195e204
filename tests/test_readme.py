"""The README's spec reference is the schema's, and every command it shows parses."""

import shlex
from pathlib import Path

from isosweep.cli import build_parser
from isosweep.spec_reference import spec_reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_spec_reference_matches_schema():
    begin, end = "<!-- SPEC-REFERENCE:BEGIN -->", "<!-- SPEC-REFERENCE:END -->"
    shown = README.split(begin)[1].split(end)[0].strip()
    assert shown == spec_reference_markdown().strip(), (
        "README spec reference is stale: regenerate it with "
        "python -c 'from isosweep.spec_reference import spec_reference_markdown as f; print(f())'"
    )


def test_readme_commands_parse():
    parser = build_parser()
    blocks = [b.split("```", 1)[0] for b in README.split("```bash")[1:]]
    commands = [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip().startswith("isosweep ")]
    assert len(commands) >= 4
    for cmd in commands:
        cmd = cmd.split("#")[0].rstrip(" \\")
        parser.parse_args(shlex.split(cmd)[1:])


def test_readme_opens_with_the_two_commands():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block and "make test" in first_block
