"""What a trial asks of the cluster, and how many trials run at once."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import ray
import yaml

from isosweep.spec import SpecError, SweepSpec
from isosweep.sweep.search import planned_trials

# where `ray up` puts the cluster config on the head node (the autoscaler runs with it)
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"


def check_cluster_fits(spec: SweepSpec, cluster_resources: dict[str, float], source: str = "<spec>") -> None:
    """Fail early when one trial needs more GPUs or CPUs than the whole cluster has."""
    res = spec.resources
    need_gpu = res.workers_per_trial * res.gpus_per_worker
    need_cpu = res.workers_per_trial * res.cpus_per_worker
    have_gpu = cluster_resources.get("GPU", 0.0)
    have_cpu = cluster_resources.get("CPU", 0.0)
    if need_gpu > have_gpu:
        raise SpecError(
            f"{source}: field 'resources': one trial needs {need_gpu:g} GPUs "
            f"(workers_per_trial={res.workers_per_trial} x gpus_per_worker={res.gpus_per_worker:g}) but the cluster has {have_gpu:g}; "
            "fix: lower resources.workers_per_trial, set resources.use_gpu=false, or connect to a GPU cluster with --address"
        )
    if need_cpu > have_cpu:
        raise SpecError(
            f"{source}: field 'resources': one trial needs {need_cpu:g} CPUs "
            f"(workers_per_trial={res.workers_per_trial} x cpus_per_worker={res.cpus_per_worker:g}) but the cluster has {have_cpu:g}; "
            "fix: lower resources.workers_per_trial or resources.cpus_per_worker"
        )


def trial_needs(spec: SweepSpec) -> dict[str, float]:
    """The Ray resources one trial's Train workers reserve together, as `trainer.build_trainer` asks for
    them: CPUs always, GPUs only with use_gpu. The Tune trial function itself holds no CPU or GPU (it
    only waits on its TorchTrainer), so it is not counted."""
    res = spec.resources
    needs = {"CPU": res.workers_per_trial * res.cpus_per_worker}
    if res.use_gpu:
        needs["GPU"] = res.workers_per_trial * res.gpus_per_worker
    return needs


def concurrency_from(spec: SweepSpec, current: Mapping[str, float],
                     autoscaler_max: Mapping[str, float] | None = None) -> tuple[int, str]:
    """How many trials run at once, and where that number came from (for the driver's log line).

    The spec's `search.max_concurrent_trials` when set. Otherwise, per resource, the larger of what the
    cluster has now (`current`, as `ray.cluster_resources()`) and what its autoscaler may grow it to
    (`autoscaler_max`, None when there is no autoscaler or it reports nothing), divided by what one trial
    reserves (`trial_needs`); the scarcest resource decides. Sums over nodes ignore how trials pack
    onto nodes, so this is an upper bound: extra trials wait for a node rather than fail. Never below 1
    (a cluster too small for one trial queues it until the autoscaler adds a node) and never above the
    sweep's planned trials (an unbounded autoscaler, `max_count: -1`, reports `sys.maxsize`).
    """
    if spec.search.max_concurrent_trials:
        return spec.search.max_concurrent_trials, "spec max_concurrent_trials"
    fits = []
    for name, need in trial_needs(spec).items():
        now = float(current.get(name, 0.0))
        most = float((autoscaler_max or {}).get(name, 0.0))
        have, where = (most, "autoscaler maximum") if most > now else (now, "current cluster")
        fits.append((int(have // need), name, have, where))
    fit, name, have, where = min(fits, key=lambda f: (f[0], f[1] != "GPU"))  # the scarcest; on a tie, name the GPUs
    amount = "unbounded" if have >= sys.maxsize else f"{have:g}"
    source = f"{where}: {amount} {name}s"
    cap = planned_trials(spec)
    if fit < 1:
        return 1, f"{source}, less than one trial needs ({trial_needs(spec)[name]:g}): one at a time"
    if fit > cap:
        return cap, f"{source}, more than the sweep's {cap} trials"
    return fit, source


def autoscaler_max_resources() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler may provide; None means "no autoscaler".

    Read with `ray._private.state.state.get_max_resources_from_cluster_config()` (what Ray Data and Ray
    Train V2's worker-group check use): the `autoscaler_pb2.ClusterConfig` an autoscaler reports into the
    GCS (internal KV, namespace `GCS_AUTOSCALER_STATE_NAMESPACE`, key `GCS_AUTOSCALER_CLUSTER_CONFIG_KEY`),
    summed as max_count x resources over its node groups. A private API: any failure, or no config,
    gives None. Needs a connected Ray (call it after `ray.init`).

    Who reports that config, checked in the installed Ray 2.60 wheel: the GCS serves `ReportClusterConfig`
    and the binding `GcsClient.report_cluster_config` exists, but nothing in the wheel calls it. Neither
    the v1 autoscaler that the cluster launcher starts (`ray start --autoscaling-config`:
    `autoscaler/_private/monitor.py`, `StandardAutoscaler`), nor the v2 one (`autoscaler/v2/monitor.py`,
    which reports only its autoscaling state), nor KubeRay's (`autoscaler/_private/kuberay/run_autoscaler.py`
    runs one of those two) writes it. So on clusters/aws-gpu.yaml and clusters/kuberay/* this returns None
    and the concurrency comes from the nodes up at the start; only an autoscaler outside the wheel (or a
    test) fills it. Hence the second source, `launcher_max_resources`: the cluster launcher's own config
    on the head node, where a submitted job's driver runs.
    """
    try:
        from ray._private.state import state  # private: guarded like any other failure

        found = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 -- a private API: whatever it raises means "no autoscaler known"
        found = None
    if found:
        return {k: float(v) for k, v in found.items()}
    return launcher_max_resources()


def launcher_max_resources(path: str | os.PathLike | None = None) -> dict[str, float] | None:
    """The most of each resource a cluster-launcher cluster may grow to, from its config on the head node.

    `ray up` copies the cluster YAML to `~/ray_bootstrap_config.yaml` on the head, and its autoscaler runs
    from that file (`ISOSWEEP_LAUNCHER_CONFIG` names another path). Per node type: max_workers x its
    declared `resources` (the head type counts once), capped by the global `max_workers` worker nodes.
    A node type without declared resources cannot be counted (the launcher then detects them from the
    instance type), so it is skipped. None when there is no such file (not a launcher head, or a laptop
    driver) or it cannot be read. Read with yaml.safe_load: plain data, nothing executed.
    """
    where = Path(path or os.environ.get("ISOSWEEP_LAUNCHER_CONFIG") or LAUNCHER_CONFIG).expanduser()
    try:
        config = yaml.safe_load(where.read_text())
        types = config["available_node_types"]
        head = config.get("head_node_type")
        global_max = int(config.get("max_workers", sys.maxsize))
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None
    total: dict[str, float] = {}
    per_node_most: dict[str, float] = {}
    for name, node in types.items():
        resources = (node or {}).get("resources") or {}
        count = 1 if name == head else min(int((node or {}).get("max_workers", 0)), global_max)
        for key, value in resources.items():
            total[key] = total.get(key, 0.0) + count * float(value)
            if name != head:
                per_node_most[key] = max(per_node_most.get(key, 0.0), float(value))
    for key, most in per_node_most.items():  # no more than global_max worker nodes of the richest type
        head_part = float(((types.get(head) or {}).get("resources") or {}).get(key, 0.0))
        total[key] = min(total[key], head_part + global_max * most)
    return total or None


def trial_concurrency(spec: SweepSpec) -> tuple[int, str]:
    """`concurrency_from` for the connected Ray cluster (call after `ray.init`): (trials at once, why)."""
    return concurrency_from(spec, ray.cluster_resources(), autoscaler_max_resources())


def max_concurrent(spec: SweepSpec, cluster_resources: dict[str, float]) -> int:
    """How many trials fit at once in `cluster_resources` alone: the spec's value, else what the
    cluster's CPUs and GPUs allow (`concurrency_from` without an autoscaler)."""
    return concurrency_from(spec, cluster_resources)[0]
