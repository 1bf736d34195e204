"""The one interface of an evaluation metric: a `Shard` (the model and this rank's place) and a `Metric`.

`evaluate_model` (suite.py) runs, for every registered metric that evaluation.metrics asks for, `share(shard, nets)` on
every rank, gathers the shares in rank order and lets rank 0 `combine` them into the `EvalResult`. A metric is
one module of this folder with one `@register`ed class (docs/metrics.md, "Adding a metric").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from isosweep.core.codec import Codec
from isosweep.core.sampling import DDIMSampler
from isosweep.evaluation.collectives import distributed as _distributed
from isosweep.evaluation.collectives import gather as _gather
from isosweep.evaluation.features.common import NO_BACKBONE
from isosweep.evaluation.metrics.samples import SampleRange
from isosweep.spec import EVAL_METRICS, base_metric, register_result_names

# Progress(share, done, total): how far this rank is with one share, at its start (done = 0), after every batch
# and at its end (done = total; an empty share reports 0 of 0). Shares and units: fid, ls and fid_cheap (the
# cheap FID of evaluation.checkpoint_fid): samples; ppl, mrtl: pairs; jacobian (MCN and VoR): samples x
# timesteps; an added metric: its own (`Metric.key`). It must not raise.
Progress = Callable[[str, int, int], None]


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [lo, hi) of n global indices for `rank` (sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@dataclass
class Shard:
    """What every metric's share needs: the model's sampler, this rank's place, and a stopwatch."""

    sampler: DDIMSampler
    unet: torch.nn.Module
    scheduler: Any
    eval_spec: Any
    dataset_spec: Any
    device: torch.device
    rank: int
    world_size: int
    progress: bool
    on_progress: Progress | None = None
    fid_resamples: int = 0  # > 0: FID gets a bootstrap interval (screening fidelity)
    metrics: tuple[str, ...] = ()  # the evaluation.metrics names this evaluation computes
    codec: Codec | None = None  # a latent model's autoencoder: `shape` is the latents', the sampler decodes
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.sampler.sample_shape

    @property
    def boot(self) -> dict[str, Any]:
        """The keywords of every bootstrap interval (evaluation.bootstrap and the seed)."""
        return {"resamples": self.eval_spec.bootstrap.resamples, "level": self.eval_spec.bootstrap.level, "seed": self.eval_spec.seed}

    def range(self, n: int) -> tuple[int, int]:
        return shard_range(n, self.rank, self.world_size)

    def samples(self, total: int, ddim_steps: int, start: int, stop: int, batch_size: int,
                on_batch: Callable[[int], None] | None = None) -> SampleRange:
        """Samples (or pairs) start..stop-1 of `total` from this model, latents of evaluation.seed."""
        return SampleRange(sampler=self.sampler, shape=self.shape, seed=self.eval_spec.seed, ddim_steps=ddim_steps, total=total,
                           start=start, stop=stop, batch_size=batch_size, on_batch=on_batch)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value in rank order (a collective: every rank must call it; [value] on one process)."""
        return _gather(value, _distributed(self.world_size), self.world_size)

    def started(self, share: str, total: int) -> Callable[[int], None]:
        """Reports `share` at 0 of `total` units; returns the per-batch callback (units done so far)."""
        if self.on_progress is None:
            return lambda done: None
        report = self.on_progress
        report(share, 0, total)
        return lambda done: report(share, done, total)


class Metric:
    """One metric of the suite. Subclasses set `names` (what evaluation.metrics may ask for; one share can serve
    several, as the Jacobian serves mcn and vor) and implement `share` and `combine`."""

    names: ClassVar[tuple[str, ...]] = ()
    results: ClassVar[tuple[str, ...]] = ()  # values it adds to a results row beyond spec.RESULT_METRICS
    needs: ClassVar[tuple[str, ...]] = ()  # feature networks it uses: "fid", "ppl" and/or "ls" (load_feature_networks)

    @property
    def key(self) -> str:
        """The share's name: the key of its part in the gathered shares, its progress and its timing."""
        return self.names[0]

    def share(self, shard: Shard, nets) -> Any:
        """This rank's part (its range of samples: `shard.range(n)`); picklable, as it is gathered to rank 0."""
        raise NotImplementedError

    def combine(self, result, shares: list[Any], shard: Shard, nets) -> None:
        """Rank 0: the final numbers from every rank's share (in rank order) into `result` (an EvalResult)."""
        raise NotImplementedError

    def settings(self, eval_spec) -> dict[str, Any]:
        """What changes its numbers, recorded in the record's `settings`."""
        return {}

    def backbone(self, name: str, names: dict[str, str], eval_spec) -> str:
        """The network named beside result `name` (this metric's name, `names`: the feature networks' names)."""
        return names.get(name, NO_BACKBONE)


REGISTRY: dict[str, Metric] = {}  # evaluation.metrics name -> its metric, in the order they run


def register(cls: type[Metric]) -> type[Metric]:
    """Class decorator: make a metric known to evaluate_model (one instance serves every name in cls.names)."""
    metric = cls()
    taken = [n for n in cls.names if n in REGISTRY and type(REGISTRY[n]) is not cls]
    taken += [n for n in cls.names if n not in EVAL_METRICS and base_metric(n) != n]  # `ls_x`, `fid_x`: a built-in's values
    if not cls.names or taken:
        raise ValueError(f"metric {cls.__name__}: names {list(cls.names)} must be non-empty and new (taken: {taken})")
    for name in cls.names:
        REGISTRY[name] = metric
    register_result_names(*(n for n in (*cls.names, *cls.results) if n not in EVAL_METRICS))
    return cls


def selected(wanted: list[str]) -> list[Metric]:
    """The metrics that compute `wanted` (evaluation.metrics names), each once, in registry order; ValueError naming
    the field and the fix for a name no module registers."""
    unknown = [n for n in wanted if n not in REGISTRY]
    if unknown:
        raise ValueError(unknown_metrics_message(unknown))
    return list(dict.fromkeys(m for n, m in REGISTRY.items() if n in wanted))


def unknown_metrics_message(unknown: list[str]) -> str:
    return (f"field 'evaluation.metrics': unknown metric(s) {unknown}; fix: use any of {' '.join(REGISTRY)}, or add the "
            f"metric as a module isosweep/evaluation/suite_metrics/<name>.py (docs/metrics.md, \"Adding a metric\")")
