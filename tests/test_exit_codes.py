"""Each exit code means one thing (a script tells a sweep without a champion from a crash), bad arguments are refused
in one line before torch or MLflow is imported, and a crash prints one line unless -v asks for the traceback."""

import os
import re
import subprocess
import sys
from pathlib import Path

from isosweep import constants
from isosweep.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
CODES = {name: value for name, value in vars(constants).items() if name.startswith("EXIT_")}


def isosweep(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isosweep", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, cwd=ROOT)


def test_exit_codes_are_pairwise_distinct():
    assert len(set(CODES.values())) == len(CODES), CODES
    assert constants.EXIT_ERROR == 1 and constants.EXIT_SPEC_ERROR == 2  # Python's crash code, argparse's usage code


def test_the_readme_table_lists_every_exit_code_and_help_points_to_it():
    """One table owns the codes' meanings: the README's "Exit codes" section, row for row the constants."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n### Exit codes\n", 1)[1].split("\n#", 1)[0]
    shown = [int(code) for code in re.findall(r"^\| (\d+) \|", section, flags=re.M)]
    assert sorted(shown) == sorted(CODES.values()), shown
    assert 'README\'s "Exit codes"' in " ".join(build_parser().format_help().split())


def test_bad_arguments_are_refused_in_one_line_before_torch_or_mlflow(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    cases = {
        "--out": ["pull", "models:/isodiff-demo@champion", "--out", str(full)],
        "--n": ["sample", str(tmp_path / "no-model"), "--n", "0"],
        "--steps": ["sample", str(tmp_path / "no-model"), "--steps", "0"],
        "--frames": ["interpolate", str(tmp_path / "no-model"), "--frames", "1"],
    }
    for flag, argv in cases.items():
        proc = isosweep(*argv)
        err = proc.stderr.strip()
        assert proc.returncode == constants.EXIT_SPEC_ERROR, (argv, proc.returncode, err)
        assert err.startswith(f"error: {flag} ") and "fix: " in err and "\n" not in err and not proc.stdout, err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    missing = str(tmp_path / "no-model")  # neither a folder nor a hub id, the built-in model or an MLflow URI
    models = [["sample", missing], ["eval", missing], ["invert", missing, str(full / "keep.txt"), "--out", str(tmp_path / "inverted")],
              ["edit", missing, "--seed", "0", "--t", "500", "--gamma", "2", "--out", str(tmp_path / "edits")]]
    for argv in models:
        proc = isosweep(*argv)
        err = proc.stderr.strip()
        assert proc.returncode == constants.EXIT_SPEC_ERROR, (argv, proc.returncode, err)
        assert err.startswith(f"error: {missing}: no such folder") and "fix: " in err and "\n" not in err, err
    cases.update({argv[0]: argv for argv in models})
    # in one interpreter: the refusals import neither torch nor MLflow
    probe = ("import sys\nfrom isosweep.cli import main\n"
             f"codes = [main(argv) for argv in {list(cases.values())!r}]\n"
             "print(codes, sorted({'torch', 'mlflow'} & {m.partition('.')[0] for m in sys.modules}))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.stdout.strip() == f"{[constants.EXIT_SPEC_ERROR] * len(cases)} []", proc.stdout + proc.stderr[-2000:]


def test_verbose_is_read_before_and_after_the_verb():
    parse = build_parser().parse_args
    assert parse(["-v", "sample", "m"]).verbose and parse(["sample", "m", "--verbose"]).verbose
    assert parse(["sample", "m"]).verbose is False


def test_an_error_prints_one_line_and_the_traceback_only_with_verbose(tmp_path):
    """A genuine error (the tracking server cannot be reached) exits 1 with one scrubbed line; -v prints the scrubbed
    traceback instead; --out, created by the pull, is removed again."""
    out = tmp_path / "pulled"
    env = {"ISOSWEEP_TRACKING_RETRIES": "1", "ISOSWEEP_TRACKING_BACKOFF_S": "0.01", "MLFLOW_TRACKING_URI": ""}
    pull = ["pull", "models:/isodiff-demo@champion", "--out", out, "--tracking-uri", "http://isosweep:pw-SECRET@127.0.0.1:9"]
    proc = isosweep(*pull, env=env)
    err = proc.stderr.strip()
    assert proc.returncode == constants.EXIT_ERROR, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and "\n" not in err and "pw-SECRET" not in err, err[-3000:]
    assert err.startswith("error: TrackingError: ") and err.endswith(" (run with -v for the traceback)"), err
    assert not out.exists()
    proc = isosweep("-v", *pull, env=env)
    assert proc.returncode == constants.EXIT_ERROR, (proc.returncode, proc.stderr[-3000:])
    assert proc.stderr.startswith("Traceback (most recent call last):") and "TrackingError: " in proc.stderr, proc.stderr
    assert "pw-SECRET" not in proc.stderr and "run with -v" not in proc.stderr and not out.exists()


def test_a_spec_that_is_not_utf8_text_is_a_bad_spec(tmp_path, capsys):
    from isosweep.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_bytes(b"\xff\xfe\x00name: x\n")
    assert main(["validate", str(spec)]) == constants.EXIT_SPEC_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {spec}: not UTF-8 text") and "fix: " in err and "\n" not in err, err


def test_the_error_line_is_one_scrubbed_line():
    from isosweep.cli import error_line

    line = error_line(ValueError("cannot open\nhttp://user:pw-SECRET@host:5000/x"))
    assert line == "ValueError: cannot open http://***@host:5000/x", line
    assert error_line(KeyError()) == "KeyError"
