"""The sweep: Ray Tune over Ray Train trials, multi-objective selection, results, registry, report.

A sweep is one Tune experiment named `<spec name>-<timestamp>` (the sweep id) under the storage path.
Each Tune trial is a function trainable that runs one `TorchTrainer` (named by the Tune trial id, so
a restarted trial resumes its own Train run) whose workers train and then evaluate. The baseline
(lambda_iso = 0) is always the sweep's first trial, injected by `BaselineFirst` so the searcher's
model never sees it. Selection is on (FID, PPL): the Pareto front and a stated champion rule.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isosweep.config import SpecError, SweepSpec, check_cluster_fits, load_spec, max_concurrent
from isosweep.selection import Choice, choose_champion, pareto_front

BASELINE_PARAMS = {"lambda_iso": 0.0, "p": 1.0, "metric": "stereographic", "baseline": True}
RESULT_METRICS = ("fid", "ppl", "mrtl", "mcn", "vor", "ls", "ls_rbf")
DONE_MARKER = "sweep_done.json"
STATE_FILE = "isosweep_sweep.json"


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------


def is_remote(path: str) -> bool:
    return "://" in path


def resolve_storage(spec: SweepSpec, cli_storage: str | None) -> str:
    """Absolute local path or a URI (s3://...) where Tune keeps the sweep."""
    path = cli_storage or spec.storage.path
    return path if is_remote(path) else str(Path(path).expanduser().resolve())


def new_sweep_id(spec: SweepSpec) -> str:
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def default_report_dir(storage: str, sweep_id: str) -> Path:
    base = Path(storage) if not is_remote(storage) else Path("runs").resolve()
    return base / sweep_id / "report"


def local_state_dir(storage: str, sweep_id: str) -> Path:
    """Where the driver keeps its own small files (state, tables); local even for s3 storage."""
    base = Path(storage) if not is_remote(storage) else Path("runs").resolve()
    d = base / sweep_id
    d.mkdir(parents=True, exist_ok=True)
    return d


def find_sweeps(storage: str, name: str) -> list[Path]:
    """Local sweep directories of a spec name, newest first."""
    root = Path(storage) if not is_remote(storage) else Path("runs").resolve()
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{name}-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


# ----------------------------------------------------------------------------------------------
# The baseline trial, injected in front of any searcher
# ----------------------------------------------------------------------------------------------


def _make_baseline_first():
    from ray.tune.search import Searcher

    class BaselineFirst(Searcher):
        """Suggests the baseline (lambda_iso = 0, p = 1) first, then delegates to the inner searcher.

        The baseline's result is never given to the inner searcher: its lambda_iso = 0 lies outside a
        log-uniform space and would corrupt a model-based sampler such as Optuna's TPE.
        """

        def __init__(self, inner: Searcher, baseline: dict):
            self.inner = inner
            self.baseline = dict(baseline)
            self.baseline_trial: str | None = None
            super().__init__(metric=inner.metric, mode=inner.mode)

        def set_search_properties(self, metric, mode, config, **spec):
            return self.inner.set_search_properties(metric, mode, config, **spec)

        def set_max_concurrency(self, max_concurrent: int) -> bool:
            return self.inner.set_max_concurrency(max_concurrent)

        def suggest(self, trial_id: str):
            if self.baseline_trial is None:
                self.baseline_trial = trial_id
                return dict(self.baseline)
            suggestion = self.inner.suggest(trial_id)
            if isinstance(suggestion, dict):
                suggestion = {**suggestion, "baseline": False}
            return suggestion

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if trial_id != self.baseline_trial:
                self.inner.on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            if trial_id != self.baseline_trial:
                self.inner.on_trial_complete(trial_id, result=result, error=error)

        def save(self, checkpoint_path: str) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                inner_path = os.path.join(tmp, "inner.pkl")
                self.inner.save(inner_path)
                inner_bytes = Path(inner_path).read_bytes()
            with open(checkpoint_path, "wb") as f:
                pickle.dump({"baseline_trial": self.baseline_trial, "baseline": self.baseline, "inner": inner_bytes}, f)

        def restore(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "rb") as f:
                state = pickle.load(f)
            self.baseline_trial = state["baseline_trial"]
            self.baseline = state["baseline"]
            with tempfile.TemporaryDirectory() as tmp:
                inner_path = os.path.join(tmp, "inner.pkl")
                Path(inner_path).write_bytes(state["inner"])
                self.inner.restore(inner_path)

    return BaselineFirst


def _domain(dist, tune):
    if dist.type == "loguniform":
        return tune.loguniform(dist.low, dist.high)
    if dist.type == "uniform":
        return tune.uniform(dist.low, dist.high)
    return tune.choice(list(dist.values))


def planned_trials(spec: SweepSpec) -> int:
    """How many trials the search will run, the baseline included (a grid runs every combination)."""
    s = spec.search
    if s.algorithm != "grid":
        return s.num_trials + 1
    return 1 + s.num_trials * len(s.lambda_iso.values) * len(s.p.values) * len(s.metric.values)


def build_search(spec: SweepSpec, state_dir: Path, max_concurrent: int = 0):
    """(param_space, search_alg, num_samples) for the spec's algorithm, with the baseline first.

    max_concurrent (0: no limit) goes into BasicVariantGenerator itself: Tune applies
    `TuneConfig.max_concurrent_trials` only to Searchers and silently ignores it for random and grid.
    """
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s = spec.search
    objectives = list(spec.selection.objectives)
    if s.algorithm == "grid":
        space = {k: tune.grid_search(list(getattr(s, k).values)) for k in ("lambda_iso", "p", "metric")}
        space["baseline"] = False
        alg = BasicVariantGenerator(points_to_evaluate=[dict(BASELINE_PARAMS)], max_concurrent=max_concurrent,
                                    random_state=s.seed)
        # the baseline point uses up one sample; each further sample is one pass over the whole grid
        return space, alg, s.num_trials + 1
    space = {k: _domain(getattr(s, k), tune) for k in ("lambda_iso", "p", "metric")}
    if s.algorithm == "random":
        space["baseline"] = False
        alg = BasicVariantGenerator(points_to_evaluate=[dict(BASELINE_PARAMS)], max_concurrent=max_concurrent,
                                    random_state=s.seed)
        return space, alg, s.num_trials + 1
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    # the study lives beside the sweep, where `optuna-dashboard sqlite:///.../optuna.db` opens it
    state_dir.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{state_dir / 'optuna.db'}")
    inner = OptunaSearch(
        metric=objectives,
        mode=["min", "min"],
        sampler=optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=max(2, min(10, s.num_trials // 2))),
        storage=storage,
        study_name=state_dir.name,
    )
    alg = _make_baseline_first()(inner, BASELINE_PARAMS)
    return space, alg, s.num_trials + 1


# ----------------------------------------------------------------------------------------------
# The trial
# ----------------------------------------------------------------------------------------------


def sweep_eta(durations: list[float], running_since: list[float], remaining: int, concurrency: int, now: float) -> float | None:
    """Seconds until the sweep ends, from the mean finished-trial duration; None before any trial ends.

    Trials still running are assumed to need the mean duration in total; queued ones run
    `concurrency` at a time after them.
    """
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    running_left = max((max(0.0, mean - (now - t)) for t in running_since), default=0.0)
    queued = max(0, remaining - len(running_since))
    return running_left + math.ceil(queued / max(1, concurrency)) * mean


def _make_progress_callback(total: int, concurrency: int):
    """A Tune callback that prints one line per finished trial: how many are done and about how long is left."""
    from ray.tune import Callback

    class SweepProgress(Callback):
        def __init__(self) -> None:
            self.started: dict[str, float] = {}
            self.durations: list[float] = []
            self.done = 0

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started.setdefault(trial.trial_id, time.time())

        def _finished(self, trial, how: str) -> None:
            now = time.time()
            self.done += 1
            if trial.trial_id in self.started:
                self.durations.append(now - self.started.pop(trial.trial_id))
            eta = sweep_eta(self.durations, list(self.started.values()), total - self.done, concurrency, now)
            left = ""
            if eta is not None and self.done < total:
                left = f"; about {eta / 60:.0f} min left" if eta >= 90 else f"; about {eta:.0f} s left"
            _phase(f"trial {trial.trial_id} {how} ({self.done}/{total} done{left})")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._finished(trial, "finished")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._finished(trial, "failed")

    return SweepProgress()


def _make_forward_callback(objectives: list[str]):
    """A Train callback that forwards each Train report to Tune (live per-trial status).

    Two-objective searchers need every Tune result to carry both objectives, so training reports
    carry NaN placeholders until the final, evaluated report.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            filled = [{**{o: float("nan") for o in objectives}, **m} for m in metrics]
            super().after_report(run_context, filled, checkpoint)

    return ForwardToTune()


def _read_eval(ckpt_dir: Path) -> dict:
    path = ckpt_dir / "eval" / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def make_trial_fn(spec_dict: dict, sweep: dict):
    """The Tune function trainable: one TorchTrainer run, then tracking, then the final report."""

    def isosweep_trial(config: dict) -> None:
        from ray import tune

        from isosweep import tracking
        from isosweep.trial import build_trainer

        spec = SweepSpec.model_validate(spec_dict)
        trial_id = tune.get_context().get_trial_id()
        params = {k: config[k] for k in ("lambda_iso", "p", "metric")}
        params["baseline"] = bool(config.get("baseline", False))
        run_id = None
        if sweep.get("tracking_uri"):
            run_id = tracking.open_trial_run(
                sweep["tracking_uri"], spec.experiment_name, sweep["parent_run_id"], trial_id, params
            )
        mlflow_cfg = {"tracking_uri": sweep["tracking_uri"], "run_id": run_id} if run_id else None
        trainer = build_trainer(
            spec,
            run_name=trial_id,
            storage_path=sweep["train_storage"],
            trial_params=params,
            evaluate=True,
            mlflow=mlflow_cfg,
            callbacks=[_make_forward_callback(list(spec.selection.objectives))],
        )
        try:
            result = trainer.fit()
            if result.error:
                raise result.error
            final = dict(result.metrics or {})
            checkpoint = result.checkpoint
            if checkpoint is None:
                raise RuntimeError(f"trial {trial_id} finished without a checkpoint")
            with checkpoint.as_directory() as ckpt_dir:
                evaluation = _read_eval(Path(ckpt_dir))
                if run_id:
                    tracking.log_trial_result(
                        sweep["tracking_uri"], run_id, evaluation.get("metrics", {}),
                        backbones=evaluation.get("backbones"), eval_dir=Path(ckpt_dir) / "eval",
                        checkpoint_dir=ckpt_dir, rtl_curve=evaluation.get("rtl_curve"),
                    )
        except BaseException:
            if run_id:
                tracking.end_run(sweep["tracking_uri"], run_id, "FAILED", quiet=True)
            raise
        if run_id:
            tracking.end_run(sweep["tracking_uri"], run_id, "FINISHED")
        report = {k: v for k, v in final.items() if isinstance(v, (int, float, str, bool))}
        report.update({k: float(v) for k, v in evaluation.get("metrics", {}).items() if isinstance(v, (int, float))})
        report.update({f"backbone_{k}": v for k, v in (evaluation.get("backbones") or {}).items()})
        report.update(params)
        report.update({"checkpoint_path": checkpoint.path, "mlflow_run_id": run_id or "", "evaluated": True})
        for o in spec.selection.objectives:
            report.setdefault(o, float("nan"))
        tune.report(report)

    return isosweep_trial


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    sweep_id: str
    sweep_dir: Path
    rows: list[dict]
    front: list[dict]
    champion: Choice | None
    report_dir: Path | None = None
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    registered: dict = field(default_factory=dict)


def make_row(trial_id: str, config: dict, metrics: dict, status: str) -> dict:
    """One flat table row: the trial's parameters, status, metrics, backbones and where its model is."""
    row = {
        "trial_id": trial_id,
        "baseline": bool(config.get("baseline", False)),
        "lambda_iso": float(config.get("lambda_iso", math.nan)),
        "p": float(config.get("p", math.nan)),
        "metric": config.get("metric", ""),
        "status": "DONE" if metrics.get("evaluated") else status,
    }
    for k in RESULT_METRICS:
        v = metrics.get(k)
        row[k] = float(v) if isinstance(v, (int, float)) else math.nan
    row.update({k: v for k, v in metrics.items() if k.startswith("backbone_")})
    row["checkpoint_path"] = metrics.get("checkpoint_path", "")
    row["mlflow_run_id"] = metrics.get("mlflow_run_id", "")
    return row


def rows_from_results(results) -> list[dict]:
    """One row per trial of a finished Tune run (a ResultGrid), baseline first."""
    rows = []
    for res in results:
        m = dict(res.metrics or {})
        trial_id = m.get("trial_id") or (res.path.rstrip("/").split("/")[-1] if res.path else "")
        rows.append(make_row(trial_id, dict(res.config or {}), m, "ERROR" if res.error else "INCOMPLETE"))
    rows.sort(key=lambda r: (not r["baseline"], r["trial_id"]))
    return rows


def label_rows(rows: list[dict], front: list[dict], champion: Choice | None) -> None:
    front_ids = {r["trial_id"] for r in front}
    champ = champion.row["trial_id"] if champion else None
    for r in rows:
        roles = []
        if r["baseline"]:
            roles.append("baseline")
        if r["trial_id"] == champ:
            roles.append("champion")
        if r["trial_id"] in front_ids:
            roles.append("pareto")
        r["role"] = "+".join(roles) or "-"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}"
    return str(v)


TABLE_COLUMNS = ("role", "trial_id", "lambda_iso", "p", "metric", "fid", "ppl", "mrtl", "mcn", "vor", "ls", "status")


def table_rows(rows: list[dict]) -> list[dict]:
    """Table-1 order: baseline, champion, the other Pareto trials, then the rest."""
    def order(r):
        role = r.get("role", "-")
        return (0 if "baseline" in role else 1 if "champion" in role else 2 if "pareto" in role else 3, r.get("fid", 0.0))

    return sorted(rows, key=order)


def markdown_table(rows: list[dict], backbones: dict[str, str] | None = None) -> str:
    head = [c if c not in ("fid", "ppl") or not backbones else f"{c} [{backbones.get(c, '?')}]" for c in TABLE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table_rows(rows):
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def plain_table(rows: list[dict]) -> str:
    cells = [list(TABLE_COLUMNS)] + [[_fmt(r.get(c, "")) for c in TABLE_COLUMNS] for r in table_rows(rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(TABLE_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)


def backbones_of(rows: list[dict]) -> dict[str, str]:
    out = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("backbone_") and v:
                out.setdefault(k.removeprefix("backbone_"), v)
    return out


def save_tables(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in table_rows(rows):
            w.writerow(r)
    md_path.write_text(markdown_table(rows, backbones_of(rows)) + "\n")
    return csv_path, md_path


def pareto_plot(rows: list[dict], front: list[dict], champion: Choice | None, out: Path, objectives=("fid", "ppl"), backbones=None) -> Path:
    """Scatter of every evaluated trial in (FID, PPL), the front joined, baseline and champion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = objectives
    backbones = backbones or {}
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    pts = [r for r in rows if math.isfinite(r.get(a, math.nan)) and math.isfinite(r.get(b, math.nan))]
    ax.scatter([r[a] for r in pts], [r[b] for r in pts], c="0.6", s=28, label="trials", zorder=2)
    if front:
        ax.plot([r[a] for r in front], [r[b] for r in front], "-o", color="tab:blue", ms=6, label="Pareto front", zorder=3)
    for r in pts:
        if r.get("baseline"):
            ax.scatter([r[a]], [r[b]], marker="s", s=80, facecolors="none", edgecolors="k", label="baseline (lambda=0)", zorder=4)
        ax.annotate(f"{r['metric'][:5]} lam={r['lambda_iso']:.0e} p={r['p']:g}" if not r.get("baseline") else "baseline",
                    (r[a], r[b]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if champion:
        c = champion.row
        ax.scatter([c[a]], [c[b]], marker="*", s=220, color="tab:red", label="champion", zorder=5)
    ax.set_xlabel(f"{a.upper()} [{backbones.get(a, '?')}] (lower is better)")
    ax.set_ylabel(f"{b.upper()} [{backbones.get(b, '?')}] (lower is better)")
    ax.set_title("Sweep: FID vs PPL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def summarize(spec: SweepSpec, rows: list[dict]) -> tuple[list[dict], Choice | None]:
    done = [r for r in rows if r["status"] == "DONE"]
    objectives = tuple(spec.selection.objectives)
    front = pareto_front(done, objectives)
    champion = choose_champion(
        done, spec.selection.rule, objectives, spec.selection.fid_tolerance, spec.selection.weights
    )
    label_rows(rows, front, champion)
    return front, champion


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def init_ray(address: str | None, dashboard: bool = True) -> dict:
    """Connect to a cluster by address, or start the embedded local Ray; returns what we print."""
    import ray

    # Progress bars in workers are not terminals: redraw them at most every 15 s instead of per step.
    # Train V2 re-routes print() in workers to its logger and also tees it to the wrapped stdout, so every
    # "[isosweep] step ..." line reached the terminal twice; plain print keeps one copy (and the log file).
    worker_env = {"TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "15"), "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
                  "RAY_TRAIN_ENABLE_PRINT_PATCH": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")}
    quiet = {"logging_level": "WARNING", "log_to_driver": True}
    if ray.is_initialized():
        ctx = None
    elif address:
        ctx = ray.init(address=address, **quiet)
    else:
        dashboard = dashboard and os.environ.get("ISOSWEEP_RAY_DASHBOARD", "1") != "0"
        ctx = ray.init(include_dashboard=dashboard, dashboard_host="127.0.0.1",
                       runtime_env={"env_vars": worker_env}, **quiet)
    url = getattr(ctx, "dashboard_url", None) if ctx is not None else None  # `if ctx` warns (len)
    return {"dashboard_url": f"http://{url}" if url and not url.startswith("http") else url}


def _quiet_libraries() -> None:
    """Silence library noise that a user cannot act on; real warnings stay."""
    import warnings

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def run_sweep(
    spec: SweepSpec,
    spec_path: str | None = None,
    *,
    address: str | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    report_dir: str | None = None,
    resume_dir: Path | None = None,
    dashboard: bool = True,
    write_report: bool = True,
) -> SweepOutcome:
    """Run (or resume) a sweep to completion and return its rows, front and champion."""
    _quiet_libraries()
    import ray
    from ray import tune

    from isosweep import tracking

    storage = resolve_storage(spec, storage)
    if resume_dir is not None:
        state = json.loads((resume_dir / STATE_FILE).read_text())
        sweep_id = state["sweep_id"]
        tracking_uri = tracking_uri or state.get("tracking_uri")
    else:
        sweep_id = new_sweep_id(spec)
        state = {}
    state_dir = local_state_dir(storage, sweep_id)
    experiment_path = f"{storage.rstrip('/')}/{sweep_id}"
    train_storage = f"{experiment_path}/train" if is_remote(storage) else str(Path(storage) / sweep_id / "train")
    _phase(f"sweep {sweep_id}: storage {experiment_path}")

    if spec.base_model.source.startswith("builtin:"):
        # before Ray starts, so pretraining has the CPUs to itself
        _phase("base model: preparing the built-in base model (cached after the first run)")
        from isosweep.models import load_unet_and_scheduler

        load_unet_and_scheduler(spec.base_model, spec.dataset)
    _prepare_backbones(spec)

    info = init_ray(address, dashboard)
    try:
        check_cluster_fits(spec, ray.cluster_resources(), spec_path or spec.name)
    except SpecError as exc:
        if not address:
            raise
        # an autoscaling cluster may have scaled its GPU nodes down: trials wait for them
        _phase(f"warning: {exc}\n  (connected by address: trials will queue until the autoscaler adds nodes)")
    if info.get("dashboard_url"):
        _phase(f"Ray dashboard: {info['dashboard_url']} (token: `ray get-auth-token` if it asks)")

    tracking_uri = tracking.resolve_tracking_uri(spec.tracking.uri, tracking_uri, str(state_dir.parent))
    parent_run_id = tracking.find_or_create_sweep_run(spec, spec_path, tracking_uri, sweep_id, storage_path=experiment_path)
    state.update({"sweep_id": sweep_id, "spec": spec.to_dict(), "spec_path": spec_path, "storage": storage,
                  "experiment_path": experiment_path, "tracking_uri": tracking_uri, "parent_run_id": parent_run_id})
    (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    _phase(f"MLflow: {tracking_uri} (experiment '{spec.experiment_name}', parent run {parent_run_id})")

    sweep = {"tracking_uri": tracking_uri, "parent_run_id": parent_run_id, "train_storage": train_storage}
    # the trial function only waits on its TorchTrainer: it holds no CPU (1 MB so the bundle is not empty)
    trainable = tune.with_resources(make_trial_fn(spec.to_dict(), sweep), {"CPU": 0, "memory": 2**20})
    concurrency = max_concurrent(spec, ray.cluster_resources())
    run_config = tune.RunConfig(
        name=sweep_id,
        callbacks=[_make_progress_callback(planned_trials(spec), concurrency)],
        storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
        verbose=1,
    )
    if resume_dir is not None and tune.Tuner.can_restore(experiment_path):
        _phase(f"resuming {sweep_id}: finished trials are kept, unfinished ones continue from their checkpoints")
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        space, alg, num_samples = build_search(spec, state_dir, concurrency)
        _phase(f"search: {spec.search.algorithm}, {planned_trials(spec)} trials (baseline included), up to {concurrency} at once")
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(search_alg=alg, num_samples=num_samples, max_concurrent_trials=concurrency),
            run_config=run_config,
        )
    results = tuner.fit()
    rows = rows_from_results(results)
    front, champion = summarize(spec, rows)
    outcome = SweepOutcome(sweep_id, state_dir, rows, front, champion, tracking_uri=tracking_uri, parent_run_id=parent_run_id)
    csv_path, md_path = save_tables(rows, state_dir)
    plot = pareto_plot(rows, front, champion, state_dir / "pareto.png", tuple(spec.selection.objectives), backbones_of(rows))

    if champion and spec.tracking.register_champion:
        from isosweep import registry

        _phase("registry: registering the champion and the Pareto trials")
        outcome.registered = registry.register_sweep_models(
            tracking_uri, spec.registry_name, champion.row, front, rows
        )
    if write_report:
        from isosweep.report import write_report as _write

        outcome.report_dir = _write(spec, outcome, Path(report_dir) if report_dir else default_report_dir(storage, sweep_id))
    tracking.log_sweep_summary(
        tracking_uri, parent_run_id, csv_path=csv_path, md_path=md_path, pareto_png=plot,
        champion_run_id=champion.row.get("mlflow_run_id") if champion else None,
        report_dir=outcome.report_dir,
    )
    (state_dir / DONE_MARKER).write_text(json.dumps({"finished": time.time(), "champion": champion.row["trial_id"] if champion else None}))
    tracking.end_run(tracking_uri, parent_run_id, "FINISHED" if all(r["status"] == "DONE" for r in rows) else "FAILED")
    return outcome


def _prepare_backbones(spec: SweepSpec) -> None:
    """Resolve and cache the feature networks once in the driver, before trials start.

    Fails early when standard weights are asked for but missing, and keeps concurrent trials from
    each training the offline domain network.
    """
    from isosweep.backbones import BackboneUnavailable, load_feature_networks

    needs = tuple(m for m in spec.evaluation.metrics if m in ("fid", "ppl", "ls"))
    if not needs:
        return
    _phase("feature networks: resolving the evaluation backbone (the offline domain network is trained once and cached)")
    try:
        nets = load_feature_networks(spec.evaluation, spec.dataset, needs=needs, progress=True)
    except BackboneUnavailable as exc:
        raise SpecError(f"{spec.name}: field 'evaluation.backbone': {exc}") from None
    _phase(f"feature networks: {nets.family}")


def _phase(msg: str) -> None:
    print(f"[isosweep] {msg}", flush=True)


def print_summary(spec: SweepSpec, outcome: SweepOutcome) -> None:
    """The end of a run: the table and where everything is."""
    print()
    print(plain_table(outcome.rows))
    bb = backbones_of(outcome.rows)
    if bb:
        print("backbones: " + ", ".join(f"{k}={v}" for k, v in sorted(bb.items())))
    if outcome.champion:
        c = outcome.champion.row
        print(f"\nchampion: trial {c['trial_id']} (lambda_iso={c['lambda_iso']:.3g}, p={c['p']:g}, G={c['metric']}): {outcome.champion.reason}")
    else:
        print("\nno champion: no trial finished with finite objectives")
    print(f"\nsweep folder: {outcome.sweep_dir}")
    if outcome.report_dir:
        print(f"report:       {outcome.report_dir / 'report.md'}")
    if outcome.tracking_uri:
        if outcome.tracking_uri.startswith("sqlite:"):
            print(f"MLflow UI:    mlflow ui --backend-store-uri {outcome.tracking_uri}")
        else:
            print(f"MLflow UI:    {outcome.tracking_uri}")
    if outcome.champion and outcome.registered:
        uri = f"models:/{spec.registry_name}@champion"
        env = f"MLFLOW_TRACKING_URI={outcome.tracking_uri} " if outcome.tracking_uri else ""
        print("\nuse the champion:")
        print(f"  {env}isosweep pull {uri} --out champion")
        print("  isosweep sample champion --n 16 --steps 50 --out grid.png")
        print("  isosweep interpolate champion --seeds 1 2 --frames 9 --mode slerp --out strip.png")


def run_command(args, resume: bool = False) -> int:
    spec = load_spec(args.spec, args.overrides)
    resume_dir = None
    if resume:
        storage = resolve_storage(spec, args.storage)
        candidates = [p for p in find_sweeps(storage, spec.name) if not (p / DONE_MARKER).exists()]
        if not candidates:
            raise SpecError(
                f"{args.spec}: no unfinished sweep named '{spec.name}-*' under {storage}; "
                "fix: start one with `isosweep run`, or pass the same --storage as the interrupted run"
            )
        resume_dir = candidates[0]
    outcome = run_sweep(
        spec, args.spec, address=args.address, tracking_uri=args.tracking_uri, storage=args.storage,
        report_dir=args.report_dir, resume_dir=resume_dir,
    )
    print_summary(spec, outcome)
    return 0 if outcome.champion else 1


def load_outcome(sweep_dir: Path) -> tuple[SweepSpec, SweepOutcome]:
    """Rebuild a sweep's rows from its Tune experiment directory (running or finished)."""
    from ray.tune import ExperimentAnalysis

    state = json.loads((sweep_dir / STATE_FILE).read_text())
    spec = SweepSpec.model_validate(state["spec"])
    analysis = ExperimentAnalysis(state["experiment_path"])
    rows = [make_row(t.trial_id, dict(t.config or {}), dict(t.last_result or {}), t.status) for t in analysis.trials]
    rows.sort(key=lambda r: (not r["baseline"], r["trial_id"]))
    front, champion = summarize(spec, rows)
    return spec, SweepOutcome(state["sweep_id"], sweep_dir, rows, front, champion,
                              tracking_uri=state.get("tracking_uri"), parent_run_id=state.get("parent_run_id"))


def results_command(args) -> int:
    target = Path(args.sweep)
    if target.is_dir() and (target / STATE_FILE).is_file():
        sweep_dir = target
    else:
        spec = load_spec(args.sweep, args.overrides, check_paths=False)
        found = find_sweeps(resolve_storage(spec, args.storage), spec.name)
        if not found:
            raise SpecError(f"{args.sweep}: no sweep named '{spec.name}-*' found; fix: pass --storage or the sweep folder")
        sweep_dir = found[0]
    spec, outcome = load_outcome(sweep_dir)
    done = (sweep_dir / DONE_MARKER).exists()
    print(f"sweep {outcome.sweep_id} ({'finished' if done else 'running or interrupted'})")
    print(plain_table(outcome.rows))
    print("\nPareto front: " + ", ".join(r["trial_id"] for r in outcome.front))
    if outcome.champion:
        print(f"champion: {outcome.champion.row['trial_id']}: {outcome.champion.reason}")
    return 0
