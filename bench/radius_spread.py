"""How much G = identity differs from G = stereographic on a spec's data: the spread of r = |x_t| and of g.

    python -m bench.radius_spread search_spaces/shapes_study.yaml [--batch 16] [--batches 200]

docs/math.md section 3: G = identity multiplies each sample's Tr(R) by g = (r - x[n-1])^2 and Tr(R^2) by g^2, with
r = |x_t|. L_iso is a ratio that ignores a factor common to the samples it averages, so identity and
stereographic differ only as much as g varies across those samples. Which samples those are depends on
`train.iso_timesteps`: per_timestep averages one micro-batch at one t (g varies with the image only), pooled at
the batch's own timesteps, t ~ U{pT..T-1} (g varies with t too). For p in {0, 0.5} this draws `--batches`
micro-batches of `--batch` training images (the spec's dataset, the scheduler of the built-in base model) and
prints the median over batches of the within-batch spread of r^2/n (max/min) and of g (std/mean), both ways.
Base model and data: the spec's; nothing is trained.
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from diffusers import DDPMScheduler

    from isosweep.core.losses import add_noise, iso_cutoff
    from isosweep.data.datasets import build_dataset
    from isosweep.spec import load_spec

    spec = load_spec(args.spec, [])
    data = build_dataset(spec.dataset, train=True)
    scheduler = DDPMScheduler(num_train_timesteps=1000)  # the built-in and the paper's linear schedule
    abar, T = scheduler.alphas_cumprod, scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(args.seed)
    print(f"{args.spec}: {len(data)} images of {tuple(data[0][0].shape)}, n = {data[0][0].numel()}, "
          f"{args.batches} micro-batches of {args.batch}")
    print("p    iso_timesteps   r^2/n median   r^2/n max/min in a batch (median)   g std/mean in a batch (median)")
    for p in (0.0, 0.5):
        cut = iso_cutoff(p, T)
        for mode in ("per_timestep", "pooled"):
            ratios, spreads, levels = [], [], []
            for _ in range(args.batches):
                idx = torch.randint(0, len(data), (args.batch,), generator=gen)
                x0 = torch.stack([data[int(i)][0] for i in idx]).float()
                if mode == "per_timestep":
                    t = torch.full((args.batch,), int(torch.randint(cut, T, (1,), generator=gen)))
                else:
                    t = torch.randint(cut, T, (args.batch,), generator=gen)
                x_t = add_noise(x0, torch.randn(x0.shape, generator=gen), t, abar).flatten(1)
                n = x_t.shape[1]
                r = x_t.norm(dim=1)
                g = (r - x_t[:, -1]) ** 2
                r2n = r ** 2 / n
                levels.append(float(r2n.median()))
                ratios.append(float(r2n.max() / r2n.min()))
                spreads.append(float(g.std() / g.mean()))
            print(f"{p:<4g} {mode:<15} {statistics.median(levels):<14.3f} {statistics.median(ratios):<35.3f} "
                  f"{statistics.median(spreads):.3f}")


if __name__ == "__main__":
    main()
