"""The files a sweep publishes, written into one folder: the results tables, the Pareto plot and the report."""

from __future__ import annotations

from pathlib import Path

from isosweep.results.layout import REPORT_DIR
from isosweep.results.plots import pareto_plot
from isosweep.results.report import write_report
from isosweep.results.rows import SweepOutcome
from isosweep.results.tables import backbones_of, save_tables
from isosweep.spec import SweepSpec


def write_results(spec: SweepSpec, outcome: SweepOutcome, folder: Path, *, report: bool,
                  report_dir: Path | None = None) -> dict[str, Path]:
    """results.csv, results.md and pareto.png into `folder`, and with `report` the report into `report_dir` (default
    `folder/report`; `outcome.report_dir` is set to it). Returns the tables' and the plot's paths by the names
    the parent run's summary logs them under."""
    csv_path, md_path = save_tables(outcome.rows, folder, spec.evaluation.bootstrap.level)
    plot = pareto_plot(outcome.rows, outcome.front, outcome.champion, folder / "pareto.png",
                       tuple(spec.selection.objectives), backbones_of(outcome.rows))
    if report:
        outcome.report_dir = write_report(spec, outcome, report_dir or folder / REPORT_DIR)
    return {"csv_path": csv_path, "md_path": md_path, "pareto_png": plot}
