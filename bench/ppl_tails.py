"""The distribution behind PPL: per-pair path lengths of several models, not just their filtered mean.

    python -m bench.ppl_tails search_spaces/shapes_study.yaml BASE_DIR TRIAL_CKPT_DIR ... [--labels a b ...]

PPL (docs/math.md section 5) is the mean of d(G(slerp(t)), G(slerp(t + eps))) / eps^2 over pairs, after dropping
the values outside the 1st-99th percentiles. A generator that is flat almost everywhere and jumps in a few
places (for example between a blank image and a shape) can have a low filtered PPL: the jumps fall in the
dropped top 1%. This prints, for each model directory (a diffusers pipeline directory or a trial checkpoint),
the filtered mean together with the median, the 90th and 99th percentiles, the maximum and the
unfiltered mean of the same per-pair values, with the spec's evaluation settings (seed, pairs, DDIM steps,
eps, backbone).
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec")
    p.add_argument("models", nargs="+")
    p.add_argument("--labels", nargs="*", default=None)
    p.add_argument("--num-samples", type=int, default=None, help="override evaluation.ppl.num_samples")
    args = p.parse_args()

    from isosweep.core.sampling import DDIMSampler
    from isosweep.evaluation.features import resolver as bb
    from isosweep.evaluation.metrics.ppl import filtered_mean, ppl_distances
    from isosweep.evaluation.metrics.samples import SampleRange
    from isosweep.models.loading import load_unet_and_scheduler
    from isosweep.spec import BaseModelSpec, load_spec

    spec = load_spec(args.spec, [])
    ev = spec.evaluation
    n = args.num_samples or ev.ppl.num_samples
    nets = bb.load_feature_networks(ev, spec.dataset, needs=("ppl",), progress=False)
    labels = args.labels or args.models
    print(f"PPL per-pair values: {n} pairs, {ev.ppl.ddim_steps} DDIM steps, eps={ev.ppl.eps}, backbone={nets.names['ppl']}")
    print(f"{'model':<28} {'filtered':>10} {'median':>10} {'p90':>10} {'p99':>10} {'max':>12} {'mean':>12}")
    for label, model in zip(labels, args.models):
        unet, scheduler = load_unet_and_scheduler(BaseModelSpec(source=model), spec.dataset, progress=False)
        sampler = DDIMSampler(unet, scheduler, batch_size=ev.batch_size, progress=False)
        samples = SampleRange(sampler=sampler, shape=sampler.sample_shape, seed=ev.seed, ddim_steps=ev.ppl.ddim_steps, total=n,
                              batch_size=max(1, ev.batch_size // 2))
        d = ppl_distances(samples, nets.distance, eps=ev.ppl.eps)
        q = np.percentile(d, [50, 90, 99])
        print(f"{label:<28} {filtered_mean(d):>10.4g} {q[0]:>10.4g} {q[1]:>10.4g} {q[2]:>10.4g} {d.max():>12.4g} {d.mean():>12.4g}")


if __name__ == "__main__":
    main()
