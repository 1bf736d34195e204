"""Sharded evaluation (2 gloo ranks) equals the one-process result."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.multiprocessing as mp
from test_metrics_evaluate import FAST_DOMAIN, tiny_eval_spec, tiny_unet


def _spec(tmp):
    """The tiny suite plus the DDIM inversion metric (3 dataset images: 2 on rank 0, 1 on rank 1)."""
    return tiny_eval_spec(tmp, metrics=["fid", "ppl", "mrtl", "mcn", "vor", "ls", "inversion_mse", "inversion_perceptual"],
                          inversion={"num_images": 3, "ddim_steps": 2, "shown": 2})


def _worker(rank: int, world: int, tmp: str) -> None:
    from diffusers import DDPMScheduler

    from isosweep.evaluation.features import domain
    from isosweep.evaluation.suite import evaluate_model
    from isosweep.spec import DatasetSpec

    torch.set_num_threads(1)
    domain._DOMAIN_RECIPE = {**domain._DOMAIN_RECIPE, **FAST_DOMAIN}  # same recipe as the parent, so the cache hits
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        from pathlib import Path

        res = evaluate_model(tiny_unet(16), DDPMScheduler(num_train_timesteps=1000), _spec(Path(tmp)),
                             DatasetSpec(kind="shapes", resolution=16, size=64), rank=rank, world_size=world, progress=False)
        with open(f"{tmp}/rank{rank}.pkl", "wb") as f:
            pickle.dump((res.metrics, res.rtl_curve, res.backbones), f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about a minute on 2 shared cores
def test_two_ranks_equal_one_process(tmp_path, monkeypatch):
    from diffusers import DDPMScheduler

    from isosweep.evaluation.features import domain
    from isosweep.evaluation.suite import evaluate_model
    from isosweep.spec import DatasetSpec

    monkeypatch.setattr(domain, "_DOMAIN_RECIPE", {**domain._DOMAIN_RECIPE, **FAST_DOMAIN})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = evaluate_model(tiny_unet(16), DDPMScheduler(num_train_timesteps=1000), _spec(tmp_path),
                                DatasetSpec(kind="shapes", resolution=16, size=64), progress=False)
    finally:
        torch.set_num_threads(before)
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    out = [pickle.load(open(tmp_path / f"rank{r}.pkl", "rb")) for r in range(2)]
    assert out[0] == out[1]  # every rank returns the same result
    metrics, curve, names = out[0]
    assert names == {k: v for k, v in single.backbones.items()}
    assert set(metrics) == set(single.metrics) and {"inversion_mse_hi", "inversion_perceptual_hi"} <= set(metrics)
    for k, v in single.metrics.items():
        assert metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert curve == pytest.approx(single.rtl_curve, rel=1e-5)
