"""What isosweep writes to logs: progress bars off a terminal redraw rarely, a trial's step lines name the trial, and
registering a model does not print MLflow's warning about the pyfunc's type hints."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

from isosweep.core.progress import PROGRESS_INTERVAL_ENV, progress_bar

ROOT = Path(__file__).resolve().parent.parent


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drive(stream: io.StringIO, updates: int = 400, seconds: float = 0.8) -> int:
    """Updates spread over `seconds` (several of tqdm's default 0.1 s redraws); the carriage returns written."""
    bar = progress_bar(total=updates, desc="work", file=stream, leave=False)
    for _ in range(updates):
        time.sleep(seconds / updates)
        bar.update(1)
    bar.close()
    return stream.getvalue().count("\r")


def test_a_bar_off_a_terminal_writes_a_couple_of_updates_and_on_one_redraws(monkeypatch):
    monkeypatch.delenv(PROGRESS_INTERVAL_ENV, raising=False)
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    log = io.StringIO()
    assert _drive(log) <= 3, repr(log.getvalue())  # the first draw and the clearing at close
    assert "\u2588" not in log.getvalue()  # ASCII
    assert _drive(_Terminal()) >= 5  # a terminal keeps tqdm's own pace


def test_the_interval_off_a_terminal_is_the_variable(monkeypatch):
    monkeypatch.setenv(PROGRESS_INTERVAL_ENV, "0")
    assert _drive(io.StringIO()) >= 50
    assert progress_bar(range(3), file=io.StringIO(), disable=True).disable  # call sites' `disable=` holds


def test_a_trial_step_line_names_the_trial_and_a_plain_train_keeps_its_line():
    from isosweep.sweep.train_worker import step_line

    plain = step_line(50, 300, "loss=0.1", eta="2:28", checkpoint=True)
    assert plain == "step 50/300 loss=0.1 eta 2:28 (checkpoint)"
    assert step_line(50, 300, "loss=0.1", eta="2:28", trial="3f2a1b_00000") == "trial 3f2a1b_00000: step 50/300 loss=0.1 eta 2:28"
    assert step_line(7, None, "loss=0.1", trial="t") == "trial t: step 7 loss=0.1"


def test_the_pyfunc_signature_is_loaded_without_the_type_hint_warning():
    """A fresh process (the warning comes when the pyfunc module is first imported), every warning shown."""
    code = ("import warnings\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            "    from isosweep.tracking.registry import pyfunc_signature\n"
            "    assert pyfunc_signature() is not None\n"
            "print('\\n'.join(str(w.message) for w in seen))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert "Add type hints" not in out.stdout + out.stderr, out.stdout + out.stderr
