"""The files a sweep publishes, written into one folder: the results tables, the Pareto plot and the report."""

from __future__ import annotations

from pathlib import Path

from isosweep import storage as st
from isosweep.results.layout import REPORT_DIR
from isosweep.results.plots import pareto_plot
from isosweep.results.report import write_report
from isosweep.results.rows import SweepOutcome
from isosweep.results.tables import backbones_of, save_tables
from isosweep.spec import SweepSpec


def write_results(spec: SweepSpec, outcome: SweepOutcome, folder: Path, *, report: bool,
                  report_dir: Path | None = None) -> dict[str, Path]:
    """results.csv, results.md and pareto.png into `folder`, and with `report` the report into `folder/report`, copied
    into `report_dir` when one is given (`outcome.report_dir` is where the user reads it). Returns the paths the
    parent run's summary logs, by their names: what is published is only what was written here, never the rest
    of a user's `report_dir` (it may be `.`, with `.env` in it)."""
    csv_path, md_path = save_tables(outcome.rows, folder, spec.evaluation.bootstrap.level)
    plot = pareto_plot(outcome.rows, outcome.front, outcome.champion, folder / "pareto.png",
                       tuple(spec.selection.objectives), backbones_of(outcome.rows))
    files = {"csv_path": csv_path, "md_path": md_path, "pareto_png": plot}
    if report:
        files["report_dir"] = outcome.report_dir = write_report(spec, outcome, folder / REPORT_DIR)
        if report_dir is not None:  # the same files, private, in the user's folder
            st.upload_dir(files["report_dir"], st.normalize(report_dir))
            outcome.report_dir = Path(report_dir)
    return files
