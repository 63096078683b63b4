"""Classification labels from a site's CSV sheet, matched to studies by a header value.

A classification spec (``task: classification``) takes one class per study
from a CSV that the site keeps next to its export (a PACS-side label sheet:
it holds identifiers, so it is site-local and passed as ``--labels-csv``,
never part of the shared spec). ``labels.csv_key`` of the spec says which
header value identifies a study: (0008,0050) Accession Number (``accession``)
or (0020,000D) Study Instance UID (``study_uid``).

The CSV is read with the :mod:`csv` module as UTF-8 (a byte-order mark is
accepted, as Excel writes one); keys and class cells are compared after
stripping whitespace. A class cell holds a class name from
``labels.classes`` or its 0-based index.

Nothing read here ever reaches an output, a log line or an exception
message: errors name columns, row numbers and counts, never a key or a cell.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from fedimg.config import LabelSpec
from fedimg.preprocess.scan import PreprocessInputError

__all__ = ["LabelSheet", "LabelsCsvError", "class_index", "read_labels_csv"]

_MAX_LISTED = 20


class LabelsCsvError(PreprocessInputError):
    """The labels CSV is missing, unreadable or lacks the columns the spec names (a usage error)."""


@dataclass
class LabelSheet:
    """The rows of a labels CSV, keyed by the study key (identifiers: keep in memory only).

    Attributes:
        key_column: the column holding the study key.
        label_column: the column holding the class.
        key_tag: the DICOM attribute the key is compared with.
        labels: stripped key -> stripped class cell.
        rows: data rows read.
        rows_without_key: data rows whose key cell is empty (ignored).
        row_keys: the key of every data row with one, in file order (duplicates kept).
    """

    key_column: str
    label_column: str
    key_tag: str
    labels: dict[str, str] = field(default_factory=dict, repr=False)
    rows: int = 0
    rows_without_key: int = 0
    row_keys: list[str] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:  # never print keys
        return f"LabelSheet(key_column={self.key_column!r}, rows={self.rows})"

    def lookup(self, key: str) -> str | None:
        """The class cell for ``key`` (stripped), or None when the CSV has no row for it."""
        key = (key or "").strip()
        return self.labels.get(key) if key else None

    def account(self, source_keys: set[str]) -> dict[str, int | str]:
        """Counts only (never keys): how many CSV rows matched a study of the source."""
        matched = sum(1 for k in self.row_keys if k in source_keys)
        return {
            "key": self.key_tag,
            "key_column": self.key_column,
            "label_column": self.label_column,
            "rows": self.rows,
            "rows_matched": matched,
            "rows_unmatched": len(self.row_keys) - matched,
            "rows_without_key": self.rows_without_key,
        }


def _columns_text(names: list[str]) -> str:
    shown = [repr(n[:40]) for n in names[:_MAX_LISTED]]
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return (", ".join(shown) + more) if shown else "none"


def _find(header: list[str], name: str) -> int | None:
    if name in header:
        return header.index(name)
    folded = [h.casefold() for h in header]
    return folded.index(name.casefold()) if folded.count(name.casefold()) == 1 else None


def read_labels_csv(path: str | Path, labels: LabelSpec) -> LabelSheet:
    """Read the labels CSV named by ``--labels-csv``.

    Args:
        path: the CSV file.
        labels: the spec's label section (key kind, column names, classes).

    Returns:
        The sheet, ready for :meth:`LabelSheet.lookup`.

    Raises:
        LabelsCsvError: the file is missing or unreadable, has no header row,
            lacks the key or label column (the message lists the columns
            found), or gives one key two different classes.
    """
    key_col, label_col = labels.key_column, labels.csv_label_column.strip()
    expected = (
        f"expected a CSV with a header row naming the columns {key_col!r} (the study key, "
        f"{labels.key_tag}; labels.csv_key_column) and {label_col!r} (the class; labels.csv_label_column)"
    )
    p = Path(path)
    if not p.is_file():
        raise LabelsCsvError(f"the --labels-csv file does not exist or is not a file; {expected}")
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise LabelsCsvError(f"the --labels-csv file is empty; {expected}")
            header = [h.strip() for h in header]
            ki, li = _find(header, key_col), _find(header, label_col)
            if ki is None or li is None:
                missing = " and ".join(repr(c) for c, i in ((key_col, ki), (label_col, li)) if i is None)
                hint = ""
                if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
                    hint = "; the file seems to use another separator than ',': save it comma-separated"
                raise LabelsCsvError(
                    f"the --labels-csv file lacks the column(s) {missing}; {expected}; found "
                    f"columns: {_columns_text(header)}{hint}"
                )
            sheet = LabelSheet(key_column=header[ki], label_column=header[li], key_tag=labels.key_tag)
            first_row: dict[str, int] = {}
            for line_no, row in enumerate(reader, start=2):
                if not any(cell.strip() for cell in row):
                    continue  # blank line
                sheet.rows += 1
                key = row[ki].strip() if ki < len(row) else ""
                value = row[li].strip() if li < len(row) else ""
                if not key:
                    sheet.rows_without_key += 1
                    continue
                sheet.row_keys.append(key)
                if key in sheet.labels and sheet.labels[key] != value:
                    raise LabelsCsvError(
                        f"the --labels-csv file gives one study key two different classes (lines "
                        f"{first_row[key]} and {line_no}); keep one row per study"
                    )
                sheet.labels.setdefault(key, value)
                first_row.setdefault(key, line_no)
    except LabelsCsvError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelsCsvError(
            f"the --labels-csv file cannot be read ({type(exc).__name__}); expected a "
            f"readable UTF-8 CSV file; {expected}"
        ) from None
    return sheet


def class_index(value: str, classes: list[str]) -> int | None:
    """The 0-based class index of a CSV class cell (a class name or an index), or None."""
    value = value.strip()
    if value in classes:
        return classes.index(value)
    folded = [c.casefold() for c in classes]
    if folded.count(value.casefold()) == 1:
        return folded.index(value.casefold())
    if value.isdigit() and int(value) < len(classes):
        return int(value)
    return None
