"""How the training loop reports: the `Reporter` its runner provides, and the statistics of a report window.

Ray Train's adapter (`sweep/train_worker.py`) implements `Reporter`; tests use `LocalReporter` in-process.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist


class Reporter(Protocol):
    """What the loop needs from its runner (Ray Train, or `LocalReporter` in-process)."""

    rank: int
    world_size: int
    device: torch.device

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Called by every rank with the same cadence; `checkpoint_dir` only on rank 0."""

    def latest_checkpoint(self) -> Any:
        """The checkpoint to resume from, or None: a local folder, a storage URI, or an object with
        `.filesystem` and `.path` (a Ray Checkpoint); `training.checkpoint.resume_state` reads all three."""


class LocalReporter:
    """In-process reporter: records metrics and copies checkpoints to `root/checkpoint_<step>`."""

    def __init__(self, root: str | Path, rank: int = 0, world_size: int = 1, device: str = "cpu") -> None:
        self.root, self.rank, self.world_size, self.device = Path(root), rank, world_size, torch.device(device)
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            dst = self.root / f"checkpoint_{int(metrics['step']):06d}"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(checkpoint_dir, dst)
            self.checkpoints.append(dst)

    def latest_checkpoint(self) -> str | None:
        return str(self.checkpoints[-1]) if self.checkpoints else None


def all_reduce_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """The mean of `values` over the DDP ranks (itself when there is one rank)."""
    if world_size > 1:
        dist.all_reduce(values)
        values = values / world_size
    return values


class StepStats:
    """Statistics since the last report; read (one device sync, one all-reduce) only when reported."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pending: list[torch.Tensor] = []
        self.steps, self.iso_steps, self.seconds = 0, 0, 0.0

    def add(self, out, accumulation: int) -> None:
        """Add one micro-batch's `LossOutput`: loss, dsm, iso, tr_r, each divided by the accumulation count."""
        zero = torch.zeros((), device=out.dsm.device)
        iso_on = out.iso is not None
        stats = [out.loss.detach(), out.dsm, out.iso if iso_on else zero, out.tr_r if iso_on else zero]
        self.pending.append(torch.stack([v.float() for v in stats]) / accumulation)

    def end_step(self, seconds: float, iso_on: bool) -> None:
        self.steps += 1
        self.iso_steps += int(iso_on)
        self.seconds += seconds

    def flush(self, world: int, device: torch.device, global_batch: int) -> dict[str, Any]:
        """The window's means (over all ranks) as plain floats, then an empty window."""
        totals = torch.stack(self.pending).sum(0).to(device)
        totals = all_reduce_mean(totals.float(), world).double().cpu()
        n = self.steps
        out = {"loss": totals[0].item() / n, "dsm_loss": totals[1].item() / n, "iso_fraction": self.iso_steps / n,
               "s_per_step": self.seconds / n, "images_per_s": global_batch * n / max(self.seconds, 1e-9)}
        if self.iso_steps:
            # iso and tr_r are averaged over the steps where the isometry loss was on
            out |= {"iso_loss": totals[2].item() / self.iso_steps, "tr_r": totals[3].item() / self.iso_steps}
        self.reset()
        return out
