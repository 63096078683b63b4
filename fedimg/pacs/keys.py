"""The studies to pull: a CSV of accession numbers or Study Instance UIDs, and the grammar of both.

The keys file is a UTF-8 CSV with a header row (a byte-order mark is
accepted, as Excel writes one). Which column holds the keys, and what they
are, is decided like this:

- ``--key-column NAME`` names the column (case-insensitive); its kind comes
  from ``--key`` or, failing that, from the column's name;
- otherwise the header must hold exactly one known column: ``AccessionNumber``,
  ``accession`` or ``accession_number`` (accession numbers), or
  ``StudyInstanceUID``, ``study_uid`` or ``study_instance_uid`` (Study
  Instance UIDs); ``--key accession|study_uid`` picks one kind when both are
  present. The label sheets ``fedimg synth`` writes (``labels.csv``) hold
  both kinds, so they need ``--key``.

Blank lines and rows with an empty key cell are skipped (counted); a key
given twice is pulled once.

Values a PACS sends back are peer input. :func:`fedimg.safepath.is_uid` is
the gate every UID passes before fedimg uses it in a query or a file name:
digits and dots, no empty component, at most 64 characters (PS3.5 forbids
leading zeros in a component; some archives issue them, and they are
harmless in a query or a file name, so they are tolerated).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedimg.pacs.errors import PacsError
from fedimg.safepath import UID_MAX_LEN, is_uid

__all__ = ["KEY_TYPES", "Key", "KeyList", "accession_problem", "read_keys", "uid_problem"]

KeyType = Literal["accession", "study_uid"]
KEY_TYPES: tuple[str, ...] = ("accession", "study_uid")

#: Column names recognized without --key-column (compared case-insensitively).
KNOWN_COLUMNS: dict[str, tuple[str, ...]] = {
    "accession": ("AccessionNumber", "accession", "accession_number"),
    "study_uid": ("StudyInstanceUID", "study_uid", "study_instance_uid"),
}

ACCESSION_MAX_LEN = 16  # VR SH
_MAX_LISTED = 20


def uid_problem(value: str) -> str | None:
    """Why ``value`` is not a UID (a phrase without the value), or None when it is one."""
    if not value:
        return "is empty"
    if len(value) > UID_MAX_LEN:
        return f"has {len(value)} characters, more than {UID_MAX_LEN}"
    if not is_uid(value):
        return "holds characters other than digits and single dots between digits"
    return None


def accession_problem(value: str) -> str | None:
    """Why ``value`` cannot be an Accession Number key (a phrase), or None when it can.

    Wildcards (``*``, ``?``) and backslashes are refused, not escaped: a PACS would read them as
    "match anything" or as a list of values, and pull studies the user did not name.
    """
    if not value:
        return "is empty"
    if len(value) > ACCESSION_MAX_LEN:
        return f"has {len(value)} characters, more than {ACCESSION_MAX_LEN} (VR SH)"
    if any(not (" " <= ch <= "~") for ch in value):
        return "holds characters other than printable ASCII"
    if any(ch in "*?\\" for ch in value):
        return "holds '*', '?' or '\\', which a PACS reads as a wildcard or a list of values"
    return None


@dataclass(frozen=True)
class Key:
    """One requested study key, as typed.

    Attributes:
        value: the key (whitespace stripped).
        type: ``accession`` or ``study_uid``.
        line: the CSV line it came from (1 is the header).
    """

    value: str
    type: str
    line: int

    @property
    def problem(self) -> str | None:
        """Why this key cannot be queried (a phrase), or None."""
        return uid_problem(self.value) if self.type == "study_uid" else accession_problem(self.value)


@dataclass
class KeyList:
    """The keys read from a keys CSV.

    Attributes:
        path: the CSV file.
        column: the column the keys came from.
        type: ``accession`` or ``study_uid``.
        keys: unique keys in file order.
        rows: data rows read (blank lines excluded).
        rows_without_key: rows whose key cell is empty.
        duplicates: rows repeating an earlier key.
    """

    path: Path
    column: str
    type: str
    keys: list[Key] = field(default_factory=list)
    rows: int = 0
    rows_without_key: int = 0
    duplicates: int = 0


def _columns_text(names: list[str]) -> str:
    shown = [repr(n[:40]) for n in names[:_MAX_LISTED]]
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return (", ".join(shown) + more) if shown else "none"


def _type_of_column(name: str) -> str | None:
    folded = name.casefold()
    for kind, names in KNOWN_COLUMNS.items():
        if folded in (n.casefold() for n in names):
            return kind
    return None


def _pick_column(header: list[str], key_type: str | None, column: str | None) -> tuple[int, str]:
    how = (
        "name the column with --key-column NAME and its kind with --key accession|study_uid, or use a "
        "header AccessionNumber or StudyInstanceUID"
    )
    if column is not None:
        folded = [h.casefold() for h in header]
        if folded.count(column.strip().casefold()) != 1:
            raise PacsError(
                f"the --keys file has no single column {column.strip()!r} (--key-column); found columns: "
                f"{_columns_text(header)}; {how}"
            )
        idx = folded.index(column.strip().casefold())
        kind = key_type or _type_of_column(header[idx])
        if kind is None:
            raise PacsError(
                f"the --keys column {header[idx]!r} does not say what it holds: expected --key accession "
                "or --key study_uid with --key-column"
            )
        return idx, kind
    candidates = [(i, _type_of_column(h)) for i, h in enumerate(header)]
    found = [(i, k) for i, k in candidates if k is not None and (key_type is None or k == key_type)]
    if len(found) == 1:
        return found[0][0], str(found[0][1])
    if not found:
        wanted = " or ".join(KNOWN_COLUMNS[key_type]) if key_type else "an accession or Study Instance UID column"
        hint = ""
        if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
            hint = "; the file seems to use another separator than ',': save it comma-separated"
        raise PacsError(
            f"the --keys file has no key column: expected a header naming {wanted}; found columns: "
            f"{_columns_text(header)}{hint}; {how}"
        )
    raise PacsError(
        f"the --keys file has several key columns ({', '.join(repr(header[i]) for i, _ in found)}): "
        "expected one; pick it with --key-column NAME (or --key accession|study_uid)"
    )


def read_keys(path: str | Path, key_type: str | None = None, column: str | None = None) -> KeyList:
    """Read the keys CSV of ``fedimg pull``.

    Args:
        path: the CSV file (header row required).
        key_type: ``accession`` or ``study_uid``; None to infer it from the column's name.
        column: the column holding the keys; None to find the one known column.

    Returns:
        The unique keys in file order, with counts of skipped rows. Keys that break the grammar of
        their kind are kept (their :attr:`Key.problem` says why): the pull records them as failed.

    Raises:
        PacsError: the file is missing, unreadable, empty, has no (or an ambiguous) key column, or no key.
    """
    if key_type is not None and key_type not in KEY_TYPES:
        raise PacsError(f"--key must be one of {', '.join(KEY_TYPES)}, got {key_type!r}")
    p = Path(path)
    if not p.is_file():
        raise PacsError(
            f"the --keys file {p} does not exist or is not a file: expected a CSV with a header row "
            "and one accession number or Study Instance UID per row"
        )
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise PacsError(f"the --keys file {p} is empty: expected a header row, then one key per row")
            header = [h.strip() for h in header]
            idx, kind = _pick_column(header, key_type, column)
            out = KeyList(path=p, column=header[idx], type=kind)
            seen: set[str] = set()
            for line_no, row in enumerate(reader, start=2):
                if not any(cell.strip() for cell in row):
                    continue
                out.rows += 1
                value = row[idx].strip() if idx < len(row) else ""
                if not value:
                    out.rows_without_key += 1
                elif value in seen:
                    out.duplicates += 1
                else:
                    seen.add(value)
                    out.keys.append(Key(value=value, type=kind, line=line_no))
    except PacsError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PacsError(
            f"the --keys file {p} cannot be read ({type(exc).__name__}): expected a readable UTF-8 CSV file"
        ) from None
    if not out.keys:
        raise PacsError(
            f"the --keys file {p} lists no key in column {out.column!r} ({out.rows} data rows, "
            f"{out.rows_without_key} with an empty key cell): expected at least one key"
        )
    return out
