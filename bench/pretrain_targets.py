"""Which denoising target lets the built-in shapes model pretrain in a few hundred CPU steps.

    python -m bench.pretrain_targets --target sample --steps 700 --threads 1 --out /tmp/x0.png

Trains the built-in UNet (`models.builtin_unet_config`) on `shapes` with the pretraining recipe of
`models.pretrain_builtin` (`models.builtin.pretrain_unet`: Adam 2e-3, warm-up 100, cosine decay, EMA 0.995, batch 32) but a chosen
target: epsilon, v_prediction or sample (x_0), optionally with min-SNR-5 loss weighting. Then samples
64 images with 10-step DDIM and prints one JSON line: wall time, final loss and `background`, the
fraction of pixels within 0.15 of black in every channel (the data: about 0.94), next to the data's
own fraction. `--out` writes the 64 samples as a grid. docs/training.md has the table it produced.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def min_snr_weight(sched, target: str):
    """Min-SNR-5 per-sample weights (Hang et al. 2023) in the target's own units: eps and v errors are SNR and SNR + 1
    times x_0's."""
    abar = sched.alphas_cumprod

    def weight(t: torch.Tensor) -> torch.Tensor:
        snr = abar[t] / (1 - abar[t])
        return torch.clamp(snr, max=5.0) / {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[target]

    return weight


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=["epsilon", "v_prediction", "sample"], default="sample")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-snr", action="store_true", help="min-SNR-5 loss weighting (Hang et al. 2023)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the 64 samples here (PNG)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import UNet2DModel

    from isosweep.core.sampling import ddim_sample
    from isosweep.data.datasets import ShapesDataset
    from isosweep.models.builtin import builtin_unet_config, default_scheduler, pretrain_unet

    torch.manual_seed(0)
    unet = UNet2DModel(**builtin_unet_config(32))
    sched = default_scheduler(1000, args.target)
    data = ShapesDataset(4096, 32, 0)
    images = torch.stack([data[i][0] for i in range(len(data))])
    weight = min_snr_weight(sched, args.target) if args.min_snr else None
    t0 = time.time()
    losses = pretrain_unet(unet, sched, images, steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=100,
                           ema_decay=0.995, seed=0, progress=False, weight=weight)
    wall = time.time() - t0
    x = ddim_sample(unet, sched, torch.randn((64, 3, 32, 32), generator=torch.Generator().manual_seed(0)), 10,
                    progress=False).images

    def black(imgs: torch.Tensor) -> float:
        return ((imgs + 1).abs() < 0.15).all(dim=1).float().mean().item()

    if args.out:

        from isosweep.data.images import make_grid

        make_grid(x.numpy().transpose(0, 2, 3, 1)).save(args.out)
    print(json.dumps(dict(target=args.target, min_snr=args.min_snr, steps=args.steps, wall_s=round(wall, 1),
                          final_loss=round(float(np.mean(losses[-50:])), 5), background=round(black(x), 3),
                          background_data=round(black(images[:64]), 3))))


if __name__ == "__main__":
    main()
