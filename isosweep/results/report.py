"""The sweep report: a folder with report.md, report.html and the figures, every number from the run.

Reads the rows, front and champion from the sweep and each trial's `eval/` folder (written by the
trial's workers next to its final checkpoint): `metrics.json` (metrics, backbones, rtl_curve,
frame_distances) and the PNG strips.

Every text it writes is scrubbed (`isosweep.redact`): the spec and the rows may name storage and
tracking URIs with credentials in them, and the folder is uploaded to MLflow. Its files are private on
a local disk (0600, the folders it creates 0700), like everything `isosweep.storage` writes.
"""

from __future__ import annotations

import html
import shutil
from pathlib import Path

import yaml

from isosweep import storage as st
from isosweep.evaluation.features.common import unpublished_note
from isosweep.evaluation.record import metric_text, read_record, record_images, shown_metrics
from isosweep.redact import scrub_text, scrub_tree
from isosweep.results.plots import rtl_plot, strips_figure
from isosweep.results.rows import SweepOutcome
from isosweep.results.tables import backbones_of, change_markdown, markdown_table
from isosweep.spec import RESULT_METRICS, SweepSpec, is_result_metric


def load_trial_eval(row: dict) -> dict:
    """The trial's evaluation record (rtl_curve, frame_distances, ...) and image paths; {} when its checkpoint is not here."""
    ckpt = Path(row.get("checkpoint_path") or "")
    record = read_record(ckpt) if row.get("checkpoint_path") and ckpt.is_dir() else None
    if record is None:
        return {}
    return {"rtl_curve": record.rtl_curve, "frame_distances": record.frame_distances, "images": record_images(ckpt),
            "settings": record.settings}


def write_report(spec: SweepSpec, outcome: SweepOutcome, out_dir: Path) -> Path:
    """Write report.md, report.html and their figures into out_dir (text scrubbed, files 0600); returns out_dir."""
    out_dir = st.make_private_dirs(out_dir)
    rows = outcome.rows
    backbones = backbones_of(rows)
    pareto_src = outcome.sweep_dir / "pareto.png"
    if pareto_src.is_file():
        st.make_private(shutil.copyfile(pareto_src, out_dir / "pareto.png"))
    baseline = next((r for r in rows if r.get("baseline")), None)
    champion = outcome.champion.row if outcome.champion else None
    evals = {}
    for label, r in (("baseline", baseline), ("champion", champion)):
        if r is not None:
            evals[label] = load_trial_eval(r)

    md = [f"# Sweep report: {outcome.sweep_id}", ""]
    md += [
        "Every number below was produced by this run. FID and PPL name the feature network that",
        "produced them; values from different backbones are not comparable. `12.3 [11.1, 13.6]` is a value",
        "with its bootstrap interval (evaluation.bootstrap.level); a trial counts as better than another on a",
        "metric only where its interval lies wholly below the other's (docs/metrics.md).",
        "",
        "## Results (Table-1 style)",
        "",
        markdown_table(rows, backbones),
        "",
        "Backbones: " + (", ".join(f"`{k}`: {v}" for k, v in sorted(backbones.items())) or "none recorded"),
        "",
    ]
    if unpublished_note(backbones):
        md += [f"**{unpublished_note(backbones)}**", ""]
    screened = [r["trial_id"] for r in rows if r.get("fidelity") == "screen" and r["status"] == "DONE"]  # ERROR: failed
    if screened or any(r.get("fidelity") == "full" and "screen_fid" in r for r in rows):
        md += [f"Screened (evaluation.screening): every trial was first evaluated at screening sizes; the {len(screened)} "
               f"trial(s) at `fidelity: screen` ({', '.join(screened) or 'none'}) were beaten beyond the noise on both "
               "objectives by another trial, kept their screening numbers and are not selected; the others were "
               "evaluated with the full protocol (docs/metrics.md, \"Screening\").", ""]
    if outcome.champion:
        c = champion
        md += [
            "## Champion",
            "",
            f"Trial `{c['trial_id']}`: lambda_iso = {c['lambda_iso']:.3g}, p = {c['p']:g}, G = {c['iso_metric']}.",
            f"Rule `{spec.selection.rule}`: {outcome.champion.reason}.",
            "",
        ]
        if baseline is not None:
            md.append("| metric | baseline | champion |")
            md.append("|---|---|---|")
            extra = sorted(k for k in {*baseline, *c} if k not in RESULT_METRICS and is_result_metric(k))  # mcn_t100, ...
            for k in shown_metrics([*RESULT_METRICS, *extra]):
                md.append(f"| {k} | {metric_text(baseline, k)} | {metric_text(c, k)} |")
            md.append("")
    else:
        md += ["## Champion", "", "No trial finished with finite FID and PPL.", ""]
    changes = change_markdown(rows, spec.evaluation.bootstrap.level)
    if changes:
        md += ["## What the loss changed", "", changes, ""]
    if (out_dir / "pareto.png").is_file():
        md += ["## Pareto front (FID vs PPL)", "", "![Pareto front](pareto.png)", ""]

    curves = {k: v["rtl_curve"] for k, v in evals.items() if v.get("rtl_curve")}
    if curves:
        st.make_private(rtl_plot(curves, out_dir / "rtl_curves.png"))
        md += ["## RTL(t): baseline vs champion (Fig. 5)", "", "![RTL curves](rtl_curves.png)", ""]

    for mode in ("slerp", "lerp"):
        entries = []
        for label, ev in evals.items():
            img = ev.get("images", {}).get(f"{mode}_strip")
            if img is not None:
                dists = (ev.get("frame_distances") or {}).get(f"{mode}_strip") or (ev.get("frame_distances") or {}).get(mode)
                entries.append((f"{label}: {mode} (same seeds)", img, dists))
        if entries:
            name = f"strips_{mode}.png"
            st.make_private(strips_figure(entries, out_dir / name))
            md += [f"## Interpolation strips, {mode} (Figs. 1 and 6)", "",
                   "Same seeds for every model; below each strip the distance between adjacent frames.", "",
                   f"![{mode} strips]({name})", ""]
    edits = [(label, ev) for label, ev in evals.items() if "edit_grid" in ev.get("images", {})]
    if edits:
        md += ["## Local Basis edits (Fig. 7)", "",
               "Evaluation sample 0 edited along its top Local Basis directions (rows), gamma from low to high (columns); "
               "edit_linearity, edit_straightness and edit_consistency above measure such grids over every edited sample "
               "(docs/editing.md).", ""]
        for label, ev in edits:
            e = (ev.get("settings") or {}).get("edit") or {}
            st.make_private(shutil.copyfile(ev["images"]["edit_grid"], out_dir / f"edits_{label}.png"))
            md += [f"### Edits: {label} (t = {e.get('t')}, gamma -{e.get('gamma')}..{e.get('gamma')}, "
                   f"{e.get('directions')} directions)", "", f"![edits {label}](edits_{label}.png)", ""]
    trips = [(label, ev) for label, ev in evals.items() if "inversion_strip" in ev.get("images", {})]
    if trips:
        md += ["## DDIM inversion", "",
               "The dataset's first images (top row) DDIM-inverted to x_T and drawn again from it (bottom row); "
               "inversion_mse and inversion_perceptual above measure every inverted image (docs/editing.md).", ""]
        for label, ev in trips:
            v = (ev.get("settings") or {}).get("inversion") or {}
            st.make_private(shutil.copyfile(ev["images"]["inversion_strip"], out_dir / f"inversion_{label}.png"))
            md += [f"### Round trips: {label} ({v.get('ddim_steps')} DDIM steps, refine {v.get('refine')}, "
                   f"{v.get('num_images')} images measured)", "", f"![inversion {label}](inversion_{label}.png)", ""]
    for label, ev in evals.items():
        img = ev.get("images", {}).get("samples")
        if img is not None:
            st.make_private(shutil.copyfile(img, out_dir / f"samples_{label}.png"))
            md += [f"### Samples: {label}", "", f"![samples {label}](samples_{label}.png)", ""]

    # the spec scrubbed field by field first (a secret key's value goes whole), then the whole text
    md += ["## Spec", "", "```yaml", yaml.safe_dump(scrub_tree(spec.to_dict()), sort_keys=False).rstrip(), "```", ""]
    text = scrub_text("\n".join(md))
    page = scrub_text(markdown_to_html(text, title=f"isosweep report {outcome.sweep_id}"))
    st.write_bytes(str(out_dir / "report.md"), text.encode())
    st.write_bytes(str(out_dir / "report.html"), page.encode())
    return out_dir


def markdown_to_html(text: str, title: str) -> str:
    """A small converter for the report's own markdown (headings, tables, images, code, paragraphs)."""
    out, in_code, in_table = [], False, False
    for line in text.splitlines():
        if line.startswith("```"):
            out.append("<pre>" if not in_code else "</pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            out.append(f'<p><img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}" style="max-width:100%"></p>')
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
