"""The range of generated samples (or pairs) a sampled metric computes: one description and one batch loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from isosweep.core.sampling import Sampler

__all__ = ["SampleRange"]


@dataclass(frozen=True, kw_only=True)
class SampleRange:
    """Samples start..stop-1 of `total` (samples or pairs), drawn by `sampler` with `ddim_steps` DDIM steps from
    latents of `seed` (`initial_noise(.., seed, start=i)`, each metric its own streams) in batches of `batch_size`.

    FID, PPL, mRTL and LS sample the same way: one value holds what they share, so a shard's range, its batching
    and its progress are described once. Sample i depends only on (seed, i), so ranges that tile 0..total-1
    concatenate to the unsharded result. `on_batch(done)` is called after each batch's work with the samples of
    this range done so far (progress).
    """

    sampler: Sampler
    shape: tuple[int, ...]
    seed: int
    ddim_steps: int
    total: int
    batch_size: int
    start: int = 0
    stop: int | None = None
    on_batch: Callable[[int], None] | None = None

    @property
    def end(self) -> int:
        """The index after the last one of this range: stop, at most total (total when stop is None)."""
        return self.total if self.stop is None else min(self.stop, self.total)

    def batches(self) -> Iterator[tuple[int, int]]:
        """(lo, n) of each batch: samples lo..lo+n-1. Progress is reported when the caller asks for the next batch,
        that is after this one's work."""
        end = self.end
        for lo in range(self.start, end, self.batch_size):
            n = min(self.batch_size, end - lo)
            yield lo, n
            if self.on_batch is not None:
                self.on_batch(lo + n - self.start)
