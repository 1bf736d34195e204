"""Storage is a trust boundary: whoever can write a sweep's bucket must not run code on the machine of whoever
reads or resumes the sweep. Tune's files embed cloudpickle; isosweep's read-only verbs never open them."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from isosweep.results.place import SweepPlace
from isosweep.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"


class _WritesMarker:
    """Unpickling this object creates the file `path`: the code a planted payload would run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def plant_payloads(sweep: Path, marker: Path) -> list[Path]:
    """Every pickled file of Tune's in the sweep (tuner.pkl, the searcher state, `experiment_state-*.json`'s embedded
    cloudpickle) replaced by a payload that writes `marker` when loaded; returns the files planted."""
    from ray import cloudpickle

    blob = cloudpickle.dumps(_WritesMarker(marker))
    planted = []
    for f in sorted(sweep.rglob("*")):
        if f.name.startswith("experiment_state-") and f.suffix == ".json":
            f.write_text(json.dumps({"trial_data": [], "checkpoint": {"_type": "CLOUDPICKLE_FALLBACK", "value": blob.hex()}}))
        elif f.suffix == ".pkl":
            f.write_bytes(blob)
        else:
            continue
        planted.append(f)
    return planted


KEY = "test-state-key-0123456789abcdef"  # ISOSWEEP_STATE_KEY of this module's driver and CLI runs
PASSWORD = "pw-SECRET-0x7e57"  # in the tracking URI the trials hold, as a sweep's trial function does


def make_sweep(root: Path, *, finished: bool) -> Path:
    """A two-trial sweep in storage as the driver leaves it: the state file, a real Tune experiment (experiment state,
    tuner.pkl, searcher state, trial folders) with isosweep's callbacks (trial records, seals); the trials report
    an evaluation without training. Unfinished: `isosweep resume` would continue it."""
    import ray
    from ray import tune

    from isosweep.sweep.callbacks import StateSeal, TrialRecords

    spec = load_spec(DEMO, ["search.num_trials=1"], check_paths=False)
    place = SweepPlace.open(spec, str(root), None)
    place.record_start(spec, None, "http://127.0.0.1:9/", "parent-run")

    tracking = f"http://isosweep:{PASSWORD}@127.0.0.1:9/"

    def trial(config):
        assert tracking  # the trial function holds the tracking URI with its password
        fid = 10.0 if config["baseline"] else 9.0
        tune.report({"fid": fid, "ppl": 5.0 - 2 * (not config["baseline"]), "evaluated": True, "mlflow_run_id": "run",
                     "checkpoint_path": "nowhere", **config})

    ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        tune.Tuner(trial, param_space={"baseline": tune.grid_search([True, False]), "lambda_iso": 0.1, "p": 0.0,
                                               "iso_metric": "stereographic"},
                           run_config=tune.RunConfig(name=place.sweep_id, storage_path=str(root), verbose=0,
                                                     callbacks=[TrialRecords(place.sweep_uri), StateSeal(place.sweep_uri)])).fit()
    finally:
        ray.shutdown()
    if finished:
        place.record_done(None)
    return Path(place.sweep_uri)


@pytest.fixture(scope="module")
def state_key():
    before = os.environ.get("ISOSWEEP_STATE_KEY")
    os.environ["ISOSWEEP_STATE_KEY"] = KEY
    yield KEY
    if before is None:
        os.environ.pop("ISOSWEEP_STATE_KEY")
    else:
        os.environ["ISOSWEEP_STATE_KEY"] = before


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, state_key):
    return make_sweep(tmp_path_factory.mktemp("storage"), finished=True)


@pytest.fixture(scope="module")
def unfinished_sweep(tmp_path_factory, state_key):
    return make_sweep(tmp_path_factory.mktemp("storage"), finished=False)


def _isosweep(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "isosweep", *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_results_and_status_never_load_the_pickles_a_bucket_writer_planted(finished_sweep, tmp_path):
    """Payloads planted in every pickled Tune file of a finished sweep: `isosweep status` and `results` still show
    both trials DONE and the champion (from isosweep's JSON), and no payload ran."""
    marker = tmp_path / "payload-ran"
    planted = plant_payloads(finished_sweep, marker)
    names = {p.name for p in planted}
    assert "tuner.pkl" in names and any(n.startswith("experiment_state-") for n in names), names
    for verb in ("status", "results"):
        out = _isosweep(verb, str(finished_sweep), cwd=tmp_path)
        assert not marker.exists(), f"`isosweep {verb}` ran a payload planted in storage"
        assert out.returncode == 0, out.stderr[-3000:]
        rows = [line for line in out.stdout.splitlines() if " DONE " in f"{line} "]
        assert len(rows) == 2, out.stdout
        assert "champion: " in out.stdout and "(finished)" in out.stdout, out.stdout
    # the check has teeth: Tune's own reader runs the payload
    from ray.tune import ExperimentAnalysis

    try:
        ExperimentAnalysis(str(finished_sweep))
    except Exception:  # noqa: BLE001 -- whatever it makes of the rest, the payload ran first
        pass
    assert marker.exists()


def test_a_corrupt_trial_records_file_is_named(finished_sweep, tmp_path):
    """A trial records file that is not what isosweep writes: one line naming it and the fix, exit 2."""
    records = finished_sweep / "isosweep_trials.records"
    saved = records.read_text()
    try:
        records.write_text(json.dumps({"trials": [{"trial_id": 1, "status": "DONE", "config": {}, "last_result": {}}]}))
        out = _isosweep("results", str(finished_sweep), cwd=tmp_path)
    finally:
        records.write_text(saved)
    assert out.returncode == 2 and "isosweep_trials.records: unreadable" in out.stderr and "fix:" in out.stderr, out.stderr


def test_pickle_module_is_not_what_payloads_need(tmp_path):
    """The planted object really runs code on load (guards the planted payload itself)."""
    marker = tmp_path / "m"
    pickle.loads(pickle.dumps(_WritesMarker(marker)))
    assert marker.exists()


def test_every_tune_file_a_resume_unpickles_is_sealed_and_a_tampered_one_is_refused(unfinished_sweep, tmp_path):
    """The driver's seals cover every file of Tune's at the sweep's top level (tuner.pkl, the experiment and searcher
    states); a tampered tuner.pkl makes `isosweep resume` refuse with one line (exit 2) before anything is unpickled; a
    resume with another key refuses too; with --trust-storage it goes on to restore the sweep."""
    import shutil

    from isosweep.results.seal import unsealed

    sweep = tmp_path / unfinished_sweep.name
    shutil.copytree(unfinished_sweep, sweep)
    names = sorted(p.name for p in sweep.iterdir() if p.is_file())
    assert "tuner.pkl" in names and any(n.startswith("experiment_state-") for n in names), names
    assert unsealed(str(sweep)) == [], names
    other = subprocess.run([sys.executable, "-m", "isosweep", "resume", str(sweep)], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "ISOSWEEP_STATE_KEY": "another-key"})
    assert other.returncode == 2 and "without a valid seal" in other.stderr, other.stderr[-2000:]

    marker = tmp_path / "payload-ran"
    from ray import cloudpickle

    (sweep / "tuner.pkl").write_bytes(cloudpickle.dumps(_WritesMarker(marker)))
    assert unsealed(str(sweep)) == ["tuner.pkl"]
    out = _isosweep("resume", str(sweep), cwd=tmp_path)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr[-3000:]
    assert "tuner.pkl: Tune's state without a valid seal" in lines[-1] and "--trust-storage" in lines[-1], lines
    assert not marker.exists()
    # --trust-storage: past the seal, on to the restore (stopped once it says it resumes; it would unpickle the payload)
    proc = subprocess.Popen([sys.executable, "-m", "isosweep", "resume", str(sweep), "--trust-storage"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    said = []
    try:
        for line in proc.stdout:
            said.append(line)
            if "resuming " in line or "without a valid seal" in line:
                break
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    assert said and "resuming " in said[-1], "".join(said)[-3000:]


def _pickled_strings(data: bytes) -> list[str]:
    """Every string and bytes value a pickle holds, read by pickletools (nothing is loaded)."""
    import pickletools

    out = []
    for op, arg, _ in pickletools.genops(data):
        if isinstance(arg, (str, bytes)):
            out.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
    return out


def _decoded_strings(path: Path) -> list[str]:
    """The strings of one of Tune's files: a pickle's (pickletools), or a JSON file's with every embedded pickle
    (Tune's hex-encoded cloudpickle) decoded the same way."""
    data = path.read_bytes()
    if path.suffix == ".pkl" or data[:1] == b"\x80":
        found = _pickled_strings(data)
    else:
        found, todo = [], [json.loads(data)]
        while todo:
            value = todo.pop()
            if isinstance(value, dict):
                todo += list(value.values())
            elif isinstance(value, list):
                todo += value
            elif isinstance(value, str):
                found.append(value)
                if value.startswith("{") or value.startswith("["):
                    try:
                        todo.append(json.loads(value))
                    except ValueError:
                        pass
                elif len(value) > 8 and len(value) % 2 == 0 and all(c in "0123456789abcdef" for c in value[:16]):
                    try:
                        found += _pickled_strings(bytes.fromhex(value))
                    except Exception:  # noqa: BLE001 -- hex that is no pickle
                        pass
    return found


def test_tunes_pickled_state_holds_no_credential(unfinished_sweep):
    """Every pickle Tune left in the sweep (tuner.pkl, the experiment and searcher states, the trial folders'),
    decoded opcode by opcode: no trace of the tracking password the trial function held. The driver's callbacks
    (pickled into tuner.pkl) keep their storage URI scrubbed, and find it again in the driver that restores them."""
    from ray import cloudpickle

    from isosweep.sweep.callbacks import StateSeal, TrialRecords

    files = [p for p in unfinished_sweep.rglob("*") if p.is_file() and (p.suffix == ".pkl" or p.name.startswith(
        ("experiment_state-", "basic-variant-state-", "search_gen_state-", "searcher-state-")))]
    assert any(p.name == "tuner.pkl" for p in files), files
    for f in files:
        strings = _decoded_strings(f)
        assert strings and not [s for s in strings if PASSWORD in s], f
        if f.name.startswith("experiment_state-"):  # the decoding reaches the trials' pickled configs
            assert any("stereographic" in s for s in strings), f
    uri = "s3://bucket/sweeps/demo-1?endpoint_override=127.0.0.1:9&secret_key=KEY-SECRET-0x5eed"
    for cls in (TrialRecords, StateSeal):
        data = cloudpickle.dumps(cls(uri))
        assert not [s for s in _pickled_strings(data) if "KEY-SECRET-0x5eed" in s], cls
        assert cloudpickle.loads(data).uri == uri  # restored in the driver of the sweep: its own URI again
