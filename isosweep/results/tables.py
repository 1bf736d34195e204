"""The results table: Table-1 order, as Markdown, as plain text and as CSV, every number from the rows.

A metric with a bootstrap interval is shown with it, `12.3 [11.1, 13.6]` (`evaluation.record.metric_text`);
the CSV keeps every value in its own column (`ppl`, `ppl_lo`, `ppl_hi`, ...). The change table says what the loss
changed against the baseline, beyond the noise or inside it, by the rule that chooses the champion."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from isosweep import storage as st
from isosweep.evaluation.features.common import unpublished_note
from isosweep.evaluation.record import metric_text
from isosweep.redact import scrub_text
from isosweep.results.pareto import has_interval, lower_beyond_noise
from isosweep.spec import INTERVAL_METRICS, POINT_KEYS, is_result_metric


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}"
    return str(v)


TABLE_COLUMNS = ("role", "trial_id", "lambda_iso", "p", "iso_metric", "fid", "ppl", "mrtl", "mcn", "vor", "ls", "status")
_NAMED_COLUMNS = ("fid", "ppl", "vor")  # headed with what produced them: the feature network; VoR's normalisation


def _head(c: str, backbones: dict[str, str] | None) -> str:
    if not backbones or c not in _NAMED_COLUMNS:
        return c
    name = backbones.get(c, "?")
    return c if c == "vor" and name in ("?", "none") else f"{c} [{name}]"  # VoR before its normalisation was named


def _cell(r: dict, c: str) -> str:
    return metric_text(r, c) if c in INTERVAL_METRICS else _fmt(r.get(c, ""))


def table_rows(rows: list[dict]) -> list[dict]:
    """Table-1 order: baseline, champion, the other Pareto trials, then the rest."""
    def order(r):
        role = r.get("role", "-")
        return (0 if "baseline" in role else 1 if "champion" in role else 2 if "pareto" in role else 3, r.get("fid", 0.0))

    return sorted(rows, key=order)


def table_columns(rows: list[dict]) -> tuple[str, ...]:
    """TABLE_COLUMNS, with the POINT_KEYS columns after iso_metric when a point of search.points set them, and
    `fidelity` (screen or full) before status when the sweep screened its trials (evaluation.screening)."""
    extra = tuple(k for k in POINT_KEYS if any(k in r for r in rows))
    at = TABLE_COLUMNS.index("iso_metric") + 1
    columns = TABLE_COLUMNS[:at] + extra + TABLE_COLUMNS[at:]
    if any(r.get("fidelity") == "screen" or "screen_fid" in r for r in rows):  # evaluation.screening: which rows are full
        columns = columns[:-1] + ("fidelity", columns[-1])
    return columns


def markdown_table(rows: list[dict], backbones: dict[str, str] | None = None) -> str:
    columns = table_columns(rows)
    head = [_head(c, backbones) for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table_rows(rows):
        lines.append("| " + " | ".join(_cell(r, c) for c in columns) + " |")
    return "\n".join(lines)


def plain_table(rows: list[dict]) -> str:
    columns = table_columns(rows)
    return _aligned([list(columns)] + [[_cell(r, c) for c in columns] for r in table_rows(rows)])


def _aligned(cells: list[list[str]]) -> str:
    """Cells as text columns padded to their widest cell."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)


# what the isometry loss is meant to move (MCN, VoR; at further timesteps after these), then what it may cost
CHANGE_METRICS = ("mcn", "vor", "mrtl", "ppl")


def change_cells(rows: list[dict]) -> list[list[str]]:
    """What the loss changed against the baseline, as cells: a header (metric, the baseline, each finished trial in
    table order with its lambda_iso), then one line per metric the baseline has an interval for (CHANGE_METRICS, MCN/VoR at further
    timesteps after VoR): the baseline's `12.3 [11.1, 13.6]`, each trial's with `lower` or `higher` where
    `selection.lower_beyond_noise` says so (the intervals do not overlap: the rule that chooses the champion) and
    `overlap` where it does not. [] without a finished baseline, another finished trial or such a metric. Rows at
    screening fidelity are left out: their numbers come from other sample sizes."""
    done = [r for r in table_rows(rows) if r.get("status") == "DONE" and r.get("fidelity", "full") != "screen"]
    base = next((r for r in done if r.get("baseline")), None)
    trials = [r for r in done if not r.get("baseline")]
    if base is None or not trials:
        return []
    further = sorted(k for k in base if is_result_metric(k) and k.startswith(("mcn_t", "vor_t")) and not k.endswith(("_lo", "_hi")))
    metrics = [k for k in (*CHANGE_METRICS[:2], *further, *CHANGE_METRICS[2:]) if has_interval(base, k)]
    if not metrics:
        return []

    def verdict(r: dict, k: str) -> str:
        if not isinstance(r.get(k), float) or math.isnan(r[k]):
            return ""
        return " lower" if lower_beyond_noise(r, base, k) else " higher" if lower_beyond_noise(base, r, k) else " overlap"

    cells = [["metric", f"baseline {base['trial_id']}", *(f"{r['trial_id']} (lambda_iso={r['lambda_iso']:.3g})" for r in trials)]]
    for k in metrics:
        cells.append([k, metric_text(base, k), *(metric_text(r, k) + verdict(r, k) for r in trials)])
    return cells


def change_title(level: float | None) -> str:
    """The line above the change table: what its intervals are and what its words mean."""
    intervals = f"{level:.0%} bootstrap intervals" if level else "bootstrap intervals"
    return (f"what the loss changed against the baseline ({intervals}; lower/higher: beyond the noise, the intervals "
            "do not overlap; overlap: inside it)")


def change_plain(rows: list[dict], level: float | None) -> str:
    """The change table as text for the terminal, its title first; "" when there is nothing to compare."""
    cells = change_cells(rows)
    return change_title(level) + "\n" + _aligned(cells) if cells else ""


def change_markdown(rows: list[dict], level: float | None) -> str:
    """The change table as Markdown, its title (capitalised) first; "" when there is nothing to compare."""
    cells = change_cells(rows)
    if not cells:
        return ""
    title = change_title(level)
    lines = [title[0].upper() + title[1:] + ":", "", "| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells[1:]])


def backbones_of(rows: list[dict]) -> dict[str, str]:
    out = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("backbone_") and v:
                out.setdefault(k.removeprefix("backbone_"), v)
    return out


def save_tables(rows: list[dict], out_dir: Path, level: float | None = None) -> tuple[Path, Path]:
    """results.csv and results.md (the table, then what the loss changed at interval level `level`), scrubbed (a
    checkpoint path may be a signed URI) and private to the user."""
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in table_rows(rows):
        w.writerow(r)
    st.write_bytes(str(csv_path), scrub_text(buf.getvalue()).encode())
    changes = change_markdown(rows, level)
    md = markdown_table(rows, backbones_of(rows)) + (f"\n\n{changes}" if changes else "")
    note = unpublished_note(backbones_of(rows))  # stand-in or unverified weight files: said once, under the table
    md += f"\n\n{note}" if note else ""
    st.write_bytes(str(md_path), (scrub_text(md) + "\n").encode())
    return csv_path, md_path


