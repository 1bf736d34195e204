"""The collectives of a sharded evaluation: whether it is distributed, gather to every rank, broadcast rank 0's
result. Ranks are torch.distributed's (Ray Train sets the process group up); one process needs none of them."""

from __future__ import annotations

from typing import Any

import torch

from isosweep.evaluation.record import EvalResult


def distributed(world_size: int) -> bool:
    """Whether an evaluation over `world_size` ranks runs collectives (raises when the process group is missing)."""
    if world_size <= 1:
        return False
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised; initialise the "
                           "process group first (Ray Train does) or pass world_size=1")
    return True


def gather(obj: Any, dist: bool, world_size: int) -> list[Any]:
    """Every rank's obj, in rank order (all ranks get the list)."""
    if not dist:
        return [obj]
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast(result: EvalResult, dist: bool) -> EvalResult:
    """Rank 0's result on every rank."""
    if not dist:
        return result
    box = [result]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
