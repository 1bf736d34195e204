"""Per-image attribute labels for LS on image folders: reading the labels file and matching it to images.

Two formats, told apart by the first line:

- CelebA's `list_attr_celeba.txt` (and CelebAMask-HQ's `CelebAMask-HQ-attribute-anno.txt`): whitespace
  separated; line 1 the number of images, line 2 the attribute names, then one `<file> v_1 ... v_A` row
  per image. Line 1 may be left out; line 2 may start with a name for the file column.
- CSV: a header `image,<attr_1>,...,<attr_A>` (any name for the first column), one row per image.

Values are -1/1 or 0/1 (one convention per file); 1 means "has the attribute". Rows are matched to the
images under `dataset.path` by the file name relative to it, else by the base name, else by either
without its extension (`000001.jpg` in the file matches `000001.png` on disk). Images without a row are
left out of training; rows without an image are ignored. The classifier trained from these labels is
`isosweep.evaluation.features.attributes`.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from isosweep.files import IMAGE_SUFFIXES

__all__ = ["AttributeFileError", "AttributeTable", "read_attributes", "match_images"]

_FIX_FORMATS = ("write CelebA's list_attr_celeba.txt format (line 1: count, line 2: attribute names, then "
                "`<file> v_1 ... v_A`) or a CSV with the header `image,<attr_1>,...` and one row per image, values -1/1 or 0/1")


_TOKENS = {"1": 1, "-1": -1, "0": 0, "+1": 1, "1.0": 1, "-1.0": -1, "0.0": 0}


class AttributeFileError(ValueError):
    """dataset.attributes cannot be used; the message names the file, the line and the fix."""

    deterministic = True  # not retried (isosweep.errors)


@dataclass
class AttributeTable:
    """A parsed labels file: `values[i, a]` = 1 when image `images[i]` has attribute `names[a]`, else 0."""

    path: Path
    format: str  # "celeba" (whitespace separated) or "csv"
    names: list[str]
    images: list[str]  # as written in the file, with / separators and no leading ./
    values: np.ndarray  # (N, A) uint8 in {0, 1}
    lines: list[int]  # 1-based line of each row

    def __len__(self) -> int:
        return len(self.images)


def _err(path: Path, line: int | None, msg: str, fix: str) -> AttributeFileError:
    where = f"dataset.attributes {path}" + (f", line {line}" if line is not None else "")
    return AttributeFileError(f"{where}: {msg}; fix: {fix}")


def _norm_name(name: str) -> str:
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _value(path: Path, line: int, token: str, column: str) -> int:
    tok = token.strip()
    try:
        v = float(tok)
    except ValueError:
        v = None
    if v is None or v not in (-1.0, 0.0, 1.0):
        raise _err(path, line, f"value {tok!r} for attribute {column!r} is not one of -1, 0, 1",
                   "use 1 for 'has the attribute' and -1 or 0 (one convention for the whole file) for 'has not'")
    return int(v)


def _parse_csv(path: Path, lines: list[str]) -> tuple[list[str], list[tuple[int, str, list[str]]], int]:
    rows = [(i + 1, r) for i, r in enumerate(csv.reader(lines)) if any(c.strip() for c in r)]
    (hline, header), body = rows[0], rows[1:]
    header = [c.strip() for c in header]
    while header and header[-1] == "":  # a trailing comma
        header.pop()
    names = header[1:]
    if not names or any(not n for n in names):
        raise _err(path, hline, f"the header {','.join(header)!r} must name the image column and at least one attribute, "
                   "none of them empty", "start the file with `image,<attr_1>,<attr_2>,...`")
    out = []
    for ln, r in body:
        r = [c.strip() for c in r]
        while len(r) > len(header) and r[-1] == "":
            r.pop()
        if len(r) != len(header):
            raise _err(path, ln, f"{len(r)} fields, expected {len(header)} (the image and {len(names)} attributes of the header)",
                       "give every row the image name and one value per attribute, separated by commas")
        out.append((ln, r[0], r[1:]))
    return names, out, hline


def _parse_whitespace(path: Path, lines: list[str]) -> tuple[list[str], list[tuple[int, str, list[str]]], int]:
    rows = [(i + 1, line.split()) for i, line in enumerate(lines) if line.strip()]
    count = None
    if len(rows[0][1]) == 1 and rows[0][1][0].isdigit():
        (cline, (tok,)), rows = rows[0], rows[1:]
        count = int(tok)
        if not rows:
            raise _err(path, cline, "the file ends after the image count", "add the line of attribute names and one row per image")
    (hline, names), body = rows[0], rows[1:]
    if count is None and body and len(body[0][1]) == len(names):  # no count line: the header may name the file column
        names = names[1:]
    if not names:
        raise _err(path, hline, "no attribute names", "line 2 (line 1 without the count line) lists the attribute names")
    out = []
    for ln, toks in body:
        if len(toks) != len(names) + 1:
            raise _err(path, ln, f"{len(toks)} fields, expected {len(names) + 1} (the image and {len(names)} attributes of line {hline})",
                       "give every row the image name and one value per attribute, separated by spaces")
        out.append((ln, toks[0], toks[1:]))
    if count is not None and count != len(out):
        raise _err(path, cline, f"the count says {count} images but the file has {len(out)} rows",
                   f"write {len(out)} on line {cline} (or delete that line)")
    return names, out, hline


def read_attributes(path: str | os.PathLike) -> AttributeTable:
    """Parse `dataset.attributes` (module docstring: CelebA's whitespace format or a CSV).

    Raises `AttributeFileError` naming the file, the line and the fix: unreadable file, no rows, a row of the
    wrong length, a value other than -1/0/1, -1 and 0 mixed in one file, an image named twice, a count
    (CelebA's line 1) that disagrees with the rows, duplicate attribute names.
    """
    path = Path(os.path.expanduser(str(path)))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise _err(path, None, "no such file", "set dataset.attributes to the labels file's path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _err(path, None, f"cannot be read as text ({exc})", _FIX_FORMATS) from None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise _err(path, None, "the file is empty", _FIX_FORMATS)
    fmt = "csv" if "," in first else "celeba"
    names, rows, hline = (_parse_csv if fmt == "csv" else _parse_whitespace)(path, lines)
    if not rows:
        raise _err(path, hline, "a header but no image rows after it", "add one row per image: its file name, then one value per attribute")
    seen_names: dict[str, int] = {}
    for a, n in enumerate(names):
        if n in seen_names:
            raise _err(path, hline, f"attribute {n!r} appears twice in the header (columns {seen_names[n] + 2} and {a + 2})",
                       "give every attribute column its own name")
        seen_names[n] = a
    values = np.empty((len(rows), len(names)), dtype=np.int8)
    images, line_of, first_line_of = [], [], {}
    for i, (ln, image, vals) in enumerate(rows):
        name = _norm_name(image)
        if not name:
            raise _err(path, ln, "the image name is empty", "start every row with the image's file name")
        if name in first_line_of:
            raise _err(path, ln, f"image {name!r} already has a row (line {first_line_of[name]})", "keep one row per image")
        first_line_of[name] = ln
        images.append(name)
        line_of.append(ln)
        try:
            values[i] = [_TOKENS[v] for v in vals]  # fast path (CelebA has 8 million values)
        except KeyError:
            values[i] = [_value(path, ln, v, names[a]) for a, v in enumerate(vals)]
    neg, zero = np.nonzero((values == -1).any(1))[0], np.nonzero((values == 0).any(1))[0]
    if len(neg) and len(zero):
        raise _err(path, int(max(line_of[neg[0]], line_of[zero[0]])),
                   f"the file mixes the -1/1 convention (line {line_of[neg[0]]}) with 0/1 (line {line_of[zero[0]]})",
                   "use -1/1 or 0/1 throughout")
    return AttributeTable(path=path, format=fmt, names=list(names), images=images,
                          values=(values == 1).astype(np.uint8), lines=line_of)


def _strip_suffix(name: str) -> str:
    p = PurePosixPath(name)
    return str(p.with_suffix("")) if p.suffix.lower() in IMAGE_SUFFIXES else name


def match_images(table: AttributeTable, root: str | os.PathLike, files: list[Path]) -> tuple[list[int], np.ndarray, dict]:
    """Pair image files (under `root`) with the table's rows: by the path relative to root, else the base
    name, else either without its extension. Returns (indices into `files` that have a row, their labels
    (n, A) uint8, counts {'images', 'labelled', 'rows', 'unused_rows'}). Raises `AttributeFileError` when a
    row matches two images or no image matches any row."""
    root = Path(root).expanduser()
    full: dict[str, int] = {}
    noext: dict[str, list[int]] = {}
    for i, name in enumerate(table.images):
        full[name] = i
        noext.setdefault(_strip_suffix(name), []).append(i)
    used: dict[int, Path] = {}
    indices, rows = [], []
    for fi, f in enumerate(files):
        rel = f.relative_to(root).as_posix()
        row = full.get(rel, full.get(f.name))
        if row is None:
            for key in (_strip_suffix(rel), _strip_suffix(f.name)):
                cands = noext.get(key, [])
                if len(cands) > 1:
                    shown = ", ".join(f"line {table.lines[c]}" for c in cands[:3])
                    raise _err(table.path, table.lines[cands[1]], f"image {rel!r} matches several rows without extensions ({shown})",
                               "write the file names with their extensions, as they are under dataset.path")
                if cands:
                    row = cands[0]
                    break
        if row is None:
            continue
        if row in used:
            raise _err(table.path, table.lines[row], f"row {table.images[row]!r} matches two images, "
                       f"{used[row].relative_to(root).as_posix()!r} and {rel!r}",
                       f"write image names relative to dataset.path ({root}), e.g. {rel!r}")
        used[row] = f
        indices.append(fi)
        rows.append(row)
    if not indices:
        ex_files = ", ".join(repr(f.relative_to(root).as_posix()) for f in files[:3])
        ex_rows = ", ".join(repr(n) for n in table.images[:3])
        raise _err(table.path, None, f"none of the {len(files)} images under dataset.path {root} has a row (images: {ex_files}, ...; "
                   f"rows: {ex_rows}, ...)", "name each image as its path relative to dataset.path, or its file name "
                   "(the extension may differ); for CelebA-HQ use labels whose names match the files, e.g. CelebAMask-HQ-attribute-anno.txt")
    stats = {"images": len(files), "labelled": len(indices), "rows": len(table), "unused_rows": len(table) - len(indices)}
    return indices, table.values[rows], stats
