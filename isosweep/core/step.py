"""What one optimizer step draws and checks, kept off the host so that the step can run without device syncs.

Randomness: every optimizer step draws from generators seeded by (seed, step, rank) (`step_seeds`), so a resumed run
continues exactly where the checkpointed one stopped. `step_generators(..., device=...)` places them:
- `coin`: a CPU generator with the shared seed. The iso coin (`IsoDiffusionLoss.coin`) is a host decision (it picks
  the timestep range, or which of two captured graphs to replay), so it reads its draw on the host.
- `shared`: the shared seed on `device`, identical on every rank (each micro-batch's per_timestep t_iso).
- `local`: this rank's seed on `device` (timesteps, noise, Hutchinson probes).
On the CPU `coin` and `shared` are one generator, exactly the pair the training loop has always used, so the draws
there are unchanged bit for bit. On a GPU the shared and local draws are made on the device (Philox, not the CPU's
Mersenne Twister: other numbers than CPU generators give, from the same seeds) and nothing is copied from the host.
A captured CUDA graph holds the generator objects: `reseed` gives them the next step's seeds in place.

Finite check: `FiniteFlags` records on the device whether a loss term became NaN/inf (and its first such value);
`observe` writes in place and reads nothing, so it can sit inside a captured step; `first` is the one host read.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


def step_seeds(seed: int, step: int, rank: int) -> tuple[int, int]:
    """(shared, local) seeds of optimizer step `step`: shared is the same on every rank, local is per rank."""
    # SeedSequence, not hash(): Python's string hashing differs between processes
    shared = np.random.SeedSequence([seed, step, 0]).generate_state(1, dtype=np.uint64)[0]
    local = np.random.SeedSequence([seed, step, 1, rank]).generate_state(1, dtype=np.uint64)[0]
    return int(shared) >> 1, int(local) >> 1


class StepGenerators(NamedTuple):
    """One step's generators: `coin` (CPU, host decisions), `shared` and `local` (on the device that draws)."""

    coin: torch.Generator
    shared: torch.Generator
    local: torch.Generator


def step_generators(seed: int, step: int, rank: int, device: torch.device | str | None = None) -> StepGenerators:
    """The generators of optimizer step `step` on `device` (None: the CPU). On the CPU `coin is shared`."""
    shared_seed, local_seed = step_seeds(seed, step, rank)
    device = torch.device(device if device is not None else "cpu")
    coin = torch.Generator().manual_seed(shared_seed)
    if device.type == "cpu":
        return StepGenerators(coin, coin, torch.Generator().manual_seed(local_seed))
    return StepGenerators(coin, torch.Generator(device=device).manual_seed(shared_seed),
                          torch.Generator(device=device).manual_seed(local_seed))


def reseed(gens: StepGenerators, seed: int, step: int, rank: int) -> StepGenerators:
    """Give `gens` (from `step_generators`) the seeds of step `step` in place, offsets back to zero: a captured graph
    that registered them replays with that step's draws. Returns `gens`."""
    shared_seed, local_seed = step_seeds(seed, step, rank)
    for gen, value in ((gens.coin, shared_seed), (gens.shared, shared_seed), (gens.local, local_seed)):
        gen.manual_seed(value)
    return gens


class FiniteFlags:
    """Device-side record of non-finite loss terms: flags[i] = 1 once term i (0: dsm, 1: iso) was NaN/inf, values[i]
    its first such value. `observe` updates both in place (same buffers, so a captured graph keeps updating them)
    and never reads the device; `first` reads them on the host (one sync).

    The flags accumulate until `clear`, so they may be read every step (the training loop: a non-finite loss raises
    before the optimizer applies it, and nothing is poisoned) or every k steps (a step that must never sync, such
    as a captured graph). Read late, up to k - 1 further updates have run on weights the bad step poisoned: the
    weights (and their EMA) in memory are lost, so the read must come before any checkpoint is written from them;
    `since` (the step of the last `clear`) says from which step on the weights cannot be trusted.
    """

    def __init__(self, device: torch.device | str, since: int = 0) -> None:
        self.flags = torch.zeros(2, device=device)
        self.values = torch.zeros(2, device=device)
        self.since = since

    def observe(self, dsm: torch.Tensor, iso: torch.Tensor | None) -> None:
        """Record one micro-batch's detached loss terms (iso None: the term was off)."""
        terms = torch.stack([dsm.float(), iso.float() if iso is not None else torch.zeros((), device=self.flags.device)])
        bad = (~torch.isfinite(terms)).float()
        self.values.copy_(torch.where(bad > self.flags, terms, self.values))  # the first non-finite value of each term
        self.flags.copy_(torch.maximum(self.flags, bad))

    def first(self) -> tuple[str, float] | None:
        """The host read: None when every observed term was finite, else ("dsm" or "iso", its first bad value)."""
        if not bool(self.flags.any()):
            return None
        term = "dsm" if self.flags[0] > 0 else "iso"
        return term, self.values[0 if term == "dsm" else 1].item()

    def clear(self, since: int) -> None:
        """Start a new window at optimizer step `since` (in place)."""
        self.flags.zero_()
        self.values.zero_()
        self.since = since
