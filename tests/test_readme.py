"""The spec reference (docs/spec.md) is the schema's, and every command the README shows parses."""

import shlex
from pathlib import Path

from isosweep.cli import build_parser
from isosweep.spec.reference import spec_reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_spec_reference_matches_schema():
    begin, end = "<!-- SPEC-REFERENCE:BEGIN -->", "<!-- SPEC-REFERENCE:END -->"
    shown = (ROOT / "docs" / "spec.md").read_text().split(begin)[1].split(end)[0].strip()
    assert shown == spec_reference_markdown().strip(), (
        "docs/spec.md's table is stale: regenerate it with "
        "python -c 'from isosweep.spec.reference import spec_reference_markdown as f; print(f())'"
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


def test_citations_of_the_math_name_sections_of_docs_math_md():
    """Code, specs, bench scripts and docs cite the formulas as "docs/math.md section N" (or "math.md section N"
    inside docs/): each N must be a numbered section of docs/math.md, and nothing cites a MATH.md, which is not
    part of this repository."""
    import re

    root = Path(__file__).resolve().parents[1]
    sections = set(re.findall(r"^## (\d+)\. ", (root / "docs" / "math.md").read_text(), re.M))
    assert len(sections) >= 5, sections
    cited, outside = [], []
    files = [p for d in ("isosweep", "tests", "bench", "docs", "search_spaces") for p in (root / d).rglob("*")
             if p.suffix in {".py", ".md", ".yaml"}] + [root / "README.md"]
    for path in files:
        text = path.read_text(errors="replace")
        if path.name != "test_readme.py" and "MATH" + ".md" in text:
            outside.append(str(path.relative_to(root)))
        for first, last in re.findall(r"math\.md\)? sections? (\d+)(?:-(\d+))?", text):
            cited += [(str(path.relative_to(root)), n) for n in range(int(first), int(last or first) + 1)]
    assert not outside, f"cite docs/math.md, not a file outside the repository: {outside}"
    assert cited, "no citation found: the pattern no longer matches how the code cites docs/math.md"
    missing = sorted({(f, n) for f, n in cited if str(n) not in sections})
    assert not missing, f"citations of sections docs/math.md does not have: {missing}"


def test_version_prints_the_package_version(capsys):
    """`isosweep --version` prints the installed package's version and exits 0."""
    import pytest

    import isosweep

    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"isosweep {isosweep.__version__}"


def test_every_argument_of_every_verb_says_what_it_is_for_and_its_default():
    import argparse

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    bare = [f"{verb} {a.option_strings or a.dest}" for verb, p in sub.choices.items() for a in p._actions if not a.help]
    assert not bare, bare
    sample = " ".join(sub.choices["sample"].format_help().split())
    assert "--seed SEED seed of the initial noise (default: 0)" in sample and "--n N how many images (default: 16)" in sample
    assert "(default: None)" not in " ".join(p.format_help() for p in sub.choices.values())
