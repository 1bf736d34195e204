"""Tracking, registry and the pull/sample/interpolate commands against real MLflow stores.

Local tests use a SQLite store in tmp_path (the server-less default); the S3 test uses the real
moto S3 server and `mlflow server --artifacts-destination s3://...` from tests/support/servers.py and lists
the bucket with boto3. Models are tiny UNet2DModels built from config (no download).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image
from support.servers import LosingProxy, free_port

from isosweep import redact
from isosweep.commands import models as model_cmds
from isosweep.commands import sync as sync_cmd
from isosweep.spec import spec_from_dict
from isosweep.tracking import artifacts, client, registry, runs
from isosweep.tracking import steps as step_metrics
from isosweep.training.checkpoint import write_manifest

RES = 8  # image side of the tiny model


# --------------------------------------------------------------------------------------- helpers


def tiny_pipeline_dir(root: Path) -> Path:
    """A DDPMPipeline dir of a tiny UNet (8x8 RGB, ~10k params), plus training state to be excluded."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=RES, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(root)
    (root / "train_state.pt").write_bytes(b"optimizer state, never uploaded")
    return root


def trial_checkpoint(root: Path, trial_id: str, fid: float = 12.5) -> Path:
    """A trial's final checkpoint as the sweep writes it: pipeline + eval/ + trial_params.json."""
    ckpt = tiny_pipeline_dir(root)
    ev = ckpt / "eval"
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps({
        "metrics": {"fid": fid, "ppl": 40.0, "mrtl": 1.3}, "backbones": {"fid": "domain-shapes-v1", "ppl": "domain-shapes-v1"},
        "rtl_curve": [1.0, 1.2, 1.5, 1.3],
    }))
    Image.new("RGB", (20, 20), (255, 0, 0)).save(ev / "grid.png")
    Image.new("RGB", (40, 10), (0, 255, 0)).save(ev / "strip_slerp.png")
    (ckpt / "trial_params.json").write_text(json.dumps({"trial_id": trial_id, "params": {"lambda_iso": 1e-4, "p": 0.5, "iso_metric": "stereographic"}}))
    write_manifest(ckpt, step=2)  # written last, as save_checkpoint does
    return ckpt


def make_spec(name: str, storage: Path, **extra):
    data = {"name": name, "storage": {"path": str(storage)}, **extra}
    return spec_from_dict(data, check_paths=False)


def spec_file(path: Path, name: str, storage: Path) -> Path:
    path.write_text(f"name: {name}\nstorage:\n  path: {storage}\n")
    return path


@pytest.fixture
def local_uri(tmp_path: Path) -> str:
    return client.resolve_tracking_uri(None, None, tmp_path / "runs")


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setenv("ISOSWEEP_TRACKING_RETRIES", "3")
    monkeypatch.setenv("ISOSWEEP_TRACKING_BACKOFF_S", "0.05")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# --------------------------------------------------------------------------------------- local store


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    assert client.resolve_tracking_uri("http://spec:5000", "http://cli:5000", tmp_path) == "http://cli:5000"
    assert client.resolve_tracking_uri("http://spec:5000", None, tmp_path) == "http://spec:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert client.resolve_tracking_uri(None, None, tmp_path) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert client.resolve_tracking_uri(None, None, tmp_path / "st") == f"sqlite:///{(tmp_path / 'st').resolve()}/mlflow.db"


def test_parent_and_child_runs_with_batched_step_metrics(tmp_path, local_uri, monkeypatch):
    spec = make_spec("local-sweep", tmp_path / "runs")
    sf = spec_file(tmp_path / "spec.yaml", "local-sweep", tmp_path / "runs")
    parent = runs.find_or_create_sweep_run(spec, sf, local_uri, "local-sweep-001")
    c = client.client(local_uri)
    run = c.get_run(parent)
    assert run.data.params["train.lambda_iso"] == "0.0001"
    assert run.data.tags["isosweep.sweep_id"] == "local-sweep-001"
    assert run.data.tags["isosweep.version"]
    assert {a.path for a in c.list_artifacts(parent, "spec")} == {"spec/spec.yaml", "spec/resolved_spec.yaml"}
    # artifacts sit next to the database, not in ./mlruns
    assert run.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())
    # resume: the same sweep id finds the same parent run
    assert runs.find_or_create_sweep_run(spec, sf, local_uri, "local-sweep-001") == parent

    child = runs.open_trial_run(local_uri, spec.experiment_name, parent, "trial_0001", {"lambda_iso": 1e-4, "p": 0.5})
    calls = []
    logger = step_metrics.StepLogger(local_uri, child, flush_every=10)
    real = logger._client.log_batch
    monkeypatch.setattr(logger._client, "log_batch", lambda *a, **k: (calls.append(len(k.get("metrics", []))), real(*a, **k))[1])
    for step in range(25):
        logger.log({"loss": 1.0 / (step + 1), "tr_ratio": 1.0 + step, "bad": float("nan")}, step)
    logger.close()
    assert calls == [20, 20, 10]  # three batched requests for 50 scalars, NaN dropped
    hist = c.get_metric_history(child, "loss")
    assert [m.step for m in hist] == list(range(25))
    child_run = c.get_run(child)
    assert child_run.data.tags["mlflow.parentRunId"] == parent
    assert child_run.data.tags["isosweep.trial_id"] == "trial_0001"


def test_retried_trial_reopens_its_run(tmp_path, local_uri):
    spec = make_spec("retry-sweep", tmp_path / "runs")
    parent = runs.find_or_create_sweep_run(spec, None, local_uri, "retry-1")
    first = runs.open_trial_run(local_uri, spec.experiment_name, parent, "t1", {"p": 0.5})
    runs.end_run(local_uri, first, "FAILED")
    again = runs.open_trial_run(local_uri, spec.experiment_name, parent, "t1", {"p": 0.5})
    assert again == first
    c = client.client(local_uri)
    assert c.get_run(again).info.status == "RUNNING"
    exp = c.get_experiment_by_name(spec.experiment_name).experiment_id
    children = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 1
    other = runs.open_trial_run(local_uri, spec.experiment_name, parent, "t2", {"p": 0.0})
    assert other != first


def test_crashed_trial_ends_failed(tmp_path, local_uri):
    spec = make_spec("crash-sweep", tmp_path / "runs")
    parent = runs.find_or_create_sweep_run(spec, None, local_uri, "crash-1")
    run_id = runs.open_trial_run(local_uri, spec.experiment_name, parent, "t1", {})
    with pytest.raises(RuntimeError, match="boom"):
        with runs.run_guard(local_uri, run_id):
            raise RuntimeError("boom")
    c = client.client(local_uri)
    assert c.get_run(run_id).info.status == "FAILED"
    ok = runs.open_trial_run(local_uri, spec.experiment_name, parent, "t2", {})
    with runs.run_guard(local_uri, ok):
        pass
    assert c.get_run(ok).info.status == "FINISHED"
    with pytest.raises(ValueError):
        runs.end_run(local_uri, ok, "DONE")


def test_registry_champion_pull_sample_interpolate(tmp_path, local_uri, monkeypatch):
    import mlflow
    from diffusers import DDPMPipeline

    spec = make_spec("reg-sweep", tmp_path / "runs")
    parent = runs.find_or_create_sweep_run(spec, None, local_uri, "reg-1")
    rows = []
    for i, fid in enumerate([10.0, 20.0]):
        rid = runs.open_trial_run(local_uri, spec.experiment_name, parent, f"t{i}", {"p": 0.5})
        ckpt = trial_checkpoint(tmp_path / f"ckpt{i}", f"t{i}", fid)
        artifacts.log_trial_result(local_uri, rid, ckpt)
        runs.end_run(local_uri, rid)
        # t1's checkpoint is not on this machine: registering it downloads the run's checkpoint/ artifacts
        where = str(ckpt) if i == 0 else "s3://elsewhere/t1/checkpoint_000002"
        rows.append({"trial_id": f"t{i}", "mlflow_run_id": rid, "fid": fid, "ppl": 40.0, "checkpoint_path": where})
    c = client.client(local_uri)
    r0 = c.get_run(rows[0]["mlflow_run_id"])
    assert r0.data.metrics["fid"] == 10.0 and r0.data.tags["backbone.fid"] == "domain-shapes-v1"
    assert len(c.get_metric_history(r0.info.run_id, "rtl_t")) == 4
    ckpt_files = {a.path for a in c.list_artifacts(r0.info.run_id, "checkpoint")}
    assert "checkpoint/train_state.pt" not in ckpt_files and "checkpoint/model_index.json" in ckpt_files
    assert {"eval/grid.png", "eval/rtl_curve.png"} <= {a.path for a in c.list_artifacts(r0.info.run_id, "eval")}

    versions = registry.register_sweep_models(local_uri, "isodiff-reg", rows[0], rows, rows)
    assert set(versions) == {rows[0]["mlflow_run_id"], rows[1]["mlflow_run_id"]}
    champ = c.get_model_version_by_alias("isodiff-reg", "champion")
    assert champ.run_id == rows[0]["mlflow_run_id"]
    assert champ.tags["pareto"] == "true" and "| fid |" in champ.description
    # a resumed sweep registering again reuses the versions
    assert registry.register_sweep_models(local_uri, "isodiff-reg", rows[0], rows, rows) == versions

    # what a user without isosweep does: MLFLOW_TRACKING_URI, download, DDPMPipeline / pyfunc
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_uri)
    dl = Path(mlflow.artifacts.download_artifacts("models:/isodiff-reg@champion", dst_path=str(tmp_path / "dl")))
    pipe = DDPMPipeline.from_pretrained(dl / registry.PIPELINE_SUBPATH)
    assert pipe.unet.config.sample_size == RES
    assert not (dl / registry.PIPELINE_SUBPATH / "train_state.pt").exists()
    model = mlflow.pyfunc.load_model("models:/isodiff-reg@champion")
    pngs = model.predict(None, params={"n": 2, "seed": 0, "steps": 2})  # one PNG per image (tests/test_serving.py: over HTTP)
    assert len(pngs) == 2 and all(Image.open(io.BytesIO(p)).size == (RES, RES) for p in pngs)
    assert model.predict({"n": 2, "seed": 0, "steps": 2}) == pngs  # the request as input fields
    assert {p.name for p in model.metadata.get_params_schema().params} == {"n", "seed", "seeds", "steps", "mode", "frames", "device",
                                                                         "t", "directions", "gammas", "iterations", "image"}

    # and where isosweep is not installed (the venv's editable finder dropped): the model imports the isosweep code
    # logged with it (registry.SERVED_CODE, under the model's code/), and samples and edits with it
    code = ("import sys, io; sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
            "try:\n    import isosweep\nexcept ImportError:\n    print('no isosweep installed')\n"
            "import mlflow; from PIL import Image\n"
            "m = mlflow.pyfunc.load_model('models:/isodiff-reg@champion')\n"
            "print([Image.open(io.BytesIO(p)).size for p in m.predict(None, params={'n': 1, 'seed': 3, 'steps': 1})])\n"
            "print(len(m.predict({'mode': 'edit', 'steps': 2, 't': 0, 'gammas': [1.0], 'iterations': 1})['images']), 'edit')\n"
            "import isosweep.core.editing as e; print(e.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": local_uri, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["no isosweep installed", f"[({RES}, {RES})]", "1 edit"], proc.stdout
    assert lines[3].endswith("/code/isosweep/core/editing.py") and str(Path(__file__).resolve().parents[1]) not in lines[3], lines[3]

    out = tmp_path / "pulled"
    ns = argparse.Namespace
    assert model_cmds.pull_command(ns(model_uri="models:/isodiff-reg@champion", out=str(out), tracking_uri=local_uri)) == 0
    assert (out / registry.PIPELINE_SUBPATH / "model_index.json").is_file()
    grid = tmp_path / "grid.png"
    assert model_cmds.sample_command(ns(model=str(out), n=4, steps=2, seed=0, out=str(grid), tracking_uri=None)) == 0
    pad = 2
    assert Image.open(grid).size == (2 * RES + 3 * pad, 2 * RES + 3 * pad)
    strip = tmp_path / "strip.png"
    for mode in ("slerp", "lerp"):
        assert model_cmds.interpolate_command(ns(model="models:/isodiff-reg@champion", seeds=[1, 2], frames=5, mode=mode, steps=2,
                                               out=str(strip), tracking_uri=local_uri)) == 0
        assert Image.open(strip).size == (5 * RES + 6 * pad, RES + 2 * pad)
        assert (tmp_path / "strip_distances.png").is_file()
        assert len(json.loads((tmp_path / "strip_distances.json").read_text())["values"]) == 4


def test_sync_uploads_what_storage_has(tmp_path, local_uri, capsys):
    storage = tmp_path / "runs"
    sweep_dir = storage / "sync-sweep-20261125-101010"
    # the sweep's layout: <storage>/<sweep id>/train/<trial id>/checkpoint_*/ (+ eval/ when final)
    trial_checkpoint(sweep_dir / "train" / "t1" / "checkpoint_000002", "t1", 11.0)
    t2 = trial_checkpoint(sweep_dir / "train" / "t2" / "checkpoint_000002", "t2", 22.0)
    (t2 / "trial_params.json").unlink()  # id from the folder name, params from spec.json as training writes it
    (t2 / "spec.json").write_text(json.dumps({"spec": {}, "trial_params": {"lambda_iso": 0.001, "p": 0.0}, "world_size": 1}))
    (sweep_dir / "train" / "t3" / "checkpoint_000001").mkdir(parents=True)  # unfinished: no eval, ignored
    spec = make_spec("sync-sweep", storage)
    sf = spec_file(tmp_path / "spec.yaml", "sync-sweep", storage)
    parent = runs.find_or_create_sweep_run(spec, sf, local_uri, sweep_dir.name)
    (sweep_dir / "isosweep_sweep.json").write_text(json.dumps({"sweep_id": sweep_dir.name, "parent_run_id": parent, "tracking_uri": local_uri}))
    # t1's run exists (the trial logged its params) but the final upload failed
    t1 = runs.open_trial_run(local_uri, spec.experiment_name, parent, "t1", {"p": 0.5})
    runs.end_run(local_uri, t1, "FAILED")

    args = argparse.Namespace(target=str(sf), overrides=[], tracking_uri=None, storage=str(storage))
    assert sync_cmd.sync_command(args) == 0
    assert "synced 2 of 2" in capsys.readouterr().out
    c = client.client(local_uri)
    exp = c.get_experiment_by_name("sync-sweep").experiment_id
    children = {r.data.tags["isosweep.trial_id"]: r for r in c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert set(children) == {"t1", "t2"} and children["t1"].info.run_id == t1
    for tid, fid in (("t1", 11.0), ("t2", 22.0)):
        r = children[tid]
        assert r.info.status == "FINISHED" and r.data.metrics["fid"] == fid
        assert any(a.path == "checkpoint/model_index.json" for a in c.list_artifacts(r.info.run_id, "checkpoint"))
        assert any(a.path == "eval/grid.png" for a in c.list_artifacts(r.info.run_id, "eval"))
    assert children["t2"].data.params["lambda_iso"] == "0.001"
    assert sync_cmd.sync_command(args) == 0
    assert "synced 0 of 2" in capsys.readouterr().out


WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def is_uploaded_weight(key: str) -> bool:
    return key.endswith((".safetensors", ".bin", ".pt"))


def checkpoint_artifact_on_disk(uri: str, run_id: str) -> Path:
    """Where the local store keeps a run's `checkpoint/` artifact: the files a cut-off upload leaves behind."""
    artifact_uri = client.client(uri).get_run(run_id).info.artifact_uri
    root = Path(urllib.parse.urlparse(artifact_uri).path if artifact_uri.startswith("file:") else artifact_uri)
    return root / artifacts.CHECKPOINT_ARTIFACT_PATH


def test_sync_uploads_a_cut_off_checkpoint_again(tmp_path, local_uri, capsys):
    """The run's checkpoint/ lost a file and another was cut off mid-way: sync sees it by names and sizes and
    uploads it again; the model then registers from the artifact alone."""
    storage = tmp_path / "runs"
    sweep_dir = storage / "repair-20261125-101010"
    trial_checkpoint(sweep_dir / "train" / "t1" / "checkpoint_000002", "t1", 11.0)
    spec = make_spec("repair", storage)
    sf = spec_file(tmp_path / "spec.yaml", "repair", storage)
    parent = runs.find_or_create_sweep_run(spec, sf, local_uri, sweep_dir.name)
    (sweep_dir / "isosweep_sweep.json").write_text(json.dumps({"sweep_id": sweep_dir.name, "parent_run_id": parent, "tracking_uri": local_uri}))
    args = argparse.Namespace(target=str(sf), overrides=[], tracking_uri=None, storage=str(storage))
    assert sync_cmd.sync_command(args) == 0
    c = client.client(local_uri)
    exp = c.get_experiment_by_name("repair").experiment_id
    (run,) = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    root = checkpoint_artifact_on_disk(local_uri, run.info.run_id)
    weights, scheduler = root / WEIGHTS, root / "scheduler" / "scheduler_config.json"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)  # the upload was cut off in the middle of the weights
    scheduler.unlink()  # and never reached the scheduler
    capsys.readouterr()

    assert sync_cmd.sync_command(args) == 0
    out = capsys.readouterr().out
    assert "synced 1 of 1" in out and "checkpoint" in out, out
    assert weights.stat().st_size == size and scheduler.is_file()
    row = {"trial_id": "t1", "mlflow_run_id": run.info.run_id, "fid": 11.0, "checkpoint_path": "s3://elsewhere/t1/checkpoint_000002"}
    registry.register_sweep_models(local_uri, "isodiff-repair", row, [row], [row])
    assert c.get_model_version_by_alias("isodiff-repair", "champion").run_id == run.info.run_id
    assert sync_cmd.sync_command(args) == 0
    assert "synced 0 of 1" in capsys.readouterr().out


def test_a_cut_off_checkpoint_is_never_registered_and_the_alias_stays(tmp_path, local_uri):
    """Registering a trial whose checkpoint/ artifact is partial is refused in one line naming the trial, the run,
    the file and the fix, and @champion stays on the version it was: checked by sizes when the checkpoint is on
    this machine, by sizes and sha256 of the download when it is not."""
    spec = make_spec("partial", tmp_path / "runs")
    parent = runs.find_or_create_sweep_run(spec, None, local_uri, "partial-1")
    rows = []
    for i in (0, 1):
        rid = runs.open_trial_run(local_uri, spec.experiment_name, parent, f"t{i}", {"p": 0.5})
        ckpt = trial_checkpoint(tmp_path / f"ckpt{i}", f"t{i}", 10.0 + i)
        artifacts.log_trial_result(local_uri, rid, ckpt)
        runs.end_run(local_uri, rid)
        rows.append({"trial_id": f"t{i}", "mlflow_run_id": rid, "fid": 10.0 + i, "checkpoint_path": str(ckpt)})
    c = client.client(local_uri)
    registry.register_sweep_models(local_uri, "isodiff-partial", rows[0], [], rows)
    before = c.get_model_version_by_alias("isodiff-partial", "champion").version
    t1 = rows[1]["mlflow_run_id"]
    weights = checkpoint_artifact_on_disk(local_uri, t1) / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # the upload was cut off

    def refused(row: dict) -> str:
        with pytest.raises(artifacts.CheckpointArtifactError) as err:
            registry.register_sweep_models(local_uri, "isodiff-partial", row, [row], [rows[0], row], sweep="runs/partial-1")
        assert c.get_model_version_by_alias("isodiff-partial", "champion").version == before
        assert not c.search_model_versions(f"name='isodiff-partial' and run_id='{t1}'")
        line = err.value.line("runs/partial-1")
        assert "\n" not in line and "trial t1" in line and t1 in line
        assert "`isosweep sync runs/partial-1` then `isosweep promote runs/partial-1 --trial t1`" in line
        return line

    assert f"{WEIGHTS} has {len(data) // 2} bytes, the manifest says {len(data)}" in refused(rows[1])
    elsewhere = {**rows[1], "checkpoint_path": "s3://elsewhere/t1/checkpoint_000002"}  # only the artifact to go by
    assert f"{WEIGHTS} has {len(data) // 2} bytes" in refused(elsewhere)
    weights.write_bytes(bytes(len(data)))  # the right size, other bytes
    assert f"the sha256 of {WEIGHTS} differs from the manifest's" in refused(elsewhere)


@pytest.mark.slow
def test_sync_from_a_sweep_in_s3_by_its_uri(tmp_path, local_uri, s3_server, monkeypatch, capsys):
    """`isosweep sync SWEEP_URI` from a machine that has only the S3 URI: the sweep is read from the bucket
    (endpoint-query form), its saved spec used, the missing runs created, and the temporary copy removed."""
    from isosweep import storage as st

    for k, v in s3_server.env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    port = s3_server.endpoint_url.rsplit(":", 1)[1]
    root = f"s3://{s3_server.bucket}/sync-test?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    local = tmp_path / "made-here" / "s3sync-20261126-101010"
    final = trial_checkpoint(local / "train" / "t1" / "checkpoint_000002", "t1", 11.0)
    (final / "train_state.pt").write_bytes(b"\0" * 4096)  # optimizer state: never uploaded, so its bytes are never read
    tiny_pipeline_dir(local / "train" / "t1" / "checkpoint_000001")  # an earlier step's: only its JSON is read
    spec = make_spec("s3sync", tmp_path)
    parent = runs.find_or_create_sweep_run(spec, None, local_uri, local.name)
    (local / "isosweep_sweep.json").write_text(json.dumps({"sweep_id": local.name, "parent_run_id": parent,
                                                           "tracking_uri": local_uri, "spec": spec.to_dict()}))
    sweep_uri = st.join(root, local.name)
    st.upload_dir(local, sweep_uri)
    import shutil

    shutil.rmtree(tmp_path / "made-here")
    args = argparse.Namespace(target=sweep_uri, overrides=[], tracking_uri=None, storage=None)
    key = f"sync-test/{local.name}/train/t1"
    seen = len(s3_server.fetched())
    assert sync_cmd.sync_command(args) == 0
    assert "synced 1 of 1" in capsys.readouterr().out
    read = s3_server.fetched()[seen:]
    assert f"{key}/checkpoint_000002/{WEIGHTS}" in read, read  # the run lacked the final checkpoint: fetched to upload it
    assert not [k for k in read if is_uploaded_weight(k) and not k.startswith(f"{key}/checkpoint_000002/unet/")], read
    c = client.client(local_uri)
    exp = c.get_experiment_by_name("s3sync").experiment_id
    children = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.data.tags["isosweep.trial_id"] for r in children] == ["t1"] and children[0].data.metrics["fid"] == 11.0
    seen = len(s3_server.fetched())
    assert sync_cmd.sync_command(args) == 0  # by name under the storage too, and nothing twice
    read = s3_server.fetched()[seen:]
    assert read and not [k for k in read if is_uploaded_weight(k)], read  # the records, not the weights of a complete run
    assert sync_cmd.sync_command(argparse.Namespace(target="s3sync", overrides=[], tracking_uri=None, storage=root)) == 0
    assert "synced 0 of 1" in capsys.readouterr().out
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("isosweep-sync-*/s3sync-*"))


# --------------------------------------------------------------------------------------- failures and secrets


def test_unreachable_server_clear_error(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    t0 = time.monotonic()
    with pytest.raises(client.TrackingError, match=f"{uri}.*after 3 attempt"):
        runs.open_trial_run(uri, "exp", "parent", "t1", {})
    assert time.monotonic() - t0 < 30
    logger = step_metrics.StepLogger(uri, "run", flush_every=1)
    with pytest.warns(RuntimeWarning, match="kept in memory"):
        logger.log({"loss": 1.0}, 0)  # a periodic flush fails: training goes on
    logger.log({"loss": 0.5}, 1)
    assert len(logger._buffer) == 2
    with pytest.raises(client.TrackingError, match=f"final flush of 2 .*{uri}"):
        logger.close()
    runs.end_run(uri, "run", "FAILED", quiet=True)  # warns, does not raise
    with pytest.raises(RuntimeError, match="boom"):  # run_guard keeps the trial's own error
        with runs.run_guard(uri, "run"):
            raise RuntimeError("boom")
    # inside `with`, a training error is not hidden by the tracking error
    with pytest.raises(ZeroDivisionError), pytest.warns(RuntimeWarning, match="final flush"):
        with step_metrics.StepLogger(uri, "run", flush_every=100) as steps:
            steps.log({"loss": 1.0}, 0)
            1 / 0


def test_scrub_rules(monkeypatch):
    assert redact.scrub("AWS_SECRET_ACCESS_KEY", "abc") == "***"
    assert redact.scrub("hub_token", "x") == "***"
    assert redact.scrub("db.password", "x") == "***"
    assert redact.scrub("base_model.source", "https://bob:pw@host/x") == "https://***@host/x"
    assert "hf_" not in redact.scrub_text("id hf_abcdefghijklmnopqrstuvwxyz123")
    assert "AKIA" not in redact.scrub_text("key AKIAABCDEFGHIJKLMNOP here")
    assert redact.scrub_text("s3://b/p?endpoint_override=h:1&X-Amz-Signature=deadbeef") == "s3://b/p?endpoint_override=h:1&X-Amz-Signature=***"
    assert redact.scrub("train.p", 0.5) == "0.5"
    assert redact.scrub_text("hub_token: abc123\nname: x") == "hub_token: ***\nname: x"
    assert redact.scrub_text('{"aws_secret_access_key": "abc", "p": 0.5}') == '{"aws_secret_access_key": "***", "p": 0.5}'
    assert redact.scrub_text("s3://b/p?endpoint_override=h:1&scheme=http") == "s3://b/p?endpoint_override=h:1&scheme=http"
    # a secret variable's value is scrubbed wherever it appears; the region (where, not who) is not
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert redact.scrub_text("s3://b/p?region=us-east-1 key s3cr3t-value-xyz") == "s3://b/p?region=us-east-1 key ***"


def test_no_secret_in_params_tags_or_spec_artifact(tmp_path, local_uri, monkeypatch):
    aws_secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    token = "hf_ZyXwVuTsRqPoNmLkJiHgFeDcBa0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    storage = f"s3://bucket/sweeps?endpoint_override=127.0.0.1:9000&secret_key={aws_secret}"
    source = f"https://alice:{token}@models.example.com/unet"
    spec = make_spec("secret-sweep", tmp_path / "runs", base_model={"source": source})
    sf = tmp_path / "spec.yaml"
    sf.write_text(f"name: secret-sweep\nbase_model:\n  source: {source}\nstorage:\n  path: {storage}\n")
    parent = runs.find_or_create_sweep_run(spec, sf, local_uri, "secret-1", storage_path=storage)
    child = runs.open_trial_run(local_uri, spec.experiment_name, parent, "t1", {"p": 0.5, "hub_token": token, "note": f"uses {aws_secret}"})
    c = client.client(local_uri)
    texts = []
    for rid in (parent, child):
        r = c.get_run(rid)
        texts += list(r.data.params.values()) + list(r.data.tags.values())
    dl = Path(client.retry_call("dl", local_uri, __import__("mlflow").artifacts.download_artifacts,
                                  run_id=parent, artifact_path="spec", dst_path=str(tmp_path / "dl"), tracking_uri=local_uri))
    texts += [p.read_text() for p in dl.iterdir()]
    blob = "\n".join(texts)
    assert "models.example.com" in blob  # the field is there, its credentials are not
    assert aws_secret not in blob and token not in blob and "alice" not in blob


# --------------------------------------------------------------------------------------- S3 integration


@pytest.mark.slow
def test_s3_artifacts_through_mlflow_server(tmp_path, mlflow_server, monkeypatch):
    """Real servers: parent + child run, step metrics, checkpoint and PNGs, registry; objects in the bucket."""
    import mlflow
    from diffusers import DDPMPipeline

    uri = mlflow_server.uri
    spec = make_spec("s3-sweep", tmp_path / "runs")
    sf = spec_file(tmp_path / "spec.yaml", "s3-sweep", tmp_path / "runs")
    parent = runs.find_or_create_sweep_run(spec, sf, uri, "s3-sweep-1")
    child = runs.open_trial_run(uri, spec.experiment_name, parent, "t1", {"lambda_iso": 1e-4, "p": 0.5, "iso_metric": "identity"})
    with step_metrics.StepLogger(uri, child, flush_every=5) as steps:
        for step in range(12):
            steps.log({"loss": 1.0 / (step + 1)}, step)
    ckpt = trial_checkpoint(tmp_path / "ckpt", "t1")
    artifacts.log_trial_result(uri, child, ckpt)
    runs.end_run(uri, child)
    version = registry.log_and_register(uri, child, ckpt, "isodiff-s3", alias="champion", tags={"pareto": "true"}, description="fid 12.5")
    artifacts.log_sweep_summary(uri, parent, pareto_png=ckpt / "eval" / "grid.png", champion_run_id=child)
    runs.end_run(uri, parent)

    keys = mlflow_server.s3.keys("mlflow/")
    run_keys = [k for k in keys if f"/{child}/" in k]
    assert any(k.endswith("checkpoint/unet/diffusion_pytorch_model.safetensors") for k in run_keys), keys
    assert any(k.endswith("eval/grid.png") for k in run_keys) and any(k.endswith("eval/strip_slerp.png") for k in run_keys)
    assert not any(k.endswith("train_state.pt") for k in keys)
    assert any(k.endswith("artifacts/pipeline/unet/diffusion_pytorch_model.safetensors") for k in keys)  # the logged model
    assert any(f"/{parent}/" in k and k.endswith("results/grid.png") for k in keys)

    c = client.client(uri)
    assert len(c.get_metric_history(child, "loss")) == 12
    assert c.get_run(child).info.status == "FINISHED"
    assert c.get_model_version_by_alias("isodiff-s3", "champion").version == version
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # all a client needs: the server proxies S3
    dl = Path(mlflow.artifacts.download_artifacts("models:/isodiff-s3@champion", dst_path=str(tmp_path / "dl")))
    assert DDPMPipeline.from_pretrained(dl / registry.PIPELINE_SUBPATH).unet.config.sample_size == RES


def test_client_side_s3_artifact_location(tmp_path, local_uri, s3_server, monkeypatch):
    """No tracking server: a SQLite store with an experiment whose artifact location is s3://..."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    spec = make_spec("client-s3", tmp_path / "runs")
    location = f"s3://{s3_server.bucket}/client-side"
    parent = runs.find_or_create_sweep_run(spec, None, local_uri, "client-s3-1", artifact_location=location)
    child = runs.open_trial_run(local_uri, spec.experiment_name, parent, "t1", {"p": 0.5})
    artifacts.log_trial_result(local_uri, child, trial_checkpoint(tmp_path / "ckpt", "t1"))
    runs.end_run(local_uri, child)
    keys = s3_server.keys("client-side/")
    assert any(k.endswith(f"{child}/artifacts/checkpoint/unet/diffusion_pytorch_model.safetensors") for k in keys), keys
    assert any(k.endswith(f"{child}/artifacts/eval/grid.png") for k in keys)
    assert any(k.endswith(f"{parent}/artifacts/spec/resolved_spec.yaml") for k in keys)


@pytest.mark.slow
def test_a_create_whose_response_is_lost_is_not_duplicated(mlflow_server):
    """A trial run created on a real `mlflow server` through a proxy that loses the
    first create's response: the retry finds what the lost call created instead of creating it twice."""
    direct = client.client(mlflow_server.uri)
    proxy = LosingProxy(mlflow_server.uri, ("/runs/create",), lose=1)
    try:
        parent = runs.find_or_create_sweep_run(make_spec("lost-response", Path("/tmp/unused")), None, mlflow_server.uri, "lost-1")
        exp = direct.get_experiment_by_name("lost-response").experiment_id
        run_id = runs.open_trial_run(proxy.uri, exp, parent, "t1", {"p": 0.5})
        assert len(proxy.lost) == 1, proxy.lost
        children = direct.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
        assert [r.info.run_id for r in children] == [run_id], "the lost create was repeated"
    finally:
        proxy.close()


@pytest.mark.slow
def test_no_password_reaches_stdout_from_a_real_server(mlflow_server, tmp_path, monkeypatch, capfd):
    """MLflow prints "View run NAME at: URL" when a run ends, the URL built from the tracking URI: through a URI
    with `user:password@` (which the server, without auth, ignores) the link is not printed, through a plain URI
    it is. `isosweep validate` of a `runs:/` base model at that URI names the server scrubbed."""
    from isosweep.cli import main
    from isosweep.tracking.tracker import Tracker

    var = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    monkeypatch.setenv(var, "false")
    monkeypatch.delenv(var)  # unset now, and unset again after the test
    plain = mlflow_server.uri
    secret = plain.replace("http://", "http://user:SECRETPW@")
    parent = runs.find_or_create_sweep_run(make_spec("run-links", tmp_path), None, plain, "links-1")
    exp = client.client(plain).get_experiment_by_name("run-links").experiment_id
    first = runs.open_trial_run(plain, exp, parent, "t1")
    capfd.readouterr()
    Tracker(plain).end_run(first)
    assert f"View run t1 at: {plain}/#/experiments/{exp}/runs/{first}" in capfd.readouterr().out  # the link stays
    assert var not in os.environ

    second = runs.open_trial_run(secret, exp, parent, "t2")
    Tracker(secret).end_run(second)
    out, err = capfd.readouterr()
    assert "SECRETPW" not in out + err and "View run" not in out
    assert client.client(plain).get_run(second).info.status == "FINISHED"

    (tmp_path / "model" / "unet").mkdir(parents=True)
    (tmp_path / "model" / "unet" / "config.json").write_text("{}")
    client.client(plain).log_artifacts(second, str(tmp_path / "model"), "model")
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: links\nbase_model:\n  source: runs:/{second}/model\nstorage:\n  path: {tmp_path / 'runs'}\n")
    assert main(["validate", str(path), "--tracking-uri", secret]) == 0
    out, err = capfd.readouterr()
    assert "SECRETPW" not in out + err and f"at {plain.replace('http://', 'http://***@')}" in err


# ----------------------------------------------------------------------------------------------------
# Tracker: the one door the sweep, its trials and the commands use


def test_tracker_best_effort_warns_once_with_where_the_data_is_and_returns_what_the_call_gave(local_uri, capsys):
    """On a reachable store the call's value comes back (`ok` stands in for a None result); on a dead one the
    retries run out, nothing is raised, and one warning line names the step, the (scrubbed) server and where
    the data is safe."""
    from isosweep.tracking.tracker import Tracker

    live = Tracker(local_uri)
    run_id = live.best_effort("opening a run", "safe", live.open_trial_run, "exp", "parent0", "trial0", {"lambda_iso": 0.1})
    assert run_id and live.find_trial_run("exp", "parent0", "trial0").info.run_id == run_id
    assert live.best_effort("logging", "safe", live.log_final_metrics, run_id, {"fid": 3.0}, ok=True) is True
    assert capsys.readouterr().out == ""

    dead = Tracker(f"http://user:secret@127.0.0.1:{free_port()}")
    assert "secret" not in repr(dead)
    assert dead.best_effort("logging the costs", "they are in storage", dead.log_final_metrics, run_id, {"fid": 1.0}, ok=True) is None
    out = capsys.readouterr().out
    assert out.count("warning: logging the costs failed (") == 1 and out.rstrip().endswith("; they are in storage")
    assert "secret" not in out and "127.0.0.1" in out
    with pytest.raises(ValueError):  # only tracking failures are best effort: a bug still raises
        live.best_effort("ending", "safe", live.end_run, run_id, "DONE")


def test_tracker_waits_for_the_sweep_run_then_stops_saying_nothing_was_trained(tmp_path, capsys):
    """At a sweep's start an unreachable store is polled until the wait runs out; then the error says how
    long it waited and that nothing was trained, so the same command can simply run again."""
    from isosweep.tracking.client import TrackingError
    from isosweep.tracking.tracker import Tracker

    dead = Tracker(f"http://127.0.0.1:{free_port()}")
    spec = make_spec("waiting", tmp_path)
    with pytest.raises(TrackingError, match=r"Waited \d+ s at the sweep's start .*nothing was trained"):
        dead.open_sweep_run(spec, None, "waiting-1", str(tmp_path), wait_s=2.5, poll_s=1.0)
    assert "waiting for MLflow at http://127.0.0.1" in capsys.readouterr().out


def test_refusals_are_told_apart_from_outages_on_real_mlflow_errors(local_uri, monkeypatch, capsys):
    """`client.failure_kind` on what MLflow really raises: a gateway's 401 and 403 (plain text, as an expired token
    gets) are AUTH; a JSON RESOURCE_DOES_NOT_EXIST 404, a bare 404, and a run deleted in a real store are MISSING;
    503 and 429 are TRANSIENT. A refusal is asked once (never retried); a StepLogger that meets one drops its
    buffer, says so in one line naming the scrubbed URI and the fix, and sends nothing more, its final flush included."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("ISOSWEEP_TRACKING_RETRIES", "3")
    monkeypatch.setenv("ISOSWEEP_TRACKING_BACKOFF_S", "0.01")
    proxy = LosingProxy("http://127.0.0.1:9")  # answers every request itself: nothing behind it
    uri = proxy.uri.replace("://", "://isosweep:pw-SECRET-0x5eed@")
    try:
        cases = [(401, b"Unauthorized", client.AUTH), (403, b"Forbidden", client.AUTH),
                 (404, json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Run 'x' not found"}).encode(), client.MISSING),
                 (404, b"Not Found", client.MISSING), (503, b"", client.TRANSIENT), (429, b"Too Many Requests", client.TRANSIENT)]
        for status, body, kind in cases:
            proxy.status, proxy.body, proxy.after = status, body, []
            proxy.trigger = (lambda *_: True, lambda _: None)
            with pytest.raises((MlflowException, client.TrackingError)) as err:
                client.retry_call("get run", uri, client.client(uri).get_run, "0123abcd")
            cause = err.value.__cause__ if isinstance(err.value, client.TrackingError) else err.value
            assert isinstance(cause, MlflowException) and client.failure_kind(cause) == kind, (status, cause)
            assert len(proxy.after) == (3 if kind == client.TRANSIENT else 1), (status, proxy.after)  # refusals: not retried
            assert client.refusal(err.value) == (None if kind == client.TRANSIENT else kind)

        proxy.status, proxy.after = 401, []
        proxy.trigger = (lambda *_: True, lambda _: None)
        logger = step_metrics.StepLogger(uri, "0123abcd", flush_every=2)
        for step in range(6):
            logger.log({"loss": 0.5}, step)
        logger.close()  # no raise: the refusal stopped tracking for this run
        assert logger.stop.kind == client.AUTH and len(proxy.after) == 1, proxy.after
        out = capsys.readouterr().out
        assert out.count("tracking stops for run 0123abcd") == 1 and "renew the token" in out and "isosweep sync" in out, out
        assert "pw-SECRET" not in out and proxy.uri.split("//")[1] in out
    finally:
        proxy.close()

    c = MlflowClient(local_uri)  # a run deleted in a real store: MLflow answers INVALID_PARAMETER_VALUE, "deleted"
    run = c.create_run(c.create_experiment("deleted"))
    c.delete_run(run.info.run_id)
    with pytest.raises(MlflowException) as err:
        client.retry_call("log step metrics", local_uri, c.log_param, run.info.run_id, "p", 1)
    assert client.failure_kind(err.value) == client.MISSING
    with pytest.raises(MlflowException) as err:
        c.log_param("not-a-run", "p", 1)
    assert client.failure_kind(err.value) == client.MISSING
    with pytest.raises(MlflowException) as err:
        c.log_param(c.create_run(c.get_experiment_by_name("deleted").experiment_id).info.run_id, "p" * 300, 1)
    assert client.failure_kind(err.value) == client.INVALID  # a bad request stays an error, not a refusal
