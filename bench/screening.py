"""Checks multi-fidelity evaluation (`evaluation.screening`, docs/metrics.md "Screening") on finished sweeps that
were evaluated in full: would screening have kept the same Pareto front and champion, and what would it save?

    nice -n 15 python -m bench.screening /work/study_runs/shapes_study_s[012]-* /work/study_runs/shapes_study_ablations-*

For every DONE trial of each sweep (each sweep on its own: selection is per sweep) the trial's final model (the
checkpoint its row names, manifest verified) is evaluated again at the screening sizes, exactly as a screening
sweep's trial would be (`trial_evaluator` with `evaluation.screening` set: FID and PPL, each with its bootstrap
interval; the same evaluation seed, so the screening samples are the first ones of the full protocol's). Defaults:
a quarter of the sweep's `evaluation.fid` / `evaluation.ppl` sample counts at their DDIM steps (`--fraction`, or
`--fid-samples` ... to set each), `--fid-resamples 100`. Each trial's screening result is cached as JSON under
`--cache`, so a rerun only prints.

PPL needs no sampling when the screening keeps the full DDIM steps: the screening PPL is that of the first n pairs of
the full record's `eval/ppl_pairs.npy` (pair i depends only on (seed, i)). FID is sampled only for the trials that
can change the contenders: a trial is dropped only when another beats it beyond the noise on *both* objectives, so
only trials in a pair that PPL separates need a screening FID; the others get an unbounded FID interval (the same
contenders; `--all-fid` samples every trial's FID anyway).

Then, per sweep:
  (a) the Pareto front and champion of the sweep as it ran: every trial's FULL numbers;
  (b) the same of a multi-fidelity sweep: `contenders` of the screened rows decide which trials get the full
      protocol; selection then sees the FULL numbers of the contenders only (the others stay at screening
      fidelity, which selection never uses).
SAME when (a) and (b) have the same front and champion. "order kept": of the (pair, objective) that screening
separates (one trial's interval wholly below the other's), how many the full numbers order the same way; stdout also
says how often the full value lies inside the screening interval. Costs: UNet evaluations of FID and PPL (one per sample per
DDIM step, two per PPL pair: `unet_evaluations`), all trials in full against all screened plus the contenders in
full; wall time from each trial's recorded full-evaluation timings (`eval/metrics.json`, fid + ppl), the screening's
estimated as the same timings scaled by its share of the UNet evaluations (the FID bootstrap not included; the
screening FIDs measured here, on a loaded shared machine, are printed beside).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCREENED = ("fid", "fid_lo", "fid_hi", "ppl", "ppl_lo", "ppl_hi")


def unet_evaluations(fid_samples: int, fid_steps: int, ppl_samples: int, ppl_steps: int) -> int:
    """UNet forward passes of one trial's FID and PPL: one per FID image per DDIM step, two images (the pair's ends,
    eps apart) per PPL sample per DDIM step."""
    return fid_samples * fid_steps + 2 * ppl_samples * ppl_steps


def screened_row(row: dict, screen: dict[str, float]) -> dict:
    """A copy of a full row with FID and PPL (and their intervals) replaced by the screening ones; `fidelity: screen`."""
    out = dict(row)
    for k in SCREENED:
        out[k] = float(screen.get(k, math.nan))
    out["fidelity"] = "screen"
    return out


@dataclass
class Check:
    """One sweep's comparison: (a) selection on every trial's full row, (b) on the contenders' full rows only."""

    trials: list[str]
    contenders: list[str]
    front_full: list[str]
    front_mf: list[str]
    champion_full: str | None
    champion_mf: str | None
    missed: list[str] = field(default_factory=list)  # on front (a) or champion (a), but not a contender
    separated: int = 0  # (pair, objective): one trial's screening interval wholly below the other's
    order_kept: int = 0  # ... of which the full numbers keep the order (the assumption, pair by pair)

    @property
    def same(self) -> bool:
        return set(self.front_full) == set(self.front_mf) and self.champion_full == self.champion_mf


def check(spec, rows: Sequence[dict], screens: dict[str, dict[str, float]]) -> Check:
    """Selection on full rows of all DONE trials against selection on full rows of the contenders of the screened
    rows (`screens`: trial id -> screening fid, fid_lo, fid_hi, ppl, ppl_lo, ppl_hi). Rows are not changed."""
    from isosweep.results.pareto import contenders, lower_beyond_noise
    from isosweep.results.rows import summarize

    objectives = tuple(spec.selection.objectives)
    done = [dict(r) for r in rows if r["status"] == "DONE" and r["trial_id"] in screens]
    kept = {r["trial_id"] for r in contenders([screened_row(r, screens[r["trial_id"]]) for r in done], objectives)}
    full = [{**copy.deepcopy(r), "fidelity": "full"} for r in done]
    multi = [{**copy.deepcopy(r), "fidelity": "full" if r["trial_id"] in kept else "screen"} for r in done]
    screened = {r["trial_id"]: screened_row(r, screens[r["trial_id"]]) for r in done}
    pairs = [(a, b, k) for a in done for b in done for k in objectives
             if a is not b and lower_beyond_noise(screened[a["trial_id"]], screened[b["trial_id"]], k)]
    front_a, champ_a = summarize(spec, full)
    front_b, champ_b = summarize(spec, multi)
    ids_a = [r["trial_id"] for r in front_a]
    champ_a_id = champ_a.row["trial_id"] if champ_a else None
    return Check(trials=[r["trial_id"] for r in done], contenders=sorted(kept), front_full=ids_a,
                 front_mf=[r["trial_id"] for r in front_b], champion_full=champ_a_id,
                 champion_mf=champ_b.row["trial_id"] if champ_b else None,
                 missed=sorted({*ids_a, *([champ_a_id] if champ_a_id else [])} - kept),
                 separated=len(pairs), order_kept=sum(a[k] <= b[k] for a, b, k in pairs))


# --- evaluation (heavy imports only here) ---------------------------------------------------------------------


def screening_sizes(spec, args) -> dict[str, Any]:
    ev = spec.evaluation

    def size(explicit, full):
        return explicit if explicit is not None else max(2, round(full * args.fraction))

    return {"fid": {"num_samples": size(args.fid_samples, ev.fid.num_samples), "ddim_steps": args.fid_steps or ev.fid.ddim_steps},
            "ppl": {"num_samples": size(args.ppl_samples, ev.ppl.num_samples), "ddim_steps": args.ppl_steps or ev.ppl.ddim_steps},
            "fid_resamples": args.fid_resamples}


def final_checkpoint(sweep: Path, row: dict) -> Path:
    return sweep / "train" / row["trial_id"] / Path(row["checkpoint_path"]).name


def _cache_path(cache: Path, sweep: Path, row: dict, tag: str) -> Path:
    return cache / sweep.name / f"{row['trial_id']}__{final_checkpoint(sweep, row).name}__{tag}.json"


def screen_metric(spec, sweep: Path, row: dict, sizes: dict, metric: str, cache: Path) -> dict:
    """The trial's screening `metric` (fid or ppl, with its interval): {metrics, timings, how}, cached as JSON.

    PPL comes from the first n pairs of the trial's full record (`eval/ppl_pairs.npy`) when the DDIM steps match:
    pair i depends only on (seed, i), so that is the screening PPL (and interval) exactly, without sampling again
    (checked against `trial_evaluator` on 5c1d8_00000: equal to the last digit). Otherwise, and always for FID, the
    final model is evaluated by `trial_evaluator` with evaluation.screening set."""
    sub = sizes[metric]
    tag = f"{metric}{sub['num_samples']}x{sub['ddim_steps']}" + (f"_r{sizes['fid_resamples']}" if metric == "fid" else "")
    path = _cache_path(cache, sweep, row, tag)
    if path.is_file():
        return json.loads(path.read_text())
    ckpt = final_checkpoint(sweep, row)
    ev = spec.evaluation
    pairs = ckpt / "eval" / "ppl_pairs.npy"
    if metric == "ppl" and sub["ddim_steps"] == ev.ppl.ddim_steps and pairs.is_file():
        import numpy as np

        from isosweep.evaluation.metrics.confidence import ppl_summary

        d = np.load(pairs)
        if len(d) >= sub["num_samples"]:
            m = ppl_summary(d[: sub["num_samples"]], resamples=ev.bootstrap.resamples, level=ev.bootstrap.level, seed=ev.seed)
            out = {"metrics": {k: float(m[k]) for k in ("ppl", "ppl_lo", "ppl_hi")}, "timings": {}, "how": "record prefix"}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out, indent=1))
            return out
    import torch

    from isosweep.evaluation.suite import trial_evaluator
    from isosweep.models.loading import load_local
    from isosweep.spec import SweepSpec
    from isosweep.training.checkpoint import verify_checkpoint

    verify_checkpoint(ckpt)
    unet, scheduler = load_local(ckpt, None)
    d = spec.to_dict()
    d["evaluation"]["screening"] = sizes
    t0 = time.time()
    result = trial_evaluator(SweepSpec.model_validate(d), metrics=[metric])(unet, scheduler, torch.device("cpu"), 0, 1)
    assert result.settings.get("fidelity") == "screen"
    out = {"metrics": {k: float(result.metrics.get(k, math.nan)) for k in (metric, f"{metric}_lo", f"{metric}_hi")},
           "timings": dict(result.timings), "wall_s": round(time.time() - t0, 3), "how": "evaluated"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def full_timings(sweep: Path, row: dict) -> dict[str, float]:
    """Seconds of the trial's full FID and PPL, as recorded by its evaluation (nan when not recorded)."""
    from isosweep.evaluation.record import read_record

    rec = read_record(final_checkpoint(sweep, row))
    t = rec.timings if rec is not None else {}
    return {m: float(t.get(m, math.nan)) for m in ("fid", "ppl")}


def _num(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.4g}"


def _iv(m: dict, k: str) -> str:
    return f"{_num(m[k])} [{_num(m[k + '_lo'])}, {_num(m[k + '_hi'])}]"


def run_sweep(sweep: Path, args) -> dict:
    from isosweep.results.pareto import lower_beyond_noise
    from isosweep.results.readback import read_sweep

    spec, outcome = read_sweep(sweep)
    sizes = screening_sizes(spec, args)
    ev, cache = spec.evaluation, Path(args.cache)
    done = [r for r in outcome.rows if r["status"] == "DONE"]
    screens = {r["trial_id"]: dict(screen_metric(spec, sweep, r, sizes, "ppl", cache)["metrics"]) for r in done}
    # A trial is dropped only when another beats it beyond the noise on both objectives: FID can change the
    # contenders only for trials in a pair that PPL already separates. The others' screening FID cannot matter;
    # unless --all-fid they get an unbounded FID interval instead of an evaluation (same contenders, less CPU).
    ppl_rows = [{"trial_id": t, **m} for t, m in screens.items()]
    separated = {x["trial_id"] for a in ppl_rows for b in ppl_rows if a is not b and lower_beyond_noise(a, b, "ppl") for x in (a, b)}
    fid_s = {}
    for r in done:
        t = r["trial_id"]
        if args.all_fid or t in separated:
            res = screen_metric(spec, sweep, r, sizes, "fid", cache)
            screens[t].update(res["metrics"])
            fid_s[t] = float(res["timings"].get("fid", math.nan))
        else:
            screens[t].update({"fid": float(r["fid"]), "fid_lo": -1e300, "fid_hi": 1e300})
        m = screens[t]
        print(f"  {sweep.name} {t}: screen fid " + (_iv(m, "fid") if t in fid_s else "not needed")
              + f" ppl {_iv(m, 'ppl')} | full fid {_num(r['fid'])} ppl {_iv(r, 'ppl')}"
              + (f" | screening FID measured {fid_s[t]:.0f} s" if t in fid_s else ""), flush=True)
    c = check(spec, done, screens)
    inside = {k: [screens[r["trial_id"]][f"{k}_lo"] <= r[k] <= screens[r["trial_id"]][f"{k}_hi"] for r in done
                  if k == "ppl" or r["trial_id"] in fid_s] for k in ("fid", "ppl")}
    full_cost = unet_evaluations(ev.fid.num_samples, ev.fid.ddim_steps, ev.ppl.num_samples, ev.ppl.ddim_steps)
    cheap_cost = unet_evaluations(sizes["fid"]["num_samples"], sizes["fid"]["ddim_steps"], sizes["ppl"]["num_samples"], sizes["ppl"]["ddim_steps"])
    n, k = len(c.trials), len(c.contenders)
    full_t = {r["trial_id"]: full_timings(sweep, r) for r in done}
    # screening time: each trial's recorded full time per metric scaled by the screening's share of its UNet
    # evaluations (same machine, same load as the full numbers; the FID bootstrap's eigendecompositions not included)
    share = {"fid": sizes["fid"]["num_samples"] * sizes["fid"]["ddim_steps"] / (ev.fid.num_samples * ev.fid.ddim_steps),
             "ppl": sizes["ppl"]["num_samples"] * sizes["ppl"]["ddim_steps"] / (ev.ppl.num_samples * ev.ppl.ddim_steps)}
    all_s = sum(v["fid"] + v["ppl"] for v in full_t.values())
    screen_est = sum(v["fid"] * share["fid"] + v["ppl"] * share["ppl"] for v in full_t.values())
    mf_s = screen_est + sum(full_t[t]["fid"] + full_t[t]["ppl"] for t in c.contenders)
    return {"sweep": sweep.name, "name": spec.name, "check": c, "sizes": sizes, "evals_all": n * full_cost, "evals_mf": n * cheap_cost + k * full_cost,
            "time_all": all_s, "time_mf": mf_s, "screen_est": screen_est, "fid_measured": fid_s, "ppl_separated": sorted(separated),
            "inside": {k: (sum(v), len(v)) for k, v in inside.items()}}


def _pct(a: float, b: float) -> str:
    return "nan" if not (math.isfinite(a) and math.isfinite(b) and a > 0) else f"{100 * (a - b) / a:.0f}%"


def report(results: list[dict]) -> str:
    """The markdown table (one row per sweep, then the total)."""
    lines = [("| sweep | screening (FID n x steps, PPL n x steps) | trials | contenders | front, all full | front, multi-fidelity "
              "| champion (all / multi) | verdict | order kept | UNet evals, all full | UNet evals, multi-fidelity | saved "
              "| FID+PPL s, all full | FID+PPL s, multi-fidelity | saved |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c, s = r["check"], r["sizes"]
        lines.append(
            f"| {r['name']} | {s['fid']['num_samples']}x{s['fid']['ddim_steps']}, {s['ppl']['num_samples']}x{s['ppl']['ddim_steps']} "
            f"| {len(c.trials)} | {len(c.contenders)} | {' '.join(c.front_full)} | {' '.join(c.front_mf)} "
            f"| {c.champion_full} / {c.champion_mf} | {'SAME' if c.same else 'DIFFERENT'} | {c.order_kept}/{c.separated} "
            f"| {r['evals_all']:,} | {r['evals_mf']:,} | {_pct(r['evals_all'], r['evals_mf'])} "
            f"| {r['time_all']:.0f} | {r['time_mf']:.0f} | {_pct(r['time_all'], r['time_mf'])} |")
    if len(results) > 1:
        ea, em = sum(r["evals_all"] for r in results), sum(r["evals_mf"] for r in results)
        ta, tm = sum(r["time_all"] for r in results), sum(r["time_mf"] for r in results)
        same = sum(r["check"].same for r in results)
        lines.append(f"| **all** | | {sum(len(r['check'].trials) for r in results)} | {sum(len(r['check'].contenders) for r in results)} "
                     f"| | | | {same}/{len(results)} SAME | {sum(r['check'].order_kept for r in results)}/{sum(r['check'].separated for r in results)} | {ea:,} | {em:,} | {_pct(ea, em)} | {ta:.0f} | {tm:.0f} | {_pct(ta, tm)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", help="finished sweep folders (local storage), evaluated in full")
    ap.add_argument("--fraction", type=float, default=0.25, help="screening sample counts as this share of the full ones (default 0.25)")
    ap.add_argument("--fid-samples", type=int, default=None)
    ap.add_argument("--fid-steps", type=int, default=None, help="default: evaluation.fid.ddim_steps")
    ap.add_argument("--ppl-samples", type=int, default=None)
    ap.add_argument("--ppl-steps", type=int, default=None, help="default: evaluation.ppl.ddim_steps")
    ap.add_argument("--fid-resamples", type=int, default=100)
    ap.add_argument("--cache", default="/tmp/isosweep-screening-cache")
    ap.add_argument("--all-fid", action="store_true", help="screen every trial's FID, also where it cannot change the contenders")
    args = ap.parse_args(argv)
    print("$ python -m bench.screening " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])), flush=True)
    results = []
    for s in args.sweeps:
        r = run_sweep(Path(s).expanduser().resolve(), args)
        c = r["check"]
        print(f"{r['sweep']}: {len(c.trials)} trials, {len(c.contenders)} contenders ({' '.join(c.contenders)}); "
              f"front all-full [{' '.join(c.front_full)}] vs multi-fidelity [{' '.join(c.front_mf)}]; champion "
              f"{c.champion_full} vs {c.champion_mf}: {'SAME' if c.same else 'DIFFERENT'}"
              + (f"; dropped although on the full front/champion: {' '.join(c.missed)}" if c.missed else "")
              + f"; PPL-separated at screening: {' '.join(r['ppl_separated']) or 'none'}; screening FID measured for "
              f"{len(r['fid_measured'])} trials, {sum(r['fid_measured'].values()):.0f} s (this machine, loaded); pairs separated at "
              f"screening (pair, objective) whose full numbers keep the order: {c.order_kept}/{c.separated}; full value inside "
              f"the screening interval: FID {r['inside']['fid'][0]}/{r['inside']['fid'][1]}, PPL {r['inside']['ppl'][0]}/{r['inside']['ppl'][1]}", flush=True)
        results.append(r)
    print()
    print(report(results))


if __name__ == "__main__":
    main()
