"""Label manifests: a CSV that names image files and their labels, as chest X-ray data sets ship.

Two layouts, both read by :func:`read_csv`:

- one column of separated names, NIH ChestX-ray14's ``Data_Entry_2017.csv`` (Wang et al.,
  CVPR 2017): ``Image Index`` holds the file name and ``Finding Labels`` the findings joined by
  ``|`` ("Cardiomegaly|Effusion"), or ``No Finding``;
- one column per label, CheXpert's ``train.csv`` (Irvin et al., AAAI 2019): ``Path`` and one
  column per observation holding ``1.0`` (positive), ``0.0`` (negative), ``-1.0`` (uncertain) or
  nothing (not mentioned in the report). Uncertain entries follow one of the paper's policies
  (U-Ignore, U-Ones, U-Zeros: :data:`UNCERTAIN`), blank ones count as negative or are ignored.

The same one-column-per-label layout with a single column of class names ("path,label") is a
single-label manifest. The metadata both data sets carry (age, sex, view, patient) is never a
label; a patient column can be kept as groups, so that :func:`holdout_by_group` keeps every
image of a patient on one side of a validation split, as CheXNet (Rajpurkar et al. 2017)
splits ChestX-ray14 by patient.

Only the standard library's ``csv`` reads the file. Every mistake in it is a ``UsageError``
naming the file, the line (the header is line 1) and the column.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import UsageError

UNCERTAIN = ("ignore", "ones", "zeros")  # CheXpert's U-Ignore, U-Ones, U-Zeros (Irvin et al. 2019)
BLANK = ("negative", "ignore")           # a blank cell: a negative, or not counted
PATH_COLUMNS = ("path", "Path", "Image Index")  # tried in this order when path_column is None
NIH_LABELS_COLUMN = "Finding Labels"

# The non-label columns of ChestX-ray14's Data_Entry_2017.csv and CheXpert's train.csv / valid.csv.
# ChestX-ray14 writes "OriginalImage[Width,Height]" unquoted, so a CSV reader sees two columns.
METADATA_COLUMNS = frozenset({
    "Image Index", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position",
    "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA",
})

# cell text -> code in the one-column-per-label layout; anything else is not a label value
_POSITIVE, _NEGATIVE, _UNCERTAIN, _BLANK, _OTHER = 1, 0, -1, 2, 9
_CODES = {"1": _POSITIVE, "1.0": _POSITIVE, "0": _NEGATIVE, "0.0": _NEGATIVE,
          "-1": _UNCERTAIN, "-1.0": _UNCERTAIN, "": _BLANK}
_ALLOWED = ("1 or 1.0 (positive), 0 or 0.0 (negative), -1 or -1.0 (uncertain) or a blank cell "
            "(not mentioned)")


# ----------------------------------------------------------------------------- the table

@dataclass(frozen=True, eq=False)
class LabelTable:
    """What a manifest says, one row per image.

    Multi-label: ``targets`` is float32 (N, L) of 0/1 and ``mask`` bool (N, L), False where an
    entry is not counted (an uncertain or blank label under the "ignore" policies); the loss
    and the metrics skip those. Single-label: ``targets`` is int64 (N,) indices into ``names``
    and ``mask`` is None.
    """
    paths: tuple[str, ...]          # absolute image paths
    names: tuple[str, ...]          # label names (multi-label) or class names (single-label)
    targets: np.ndarray
    mask: np.ndarray | None
    groups: tuple[str, ...] | None  # the group column's values (a patient ID, say), if asked for
    source: str                     # the CSV file, for messages

    @property
    def multi_label(self) -> bool:
        return self.targets.ndim == 2

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices) -> "LabelTable":
        """The rows at ``indices`` (integers, or a boolean mask over the rows), in that order."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = idx.astype(np.int64)
        elif not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"subset takes integer indices or a boolean mask, got {idx.dtype} values")
        idx = idx.reshape(-1)
        return LabelTable(
            paths=tuple(self.paths[i] for i in idx.tolist()),
            names=self.names,
            targets=self.targets[idx],
            mask=None if self.mask is None else self.mask[idx],
            groups=None if self.groups is None else tuple(self.groups[i] for i in idx.tolist()),
            source=self.source)


# ----------------------------------------------------------------------------- read_csv

def read_csv(path: str | Path, *, path_column: str | None = None,
             label_columns: Sequence[str] | None = None, labels_column: str | None = None,
             separator: str = "|", none_value: str | None = "No Finding",
             uncertain: str = "ignore", blank: str = "negative", group_column: str | None = None,
             image_root: str | Path | None = None, check_files: bool = True) -> LabelTable:
    """Read a label manifest; see the module docstring for the two layouts.

    ``path_column`` names the column of image paths (default: the first of
    :data:`PATH_COLUMNS` present). Relative paths are taken against ``image_root``, else the
    CSV's folder: ChestX-ray14 lists bare file names, so ``image_root`` is its images folder;
    CheXpert lists ``CheXpert-v1.0-small/train/...``, so it is the folder holding
    ``CheXpert-v1.0-small``. With ``check_files`` every image must exist.

    The layout is one column of ``separator``-joined names when ``labels_column`` is given, or
    when ``label_columns`` is not and there is a ``Finding Labels`` column: the label names are
    the sorted set of names seen, ``none_value`` means no finding (it is not a label), and every
    entry counts. Otherwise it is one column per label: ``label_columns`` (in that order), by
    default every column but the path, the group and :data:`METADATA_COLUMNS`, in file order.
    ``uncertain`` (:data:`UNCERTAIN`) says what -1 becomes: "ignore" masks it out, "ones" makes
    it a positive, "zeros" a negative; ``blank`` (:data:`BLANK`) says whether a blank cell is a
    negative or masked out. A single label column none of whose values is a 0/1/-1 value is a
    column of class names: a single-label table, classes sorted.

    ``group_column`` (ChestX-ray14's ``Patient ID``, say) is kept as ``groups`` for
    :func:`holdout_by_group`. Lines that are blank or hold only separators are skipped.
    """
    if uncertain not in UNCERTAIN:
        raise UsageError(f"uncertain must be one of {', '.join(UNCERTAIN)} (CheXpert's U-Ignore, "
                         f"U-Ones, U-Zeros), got {uncertain!r}.")
    if blank not in BLANK:
        raise UsageError(f"blank must be one of {', '.join(BLANK)} (a blank cell counts as a "
                         f"negative, or is not counted), got {blank!r}.")
    if label_columns is not None and labels_column is not None:
        raise UsageError("give label_columns (one column per label) or labels_column (one column "
                         "of separated label names), not both.")
    if labels_column is not None and not separator:
        raise UsageError("separator must be a non-empty string, such as '|'.")
    if isinstance(label_columns, str):
        label_columns = [label_columns]

    source = str(path)
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"label file {source} does not exist; give the path of a CSV manifest "
                         f"(ChestX-ray14's Data_Entry_2017.csv, CheXpert's train.csv, or your own).")
    if not path.is_file():
        raise UsageError(f"label file {source} is a folder; give the path of the CSV file itself.")
    header, rows, lines = _read_rows(path, source)
    column = {name: i for i, name in enumerate(header) if name}

    def need(name: str, what: str) -> int:
        if name not in column:
            raise UsageError(f"{source} has no column {name!r} ({what}); its columns are "
                             f"{_listing(header)}. Give the name exactly as the header line writes it.")
        return column[name]

    # image paths
    if path_column is not None:
        pi = need(path_column, "path_column")
    else:
        path_column = next((c for c in PATH_COLUMNS if c in column), None)
        if path_column is None:
            raise UsageError(f"{source} has no image path column (looked for "
                             f"{', '.join(map(repr, PATH_COLUMNS))}); its columns are "
                             f"{_listing(header)}. Pass path_column, the name of the column that "
                             f"holds the image file names.")
        pi = column[path_column]
    root = os.path.abspath(os.path.expanduser(image_root) if image_root is not None else path.parent)
    paths, seen = [], {}
    for line, row in zip(lines, rows):
        cell = row[pi].strip()
        if not cell:
            raise UsageError(f"{source}, line {line}: the {path_column!r} cell is empty; every row "
                             f"names one image file. Fill it in or delete the line.")
        full = os.path.normpath(os.path.join(root, os.path.expanduser(cell)))
        if full in seen:
            raise UsageError(f"{source}: lines {seen[full]} and {line} both list the image {cell} "
                             f"({full}); an image has one row. Merge its labels into one line and "
                             f"delete the other.")
        seen[full] = line
        paths.append(full)

    # groups
    groups = None
    if group_column is not None:
        gi = need(group_column, "group_column")
        groups = []
        for line, row in zip(lines, rows):
            cell = row[gi].strip()
            if not cell:
                raise UsageError(f"{source}, line {line}: the {group_column!r} cell (group_column) "
                                 f"is empty; every image needs its group (its patient, say) so "
                                 f"that a hold-out split keeps each group on one side.")
            groups.append(cell)
        groups = tuple(groups)

    # labels
    if labels_column is None and label_columns is None and NIH_LABELS_COLUMN in column:
        labels_column = NIH_LABELS_COLUMN
    if labels_column is not None:
        li = need(labels_column, "labels_column")
        names, targets = _separated(source, rows, lines, li, labels_column, separator, none_value)
        mask = np.ones(targets.shape, dtype=bool)
    else:
        if label_columns is not None:
            label_columns = list(label_columns)
            for c in label_columns:
                need(c, "label_columns")
            twice = sorted({c for c in label_columns if label_columns.count(c) > 1})
            if twice:
                raise UsageError(f"label_columns lists {', '.join(map(repr, twice))} more than once; "
                                 f"give each label column once.")
            for c, what in ((path_column, "the image path column"), (group_column, "group_column")):
                if c in label_columns:
                    raise UsageError(f"label_columns includes {c!r}, {what}; list only the columns "
                                     f"that hold labels.")
        else:
            label_columns = [c for c in header if c and c not in (path_column, group_column)
                             and c not in METADATA_COLUMNS]
        if not label_columns:
            raise UsageError(f"{source} has no label columns: its columns are {_listing(header)}, "
                             f"and the image paths ({path_column!r}) and metadata are not labels. "
                             f"Add one column per label (1, 0, -1 or blank), a column of class "
                             f"names, or a {NIH_LABELS_COLUMN!r} column of '|'-separated names.")
        names, targets, mask = _per_column(source, rows, lines, [column[c] for c in label_columns],
                                           label_columns, uncertain, blank)

    if check_files:
        missing = [(line, row[pi].strip(), p) for line, row, p in zip(lines, rows, paths)
                   if not os.path.isfile(p)]
        if missing:
            line, cell, full = missing[0]
            where = ("image_root" if image_root is not None else "the CSV's folder, as no "
                     "image_root was given")
            raise UsageError(f"{source}, line {line}: image {cell} not found (looked for {full}); "
                             f"{len(missing)} of the {len(paths)} images listed are missing. "
                             f"Relative paths are taken against {root} ({where}): pass image_root, "
                             f"the folder the paths are relative to, or check_files=False to skip "
                             f"this check.")
    return LabelTable(paths=tuple(paths), names=tuple(names), targets=targets, mask=mask,
                      groups=groups, source=source)


def _listing(header: list[str]) -> str:
    return ", ".join(repr(h) for h in header if h) or "(none)"


def _read_rows(path: Path, source: str) -> tuple[list[str], list[list[str]], list[int]]:
    """The header (names stripped), the data rows (cells as written, as long as the header) and
    each row's line number. ChestX-ray14's file ends lines with a comma, an unnamed column:
    blank cells past the header's end, and missing cells under unnamed columns, are let pass."""
    rows, lines = [], []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, strict=True)  # an unclosed quote is an error, not a long cell
            try:
                header = next(reader)
            except StopIteration:
                header = []
            header = [h.strip() for h in header]
            if not any(header):
                raise UsageError(f"{source} is empty or its first line is blank; a label manifest "
                                 f"starts with a header line naming its columns (Path,Cardiomegaly,... "
                                 f"or Image Index,Finding Labels,...).")
            twice = sorted({h for h in header if h and header.count(h) > 1})
            if twice:
                raise UsageError(f"{source}, line 1: the header names the column "
                                 f"{', '.join(map(repr, twice))} more than once; rename one so that "
                                 f"each column has its own name.")
            n = len(header)
            for row in reader:
                if not any(c.strip() for c in row):
                    continue
                if len(row) > n and not any(c.strip() for c in row[n:]):
                    row = row[:n]
                elif len(row) < n and not any(header[len(row):]):
                    row = row + [""] * (n - len(row))
                if len(row) != n:
                    raise UsageError(f"{source}, line {reader.line_num}: {len(row)} fields, but the "
                                     f"header has {n}. A cell holding the separator (a comma) must "
                                     f"be quoted; fix the line or delete it.")
                rows.append(row)
                lines.append(reader.line_num)
    except UnicodeDecodeError as e:
        raise UsageError(f"{source} is not UTF-8 text ({e}); save it as UTF-8 CSV.") from None
    except csv.Error as e:
        raise UsageError(f"{source}, line {reader.line_num}: not readable as CSV ({e}); check the "
                         f"quotes on this line and the lines above it (a quoted cell must be "
                         f"closed), then fix or delete the line.") from None
    if not rows:
        raise UsageError(f"{source} has a header line but no rows; list one image per line.")
    return header, rows, lines


def _separated(source: str, rows, lines, li: int, name: str, separator: str,
               none_value: str | None) -> tuple[list[str], np.ndarray]:
    """Names and 0/1 targets from one column of ``separator``-joined label names."""
    per_row = []
    for line, row in zip(lines, rows):
        parts = [p.strip() for p in row[li].split(separator)]
        parts = [p for p in parts if p]
        if not parts:
            say = (f"write {none_value!r} for an image with no finding" if none_value is not None
                   else "name at least one label")
            raise UsageError(f"{source}, line {line}: the {name!r} cell is empty; {say}.")
        if none_value is not None and none_value in parts:
            if len(parts) > 1:
                raise UsageError(f"{source}, line {line}: the {name!r} cell {row[li].strip()!r} "
                                 f"says {none_value!r} and names findings as well; keep one or "
                                 f"the other.")
            parts = []
        per_row.append(parts)
    names = sorted({p for parts in per_row for p in parts})
    if not names:
        raise UsageError(f"{source}: every {name!r} cell is {none_value!r}, so there are no labels "
                         f"to learn; a manifest needs some images with findings.")
    index = {n: j for j, n in enumerate(names)}
    targets = np.zeros((len(rows), len(names)), dtype=np.float32)
    for i, parts in enumerate(per_row):
        targets[i, [index[p] for p in parts]] = 1.0
    return names, targets


def _per_column(source: str, rows, lines, indices: list[int], columns: list[str], uncertain: str,
                blank: str) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Names, targets and mask from one column per label (or one column of class names)."""
    cells = [[row[k].strip() for k in indices] for row in rows]
    for j, c in enumerate(columns):
        if not any(r[j] for r in cells):
            raise UsageError(f"{source}: every cell of the column {c!r} is blank, so it says nothing "
                             f"about any image; delete the column, or pass label_columns listing "
                             f"the label columns.")
    if len(columns) == 1 and not any(r[0] in _CODES for r in cells if r[0]):
        for line, r in zip(lines, cells):
            if not r[0]:
                raise UsageError(f"{source}, line {line}: the class column {columns[0]!r} is "
                                 f"empty; every image needs its class. Fill it in or delete the line.")
        names = sorted({r[0] for r in cells})
        index = {n: j for j, n in enumerate(names)}
        return names, np.array([index[r[0]] for r in cells], dtype=np.int64), None
    codes = np.array([[_CODES.get(v, _OTHER) for v in r] for r in cells], dtype=np.int8)
    bad = np.argwhere(codes == _OTHER)
    if len(bad):
        i, j = bad[0]
        raise UsageError(f"{source}, line {lines[i]}, column {columns[j]!r}: {cells[i][j]!r} is not "
                         f"a label value; a label column holds {_ALLOWED}. If {columns[j]!r} is not "
                         f"a label, pass label_columns listing the columns that are.")
    targets = codes == _POSITIVE
    mask = np.ones(codes.shape, dtype=bool)
    if uncertain == "ones":
        targets |= codes == _UNCERTAIN
    elif uncertain == "ignore":
        mask &= codes != _UNCERTAIN
    if blank == "ignore":
        mask &= codes != _BLANK
    return list(columns), targets.astype(np.float32), mask


# ----------------------------------------------------------------------------- hold-out

def holdout_by_group(groups: Sequence, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_indices, val_indices), sorted int64, with no group on both sides: groups are taken in
    a random order drawn from ``seed`` (numpy ``default_rng``) until the hold-out holds at least
    ``val_size`` images (it may exceed it by the last group's size). ``val_size`` 0 gives an
    empty hold-out.

    Images of one patient are alike; split by image, the validation score of a chest X-ray
    model is inflated by patients it trained on, hence CheXNet's split by patient."""
    if groups is None:
        raise UsageError("a hold-out by group needs each image's group: pass group_column (the "
                         "patient column, say) to read_csv.")
    keys = np.asarray([str(g) for g in groups])
    n = len(keys)
    if val_size < 0:
        raise UsageError(f"cannot hold out {val_size} images; give a count of 0 or more.")
    if val_size == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if val_size >= n:
        raise UsageError(f"cannot hold out {val_size} of {n} training images for validation; "
                         f"hold out fewer.")
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    order = np.random.default_rng(seed).permutation(len(uniq))
    taken = int(np.searchsorted(np.cumsum(counts[order]), val_size)) + 1
    if taken >= len(uniq):
        raise UsageError(f"holding out {val_size} of {n} images group by group would take all "
                         f"{len(uniq)} groups, leaving nothing to train on; hold out fewer images "
                         f"(the groups hold up to {int(counts.max())} each).")
    held = np.zeros(len(uniq), dtype=bool)
    held[order[:taken]] = True
    in_val = held[inverse]
    return np.flatnonzero(~in_val).astype(np.int64), np.flatnonzero(in_val).astype(np.int64)


CSV_FIELDS = ("path_column", "image_root", "label_columns", "labels_column", "none_value", "uncertain", "blank",
              "group_column")


def options_from_fields(fields) -> dict:
    """:func:`read_csv`'s keyword arguments from a run's recipe fields (a ``Recipe``, or the
    ``config`` dict a checkpoint holds), so every command reads a manifest as training did; an
    empty string means the default, ``label_columns`` is comma-separated, and a config without
    the fields (written before they existed) gives the defaults."""
    get = fields.get if isinstance(fields, dict) else (lambda k, d=None: getattr(fields, k, d))
    columns = [c.strip() for c in (get("label_columns") or "").split(",") if c.strip()]
    return {"path_column": get("path_column") or None, "image_root": get("image_root") or None,
            "label_columns": columns or None,
            "labels_column": get("labels_column") or None,
            "none_value": get("none_value", "No Finding"), "uncertain": get("uncertain", "ignore"),
            "blank": get("blank", "negative"), "group_column": get("group_column") or None}
