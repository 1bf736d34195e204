"""The GPU paths: mixed-precision training steps and resume, a two-rank NCCL trial, TF32 off while metrics run.

Tests marked `gpu` are skipped (saying why) where CUDA is absent; `make test-gpu` runs exactly these
on a machine that has it. The TF32 check also runs on the CPU, where the flags exist but do nothing.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel

from isosweep.models.builtin import default_scheduler
from isosweep.spec import DatasetSpec, EvaluationSpec, spec_from_dict
from isosweep.training.checkpoint import load_train_state
from isosweep.training.loop import train_loop
from isosweep.training.reporting import LocalReporter

gpu = pytest.mark.gpu


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base") / "pipe"
    DDPMPipeline(unet=tiny_unet(), scheduler=default_scheduler()).save_pretrained(d)
    return d


def make_spec(model_dir, workers: int = 1, **train):
    t = dict(lambda_iso=0.1, p=0.5, global_batch_size=4, max_steps=4, checkpoint_every=2, report_every=1,
             ema_decay=0.9, learning_rate=1e-3, seed=0)
    t.update(train)
    return spec_from_dict({"name": "gpu", "base_model": {"source": str(model_dir)},
                           "dataset": {"kind": "shapes", "size": 64, "resolution": 8},
                           "train": t, "resources": {"workers_per_trial": workers, "use_gpu": True}}, check_paths=False)


@gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_steps_and_resume(tiny_model_dir, tmp_path, precision):
    """fp16 (with its GradScaler) and bf16 autocast train with finite losses, and a run resumed from its
    step-2 checkpoint ends where the uninterrupted run ends (scaler state included)."""
    torch.backends.cudnn.deterministic = True  # the comparison below is of two runs of the same steps
    spec = make_spec(tiny_model_dir, mixed_precision=precision)
    full = LocalReporter(tmp_path / "full", device="cuda")
    train_loop(spec, full)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in full.reports)
    state = load_train_state(full.checkpoints[-1])
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0  # the GradScaler was on and saved its scale
    resumed = LocalReporter(tmp_path / "resumed", device="cuda")
    train_loop(spec, resumed, resume_from=str(full.checkpoints[0]))
    assert [r["step"] for r in resumed.reports] == [3, 4]
    a = load_train_state(full.checkpoints[-1])["unet"]
    b = load_train_state(resumed.checkpoints[-1])["unet"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def _nccl_worker(rank: int, world: int, model_dir: str, out: str, init: str) -> None:
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", init_method=init, rank=rank, world_size=world)
    try:
        reporter = LocalReporter(os.path.join(out, f"rank{rank}"), rank=rank, world_size=world, device=f"cuda:{rank}")
        result = train_loop(make_spec(model_dir, workers=world), reporter)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"step": result.step, "loss": result.metrics["loss"]}, f)
    finally:
        torch.distributed.destroy_process_group()


@gpu
@pytest.mark.parametrize("world", [1, 2])
def test_nccl_trial(tiny_model_dir, tmp_path, world):
    """One process per GPU, NCCL: every rank finishes every step, reports the same (all-reduced) loss and rank 0
    writes the checkpoints. One rank still runs NCCL's init, DDP's broadcast and the all-reduces; two ranks need
    two devices (NCCL refuses two ranks on one GPU)."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices (this machine has {torch.cuda.device_count()})")
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'pg'}"
    mp.spawn(_nccl_worker, args=(world, str(tiny_model_dir), str(tmp_path), init), nprocs=world, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert {r["step"] for r in results} == {4}
    assert all(r["loss"] == pytest.approx(results[0]["loss"]) for r in results)
    assert (tmp_path / "rank0" / "checkpoint_000004" / "model_index.json").is_file()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_tf32_is_off_while_metrics_are_computed(device, tmp_path):
    """cuDNN/cuBLAS TF32 is coarser than PPL's eps step: evaluation turns it off, records that, and restores it."""
    from isosweep.evaluation.suite import evaluate_model

    unet = tiny_unet().to(device).eval()
    seen = []
    unet.register_forward_pre_hook(lambda *_: seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        spec = EvaluationSpec(metrics=["mrtl"], batch_size=8, cache_dir=str(tmp_path), mrtl={"num_pairs": 1, "num_points": 2, "ddim_steps": 2})
        result = evaluate_model(unet, default_scheduler(), spec, DatasetSpec(kind="shapes", resolution=8, size=16),
                                device=device, progress=False)
        assert seen and set(seen) == {(False, False)}
        assert result.settings["tf32"] is False
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
