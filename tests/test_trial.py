"""Ray Train trials (slow): a 2-worker gloo run with a killed worker that resumes, and DDP gradients.

Kept to one TorchTrainer run (worker start-up costs ~30 s per attempt on 2 CPU cores) plus one
2-process torch.distributed check without Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel

from isosweep.models.builtin import default_scheduler
from isosweep.spec import spec_from_dict

pytestmark = pytest.mark.slow


def _tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)


@pytest.fixture(scope="module")
def ray_local():
    """An embedded Ray whose workers hold the (dummy) credentials of the loopback S3 server."""
    import ray
    from support.servers import DUMMY_AWS

    before = {k: os.environ.get(k) for k in DUMMY_AWS}
    os.environ.update(DUMMY_AWS)  # workers inherit the environment Ray starts with
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _raytest_spec(base, **train):
    return spec_from_dict({
        "name": "raytest", "base_model": {"source": str(base)},
        "dataset": {"kind": "shapes", "size": 64, "resolution": 8},
        "train": {"lambda_iso": 0.1, "p": 0.5, "global_batch_size": 4, "max_steps": 4, "checkpoint_every": 2,
                  "report_every": 1, "ema_decay": 0.9, "learning_rate": 1e-3, **train},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
        "search": {"max_failures": 1},
    })


@contextlib.contextmanager
def _train_state_tracking(monkeypatch):
    """Ray Train's record of each worker's world rank and PID (what its dashboard shows), for the fits started
    inside. Its actor is started here without the liveness checks that need the dashboard (off here), and
    removed after, so the module's other runs go without it."""
    import ray
    from ray.train.v2._internal.state.state_actor import get_or_create_state_actor  # private; its records are DeveloperAPI

    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # read by fit(), in this process
    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
    actor = get_or_create_state_actor()
    try:
        yield actor
    finally:
        ray.kill(actor, no_restart=True)


def _train_worker_pids(state_actor, run_name: str) -> dict[int, int]:
    """World rank -> PID of the live workers of `run_name`'s running attempt; {} until they run. (The state API's
    actor list has the PIDs, but not the ranks.)"""
    import ray

    runs, attempts = ray.get([state_actor.get_train_runs.remote(), state_actor.get_train_run_attempts.remote()])
    for run_id, run in runs.items():
        for attempt in (attempts.get(run_id) or {}).values():
            if run.name == run_name and attempt.status == "RUNNING":
                return {w.world_rank: w.pid for w in attempt.workers if w.status in (None, "ALIVE")}
    return {}


def _kill_rank_once_checkpointed(state_actor, run_dir: Path, run_name: str, rank: int, stop: threading.Event, out: dict) -> None:
    """SIGKILL the `rank` worker of `run_name` once Ray Train has registered a checkpoint of it (the snapshot
    file appears when it does), as a crash or the OOM killer would; records the PID and the step of every
    complete checkpoint in `run_dir` at that moment."""
    from isosweep.training.checkpoint import load_train_state

    deadline = time.monotonic() + 300
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            if (run_dir / "checkpoint_manager_snapshot.json").exists() and rank in (pids := _train_worker_pids(state_actor, run_name)):
                steps = []
                for c in run_dir.glob("checkpoint_*"):
                    with contextlib.suppress(Exception):  # one being written, or removed, is not complete
                        steps.append(load_train_state(c)["step"])
                os.kill(pids[rank], signal.SIGKILL)
                out.update(pid=pids[rank], steps=sorted(steps))
                return
            time.sleep(0.1)
        out["error"] = "no checkpoint registered, or no worker found, before the run ended or 300 s passed"
    except Exception as exc:  # reported by the test
        out["error"] = repr(exc)


def test_two_worker_trial_survives_a_killed_worker(ray_local, tmp_path, monkeypatch):
    """2 gloo workers on shapes, run as a sweep's trial runs them (`fit_with_one_budget`, Train's own retries
    off): rank 1's process SIGKILLed once a checkpoint is registered is an infrastructure failure, retried
    once from the latest registered checkpoint (not from scratch), under the one budget; the final
    checkpoint is a loadable pipeline. 40 steps, a checkpoint every 4: the kill lands mid-run."""
    from isosweep import storage as st
    from isosweep.sweep.trainer import build_trainer
    from isosweep.sweep.trial import fit_with_one_budget
    from isosweep.training.checkpoint import load_train_state

    base = tmp_path / "base"
    DDPMPipeline(unet=_tiny_unet(), scheduler=default_scheduler()).save_pretrained(base)
    spec = _raytest_spec(base, max_steps=40, checkpoint_every=4, report_every=4)
    attempts: list[int] = []

    def make_trainer():
        attempts.append(1)
        return build_trainer(spec, run_name="trial-test", storage_path=str(tmp_path / "storage"),
                             trial_params={"lambda_iso": 0.2, "baseline": False}, max_failures=0,
                             extra_config={"verbose": False})

    record = str(tmp_path / "attempts.json")
    stop, killed = threading.Event(), {}
    run_dir = tmp_path / "storage" / "trial-test"
    with _train_state_tracking(monkeypatch) as state_actor:
        killer = threading.Thread(target=_kill_rank_once_checkpointed, args=(state_actor, run_dir, "trial-test", 1, stop, killed))
        killer.start()
        try:
            result = fit_with_one_budget(make_trainer, "trial-test", spec.search.max_failures, record)
        finally:
            stop.set()
            killer.join()
    assert "pid" in killed, killed
    assert result.error is None and len(attempts) == 2  # one failure, one retry: the budget of 1
    assert st.read_json(record) == {"session": 0, "starts": 1, "failures": 1, "last_error": st.read_json(record)["last_error"]}
    m = result.metrics
    assert m["step"] == 40 and np.isfinite(m["loss"]) and np.isfinite(m["dsm_loss"])
    with result.checkpoint.as_directory() as d:
        state = load_train_state(d)
        # restarted once, from a checkpoint (every 4 steps) no older than the oldest complete when rank 1 died mid-run
        assert state["step"] == 40 and len(state["resumed_at"]) == 1, state["resumed_at"]
        resumed = state["resumed_at"][0]
        assert killed["steps"] and killed["steps"][-1] < 40, killed
        assert killed["steps"][0] <= resumed < 40 and resumed % 4 == 0, (resumed, killed)
        assert state["ema"]["num_updates"] == 40
        pipe = DDPMPipeline.from_pretrained(d)
        unet = UNet2DModel.from_pretrained(os.path.join(d, "unet"))
        assert isinstance(pipe.unet, UNet2DModel) and unet.config.sample_size == 8
        saved = json.loads(open(os.path.join(d, "spec.json")).read())
        assert saved["spec"]["train"]["lambda_iso"] == 0.2 and saved["world_size"] == 2


def test_a_deterministic_error_fails_the_trial_at_once(ray_local, tmp_path):
    """A learning rate that makes the loss non-finite fails the same way every time: one attempt, not
    (max_failures + 1)^2; the error names the cause, and a restart of the trial (Tune's) fails at once
    without training again. A resume (a new session) gets a fresh budget."""
    from isosweep import storage as st
    from isosweep.sweep.trainer import build_trainer
    from isosweep.sweep.trial import DeterministicTrialError, fit_with_one_budget

    base = tmp_path / "base"
    DDPMPipeline(unet=_tiny_unet(), scheduler=default_scheduler()).save_pretrained(base)
    spec = _raytest_spec(base, learning_rate=1e30, max_steps=3)
    attempts: list[int] = []

    def make_trainer():
        attempts.append(1)
        return build_trainer(spec, run_name="nan-test", storage_path=str(tmp_path / "storage"), max_failures=0,
                             trial_params={"lambda_iso": 0.1, "baseline": False}, extra_config={"verbose": False})

    record = str(tmp_path / "attempts.json")
    with pytest.raises(DeterministicTrialError, match="NonFiniteLossError") as err:
        fit_with_one_budget(make_trainer, "nan-test", budget=2, attempts_uri=record)
    assert len(attempts) == 1 and "not retried" in str(err.value)
    with pytest.raises(DeterministicTrialError):  # Tune restarts the trial: it fails at once
        fit_with_one_budget(make_trainer, "nan-test", budget=2, attempts_uri=record)
    assert len(attempts) == 1
    assert st.read_json(record)["deterministic"].startswith("trial nan-test failed with NonFiniteLossError")
    assert _fresh_session_trains_again(make_trainer, record, attempts)


def test_s3_server_stopped_during_a_checkpoint_upload(ray_local, tmp_path, s3_server):
    """The S3 endpoint dies in the middle of uploading the trial's third checkpoint (after two of its
    files went through) and comes back 30 s later: longer than Ray's own upload retries (3 attempts of
    pyarrow's ~6 s, about 20 s; an 8 s outage is absorbed by them in one attempt). The failed upload is
    an infrastructure failure: the trial is retried under its budget and resumes from the last checkpoint
    that was registered, not from scratch; the partial upload is never used, and the final checkpoint
    verifies against its manifest."""
    from support.servers import StoppableTcpProxy

    from isosweep.sweep.trainer import build_trainer
    from isosweep.sweep.trial import fit_with_one_budget
    from isosweep.training.checkpoint import load_train_state

    base = tmp_path / "base"
    DDPMPipeline(unet=_tiny_unet(), scheduler=default_scheduler()).save_pretrained(base)
    spec = _raytest_spec(base, max_steps=6)
    proxy = StoppableTcpProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]))
    storage = f"s3://{s3_server.bucket}/trial-outage?endpoint_override=127.0.0.1:{proxy.port}&scheme=http&region=us-east-1"
    folders: list[str] = []  # the checkpoint folders uploads went into, in order

    def into_third_checkpoint(line: bytes) -> bool:
        m = re.match(rb"PUT \S*/trial-outage/s3-test/(checkpoint_[^/]+)/", line)
        if not m:
            return False
        if m.group(1).decode() not in folders:
            folders.append(m.group(1).decode())
        return len(folders) == 3 and m.group(1).decode() == folders[2]

    proxy.stop_on(into_third_checkpoint, nth=3, down_s=30.0)  # before the third file of that upload
    attempts: list[int] = []

    def make_trainer():
        attempts.append(1)
        return build_trainer(spec, run_name="s3-test", storage_path=storage, trial_params={"lambda_iso": 0.2, "baseline": False},
                             max_failures=0, extra_config={"verbose": False})

    try:
        result = fit_with_one_budget(make_trainer, "s3-test", budget=3, attempts_uri=str(tmp_path / "attempts.json"))
        assert proxy.stops and "/checkpoint_" in proxy.stops[0], proxy.stops
        assert result.error is None and len(attempts) >= 2, attempts  # the upload failed the attempt; a retry finished
        with result.checkpoint.as_directory() as d:
            state = load_train_state(d)  # verifies the manifest's sizes and checksums
    finally:
        proxy.close()
    assert state["step"] == 6 and state["resumed_at"] and state["resumed_at"][0] in (2, 4), state["resumed_at"]


def _fresh_session_trains_again(make_trainer, record, attempts) -> bool:
    from isosweep.sweep.trial import DeterministicTrialError, fit_with_one_budget

    with pytest.raises(DeterministicTrialError):
        fit_with_one_budget(make_trainer, "nan-test", budget=2, attempts_uri=record, session=1)
    return len(attempts) == 2


# ---------------------------------------------------------------- DDP gradients == one process


def _batch():
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([600, 750, 900, 999])
    return x0, noise, t


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from isosweep.core.losses import IsoDiffusionLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    unet = _tiny_unet()
    ddp = torch.nn.parallel.DistributedDataParallel(unet)
    x0, noise, t = _batch()
    sl = slice(2 * rank, 2 * rank + 2)
    loss_fn = IsoDiffusionLoss(lambda_iso=0.5, p=0.5, iso_metric="stereographic", reduction="global")
    out = loss_fn(ddp, unet, x0[sl], t[sl], noise[sl], True, default_scheduler().alphas_cumprod,
                  generator=torch.Generator().manual_seed(100 + rank))
    out.loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in unet.named_parameters()}, os.path.join(out_dir, "ddp_grads.pt"))
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    """2 gloo ranks x 2 samples (global isometry ratio) == one process on the 4-sample batch."""
    import torch.multiprocessing as mp

    from isosweep.core.geometry import isometry_ratio, isometry_terms
    from isosweep.core.hspace import encoder_at
    from isosweep.core.losses import add_noise, dsm_loss

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ddp_grads = torch.load(tmp_path / "ddp_grads.pt")

    # reference: the same four samples and probes in one process, ratio of the means over all four
    unet = _tiny_unet()
    x0, noise, t = _batch()
    xt = add_noise(x0, noise, t, default_scheduler().alphas_cumprod)
    terms = [isometry_terms(encoder_at(unet, t[sl]), xt[sl], "stereographic", generator=torch.Generator().manual_seed(100 + r))
             for r, sl in enumerate((slice(0, 2), slice(2, 4)))]
    tr_r, tr_r2 = torch.cat([a for a, _ in terms]), torch.cat([b for _, b in terms])
    loss = dsm_loss(unet, xt, t, noise) + 0.5 * isometry_ratio(tr_r, tr_r2, reduction="local")
    loss.backward()
    for name, p in unet.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_a_full_evaluation_of_a_truncated_checkpoint_fails_alone_and_a_rerun_does_only_it(ray_local, tmp_path):
    """evaluation.screening's second phase (`sweep.full_eval`), on real checkpoints in storage and real Train runs:
    a contender whose final checkpoint was truncated fails its full evaluation (manifest check) and only its row
    turns ERROR, while the other gets the full numbers and a record in storage; once the file is back, running
    the phase again (what `isosweep resume` does) evaluates only the one that failed. A sweep stopped while a trial
    still ran (or before all were started) starts no full evaluation: that waits for the resume."""
    import shutil

    from isosweep.core.ema import EMA
    from isosweep.evaluation.features.resolver import load_feature_networks
    from isosweep.results.layout import FULL_EVAL_FILE
    from isosweep.sweep.full_eval import run_full_protocol
    from isosweep.training.checkpoint import save_checkpoint

    spec = spec_from_dict({
        "name": "promote", "base_model": {"source": str(tmp_path)}, "dataset": {"kind": "shapes", "size": 64, "resolution": 8},
        "evaluation": {"metrics": ["fid", "ppl"], "batch_size": 8, "backbone": "domain", "cache_dir": str(tmp_path / "cache"),
                       "fid": {"num_samples": 8, "ddim_steps": 1, "reference_samples": 32}, "ppl": {"num_samples": 4, "ddim_steps": 1},
                       "bootstrap": {"resamples": 200}, "screening": {"fid": {"num_samples": 4, "ddim_steps": 1},
                                                                      "ppl": {"num_samples": 2, "ddim_steps": 1}}},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1}, "search": {"max_failures": 0},
    }, check_paths=False)
    load_feature_networks(spec.evaluation, spec.dataset, needs=("fid", "ppl"), progress=False)  # cached, as the driver does
    storage = tmp_path / "train"
    rows = []
    for i, tid in enumerate(("base0000", "trial001")):
        unet = _tiny_unet(seed=i)
        ckpt = save_checkpoint(storage / tid / "checkpoint_final", unet, EMA(unet, 0.9), default_scheduler(), {"step": 3}, {})
        rows.append({"trial_id": tid, "baseline": i == 0, "status": "DONE", "fidelity": "screen", "mlflow_run_id": "",
                     "checkpoint_path": str(ckpt), "fid": 10.0 + i, "fid_lo": 5.0, "fid_hi": 20.0, "ppl": 3.0, "ppl_lo": 1.0, "ppl_hi": 9.0})
    weights = next((storage / "trial001" / "checkpoint_final" / "unet").glob("*.safetensors"))
    kept = tmp_path / "kept.safetensors"
    shutil.copy(weights, kept)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated, as by a cut-off upload

    # stopped (Ctrl-C, SIGTERM) while a trial still ran, or before one started: no full evaluation starts
    stopped = [dict(r) for r in rows]
    stopped[1]["status"] = "RUNNING"
    for partial, planned in ((stopped, 2), ([dict(r) for r in rows], 3)):
        assert run_full_protocol(spec, str(storage), partial, None, concurrency=2, planned=planned) == []
        assert [r["fidelity"] for r in partial] == ["screen", "screen"] and not list(storage.glob(f"*/{FULL_EVAL_FILE}"))

    first = [dict(r) for r in rows]
    assert run_full_protocol(spec, str(storage), first, None, concurrency=2, planned=2) == ["trial001"]
    assert [r["status"] for r in first] == ["DONE", "ERROR"] and [r["fidelity"] for r in first] == ["full", "screen"]
    record = json.loads((storage / "base0000" / FULL_EVAL_FILE).read_text())
    assert np.isfinite(record["metrics"]["fid"]) and np.isfinite(record["metrics"]["ppl"])
    assert record["settings"]["fidelity"] == "full" and record["settings"]["fid"]["num_samples"] == 8
    assert (first[0]["fid"], first[0]["screen_fid"]) == (record["metrics"]["fid"], 10.0)
    assert not (storage / "trial001" / FULL_EVAL_FILE).exists()

    shutil.copy(kept, weights)  # the file is back
    again = [dict(r) for r in rows]
    assert run_full_protocol(spec, str(storage), again, None, concurrency=2, planned=2) == []
    assert [r["status"] for r in again] == ["DONE", "DONE"] and [r["fidelity"] for r in again] == ["full", "full"]
    assert json.loads((storage / "base0000" / FULL_EVAL_FILE).read_text()) == record  # not evaluated twice


def _first_step_metrics(method: str, path: str, body: bytes) -> bool:
    """The first flush of the trial's step metrics (step 50 of 60): mid-training."""
    return path.split("?")[0].endswith("/runs/log-batch") and re.search(rb'"metrics":\s*\[\s*\{', body) is not None


# "run_deleted" (the run deleted through the MLflow client mid-training) also works here, and takes the same path once
# classified; it is left out of the suite to save three minutes of CI: a deleted run's classification on a real store is
# test_tracking.py's test_refusals_are_told_apart_from_outages_on_real_mlflow_errors
@pytest.mark.parametrize("fault", ["token_expired"])
def test_a_trial_whose_tracking_mlflow_refuses_mid_training_finishes_done(ray_local, tmp_path, mlflow_server, fault):
    """A sweep's trial (its Tune function and Train worker) tracking to a real `mlflow server` through a proxy: at
    the first step-metric flush, mid-training, the proxy starts answering 401 (an expired token). The trial still
    trains to the end, is evaluated and reports DONE with its checkpoint and `tracking_pending` (which the sweep's
    sync recovers); after the refused request no other request reaches MLflow for it, and one warning line names the
    scrubbed server, the refusal and the fix."""
    from mlflow import MlflowClient
    from ray import tune
    from support.servers import LosingProxy

    from isosweep.evaluation.features.resolver import load_feature_networks
    from isosweep.sweep.trial import make_trial_fn
    from isosweep.tracking import runs

    base = tmp_path / "base"
    DDPMPipeline(unet=_tiny_unet(), scheduler=default_scheduler()).save_pretrained(base)
    spec = spec_from_dict({
        "name": "refused", "base_model": {"source": str(base)}, "dataset": {"kind": "shapes", "size": 64, "resolution": 8},
        "train": {"global_batch_size": 4, "max_steps": 60, "checkpoint_every": 30, "report_every": 1, "learning_rate": 1e-3},
        "evaluation": {"metrics": ["fid", "ppl"], "batch_size": 8, "backbone": "domain", "cache_dir": str(tmp_path / "cache"),
                       "fid": {"num_samples": 8, "ddim_steps": 1, "reference_samples": 32}, "ppl": {"num_samples": 4, "ddim_steps": 1},
                       "bootstrap": {"resamples": 200}},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1}, "search": {"max_failures": 0},
        "tracking": {"experiment": f"refused-{fault}"},
    })
    load_feature_networks(spec.evaluation, spec.dataset, needs=("fid", "ppl"), progress=False)  # cached, as the driver does
    password = "pw-SECRET-0x5eed"
    proxy = LosingProxy(mlflow_server.uri)
    uri = proxy.uri.replace("://", f"://isosweep:{password}@")
    if fault == "token_expired":
        proxy.trigger = (_first_step_metrics, lambda body: setattr(proxy, "status", 401))
    else:
        proxy.trigger = (_first_step_metrics, lambda body: MlflowClient(mlflow_server.uri).delete_run(json.loads(body)["run_id"]))
    parent = runs.find_or_create_sweep_run(spec, None, mlflow_server.uri, f"sweep-{fault}", storage_path=str(tmp_path))
    sweep = {"tracking_uri": uri, "parent_run_id": parent, "train_storage": str(tmp_path / "train"), "session": 0,
             "sweep_id": f"sweep-{fault}", "sweep_uri": str(tmp_path / "sweep")}
    try:
        tuner = tune.Tuner(tune.with_resources(make_trial_fn(spec.to_dict(), sweep), {"CPU": 0, "memory": 2**20}),
                           param_space={"lambda_iso": 0.1, "baseline": False},
                           tune_config=tune.TuneConfig(num_samples=1),
                           run_config=tune.RunConfig(name=fault, storage_path=str(tmp_path / "tune"), verbose=0))
        result = tuner.fit()[0]
    finally:
        proxy.close()
    assert result.error is None, result.error
    m = result.metrics
    assert m["tracking_pending"] is True and m["evaluated"] is True and m["step"] == 60, m
    assert np.isfinite(m["fid"]) and np.isfinite(m["ppl"]) and "tracking_stopped" not in m
    assert (Path(m["checkpoint_path"]) / "eval" / "metrics.json").is_file()
    assert len(proxy.after) == 1 and proxy.after[0].startswith("POST ") and "log-batch" in proxy.after[0], proxy.after
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    said = [line for f in logs.glob("worker-*") for line in f.read_text(errors="replace").splitlines()
            if "tracking stops for trial" in line and m["trial_id"] in line]
    # Ray may keep a worker's line in more than one log file: one distinct line, the worker's (the trial function said nothing)
    assert len(set(said)) == 1 and "while logging step metrics" in said[0], said
    assert password not in said[0] and proxy.uri.split("//")[1] in said[0] and f"isosweep sync {tmp_path / 'sweep'}" in said[0]
    assert ("renew the token" in said[0]) == (fault == "token_expired"), said[0]
    trial_run = runs.find_trial_run(mlflow_server.uri, spec.experiment_name, parent, m["trial_id"])
    if fault == "token_expired":  # the run holds what came before the refusal, and stays open for `isosweep sync`
        assert trial_run is not None and trial_run.info.status == "RUNNING"
    else:
        assert trial_run is None  # deleted: `isosweep sync` records the trial again in a new run
