"""Table 3-style summary of a finished sweep: every trial against the baseline, and all RTL(t) curves.

    python bench/study_table.py runs/shapes_study-YYYYMMDD-HHMMSS --rtl-plot docs/img/study_rtl.png

Reads the sweep folder's `results.csv` (written by `isosweep run`/`isosweep results`) and each trial's
`eval/metrics.json`, and prints a Markdown table: (p, G, lambda_iso), each metric with its bootstrap
interval where the sweep has one (`12.3 [11.1, 13.6]`), and its change relative to the baseline row
(lambda_iso = 0), starred where the two intervals do not overlap (the change is beyond the noise:
`isosweep.results.selection.lower_beyond_noise`). Lower is better for every metric in it. With
`--rtl-plot`, draws the RTL(t) curve of every trial in one figure (the paper's Fig. 5, all trials); with
`--strips`, stacks the slerp strips of the baseline and the stereographic trials (the paper's Fig. 6).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from isosweep.evaluation.record import metric_text
from isosweep.results.selection import has_interval, lower_beyond_noise

METRICS = ("fid", "ppl", "mrtl", "mcn", "vor")


def _g(row: dict) -> str:
    """The trial's metric G: column `iso_metric` (sweeps before the rename wrote `metric`)."""
    return row.get("iso_metric") or row.get("metric", "")


def _num(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--rtl-plot", type=Path, default=None)
    p.add_argument("--strips", type=Path, default=None,
                   help="slerp strips (same seeds) of the baseline and every stereographic trial, frame distances under each")
    args = p.parse_args()

    rows = list(csv.DictReader((args.sweep_dir / "results.csv").open()))
    base = next((r for r in rows if r["baseline"] == "True"), None)
    if base is None:
        raise SystemExit(f"{args.sweep_dir}/results.csv has no baseline row")
    rows.sort(key=lambda r: (r["baseline"] != "True", _num(r["p"]), _g(r), _num(r["lambda_iso"])))
    metrics = [m for m in METRICS if not math.isnan(_num(base.get(m)))]
    head = ["p", "G", "lambda_iso", *metrics, "role"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        is_base = r["baseline"] == "True"
        cells = ["1 (baseline)" if is_base else f"{_num(r['p']):g}", "-" if is_base else _g(r),
                 "0" if is_base else f"{_num(r['lambda_iso']):g}"]
        nums, base_nums = {k: _num(v) for k, v in r.items()}, {k: _num(v) for k, v in base.items()}
        for m in metrics:
            v, b = nums[m], base_nums[m]
            sure = has_interval(nums, m) and (lower_beyond_noise(nums, base_nums, m) or lower_beyond_noise(base_nums, nums, m))
            cells.append(metric_text(nums, m) if is_base else f"{metric_text(nums, m)} ({100 * (v - b) / b:+.0f}%{'*' if sure else ''})")
        cells.append(r.get("role", ""))
        print("| " + " | ".join(cells) + " |")
    names = {m: base.get(f"backbone_{m}", "?") for m in metrics}
    print("\nbackbones: " + ", ".join(f"{m}={n}" for m, n in names.items()))

    if args.rtl_plot:
        from isosweep.results.plots import rtl_plot
        from isosweep.results.report import load_trial_eval

        curves = {}
        for r in rows:
            curve = load_trial_eval(r).get("rtl_curve")
            if curve:
                label = "baseline" if r["baseline"] == "True" else f"p={_num(r['p']):g} {_g(r)[:6]} lambda={_num(r['lambda_iso']):g}"
                curves[label] = curve
        rtl_plot(curves, args.rtl_plot)
        print(f"wrote {args.rtl_plot} ({len(curves)} curves)")
    if args.strips:
        from isosweep.results.plots import strips_figure
        from isosweep.results.report import load_trial_eval

        entries = []
        for r in rows:
            if r["baseline"] != "True" and _g(r) != "stereographic":
                continue
            ev = load_trial_eval(r)
            if "slerp_strip" in ev.get("images", {}):
                label = "baseline" if r["baseline"] == "True" else f"p={_num(r['p']):g}, stereographic, lambda_iso={_num(r['lambda_iso']):g}"
                entries.append((label, ev["images"]["slerp_strip"], (ev.get("frame_distances") or {}).get("slerp")))
        strips_figure(entries, args.strips)
        print(f"wrote {args.strips} ({len(entries)} strips)")


if __name__ == "__main__":
    main()
