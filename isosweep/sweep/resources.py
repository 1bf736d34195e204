"""What a trial asks of the cluster, and how many trials run at once."""

from __future__ import annotations

from isosweep.config import SpecError, SweepSpec


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


def max_concurrent(spec: SweepSpec, cluster_resources: dict[str, float]) -> int:
    """How many trials fit at once: the spec's value, else what the cluster's GPUs (or CPUs) allow."""
    if spec.search.max_concurrent_trials:
        return spec.search.max_concurrent_trials
    res = spec.resources
    if res.gpus_per_worker > 0:
        fit = cluster_resources.get("GPU", 0.0) // (res.workers_per_trial * res.gpus_per_worker)
    else:
        # the trial's own function holds no CPU (it waits on its TorchTrainer)
        fit = cluster_resources.get("CPU", 1.0) // (res.workers_per_trial * res.cpus_per_worker)
    return max(1, int(fit))
