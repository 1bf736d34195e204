"""Checks sequential PPL (`evaluation.ppl.stop_width`, docs/metrics.md "Screening") on finished sweeps: had each
trial's PPL stopped once its interval was tight enough, how many pairs would it have used, and would the Pareto front
and champion be the same?

    python -m bench.sequential_ppl /work/study_runs/shapes_study_s[012]-* /work/study_runs/shapes_study_ablations-* \
        --stop-width 0.25,0.5,1.0 --round-pairs 32

No sampling: pair i of a PPL depends only on (seed, i), so a sequential PPL that stops after n pairs has exactly the
first n pairs of the trial's full record (`eval/ppl_pairs.npy` of the checkpoint its row names). The replay runs the
evaluation's own loop (`sequential_pairs`) and stopping rule (`ppl_interval_tight`) on them, then recomputes the PPL
and its interval from the pairs used (`ppl_summary`, the sweep's `evaluation.bootstrap`), and selects on those rows
(`isosweep.results.rows.summarize`) against the same rows with every pair. UNet evaluations: two images per pair per
DDIM step.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from isosweep.evaluation.metrics.confidence import ppl_interval_tight, ppl_summary
from isosweep.evaluation.metrics.ppl import sequential_pairs


def stopped_pairs(d: np.ndarray, *, stop_width: float, round_pairs: int, level: float, seed: int) -> np.ndarray:
    """The pairs a sequential PPL over `d` (in pair order) would have used: one process, the evaluation's own loop."""
    return sequential_pairs(lambda a, b: d[a:b], lambda v: [v], num_samples=len(d), round_pairs=round_pairs, rank=0,
                            world_size=1, enough=lambda x: ppl_interval_tight(x, stop_width=stop_width, level=level, seed=seed))


def replay(sweep: Path, stop_width: float, round_pairs: int) -> dict:
    from isosweep.results.rows import summarize
    from isosweep.results.readback import read_sweep

    spec, outcome = read_sweep(sweep)
    ev = spec.evaluation
    done = [dict(r) for r in outcome.rows if r["status"] == "DONE"]
    full_rows, seq_rows, used = [], [], {}
    for r in done:
        d = np.load(sweep / "train" / r["trial_id"] / Path(r["checkpoint_path"]).name / "eval" / "ppl_pairs.npy")
        if len(d) != ev.ppl.num_samples:
            raise SystemExit(f"{sweep.name} {r['trial_id']}: {len(d)} PPL pairs recorded, the spec says {ev.ppl.num_samples}")
        part = stopped_pairs(d, stop_width=stop_width, round_pairs=round_pairs, level=ev.bootstrap.level, seed=ev.seed)
        boot = {"resamples": ev.bootstrap.resamples, "level": ev.bootstrap.level, "seed": ev.seed}
        whole, seq = ppl_summary(d, **boot), ppl_summary(part, **boot)
        used[r["trial_id"]] = (len(part), seq["ppl"], whole["ppl"], whole.get("ppl_lo", math.nan) <= seq["ppl"] <= whole.get("ppl_hi", math.nan))
        full_rows.append({**r, "fidelity": "full", **{k: whole[k] for k in ("ppl", "ppl_lo", "ppl_hi") if k in whole}})
        seq_rows.append({**r, "fidelity": "full", **{k: seq[k] for k in ("ppl", "ppl_lo", "ppl_hi") if k in seq}})
    front_a, champ_a = summarize(spec, full_rows)
    front_b, champ_b = summarize(spec, seq_rows)
    def ids(front) -> list[str]:
        return sorted(x["trial_id"] for x in front)

    def champ(c) -> str | None:
        return c.row["trial_id"] if c else None

    return {"sweep": spec.name, "trials": len(done), "pairs_all": len(done) * ev.ppl.num_samples,
            "pairs_used": sum(n for n, *_ in used.values()), "steps": ev.ppl.ddim_steps, "used": used,
            "same": ids(front_a) == ids(front_b) and champ(champ_a) == champ(champ_b),
            "front": (ids(front_a), ids(front_b)), "champion": (champ(champ_a), champ(champ_b))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", type=Path, help="finished sweep folders (results.csv, train/<trial>/...)")
    parser.add_argument("--stop-width", default="0.25,0.5,1.0", help="comma-separated evaluation.ppl.stop_width values")
    parser.add_argument("--round-pairs", type=int, default=32, help="evaluation.ppl.round_pairs: pairs between two looks")
    args = parser.parse_args(argv)
    widths = [float(w) for w in args.stop_width.split(",") if w.strip()]
    print(f"# sequential PPL replayed on the full records; round_pairs={args.round_pairs}")
    print()
    print("| sweep | stop_width | trials | pairs used per trial | PPL inside the full interval | front and champion | "
          "PPL UNet evals, all pairs | sequential | saved |")
    print("|---|---|---|---|---|---|---|---|---|")
    totals: dict[float, list[int]] = {w: [0, 0, 0, 0, 0, 0] for w in widths}
    for w in widths:
        for sweep in args.sweeps:
            res = replay(sweep, w, args.round_pairs)
            for t, (n, seq, whole, inside) in res["used"].items():
                print(f"#   {res['sweep']} {t} stop_width={w}: {n} pairs, PPL {seq:.4g} (all pairs {whole:.4g})", file=sys.stderr)
            evals_all, evals_seq = 2 * res["pairs_all"] * res["steps"], 2 * res["pairs_used"] * res["steps"]
            counts = sorted(n for n, *_ in res["used"].values())
            inside = sum(v[3] for v in res["used"].values())
            verdict = "SAME" if res["same"] else f"DIFFERENT: front {res['front']}, champion {res['champion']}"
            print(f"| {res['sweep']} | {w:g} | {res['trials']} | {counts[0]}-{counts[-1]} | {inside}/{res['trials']} | {verdict} | "
                  f"{evals_all:,} | {evals_seq:,} | {1 - evals_seq / evals_all:.0%} |")
            tot = totals[w]
            for i, v in enumerate((res["trials"], inside, int(res["same"]), 1, evals_all, evals_seq)):
                tot[i] += v
        tot = totals[w]
        print(f"| **all** | {w:g} | {tot[0]} | | {tot[1]}/{tot[0]} | {tot[2]}/{tot[3]} SAME | {tot[4]:,} | {tot[5]:,} | "
              f"{1 - tot[5] / tot[4]:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
