"""How well DDIM inversion gives back held-out `shapes` images on the built-in base model, and what it costs on a CPU.

    OMP_NUM_THREADS=1 python -m bench.inversion [--steps 10 20 50 100] [--refine 0 2] [--n 8]
    OMP_NUM_THREADS=1 python -m bench.inversion --suite [--repeat 3]   # the demo spec's inversion metric
    python -m bench.inversion --write-images DIR [--n 4]               # the held-out images as PNGs, for isosweep invert

For each (steps, refine): invert n held-out shapes images (seed 123, not the training set's), redraw them from
their x_T with the same schedule, and print the reconstruction MSE (mean and max over images, pixels in [-1, 1]),
the std and max |x| of the x_T (a latent the sampler draws has std 1), and the seconds per image of the
inversion and of the redraw (one batch of n). `--from-below` derives an x_0 model's noise from the point below
each step, as diffusers' DDIMInverseScheduler does for prediction_type="sample" (its first step, which divides by
zero there, taken as isosweep takes it). The base model is the demo spec's (pretrained on a miss; cached).
`--suite` runs the demo spec's inversion metric (evaluation.inversion, inversion_mse and inversion_perceptual)
through `evaluate_model` instead and prints its numbers and the seconds of its share (`timings["inversion"]`: what it
adds to a demo trial, whose PPL loads the same distance network), `--repeat` times. `--write-images DIR` writes the
n held-out images as PNGs (shape_NN.png) and stops: inputs for `isosweep invert` (the README's round trip).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100])
    ap.add_argument("--refine", type=int, nargs="+", default=[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--from-below", action="store_true")
    ap.add_argument("--suite", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write-images", metavar="DIR")
    args = ap.parse_args()

    from isosweep.core import inversion
    from isosweep.core.sampling import ddim_sample
    from isosweep.data.datasets import ShapesDataset
    from isosweep.models.builtin import pretrain_builtin
    from isosweep.models.loading import load_local
    from isosweep.spec import load_spec

    spec = load_spec("search_spaces/demo.yaml", check_paths=False)
    if args.write_images:
        return _write_images(args.write_images, ShapesDataset(args.n, spec.dataset.resolution, seed=123))
    unet, scheduler = load_local(pretrain_builtin(spec.base_model, spec.dataset), None)
    data = ShapesDataset(args.n, spec.dataset.resolution, seed=123)
    images = torch.stack([data[i][0] for i in range(args.n)])
    if args.suite:
        return _suite(spec, unet, scheduler, args.repeat)
    if args.from_below:
        _derive_noise_from_below(inversion)
    print(f"built-in model ({scheduler.config.prediction_type} prediction), {args.n} images, "
          f"{torch.get_num_threads()} thread(s)")
    for steps in args.steps:
        for refine in args.refine:
            t0 = time.time()
            x_T = inversion.ddim_invert(unet, scheduler, images, steps, refine=refine, batch_size=args.n, progress=False)
            t1 = time.time()
            redrawn = ddim_sample(unet, scheduler, x_T, steps, batch_size=args.n, progress=False).images
            t2 = time.time()
            mse = ((redrawn.double() - images.double()) ** 2).flatten(1).mean(1)
            print(f"steps {steps:3d} refine {refine}: MSE mean {mse.mean():.4f} max {mse.max():.4f}  x_T std "
                  f"{x_T.std():.2f} max|x| {x_T.abs().max():.1f}  s/image: invert {(t1 - t0) / args.n:.2f} "
                  f"redraw {(t2 - t1) / args.n:.2f}")


def _write_images(folder: str, data) -> None:
    from PIL import Image

    from isosweep.data.images import save_png, to_uint8

    for i in range(len(data)):
        print(save_png(Image.fromarray(to_uint8(data[i][0].numpy())[0]), f"{folder}/shape_{i:02d}.png"))


def _suite(spec, unet, scheduler, repeat: int) -> None:
    """The demo's inversion metric through the suite, as a trial's evaluation runs it (the distance network loaded once)."""
    from isosweep.evaluation.suite import evaluate_model

    metrics = ["inversion_mse", "inversion_perceptual"]
    inv = spec.evaluation.inversion
    print(f"demo spec: {inv.num_images} images, {inv.ddim_steps} steps, refine {inv.refine}; {torch.get_num_threads()} thread(s)")
    for _ in range(repeat):
        r = evaluate_model(unet, scheduler, spec.evaluation, spec.dataset, metrics=metrics, device="cpu", progress=False,
                           images=False)
        print(f"inversion share {r.timings['inversion']:.2f} s: " + "  ".join(
            f"{m} {r.metrics[m]:.4f} [{r.metrics[m + '_lo']:.4f}, {r.metrics[m + '_hi']:.4f}] ({r.backbones[m]})" for m in metrics))


def _derive_noise_from_below(inversion) -> None:
    """An x_0 model's noise from the point below the step (x, at its alpha_bar), not from the guess at t."""
    plain = inversion._invert_step

    def step(unet, ddim, inverse, x, t, refine, bar):
        below = t - ddim.config.num_train_timesteps // ddim.num_inference_steps
        if below < 0:
            return plain(unet, ddim, inverse, x, t, refine, bar)
        alpha_below, guess = ddim.alphas_cumprod[below], x
        for _ in range(1 + refine):
            x0 = unet(guess, t).sample
            guess = inverse.step((x - alpha_below.sqrt() * x0) / (1 - alpha_below).sqrt(), t, x).prev_sample
        return guess

    inversion._invert_step = step


if __name__ == "__main__":
    main()
