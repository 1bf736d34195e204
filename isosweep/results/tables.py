"""The results table: Table-1 order, as Markdown, as plain text and as CSV, every number from the rows.

A metric with a bootstrap interval is shown with it, `12.3 [11.1, 13.6]` (`evaluation.record.metric_text`);
the CSV keeps every value in its own column (`ppl`, `ppl_lo`, `ppl_hi`, ...)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from isosweep import storage as st
from isosweep.config import INTERVAL_METRICS, POINT_KEYS
from isosweep.evaluation.record import metric_text
from isosweep.redact import scrub_text


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
    cells = [list(columns)] + [[_cell(r, c) for c in columns] for r in table_rows(rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)


def backbones_of(rows: list[dict]) -> dict[str, str]:
    out = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("backbone_") and v:
                out.setdefault(k.removeprefix("backbone_"), v)
    return out


def save_tables(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """results.csv and results.md, scrubbed (a checkpoint path may be a signed URI) and private to the user."""
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in table_rows(rows):
        w.writerow(r)
    st.write_bytes(str(csv_path), scrub_text(buf.getvalue()).encode())
    st.write_bytes(str(md_path), (scrub_text(markdown_table(rows, backbones_of(rows))) + "\n").encode())
    return csv_path, md_path


