"""Which denoising target lets the built-in shapes model pretrain in a few hundred CPU steps.

    python bench/pretrain_targets.py --target sample --steps 700 --threads 1 --out /tmp/x0.png

Trains the built-in UNet (`models.builtin_unet_config`) on `shapes` with the pretraining recipe of
`models.pretrain_builtin` (Adam 2e-3, warm-up 100, cosine decay, EMA 0.995, batch 32) but a chosen
target: epsilon, v_prediction or sample (x_0), optionally with min-SNR-5 loss weighting. Then samples
64 images with 10-step DDIM and prints one JSON line: wall time, final loss and `background`, the
fraction of pixels within 0.15 of black in every channel (the data: about 0.94), next to the data's
own fraction. `--out` writes the 64 samples as a grid. docs/training.md has the table it produced.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch


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

    from diffusers import DDIMScheduler, UNet2DModel

    from isosweep.core.losses import add_noise, denoising_target
    from isosweep.data.datasets import ShapesDataset
    from isosweep.models.builtin import builtin_unet_config, default_scheduler

    torch.manual_seed(0)
    unet = UNet2DModel(**builtin_unet_config(32))
    sched = default_scheduler(1000, args.target)
    data = ShapesDataset(4096, 32, 0)
    images = torch.stack([data[i][0] for i in range(len(data))])
    ema = [q.detach().clone() for q in unet.parameters()]
    opt = torch.optim.Adam(unet.parameters(), lr=args.lr)
    lr_at = lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))  # noqa: E731
    lrs = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(0)
    abar = sched.alphas_cumprod
    t0, losses = time.time(), []
    for step in range(args.steps):
        x0 = images[torch.randint(0, len(images), (args.batch,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        per = ((unet(add_noise(x0, noise, t, abar), t).sample - denoising_target(args.target, x0, noise, t, abar)) ** 2).mean(dim=(1, 2, 3))
        if args.min_snr:
            snr = abar[t] / (1 - abar[t])
            per = per * torch.clamp(snr, max=5.0) / {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[args.target]
        loss = per.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lrs.step()
        with torch.no_grad():
            d = min(0.995, (1 + step) / (10 + step))
            for e, q in zip(ema, unet.parameters()):
                e.lerp_(q.detach(), 1 - d)
        losses.append(loss.item())
    wall = time.time() - t0
    with torch.no_grad():
        for e, q in zip(ema, unet.parameters()):
            q.copy_(e)
    unet.eval()
    ddim = DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(10)
    x = torch.randn((64, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    x = x.clamp(-1, 1)

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
