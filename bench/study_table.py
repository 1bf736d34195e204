"""The study's tables (docs/results.md): every configuration over its training seeds, against the baseline.

    python -m bench.study_table /work/study_runs/shapes_study_s0-* /work/study_runs/shapes_study_s1-* ... \
        --rtl-plot docs/img/study_rtl.png --strips docs/img/study_strips.png

Takes one or more finished sweep folders (each with `results.csv`, written by `isosweep run`/`isosweep results`,
and `spec.yaml`). A row's training seed and loss timestep handling are its own columns when a point of
`search.points` set them, else the sweep's `train.seed` / `train.iso_timesteps` (with " every n" appended when the
sweep's `train.iso_every` is n > 1: lazy regularisation, its own configuration). Rows with lambda_iso = 0 (the
sweep's baseline, or a point repeating it at another seed) are the baseline of their seed.

Prints two Markdown tables:
- per configuration (p, G, lambda_iso, timesteps): each metric's mean over seeds +- its standard deviation over
  seeds, and the change of the mean against the baseline's mean, starred when the change is beyond the noise in
  *every* seed (the row's bootstrap interval lies wholly on the same side of the same seed's baseline interval:
  `isosweep.results.pareto.lower_beyond_noise`; FID, the PPL median and LS have no interval, so no star), and
  the steps the best-FID rule selected per seed;
- per trial: every row with its bootstrap intervals (`12.3 [11.1, 13.6]`).
Then the stage-1 rule (`best_lambda`): among the stereographic p = 0.5 per-timestep configurations whose mean FID is
within 10% of the baseline's (the specs' selection.fid_tolerance), the largest lambda_iso whose PPL is in no seed
higher, beyond the noise, than that of the configuration with the lowest mean PPL.
Lower is better for every metric here but ls_max (the LS of latents that predict nothing: read LS against it;
ls_rel = ls / ls_max, 1 when the latents predict nothing). `--rtl-plot` draws the seed-mean RTL(t) curve per configuration (Fig. 5);
`--fid-curves` draws every trial's cheap-FID curve, a panel per seed;
`--strips` stacks seed 0's slerp strips of the baseline and every stereographic configuration (Fig. 6).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

from isosweep.evaluation.record import metric_text
from isosweep.results.pareto import has_interval, lower_beyond_noise

METRICS = ("fid", "ppl", "ppl_median", "mrtl", "mcn", "vor", "mcn_t100", "vor_t100", "ls", "ls_h", "ls_max", "ls_rel")  # ls_max: context, not a score; ls_rel = ls / ls_max
FID_TOLERANCE = 0.10
BASELINE = ("baseline",)
TEXT_COLUMNS = {"trial_id", "status", "role", "baseline", "iso_metric", "metric", "iso_timesteps", "checkpoint_path",
                "mlflow_run_id", "tracking_pending"}  # a Tune trial id such as 12345_00001 would read as a number


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def load_rows(sweep_dirs: list[Path]) -> list[dict]:
    """Every row of the sweeps, with `seed`, `iso_timesteps`, numbers as floats and `sweep` (its folder name)."""
    out = []
    for d in sweep_dirs:
        spec = yaml.safe_load((d / "spec.yaml").read_text()) or {}
        train = spec.get("train", {})
        for r in csv.DictReader((d / "results.csv").open()):
            row = {k: (_num(v) if k not in TEXT_COLUMNS and not k.startswith("backbone_") and _is_number(v) else v)
                   for k, v in r.items()}
            row["seed"] = int(_num(r.get("seed"))) if _is_number(r.get("seed")) else int(train.get("seed", 0))
            row["iso_timesteps"] = r.get("iso_timesteps") or train.get("iso_timesteps", "pooled")
            if int(train.get("iso_every", 1)) > 1:  # lazy regularisation is another configuration: its own rows
                row["iso_timesteps"] += f" every {int(train['iso_every'])}"
            row["iso_metric"] = r.get("iso_metric") or r.get("metric", "")
            row["sweep"] = d.name
            if _is_number(r.get("ls")) and _is_number(r.get("ls_max")):  # LS against the LS of latents that say nothing
                row["ls_rel"] = _num(r["ls"]) / _num(r["ls_max"])
            out.append(row)
    return out


def drop_repeats(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """One row per (configuration, seed): a repeat (the baseline of seed 0 runs in both stages) is dropped, and
    reported with both FIDs and PPLs, which tell whether the same training and evaluation reproduce."""
    seen: dict[tuple, dict] = {}
    kept, notes = [], []
    for r in rows:
        key = (config_key(r), r["seed"])
        if r.get("status") == "DONE" and key in seen:
            first = seen[key]
            notes.append(f"{'baseline' if key[0] == BASELINE else key[0]} seed {r['seed']} ran twice ({first['sweep']}, {r['sweep']}): "
                         f"fid {first.get('fid'):.6g} / {r.get('fid'):.6g}, ppl {first.get('ppl'):.6g} / {r.get('ppl'):.6g}")
            continue
        if r.get("status") == "DONE":
            seen[key] = r
        kept.append(r)
    return kept, notes


def _is_number(v) -> bool:
    return v not in (None, "") and not math.isnan(_num(v))


def config_key(row: dict) -> tuple:
    if row["lambda_iso"] == 0.0:
        return BASELINE
    return (row["p"], row["iso_metric"], row["lambda_iso"], row["iso_timesteps"])


def config_label(key: tuple) -> list[str]:
    if key == BASELINE:
        return ["1 (baseline)", "-", "0", "-"]
    p, g, lam, ts = key
    return [f"{p:g}", g, f"{lam:g}", ts]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def summary(rows: list[dict], wanted: tuple[str, ...] = METRICS, reference: tuple = BASELINE) -> tuple[list[str], list[list[str]], dict]:
    """(header, lines, means) of the per-configuration table; means[key][metric] = seed mean. Changes are against
    `reference` (the baseline, or a configuration key: `--reference`), seed by seed."""
    done = [r for r in rows if r.get("status") == "DONE"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in done:
        groups[config_key(r)].append(r)
    if BASELINE not in groups:
        raise SystemExit("no finished lambda_iso = 0 row: the study has no baseline")
    if reference not in groups:
        raise SystemExit(f"no finished rows of the reference configuration {reference}")
    base_by_seed = {r["seed"]: r for r in groups[reference]}
    metrics = [m for m in METRICS if any(math.isfinite(_num(r.get(m))) for r in groups[BASELINE])]
    means = {k: {m: _mean_sd([_num(r.get(m)) for r in g])[0] for m in metrics} for k, g in groups.items()}
    metrics = [m for m in metrics if m in wanted]
    head = ["p", "G", "lambda_iso", "timesteps", "seeds", *metrics, "selected steps"]
    lines = []
    order = sorted(groups, key=lambda k: (k != BASELINE, str(k)))
    for key in order:
        group = sorted(groups[key], key=lambda r: r["seed"])
        cells = config_label(key) + [",".join(str(r["seed"]) for r in group)]
        for m in metrics:
            mean, sd = _mean_sd([_num(r.get(m)) for r in group])
            text = "-" if math.isnan(mean) else f"{mean:.4g}" + ("" if math.isnan(sd) else f" ± {sd:.2g}")
            if key != reference and math.isfinite(mean):
                b = means[reference][m]
                pairs = [(r, base_by_seed[r["seed"]]) for r in group if r["seed"] in base_by_seed]
                pairs = [(r, b_row) for r, b_row in pairs if has_interval(r, m) and has_interval(b_row, m)]  # FID and LS have none
                lower = bool(pairs) and all(lower_beyond_noise(r, b_row, m) for r, b_row in pairs)
                higher = bool(pairs) and all(lower_beyond_noise(b_row, r, m) for r, b_row in pairs)
                text += f" ({100 * (mean - b) / b:+.0f}%{'*' if lower or higher else ''})"
            cells.append(text)
        cells.append(",".join("-" if math.isnan(_num(r.get("selected_step"))) else f"{_num(r['selected_step']):g}" for r in group))
        lines.append(cells)
    return head, lines, means


def per_trial(rows: list[dict], wanted: tuple[str, ...] = METRICS) -> tuple[list[str], list[list[str]]]:
    metrics = [m for m in METRICS if m in wanted and any(math.isfinite(_num(r.get(m))) for r in rows)]
    head = ["seed", "p", "G", "lambda_iso", "timesteps", *metrics, "selected step", "trial"]
    lines = []
    for r in sorted(rows, key=lambda r: (config_key(r) != BASELINE, str(config_key(r)), r["seed"])):
        cells = [str(r["seed"])] + config_label(config_key(r))
        cells += [metric_text(r, m) for m in metrics]
        step = _num(r.get("selected_step"))
        cells += ["-" if math.isnan(step) else f"{step:g}", f"{r['sweep']}/{r['trial_id']} {r.get('status', '')}"]
        lines.append(cells)
    return head, lines


def best_lambda(rows: list[dict], means: dict) -> float | None:
    """The stage-1 rule (module docstring): the largest lambda_iso among the stereographic p = 0.5 per-timestep
    configurations whose mean FID is within FID_TOLERANCE of the baseline's and whose PPL is, in no seed, higher
    beyond the noise than that of the configuration with the lowest mean PPL: the most isometry that costs
    nothing the selection metrics can resolve."""
    fid_cap = means[BASELINE]["fid"] * (1 + FID_TOLERANCE)
    keys = [k for k, m in means.items() if k != BASELINE and k[0] == 0.5 and k[1] == "stereographic"
            and k[3] == "per_timestep" and m["fid"] <= fid_cap]
    if not keys:
        return None
    lowest = min(keys, key=lambda k: means[k]["ppl"])
    by_seed = {(config_key(r), r["seed"]): r for r in rows if r.get("status") == "DONE"}

    def no_worse(k) -> bool:
        pairs = [(r, by_seed.get((lowest, seed))) for (kk, seed), r in by_seed.items() if kk == k]
        return all(b is None or not lower_beyond_noise(b, r, "ppl") for r, b in pairs)

    return max(k[2] for k in keys if no_worse(k))


def fid_curves(rows: list[dict], out: Path) -> None:
    """Cheap FID against the training step for every trial, from the `selection.json` of its final checkpoint
    (`isosweep.training.best_step`), a panel per seed: how much of a FID difference is the training trajectory."""
    import json

    from isosweep.results.plots import figure

    seeds = sorted({r["seed"] for r in rows})
    with figure(out, figsize=(4.2 * len(seeds), 3.4), ncols=len(seeds), sharey=True) as (fig, axes):
        axes = list(axes) if len(seeds) > 1 else [axes]
        for ax, seed in zip(axes, seeds):
            for r in sorted((r for r in rows if r["seed"] == seed), key=lambda r: str(config_key(r))):
                path = Path(r.get("checkpoint_path") or "") / "selection.json"
                if not path.is_file():
                    continue
                curve = json.loads(path.read_text())["curve"]
                key = config_key(r)
                label = "baseline" if key == BASELINE else f"p={key[0]:g} {key[1][:6]} {key[2]:g} {key[3]}"
                ax.plot([c[0] for c in curve], [c[1] for c in curve], "-o", ms=3, label=label,
                        color="black" if key == BASELINE else None, lw=2 if key == BASELINE else 1)
            ax.set_title(f"training seed {seed}")
            ax.set_xlabel("fine-tuning step")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("cheap FID (256 samples)")
        axes[-1].legend(fontsize=6)


def markdown(head: list[str], lines: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in lines])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dirs", type=Path, nargs="+")
    p.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS, help="the columns of both tables")
    p.add_argument("--reference", type=float, default=0.0,
                   help="changes against this lambda_iso (stereographic, p = 0.5, per_timestep) instead of the baseline: "
                        "a control that shares the trials' random streams (paired by seed)")
    p.add_argument("--rtl-plot", type=Path, default=None)
    p.add_argument("--fid-curves", type=Path, default=None,
                   help="the cheap-FID curve of every trial (evaluation.checkpoint_fid), one panel per seed")
    p.add_argument("--strips", type=Path, default=None,
                   help="seed 0's slerp strips of the baseline and every stereographic configuration, frame distances under each")
    args = p.parse_args()

    rows, repeats = drop_repeats(load_rows(args.sweep_dirs))
    reference = BASELINE if args.reference == 0 else (0.5, "stereographic", args.reference, "per_timestep")
    head, lines, means = summary(rows, tuple(args.metrics), reference)
    print(markdown(head, lines))
    print()
    print(markdown(*per_trial(rows, tuple(args.metrics))))
    base = [r for r in rows if config_key(r) == BASELINE]
    names = {m: next((r.get(f"backbone_{m}") for r in base if r.get(f"backbone_{m}")), "?") for m in ("fid", "ppl", "vor")}
    print("\nbackbones: " + ", ".join(f"{m}={n}" for m, n in names.items()))
    for note in repeats:
        print("repeat: " + note)
    best = best_lambda(rows, means)
    print(f"stage-1 rule: best lambda_iso = {best:g}" if best is not None else "stage-1 rule: no lambda_iso within the FID tolerance")

    if args.fid_curves:
        fid_curves(rows, args.fid_curves)
        print(f"wrote {args.fid_curves}")
    if args.rtl_plot or args.strips:
        from isosweep.results.report import load_trial_eval

        evals = {id(r): load_trial_eval(r) for r in rows if r.get("status") == "DONE"}
    if args.rtl_plot:
        from isosweep.results.plots import rtl_plot

        by_key: dict[tuple, list[list[float]]] = defaultdict(list)
        for r in rows:
            curve = evals.get(id(r), {}).get("rtl_curve")
            if curve:
                by_key[config_key(r)].append(curve)
        curves = {}
        for key, cs in sorted(by_key.items(), key=lambda kv: (kv[0] != BASELINE, str(kv[0]))):
            label = "baseline" if key == BASELINE else f"p={key[0]:g} {key[1][:6]} lambda={key[2]:g} {key[3][:6]}"
            curves[f"{label} ({len(cs)} seeds)"] = [statistics.fmean(v) for v in zip(*cs)]
        rtl_plot(curves, args.rtl_plot)
        print(f"wrote {args.rtl_plot} ({len(curves)} curves)")
    if args.strips:
        from isosweep.results.plots import strips_figure

        entries = []
        for r in sorted(rows, key=lambda r: (config_key(r) != BASELINE, str(config_key(r)))):
            key = config_key(r)
            if r["seed"] != 0 or (key != BASELINE and key[1] != "stereographic"):
                continue
            ev = evals.get(id(r), {})
            if "slerp_strip" in ev.get("images", {}):
                label = "baseline" if key == BASELINE else f"p={key[0]:g}, stereographic, lambda_iso={key[2]:g}, {key[3]}"
                entries.append((label, ev["images"]["slerp_strip"], (ev.get("frame_distances") or {}).get("slerp")))
        strips_figure(entries, args.strips)
        print(f"wrote {args.strips} ({len(entries)} strips)")


if __name__ == "__main__":
    main()
