"""The paper's main setting at its real size: celebahq-256's 113.7 M-parameter UNet through the commands a user runs.

`isosweep train search_spaces/celebahq.yaml` loads the base model by its hub id from an offline HF cache (the
real-config stand-in of tests/support/hub.py), takes one optimizer step with the isometry term on every
sample (p = 0) at 256 px on the photo folder and its CelebAMask-HQ labels file, and writes a checkpoint;
`isosweep eval` then scores that checkpoint with the spec's standard backbone (the stand-in Inception and
AlexNet files): FID of 2 samples and PPL of 2 pairs, at 1 DDIM step. Everything else is the shipped spec. The test prints
the wall time of each command (`pytest -s` shows it).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support.hub import CELEBAHQ, REAL_CELEBAHQ_PARAMS, REPOS

pytestmark = [pytest.mark.slow, pytest.mark.extended]  # ten minutes on two cores: `make test-extended`

ROOT = Path(__file__).resolve().parents[1]
ISOSWEEP = str(Path(sys.executable).parent / "isosweep")
SPEC = "search_spaces/celebahq.yaml"


def _run(args: list[str], env: dict[str, str], log: Path) -> tuple[str, float]:
    t0 = time.monotonic()
    proc = subprocess.run([ISOSWEEP, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600)
    log.write_text(proc.stdout)
    assert proc.returncode == 0, f"isosweep {args[0]} failed (log {log}):\n{proc.stdout[-4000:]}"
    return proc.stdout, time.monotonic() - t0


def test_celebahq_256_at_real_size_trains_an_iso_step_and_evaluates(hub_cache_real, photo_datasets, standard_weights, tmp_path):
    d = photo_datasets
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(hub_cache_real.env, TORCH_HOME=str(standard_weights.torch_home), ISOSWEEP_RAY_DASHBOARD="0")
    common = [f"dataset.path={d.celebahq}", f"dataset.attributes={d.attributes}", f"storage.path={tmp_path / 'runs'}",
              "resources.workers_per_trial=1", "resources.use_gpu=false", "resources.cpus_per_worker=1", "resources.gpus_per_worker=0",
              f"evaluation.weights_dir={standard_weights.dir}", f"evaluation.cache_dir={tmp_path / 'eval-cache'}"]
    train = ["train.max_steps=1", "train.global_batch_size=1", "train.iso_batch=1", "train.p=0", "train.checkpoint_every=1",
             "train.report_every=1", "train.mixed_precision=no"]
    out, train_s = _run(["train", SPEC, *(a for kv in common + train for a in ("--set", kv))], env, tmp_path / "train.log")
    assert f"base={CELEBAHQ}" in out and "lambda_iso=0.0001 p=0 " in out
    ckpt = Path(re.search(r"final checkpoint \(DDPMPipeline directory\): (\S+)", out).group(1))
    assert re.search(r"done in \d+ s: step 1 loss=", out), out[-2000:]
    iso = re.search(r"step 1/1 loss=\S+ dsm_loss=\S+ iso_loss=(\S+)", out)
    assert iso and float(iso.group(1)) > 0, out[-2000:]  # the step took the isometry term

    from diffusers import UNet2DModel

    tuned = UNet2DModel.from_pretrained(ckpt / "unet" if (ckpt / "unet").is_dir() else ckpt)
    assert sum(p.numel() for p in tuned.parameters()) == REAL_CELEBAHQ_PARAMS and tuned.config.sample_size == 256
    base = torch.load(hub_cache_real.snapshot(CELEBAHQ) / REPOS[CELEBAHQ].weights[0], map_location="cpu", weights_only=True)
    moved = [k for k, v in tuned.state_dict().items() if not torch.equal(v, base[k])]
    drift = max(float((tuned.state_dict()[k] - base[k]).abs().max()) for k in base)
    assert moved and drift < 1e-2, (len(moved), drift)  # one small Adam step away from the cached weights, not a fresh init

    sizes = ["evaluation.batch_size=2", "evaluation.fid.num_samples=2", "evaluation.fid.ddim_steps=1", "evaluation.fid.reference_samples=8",
             "evaluation.ppl.num_samples=2", "evaluation.ppl.ddim_steps=1", "evaluation.ppl.stop_width=null",
             "evaluation.bootstrap.resamples=0", "evaluation.screening=null"]
    out, eval_s = _run(["eval", str(ckpt), "--spec", SPEC, *(a for kv in common + sizes for a in ("--set", kv)),
                        "--metrics", "fid", "ppl"], env, tmp_path / "eval.log")
    print(f"\n[celebahq-256 real size] isosweep train (1 iso step): {train_s:.0f} s; isosweep eval (fid, ppl): {eval_s:.0f} s")
    rows = _metric_lines(out)
    for value, backbone in rows.values():
        assert math.isfinite(value) and value > 0 and backbone != "none", rows  # through the standard backbone


def _metric_lines(out: str) -> dict[str, tuple[float, str]]:
    """`isosweep eval`'s metric lines: name -> (value, backbone)."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) >= 3 and cells[0] in ("fid", "ppl"):
            rows[cells[0]] = (float(cells[1]), cells[-1])
    assert set(rows) == {"fid", "ppl"}, out[-2000:]
    return rows
