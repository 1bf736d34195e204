"""Storage URIs and the sweep's records in them: joins that keep S3 query strings, reads and writes on a
local folder and on a real S3 API server (moto), finding sweeps, and what a resume may change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from isosweep import storage as st
from isosweep.results import layout
from isosweep.spec import SpecError, load_spec
from isosweep.spec.changes import spec_changes, spec_for_resume

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"
QUERY = "endpoint_override=127.0.0.1:9000&scheme=http&region=us-east-1"


def test_join_keeps_the_query_at_the_end():
    root = f"s3://bucket/isosweep?{QUERY}"
    sweep = st.join(root, "demo-20261126-010101")
    assert sweep == f"s3://bucket/isosweep/demo-20261126-010101?{QUERY}"
    assert layout.train_storage(root, "demo-20261126-010101") == f"s3://bucket/isosweep/demo-20261126-010101/train?{QUERY}"
    assert st.name_of(sweep) == "demo-20261126-010101" and st.parent_of(sweep) == root
    assert st.join("s3://bucket", "a", "b/") == "s3://bucket/a/b"
    assert st.join("/data/runs", "demo-1", "train") == "/data/runs/demo-1/train"
    fs, path = st.filesystem(sweep)  # pyarrow reads the endpoint from the query, the path without it
    assert type(fs).__name__ == "S3FileSystem" and path == "bucket/isosweep/demo-20261126-010101"


def test_machine_local_places():
    assert "relative path" in st.machine_local_reason("runs", "storage")
    assert "local path" in st.machine_local_reason("/mnt/nfs/runs", "storage")
    assert st.machine_local_reason(f"s3://b/p?{QUERY}", "storage") is None
    assert "file on one machine" in st.machine_local_reason("sqlite:///runs/mlflow.db", "tracking")
    assert st.machine_local_reason("http://mlflow:5000", "tracking") is None
    assert st.machine_local_reason("databricks", "tracking") is None


def _records(root: str) -> None:
    """Two sweeps of `demo` (one finished) and one of another name, as the driver leaves them."""
    for sweep_id, done in (("demo-20261126-010101", True), ("demo-20261126-020202", False), ("other-20261126-030303", False)):
        uri = st.join(root, sweep_id)
        st.write_json(st.join(uri, layout.STATE_FILE), {"sweep_id": sweep_id, "spec": {"name": sweep_id.split("-")[0]}})
        if done:
            st.write_json(st.join(uri, layout.DONE_MARKER), {"finished": 1})
    st.write_bytes(st.join(root, "demo-notes", "x.txt"), b"not a sweep")  # no state file: never listed


def _check_records(root: str) -> None:
    found = layout.find_sweeps(root, "demo")
    assert [st.name_of(s) for s in found] == ["demo-20261126-020202", "demo-20261126-010101"]  # newest first
    assert not layout.is_done(found[0]) and layout.is_done(found[1])
    assert layout.read_state(found[0])["sweep_id"] == "demo-20261126-020202"
    assert layout.find_sweeps(root, "nothing") == []
    # a truncated state file is named, never read as an empty sweep
    st.write_bytes(st.join(found[0], layout.STATE_FILE), b'{"sweep_id": "demo-2026')
    with pytest.raises(SpecError, match=r"isosweep_sweep.json(\?[^:]*:[0-9]+[^:]*)?: unreadable"):
        layout.read_state(found[0])
    with pytest.raises(SpecError, match="missing"):
        layout.read_state(st.join(root, "demo-notes"))


def test_sweep_records_on_a_local_folder(tmp_path):
    root = str(tmp_path / "runs")
    _records(root)
    _check_records(root)


@pytest.mark.slow
def test_sweep_records_on_s3_through_the_endpoint_query(s3_server, monkeypatch, tmp_path):
    """The same records on a real S3 API server, named by the endpoint-query URI; folders round-trip."""
    for k, v in s3_server.env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    port = s3_server.endpoint_url.rsplit(":", 1)[1]
    root = f"s3://{s3_server.bucket}/storage-test?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    _records(root)
    keys = s3_server.keys("storage-test/")
    assert "storage-test/demo-20261126-010101/isosweep_sweep.json" in keys  # in the bucket, not its root
    assert not any("endpoint_override" in k or k.startswith("demo-") for k in s3_server.keys(""))
    _check_records(root)
    local = tmp_path / "report"
    (local / "fig").mkdir(parents=True)
    (local / "report.md").write_text("# r")
    (local / "fig" / "a.png").write_bytes(b"png")
    st.upload_dir(local, st.join(root, "demo-20261126-010101", "report"))
    back = st.download_dir(st.join(root, "demo-20261126-010101", "report"), tmp_path / "back")
    assert (back / "report.md").read_text() == "# r" and (back / "fig" / "a.png").read_bytes() == b"png"


def test_spec_changes_separate_results_from_operations():
    saved = load_spec(DEMO, check_paths=False)
    assert spec_for_resume(saved.to_dict(), None, allow_changes=False, source="x").to_dict() == saved.to_dict()
    same = load_spec(DEMO, check_paths=False)
    assert spec_for_resume(saved.to_dict(), same, allow_changes=False, source="x").to_dict() == saved.to_dict()
    results = load_spec(DEMO, ["train.learning_rate=0.001", "evaluation.fid.num_samples=64", "search.max_concurrent_trials=4"],
                        check_paths=False)
    changes = {c.field: c.operational for c in spec_changes(saved.to_dict(), results.to_dict())}
    assert changes == {"train.learning_rate": False, "evaluation.fid.num_samples": False, "search.max_concurrent_trials": True}
    with pytest.raises(SpecError) as err:  # refused even with the flag, each field named with both values
        spec_for_resume(saved.to_dict(), results, allow_changes=True, source="demo.yaml")
    assert "train.learning_rate: 0.0001 -> 0.001" in str(err.value) and "evaluation.fid.num_samples" in str(err.value)
    assert "max_concurrent_trials" not in str(err.value)
    ops = load_spec(DEMO, ["search.max_concurrent_trials=4", "tracking.uri=http://mlflow:5000"], check_paths=False)
    with pytest.raises(SpecError, match="--allow-changes"):
        spec_for_resume(saved.to_dict(), ops, allow_changes=False, source="demo.yaml")
    allowed = spec_for_resume(saved.to_dict(), ops, allow_changes=True, source="demo.yaml")
    assert allowed.search.max_concurrent_trials == 4 and allowed.tracking.uri == "http://mlflow:5000"


def test_resume_refuses_a_changed_spec_before_anything_runs(tmp_path):
    """`isosweep resume SPEC --set ...` against a sweep saved in storage: exit 2 naming the fields, no Ray started."""
    saved = load_spec(DEMO, check_paths=False)
    storage = tmp_path / "runs"
    sweep = st.join(str(storage), "demo-20261126-010101")
    st.write_json(st.join(sweep, layout.STATE_FILE), {"sweep_id": "demo-20261126-010101", "spec": saved.to_dict()})
    base = [sys.executable, "-m", "isosweep", "resume"]
    r = subprocess.run([*base, str(DEMO), "--storage", str(storage), "--set", "train.max_steps=80"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "train.max_steps: 40 -> 80" in r.stderr and "change results" in r.stderr, r.stderr
    r = subprocess.run([*base, sweep, "--set", "search.max_concurrent_trials=1"], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "search.max_concurrent_trials: 2 -> 1" in r.stderr and "--allow-changes" in r.stderr, r.stderr
    st.write_json(st.join(sweep, layout.DONE_MARKER), {"finished": 1})
    r = subprocess.run([*base, "demo", "--storage", str(storage)], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "no unfinished sweep named 'demo-*'" in r.stderr, r.stderr
    assert json.loads(Path(sweep, layout.STATE_FILE).read_text())["sweep_id"] == "demo-20261126-010101"  # untouched


def test_a_sweep_stores_no_credential_and_resume_asks_for_it(tmp_path, monkeypatch):
    """The saved spec and tracking URI are scrubbed; resuming with the same spec (credentials included) is
    not a change, and resuming from the saved state alone refuses with the fix instead of using `***`."""
    from isosweep.redact import scrub_tree

    given = load_spec(DEMO, ["tracking.uri=http://alice:pw-SECRET@mlflow:5000"], check_paths=False)
    saved = scrub_tree(given.to_dict())
    assert "pw-SECRET" not in json.dumps(saved) and saved["tracking"]["uri"] == "http://***@mlflow:5000"
    assert spec_for_resume(saved, given, allow_changes=False, source="x").tracking.uri == "http://alice:pw-SECRET@mlflow:5000"
    storage = tmp_path / "runs"
    sweep = st.join(str(storage), "demo-20261126-020202")
    st.write_json(st.join(sweep, layout.STATE_FILE), {"sweep_id": "demo-20261126-020202", "spec": saved,
                                                       "tracking_uri": saved["tracking"]["uri"]})
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"}
    r = subprocess.run([sys.executable, "-m", "isosweep", "resume", sweep], capture_output=True, text=True, timeout=120,
                       check=False, env=env)
    assert r.returncode == 2 and "pass --tracking-uri URI or set MLFLOW_TRACKING_URI" in r.stderr, r.stdout + r.stderr
