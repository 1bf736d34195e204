"""How many trials run at once (`sweep.resources`), and a trial that loses its worker node (slow).

The concurrency is a pure function of the spec, the cluster's current resources and the autoscaler's
maximum (`concurrency_from`); one test reads that maximum back from a real local Ray's GCS, where the
cluster config is written exactly as an autoscaler reports it.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from isosweep.spec import load_spec
from isosweep.sweep.resources import autoscaler_max_resources, concurrency_from, max_concurrent, trial_concurrency

ROOT = Path(__file__).resolve().parent.parent
CELEBAHQ = ROOT / "search_spaces" / "celebahq.yaml"  # 4 workers x (1 GPU, 8 CPUs) per trial, 12 + 1 trials
DEMO = ROOT / "search_spaces" / "demo.yaml"  # 1 worker x 1 CPU, max_concurrent_trials: 2
G5 = {"CPU": 48.0, "GPU": 4.0}  # one g5.12xlarge worker of clusters/aws-gpu.yaml


@pytest.fixture(scope="module")
def celebahq():
    spec = load_spec(CELEBAHQ, check_paths=False)
    res = spec.resources
    assert (res.workers_per_trial, res.gpus_per_worker, res.cpus_per_worker) == (4, 1, 8)  # numbers below
    assert spec.search.max_concurrent_trials is None
    return spec


def test_the_specs_own_limit_wins(celebahq):
    spec = load_spec(CELEBAHQ, ["search.max_concurrent_trials=3"], check_paths=False)
    assert concurrency_from(spec, G5, {"GPU": 64.0, "CPU": 768.0}) == (3, "spec max_concurrent_trials")


def test_without_an_autoscaler_the_current_cluster_decides(celebahq):
    assert concurrency_from(celebahq, G5, None) == (1, "current cluster: 4 GPUs")
    assert concurrency_from(celebahq, {"CPU": 96.0, "GPU": 8.0}) == (2, "current cluster: 8 GPUs")
    assert max_concurrent(celebahq, {"CPU": 96.0, "GPU": 8.0}) == 2  # the old entry point agrees


def test_the_autoscaler_maximum_counts_when_it_is_larger(celebahq):
    # clusters/aws-gpu.yaml at full size: 4 x g5.12xlarge; one GPU node up now
    assert concurrency_from(celebahq, G5, {"CPU": 192.0, "GPU": 16.0}) == (4, "autoscaler maximum: 16 GPUs")
    # an autoscaler that reports less than is already up (nodes started by hand) does not lower it
    assert concurrency_from(celebahq, {"CPU": 96.0, "GPU": 8.0}, {"CPU": 48.0, "GPU": 4.0}) == (2, "current cluster: 8 GPUs")


def test_the_scarcest_resource_decides(celebahq):
    # 16 GPUs would fit 4 trials, but 64 CPUs fit only two trials of 32 CPUs
    assert concurrency_from(celebahq, G5, {"CPU": 64.0, "GPU": 16.0}) == (2, "autoscaler maximum: 64 CPUs")
    demo = load_spec(DEMO, ["search.max_concurrent_trials=null"], check_paths=False)
    assert concurrency_from(demo, {"CPU": 2.0, "GPU": 8.0}) == (2, "current cluster: 2 CPUs")  # CPU trial: GPUs ignored


def test_at_least_one_and_at_most_the_planned_trials(celebahq):
    n, why = concurrency_from(celebahq, {"CPU": 2.0}, None)
    assert n == 1 and why.startswith("current cluster: 0 GPUs, less than one trial needs (4)")
    # an unbounded node group (max_count: -1): Ray reports sys.maxsize
    n, why = concurrency_from(celebahq, G5, {"CPU": float(sys.maxsize), "GPU": float(sys.maxsize)})
    assert n == 13 and why == "autoscaler maximum: unbounded CPUs, more than the sweep's 13 trials"


def test_a_failing_or_empty_autoscaler_lookup_means_no_autoscaler(monkeypatch):
    from ray._private import state

    def boom():
        raise RuntimeError("Ray has not been started yet")

    monkeypatch.setattr(state.state, "get_max_resources_from_cluster_config", boom)
    assert autoscaler_max_resources() is None
    monkeypatch.setattr(state.state, "get_max_resources_from_cluster_config", lambda: None)
    assert autoscaler_max_resources() is None
    monkeypatch.setattr(state.state, "get_max_resources_from_cluster_config", lambda: {"GPU": 16, "CPU": 200})
    assert autoscaler_max_resources() == {"GPU": 16.0, "CPU": 200.0}


@pytest.fixture
def local_ray():
    """An in-process one-CPU Ray, shut down after the test whatever happens."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _report_cluster_config(groups: list[tuple[str, dict[str, int], int]], max_resources: dict[str, int] | None = None) -> None:
    """Write what an autoscaler reports into the GCS: an `autoscaler_pb2.ClusterConfig` under the key
    that `ray._private.state.GlobalState.get_cluster_config` reads. groups: (name, resources, max_count)."""
    import ray._raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_put

    config = autoscaler_pb2.ClusterConfig()
    for name, resources, max_count in groups:
        group = config.node_group_configs.add(name=name, max_count=max_count)
        group.resources.update(resources)
    config.max_resources.update(max_resources or {})
    _internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, config.SerializeToString(), overwrite=True,
                     namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE)


def test_trial_concurrency_reads_the_autoscaler_config_from_the_gcs(local_ray, celebahq):
    """Real Ray, real GCS: no config reported -> the one CPU up now; clusters/aws-gpu.yaml's shape
    reported (a CPU head, up to 4 workers of 4 GPUs and 48 CPUs) -> 4 celebahq trials at once."""
    assert autoscaler_max_resources() is None
    n, why = trial_concurrency(celebahq)
    assert n == 1 and why.startswith("current cluster: 0 GPUs")

    _report_cluster_config([("head.cpu", {"CPU": 8}, 1), ("gpu.a10g.x4", {"CPU": 48, "GPU": 4}, 4)])
    assert autoscaler_max_resources() == {"CPU": 200.0, "GPU": 16.0}
    assert trial_concurrency(celebahq) == (4, "autoscaler maximum: 16 GPUs")

    # a cluster-wide cap (ClusterConfig.max_resources) lowers it: 8 GPUs hold two trials
    _report_cluster_config([("gpu.a10g.x4", {"CPU": 48, "GPU": 4}, 4)], max_resources={"GPU": 8})
    assert trial_concurrency(celebahq) == (2, "autoscaler maximum: 8 GPUs")


# ---------------------------------------------------------------- a worker node lost mid-trial


def _tiny_base(path: Path) -> Path:
    import torch
    from diffusers import DDPMPipeline, UNet2DModel

    from isosweep.models.builtin import default_scheduler

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)
    DDPMPipeline(unet=unet, scheduler=default_scheduler()).save_pretrained(path)
    return path


def _failure_decisions(temp_dir: Path) -> list[str]:
    """The Train controllers' failure-policy decisions, from their system logs under the cluster's temp
    dir (JSON lines; Ray 2.60 writes them at every level to logs/train/ray-train-sys-controller-*.log)."""
    found = []
    for log in temp_dir.glob("session_*/logs/train/ray-train-sys-controller-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            message = json.loads(line).get("message", "") if line.startswith("{") else ""
            if message.startswith("[FailurePolicy]"):
                found.append(message)
    return found


def _node_loss_driver(address: str, spec: dict, storage: str, run: str, out: str) -> None:
    """The driver of the node-loss test, in a spawned process: a fresh Ray client. (In the pytest
    process, after another test's `ray.init()`/`ray.shutdown()`, actors created on this cluster were
    cancelled "before it started running", "all references to the actor were removed".)

    A placement group holds the head's CPU, so the trial's worker starts on the worker node; once Train
    has registered a checkpoint the group is removed and `<out>.kill` tells the test to kill that node.
    Writes what the test checks to `out` (JSON)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from isosweep.spec import spec_from_dict
    from isosweep.sweep.trainer import build_trainer

    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    head = next(n["NodeID"] for n in nodes if "node:__internal_head__" in n["Resources"])
    worker = next(n["NodeID"] for n in nodes if n["NodeID"] != head)
    hold = placement_group([{"CPU": 1}], bundle_label_selector=[{ray._raylet.RAY_NODE_ID_KEY: head}])
    ray.get(hold.ready(), timeout=120)

    def release_after_first_checkpoint() -> None:
        # Train's checkpoint manager writes its snapshot once it has registered a checkpoint
        while not (Path(storage) / run / "checkpoint_manager_snapshot.json").exists():
            time.sleep(0.1)
        remove_placement_group(hold)  # the head's CPU is free for the new worker group
        Path(out + ".kill").write_text(worker)

    threading.Thread(target=release_after_first_checkpoint, daemon=True).start()
    result = build_trainer(spec_from_dict(spec), run_name=run, storage_path=storage, extra_config={"verbose": False}).fit()
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    Path(out).write_text(json.dumps({"head": head, "worker": worker, "alive": alive, "step": result.metrics["step"],
                                     "checkpoint": result.checkpoint.path}))
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_trial_whose_worker_node_dies_resumes_from_its_checkpoint_on_another_node(tmp_path, monkeypatch):
    """A head and one worker node, one CPU each; a one-worker trial (`build_trainer`, as a Tune trial runs
    it) trains on the worker node while a placement group holds the head's CPU. Once Ray Train has
    registered the trial's first checkpoint, the group is removed and the worker node is SIGKILLed. Train
    V2 counts the dead worker as a worker-group failure (FailureConfig.max_failures = search.max_failures),
    starts a new group on the head with the latest registered checkpoint, and the loop resumes from it
    (`RayReporter.latest_checkpoint` -> `ray.train.get_checkpoint()`). Two nodes, not three: each node
    costs 10-40 s to start on two busy cores."""
    import multiprocessing

    import torch
    from support.ray_cluster import kill_worker_node, start_local_cluster, stop_local_cluster

    from isosweep.spec import spec_from_dict

    # the GCS declares a silent node dead after health_check_failure_threshold missed checks of
    # health_check_period_ms each (defaults: 5 x 3 s); 3 x 1 s keeps the test short
    for var, value in {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                       "RAY_health_check_failure_threshold": "3", "RAY_AUTH_MODE": "disabled"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = spec_from_dict({
        "name": "nodeloss", "base_model": {"source": str(_tiny_base(tmp_path / "base"))},
        "dataset": {"kind": "shapes", "size": 64, "resolution": 8},
        "train": {"lambda_iso": 0.0, "global_batch_size": 4, "max_steps": 20, "checkpoint_every": 5,
                  "report_every": 5, "ema_decay": 0.9, "learning_rate": 1e-3},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
        "search": {"max_failures": 1},
    })
    storage, run, out = tmp_path / "storage", "trial-nodeloss", tmp_path / "driver.json"
    cluster = start_local_cluster(worker_nodes=1, head_cpus=1, worker_cpus=1, auth=False, include_dashboard=False)
    driver = multiprocessing.get_context("spawn").Process(
        target=_node_loss_driver, args=(cluster.address, spec.to_dict(), str(storage), run, str(out)))
    try:
        driver.start()
        ran_on, deadline = None, time.monotonic() + 240
        while driver.is_alive() and time.monotonic() < deadline:
            if ran_on is None and Path(f"{out}.kill").exists():
                first = min((storage / run).glob("checkpoint_*"))
                ran_on = json.loads((first / "spec.json").read_text())["workers"][0]["node_id"]
                kill_worker_node(cluster, 0)  # the only worker node: `ray start`, raylet, workers, at once
            time.sleep(0.1)
        driver.join(timeout=5)
        assert driver.exitcode == 0, f"the driver failed (exit {driver.exitcode}); see its output above"
        got = json.loads(out.read_text())
        assert ran_on == got["worker"], (ran_on, got)  # the first attempt ran on the node that died
        assert got["worker"] not in got["alive"] and got["step"] == 20  # the GCS saw it die; the run finished
        final = Path(got["checkpoint"])
        state = torch.load(final / "train_state.pt", weights_only=False)
        assert state["step"] == 20
        assert json.loads((final / "spec.json").read_text())["workers"][0]["node_id"] == got["head"]  # the other node
        # resumed once, from a checkpoint (every 5 steps), not from scratch
        assert len(state["resumed_at"]) == 1 and state["resumed_at"][0] in (5, 10, 15), state["resumed_at"]
        # and Train charged it to max_failures (search.max_failures), not to the preemption budget;
        # (one decision, which Ray may log more than once) a second failure would read "Error count: 2"
        decisions = _failure_decisions(cluster.temp_dir)
        assert decisions and all(d.startswith("[FailurePolicy] RETRY\n  Source: worker group\n  Error count: 1 (max allowed: 1)")
                                 for d in decisions), decisions
    finally:
        if driver.is_alive():
            driver.kill()
        stop_local_cluster(cluster, grace_s=5)  # what outlives 5 s is SIGKILLed; nothing here needs a clean exit


def test_the_launcher_config_on_the_head_gives_the_clusters_maximum(celebahq, tmp_path, monkeypatch):
    """On a `ray up` cluster the head holds the cluster YAML as ~/ray_bootstrap_config.yaml: read from the
    shipped clusters/aws-gpu.yaml, the CelebA-HQ sweep runs four trials at once (max_workers: 4 GPU nodes
    of 4 GPUs, one trial each) instead of the one that fits the single GPU node up at its start."""
    from isosweep.sweep.resources import launcher_max_resources

    most = launcher_max_resources(ROOT / "clusters" / "aws-gpu.yaml")
    assert most["GPU"] == 16.0
    assert concurrency_from(celebahq, G5, most) == (4, "autoscaler maximum: 16 GPUs")
    # the global max_workers caps the node count across types; a missing or broken file means "unknown"
    capped = tmp_path / "capped.yaml"
    capped.write_text("max_workers: 2\nhead_node_type: head\navailable_node_types:\n"
                      "  head: {resources: {CPU: 0}}\n  gpu: {max_workers: 4, resources: {CPU: 48, GPU: 4}}\n")
    assert launcher_max_resources(capped) == {"CPU": 96.0, "GPU": 8.0}
    assert launcher_max_resources(tmp_path / "none.yaml") is None
    (tmp_path / "bad.yaml").write_text("available_node_types: [")
    assert launcher_max_resources(tmp_path / "bad.yaml") is None
    monkeypatch.setenv("ISOSWEEP_LAUNCHER_CONFIG", str(capped))  # where the driver looks when not told
    assert launcher_max_resources() == {"CPU": 96.0, "GPU": 8.0}
