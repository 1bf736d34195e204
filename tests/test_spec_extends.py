"""Spec inheritance (`extends`) and the environment's defaults of --storage and --tracking-uri.

A spec may extend a parent (a path relative to its own folder) and lay its keys over it: mappings merge at any
depth, lists and values replace. What is validated, saved with a sweep and shipped with a job is the merged form,
so a resume does not depend on the parent file.
"""

from pathlib import Path

import pytest
import yaml

from isosweep.cli import build_parser, env_defaults, main
from isosweep.results.layout import SPEC_FILE, read_state, resolve_storage
from isosweep.results.place import SweepPlace
from isosweep.spec import SpecError, load_spec, resolve_spec_data
from isosweep.spec.changes import spec_for_resume

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture()
def family(tmp_path):
    """demo.yaml as the grandparent, a parent in another folder that extends it, and a child that extends the parent."""
    base = _write(tmp_path / "base" / "demo.yaml", yaml.safe_load(DEMO.read_text()))
    parent = _write(tmp_path / "mid" / "parent.yaml", {
        "extends": "../base/demo.yaml", "name": "parent",
        "train": {"seed": 7, "iso_timesteps": "pooled"},
        "evaluation": {"metrics": ["fid", "ppl"], "fid": {"num_samples": 24}},
    })
    child = _write(tmp_path / "mid" / "child.yaml", {
        "extends": "parent.yaml", "name": "child",
        "evaluation": {"fid": {"ddim_steps": 3}},
        "search": {"iso_metric": {"type": "choice", "values": ["identity"]}},
    })
    return base, parent, child


def test_a_chain_merges_mappings_deeply_and_replaces_lists_and_values(family):
    base, _, child = family
    demo = load_spec(base, check_paths=False).to_dict()
    spec = load_spec(child, check_paths=False).to_dict()
    assert spec["name"] == "child"
    assert spec["train"]["seed"] == 7 and spec["train"]["iso_timesteps"] == "pooled"  # from the parent
    assert spec["train"]["learning_rate"] == demo["train"]["learning_rate"]  # from the grandparent, past two merges
    # evaluation.fid merged key by key across three files: the parent's size, the child's steps, the base's rest
    assert spec["evaluation"]["fid"] == {**demo["evaluation"]["fid"], "num_samples": 24, "ddim_steps": 3}
    assert spec["evaluation"]["metrics"] == ["fid", "ppl"]  # a list replaces, never appends
    assert spec["search"]["iso_metric"]["values"] == ["identity"]
    assert spec["search"]["lambda_iso"] == demo["search"]["lambda_iso"]
    assert "extends" not in resolve_spec_data(child)


def test_a_null_replaces_a_parents_section(tmp_path):
    """`screening: null` in a child drops the parent's screening (as the paper specs drop their dataset spec's)."""
    parent = _write(tmp_path / "p.yaml", {**yaml.safe_load(DEMO.read_text()), "name": "p"})
    data = yaml.safe_load(parent.read_text())
    assert data["evaluation"]["ppl"].get("stop_width") is None
    data["evaluation"]["ppl"].update(stop_width=0.05, round_pairs=8)
    _write(parent, data)
    child = _write(tmp_path / "c.yaml", {"extends": "p.yaml", "name": "c", "evaluation": {"ppl": {"stop_width": None}}})
    ppl = load_spec(child, check_paths=False).evaluation.ppl
    assert ppl.stop_width is None and ppl.round_pairs == 8


def test_set_applies_after_the_merge(family):
    *_, child = family
    spec = load_spec(child, ["evaluation.fid.ddim_steps=5", "train.seed=9"], check_paths=False)
    assert spec.evaluation.fid.ddim_steps == 5 and spec.train.seed == 9 and spec.evaluation.fid.num_samples == 24


def test_validate_prints_the_merged_spec(family, capsys):
    *_, child = family
    assert main(["validate", str(child), "--no-path-checks"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "extends" not in printed and printed == load_spec(child, check_paths=False).to_dict()


@pytest.mark.parametrize("case", ["not_a_string", "empty", "missing", "cycle", "itself"])
def test_a_bad_extends_is_refused_in_one_line_naming_the_file_the_field_and_the_fix(tmp_path, capsys, case):
    demo = yaml.safe_load(DEMO.read_text())
    path = tmp_path / "spec.yaml"
    if case == "not_a_string":
        _write(path, {**demo, "extends": ["a.yaml", "b.yaml"]})
    elif case == "empty":
        _write(path, {**demo, "extends": None})
    elif case == "missing":
        _write(path, {**demo, "extends": "gone.yaml"})
    elif case == "cycle":
        _write(path, {**demo, "extends": "other.yaml"})
        _write(tmp_path / "other.yaml", {"extends": "spec.yaml", "name": "other"})
    else:
        _write(path, {**demo, "extends": "./spec.yaml"})
    assert main(["validate", str(path), "--no-path-checks"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and "'extends'" in err and "fix:" in err
    if case == "missing":
        assert "gone.yaml" in err
    if case in ("cycle", "itself"):
        assert "cycle" in err


def test_a_parent_that_is_not_a_mapping_is_named(tmp_path):
    _write(tmp_path / "p.yaml", ["not", "a", "spec"])
    child = _write(tmp_path / "c.yaml", {"extends": "p.yaml", "name": "c"})
    with pytest.raises(SpecError, match=r"p\.yaml: the top level must be a mapping.*parent spec of .*c\.yaml"):
        load_spec(child, check_paths=False)


def test_the_sweep_saves_the_merged_spec_and_resumes_without_the_parent(family, tmp_path):
    """spec.yaml and the state file hold the resolved spec: deleting or editing the parents changes nothing a
    resume reads, and resuming with the child file (parents present) finds no difference."""
    base, parent, child = family
    spec = load_spec(child, check_paths=False)
    place = SweepPlace.open(spec, str(tmp_path / "runs"), None)
    place.record_start(spec, str(child), "sqlite:///unused.db", "run-id")
    saved_yaml = yaml.safe_load(Path(place.sweep_uri, SPEC_FILE).read_text())
    state = read_state(place.sweep_uri)
    assert "extends" not in saved_yaml and saved_yaml == state["spec"] == spec.to_dict()
    assert spec_for_resume(state["spec"], load_spec(child, check_paths=False), allow_changes=False, source="t") == spec
    parent.unlink()
    base.unlink()
    assert spec_for_resume(state["spec"], None, allow_changes=False, source="t").to_dict() == spec.to_dict()


def test_a_job_shipped_without_the_checkout_gets_the_merged_spec(family):
    """Outside the checkout the spec travels alone: merged, so its parents need not be on the cluster."""
    from isosweep.sweep.jobs import build_package  # imports Ray

    *_, child = family
    package = build_package(child)
    try:
        shipped = Path(package.runtime_env["working_dir"]) / package.spec_arg
        assert yaml.safe_load(shipped.read_text()) == resolve_spec_data(child)
        assert load_spec(shipped, check_paths=False) == load_spec(child, check_paths=False)
    finally:
        import shutil

        shutil.rmtree(package.staging_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# ISOSWEEP_STORAGE and ISOSWEEP_TRACKING_URI

def _verbs_taking(flag: str) -> list[list[str]]:
    """A minimal command line of every verb that takes `flag`, read from the parser, so a new verb is covered."""
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for verb, parser in sub.choices.items():
        if any(flag in a.option_strings for a in parser._actions):
            argv = [verb]
            for a in parser._actions:
                if not a.option_strings:
                    argv.append("1")
                elif a.required:
                    argv += [a.option_strings[0], "1"]
            out.append(argv)
    return out


STORAGE_VERBS, TRACKING_VERBS = _verbs_taking("--storage"), _verbs_taking("--tracking-uri")


def test_the_verbs_that_take_storage_and_tracking_uri():
    assert {a[0] for a in STORAGE_VERBS} == {"run", "resume", "results", "status", "list", "stop", "promote", "train", "sync"}
    assert {a[0] for a in TRACKING_VERBS} == {"validate", "run", "resume", "promote", "sync", "pull", "sample", "interpolate",
                                              "invert", "edit"}


@pytest.mark.parametrize("argv", STORAGE_VERBS, ids=lambda a: a[0])
def test_storage_is_the_flag_then_isosweep_storage(argv):
    parse = build_parser().parse_args
    env = {"ISOSWEEP_STORAGE": "/env/runs"}
    args = parse(argv)
    env_defaults(args, env)
    assert args.storage == "/env/runs"
    args = parse([*argv, "--storage", "/flag/runs"])
    env_defaults(args, env)
    assert args.storage == "/flag/runs"
    args = parse(argv)
    env_defaults(args, {"ISOSWEEP_STORAGE": ""})  # empty is unset: the spec's storage.path decides
    assert args.storage is None


@pytest.mark.parametrize("argv", TRACKING_VERBS, ids=lambda a: a[0])
def test_tracking_uri_is_the_flag_then_isosweep_tracking_uri(argv):
    parse = build_parser().parse_args
    env = {"ISOSWEEP_TRACKING_URI": "http://env:5000"}
    args = parse(argv)
    env_defaults(args, env)
    assert args.tracking_uri == "http://env:5000"
    args = parse([*argv, "--tracking-uri", "http://flag:5000"])
    env_defaults(args, env)
    assert args.tracking_uri == "http://flag:5000"


def test_a_verb_looks_where_isosweep_storage_says(tmp_path, monkeypatch, capsys):
    """Through `main`: `isosweep results NAME` with no --storage searches ISOSWEEP_STORAGE, and the flag wins."""
    monkeypatch.setenv("ISOSWEEP_STORAGE", str(tmp_path / "env"))
    assert main(["results", "nosuch"]) == 2
    assert f"under {tmp_path / 'env'};" in capsys.readouterr().err
    assert main(["results", "nosuch", "--storage", str(tmp_path / "flag")]) == 2
    assert f"under {tmp_path / 'flag'};" in capsys.readouterr().err


def test_storage_precedence_end_to_end(tmp_path, monkeypatch):
    """The flag, then ISOSWEEP_STORAGE, then the spec's storage.path, as a sweep resolves where it lives."""
    spec = load_spec(DEMO, check_paths=False)
    parse = build_parser().parse_args
    monkeypatch.setenv("ISOSWEEP_STORAGE", str(tmp_path / "env"))
    args = parse(["run", str(DEMO)])
    env_defaults(args)
    assert resolve_storage(spec, args.storage) == str(tmp_path / "env")
    args = parse(["run", str(DEMO), "--storage", str(tmp_path / "flag")])
    env_defaults(args)
    assert resolve_storage(spec, args.storage) == str(tmp_path / "flag")
    monkeypatch.delenv("ISOSWEEP_STORAGE")
    args = parse(["run", str(DEMO)])
    env_defaults(args)
    assert resolve_storage(spec, args.storage) == str(Path(spec.storage.path).resolve())


def test_tracking_precedence_end_to_end(monkeypatch):
    """--tracking-uri, ISOSWEEP_TRACKING_URI, tracking.uri, then MLFLOW_TRACKING_URI."""
    from isosweep.tracking.client import resolve_tracking_uri  # imports MLflow

    parse = build_parser().parse_args

    def uri(*flag):
        args = parse(["run", str(DEMO), *flag])
        env_defaults(args)
        return resolve_tracking_uri("http://spec:5000", args.tracking_uri, None)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow-env:5000")
    assert uri() == "http://spec:5000"  # MLFLOW_TRACKING_URI stays below the spec's tracking.uri
    monkeypatch.setenv("ISOSWEEP_TRACKING_URI", "http://isosweep-env:5000")
    assert uri() == "http://isosweep-env:5000"
    assert uri("--tracking-uri", "http://flag:5000") == "http://flag:5000"
    assert resolve_tracking_uri(None, None, None) == "http://mlflow-env:5000"


def test_submit_checks_the_storage_and_tracking_uri_the_job_will_use():
    """A job's --env ISOSWEEP_STORAGE / ISOSWEEP_TRACKING_URI win over the spec on the cluster, so the check of places
    only one machine sees looks at them, and names the variable."""
    from isosweep.sweep.jobs import check_shared_places  # imports Ray

    spec = load_spec(DEMO, ["storage.path=s3://bucket/runs", "tracking.uri=http://mlflow:5000"], check_paths=False)
    check_shared_places(spec, {}, False, "s.yaml")
    with pytest.raises(SpecError, match="field 'ISOSWEEP_STORAGE'"):
        check_shared_places(spec, {"ISOSWEEP_STORAGE": "runs"}, False, "s.yaml")
    with pytest.raises(SpecError, match="field 'ISOSWEEP_TRACKING_URI'"):
        check_shared_places(spec, {"ISOSWEEP_TRACKING_URI": "sqlite:///mlflow.db"}, False, "s.yaml")
    local = load_spec(DEMO, check_paths=False)  # runs/ and no tracking URI: both refused without the variables
    check_shared_places(local, {"ISOSWEEP_STORAGE": "s3://b/p", "ISOSWEEP_TRACKING_URI": "http://mlflow:5000"}, False, "s.yaml")


def test_environment_doc_lists_every_variable_isosweep_names():
    """docs/environment.md lists every ISOSWEEP_* variable the package names."""
    import re

    doc = (ROOT / "docs" / "environment.md").read_text()
    named = {m for p in (ROOT / "isosweep").rglob("*.py") for m in re.findall(r"\bISOSWEEP_[A-Z0-9_]+\b", p.read_text())}
    assert {"ISOSWEEP_STORAGE", "ISOSWEEP_TRACKING_URI"} <= named
    missing = sorted(v for v in named if f"`{v}`" not in doc)
    assert not missing, f"docs/environment.md does not list {missing}"
