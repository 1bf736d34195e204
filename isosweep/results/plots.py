"""The pictures a sweep leaves: the Pareto front, RTL(t) curves, interpolation strips, frame distances.

Every figure goes through `figure()`: the Agg backend (no display on a cluster), one saved PNG, and the
figure closed afterwards (a long sweep must not keep figures alive).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: there is no display on a cluster node

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
from PIL import Image  # noqa: E402

from isosweep.results.pareto import Choice, has_interval, interval  # noqa: E402


@contextlib.contextmanager
def figure(out: str | Path, *, figsize: tuple[float, float], dpi: int = 120, **subplots) -> Iterator[tuple]:
    """`with figure(path, figsize=(w, h)) as (fig, ax):` draw; the PNG is written to `path` on exit."""
    fig, ax = plt.subplots(figsize=figsize, dpi=dpi, **subplots)
    try:
        yield fig, ax
        fig.tight_layout()
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    finally:
        plt.close(fig)


def pareto_plot(rows: list[dict], front: list[dict], champion: Choice | None, out: Path, objectives=("fid", "ppl"),
                backbones=None) -> Path:
    """Scatter of every evaluated trial in (FID, PPL) with its bootstrap interval bars, the front joined, baseline and
    champion marked."""
    a, b = objectives
    backbones = backbones or {}
    with figure(out, figsize=(5.5, 4.2)) as (fig, ax):
        pts = [r for r in rows if math.isfinite(r.get(a, math.nan)) and math.isfinite(r.get(b, math.nan))]
        ax.scatter([r[a] for r in pts], [r[b] for r in pts], c="0.6", s=28, label="trials", zorder=2)
        for k, axis in ((a, "x"), (b, "y")):  # bootstrap intervals where the rows have them (PPL, mRTL, MCN, VoR)
            bars = [(r, *interval(r, k)) for r in pts if has_interval(r, k)]
            if bars:
                err = [[r[k] - lo for r, lo, _ in bars], [hi - r[k] for r, _, hi in bars]]
                ax.errorbar([r[a] for r, *_ in bars], [r[b] for r, *_ in bars], fmt="none", ecolor="0.7", elinewidth=0.8,
                            zorder=1, **{f"{axis}err": err})
        if front:
            ax.plot([r[a] for r in front], [r[b] for r in front], "-o", color="tab:blue", ms=6, label="Pareto front", zorder=3)
        for r in pts:
            if r.get("baseline"):
                ax.scatter([r[a]], [r[b]], marker="s", s=80, facecolors="none", edgecolors="k", label="baseline (lambda=0)", zorder=4)
            label = "baseline" if r.get("baseline") else f"{r['iso_metric'][:5]} lam={r['lambda_iso']:.0e} p={r['p']:g}"
            ax.annotate(label, (r[a], r[b]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if champion:
            c = champion.row
            ax.scatter([c[a]], [c[b]], marker="*", s=220, color="tab:red", label="champion", zorder=5)
        ax.set_xlabel(f"{a.upper()} [{backbones.get(a, '?')}] (lower is better)")
        ax.set_ylabel(f"{b.upper()} [{backbones.get(b, '?')}] (lower is better)")
        ax.set_title("Sweep: FID vs PPL")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return out


def rtl_plot(curves: dict[str, Sequence[float]], out: Path) -> Path:
    """RTL(t) per DDIM step for one or several models in one plot (the paper's Fig. 5)."""
    with figure(out, figsize=(5.5, 3.6)) as (fig, ax):
        for label, curve in curves.items():
            ax.plot(range(1, len(curve) + 1), list(curve), "-o", ms=3, label=label)
        ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
        ax.set_xlabel("DDIM step (from x_T towards x_0)")
        ax.set_ylabel("RTL(t): path length in H / chord")
        ax.set_title("Relative trajectory length along slerp paths")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return out


def strips_figure(entries: list[tuple[str, Path, list[float] | None]], out: Path) -> Path:
    """Interpolation strips stacked, each with its adjacent-frame distances plotted under it (Fig. 6)."""
    n = len(entries)
    with figure(out, figsize=(8, 2.3 * n), nrows=2 * n, ncols=1, gridspec_kw={"height_ratios": [2, 1] * n}) as (fig, axes):
        axes = list(axes) if n else []
        for i, (label, img_path, dists) in enumerate(entries):
            ax_img, ax_d = axes[2 * i], axes[2 * i + 1]
            ax_img.imshow(Image.open(img_path))
            ax_img.set_title(label, fontsize=8)
            ax_img.axis("off")
            if dists:
                ax_d.plot(range(1, len(dists) + 1), dists, "-o", ms=3)
                ax_d.set_ylim(bottom=0)
            ax_d.set_ylabel("d(frame k, k+1)", fontsize=6)
            ax_d.tick_params(labelsize=6)
            ax_d.grid(alpha=0.3)
    return out


def distance_plot(dists: Sequence[float], out: str | Path, title: str) -> Path:
    """Pixel distance between adjacent frames of one interpolation (`isosweep interpolate`)."""
    with figure(out, figsize=(4, 2.4), dpi=100) as (fig, ax):
        ax.plot(range(1, len(dists) + 1), list(dists), "-o", ms=3)
        ax.set_xlabel("adjacent frame pair (i, i+1)")
        ax.set_ylabel("pixel L2 (RMS, [-1, 1] scale)")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return Path(out)
