"""Ray for isosweep: connect to a cluster or start the embedded local one, with quiet, readable worker logs.

Environment read here: ISOSWEEP_RAY_DASHBOARD (0: no dashboard for the embedded Ray), TQDM_MININTERVAL
and RAY_TRAIN_ENABLE_PRINT_PATCH (passed on to workers); see docs/environment.md.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import warnings

import ray


def init_ray(address: str | None, dashboard: bool = True) -> dict:
    """Connect to a cluster by address, or start the embedded local Ray; returns what we print."""
    # Progress bars in workers are not terminals: redraw them at most every 15 s instead of per step.
    # Train V2 re-routes print() in workers to its logger and also tees it to the wrapped stdout, so every
    # "[isosweep] step ..." line reached the terminal twice; plain print keeps one copy (and the log file).
    worker_env = {"TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "15"), "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
                  "RAY_TRAIN_ENABLE_PRINT_PATCH": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")}
    quiet = {"logging_level": "WARNING", "log_to_driver": True}
    sigterm = signal.getsignal(signal.SIGTERM)  # ray.init replaces it with sys.exit: the sweep would end FAILED, not resumable
    if ray.is_initialized():
        ctx = None
    elif address:  # the same worker environment: without it every step line printed twice per worker
        ctx = ray.init(address=address, runtime_env={"env_vars": _not_set_by_the_job(worker_env)}, **quiet)
    else:
        dashboard = dashboard and os.environ.get("ISOSWEEP_RAY_DASHBOARD", "1") != "0"
        ctx = ray.init(include_dashboard=dashboard, dashboard_host="127.0.0.1",
                       runtime_env={"env_vars": worker_env}, **quiet)
    if threading.current_thread() is threading.main_thread() and sigterm is not None:
        signal.signal(signal.SIGTERM, sigterm)  # the CLI's: SIGTERM stops a sweep as Ctrl-C does
    url = getattr(ctx, "dashboard_url", None) if ctx is not None else None  # `if ctx` warns (len)
    return {"dashboard_url": f"http://{url}" if url and not url.startswith("http") else url}


def _not_set_by_the_job(env: dict[str, str]) -> dict[str, str]:
    """`env` without the variables a submitted job's runtime env already sets: Ray refuses to merge a driver's
    runtime env with the job's when both set one key (`isosweep submit --env` may set any)."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")) or {}
        taken = set(((job.get("runtime_env") or {}).get("env_vars") or {}))
    except (ValueError, AttributeError, TypeError):
        taken = set()
    return {k: v for k, v in env.items() if k not in taken}


def quiet_libraries() -> None:
    """Silence library noise that a user cannot act on; real warnings stay."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


