"""Output folders fedimg may write into, and the proof that it wrote them.

A hospital's disk holds files fedimg did not make. So every command that
writes a folder (``convert``, ``preprocess``, ``demo``, ``--write-dicom``,
``pull``, ``predict``) first *claims* it:

- the folder is new or empty: fedimg creates it and leaves its marker,
  ``.fedimg-output.json``, naming the kind of output (``convert``,
  ``preprocess``, ``demo``, ``dicom-copies``, ``pull``, ``predict``);
- the folder carries fedimg's marker of the same kind: a re-run;
- anything else (a non-empty folder without the marker, or one made by
  another fedimg command) is refused before any work, with a one-line error
  naming what is there (:class:`OutputDirError`, exit status 2).

Input and output never overlap: DST equal to SRC, inside SRC or containing
SRC is refused before anything is read or written.

While a run works, it holds an exclusive lock on the marker (``flock``): a
second run into the same folder is refused at once instead of racing the
first. The lock dies with the process, so a killed run never leaves a stale
lock behind.

Deleting is narrower still. A file is removed only when fedimg's own record
says it wrote it: outputs listed in the command's state file, or announced in
the folder's journal (``.fedimg-journal``, one line per output, appended
*before* the output is written, so a run killed mid-write still has a record
of it). Temporary files carry the ``.fedimg-tmp-`` prefix
(:mod:`fedimg.atomic`); those a killed run left are removed at the
next claim of the folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fedimg.atomic import TMP_PREFIX
from fedimg.errors import UserError

MARKER = ".fedimg-output.json"
JOURNAL = ".fedimg-journal"
PULL_MANIFEST = "pull_manifest.jsonl"
#: fedimg's own records at the top of a folder it made: when such a folder is read as a source (a pulled
#: export), they are skipped with a reason, not refused as NOT_DICOM.
RECORD_FILES = (MARKER, JOURNAL, PULL_MANIFEST)
KINDS = ("convert", "preprocess", "demo", "dicom-copies", "pull", "predict")
MARKER_VERSION = 1

#: State files of earlier fedimg releases, which wrote no marker: a folder holding one is adopted.
LEGACY_STATE = {"convert": ".fedimg_convert_state.json", "preprocess": ".fedimg_preprocess_state.json"}


class OutputDirError(UserError, ValueError):
    """The output folder may not be written: not fedimg's, of another kind, overlapping the input, or busy."""


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _is_within(inner: Path, outer: Path) -> bool:
    try:
        inner.relative_to(outer)
    except ValueError:
        return False
    return True


def check_separate(src: str | Path, dst: str | Path, src_name: str = "SRC", dst_name: str = "DST") -> None:
    """Refuse an output folder that is, lies inside, or contains the input folder (links resolved).

    Raises:
        OutputDirError: the two overlap.
    """
    s, d = _resolved(Path(src)), _resolved(Path(dst))
    if s == d:
        raise OutputDirError(
            f"{dst_name} is the same folder as {src_name}: expected a separate output folder, so "
            f"that the raw input is never written to; choose a {dst_name} outside {src_name}"
        )
    if _is_within(d, s):
        raise OutputDirError(
            f"{dst_name} lies inside {src_name}: expected an output folder outside the input "
            f"(outputs would be read back as input on the next run); choose a {dst_name} outside "
            f"{src_name}"
        )
    if _is_within(s, d):
        raise OutputDirError(
            f"{dst_name} contains {src_name}: expected an output folder that does not hold the "
            f"raw input (pruning or re-runs would touch it); choose a {dst_name} beside, not "
            f"above, {src_name}"
        )


def _describe_entries(folder: Path, limit: int = 5) -> str:
    names = sorted(os.listdir(folder))
    shown = [n + ("/" if (folder / n).is_dir() else "") for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'} ({', '.join(shown)}{more})"


def read_marker(folder: Path) -> dict | None:
    """The marker of ``folder`` (None when absent or unreadable)."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") in KINDS else None


def _write_marker(folder: Path, kind: str) -> None:
    payload = (
        json.dumps(
            {
                "kind": kind,
                "version": MARKER_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "written_by": "fedimg",
            },
            indent=1,
        )
        + "\n"
    )
    try:
        # O_EXCL: written once, never replaced, so the lock taken on it stays on the same file.
        fd = os.open(folder / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(payload)


@dataclass
class OutputDir:
    """A claimed output folder: fedimg's, of one kind, locked for this run.

    Use as a context manager, or call :meth:`release` when done.
    """

    path: Path
    kind: str
    _fd: int | None = field(default=None, repr=False)

    # ------------------------------------------------------------ journal of outputs

    def record(self, rels: Iterable[str]) -> None:
        """Announce outputs (paths relative to the folder) before writing them."""
        announce(self.path, rels)

    def journaled(self) -> set[str]:
        """Outputs announced by this and earlier runs since the journal was last cleared."""
        return read_journal(self.path)

    def clear_journal(self) -> None:
        """Forget the announcements (after the state file has recorded every current output)."""
        (self.path / JOURNAL).unlink(missing_ok=True)

    def prune(self, written: Iterable[str], keep: Iterable[str]) -> list[str]:
        """Remove files fedimg recorded writing that are no longer outputs.

        Args:
            written: relative paths fedimg's records say it wrote (state file and journal).
            keep: relative paths of the current outputs.

        Returns:
            The relative paths removed.
        """
        keep_set = set(keep)
        removed = []
        for rel in sorted(set(written) - keep_set):
            target = self.child(rel)
            if target is not None and target.is_file() and not target.is_symlink():
                target.unlink()
                removed.append(rel)
        return removed

    def child(self, rel: str) -> Path | None:
        """``rel`` under the folder, or None if it would leave it."""
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts or not rel:
            return None
        return self.path / p

    def remove_temp_files(self) -> int:
        """Delete the temporary files of killed runs (``.fedimg-tmp-*``); returns how many."""
        n = 0
        for dirpath, _dirnames, filenames in os.walk(self.path, followlinks=False):
            for name in filenames:
                if name.startswith(TMP_PREFIX):
                    try:
                        os.unlink(os.path.join(dirpath, name))
                        n += 1
                    except FileNotFoundError:
                        pass
        return n

    # ------------------------------------------------------------ lock

    def release(self) -> None:
        """Release the lock (also released when the process ends, however it ends)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc: object) -> None:
        # Workers stopped mid-write leave temporary files; they are fedimg's, and the run is over.
        self.remove_temp_files()
        self.release()


def announce(folder: Path, rels: Iterable[str]) -> None:
    """Append outputs to ``folder``'s journal before they are written (safe from several processes)."""
    lines = "".join(json.dumps(r) + "\n" for r in rels)
    if not lines:
        return
    # One O_APPEND write per call: lines of concurrent workers never interleave.
    fd = os.open(folder / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, lines.encode("utf-8", "surrogateescape"))
    finally:
        os.close(fd)


def read_journal(folder: Path) -> set[str]:
    """Relative paths announced in ``folder``'s journal (a torn last line is ignored)."""
    try:
        text = (folder / JOURNAL).read_bytes().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return set()
    out = set()
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, str):
            out.add(value)
    return out


def precheck(dst: str | Path, kind: str, src: str | Path | None = None, what: str = "DST") -> None:
    """Every check of :func:`claim` that needs no write: run it before any work.

    Raises:
        OutputDirError: see :func:`claim` (all but the lock).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    folder = Path(dst)
    if src is not None:
        check_separate(src, folder, dst_name=what)
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(
            f"{what} {folder} is a file: expected a folder (new or empty) for the outputs; choose another path"
        )
    if not folder.is_dir() or not any(os.scandir(folder)):
        return
    marker = read_marker(folder)
    legacy = LEGACY_STATE.get(kind)
    if marker is None and legacy and (folder / legacy).is_file() and not (folder / MARKER).exists():
        return  # written by an earlier fedimg release, before markers: adopted by claim()
    if marker is None:
        raise OutputDirError(
            f"{what} {folder} is not empty and was not made by fedimg {kind} (no {MARKER}): it holds "
            f"{_describe_entries(folder)}; fedimg never writes into a folder it did not make: choose a new "
            f"or empty {what}"
        )
    if marker["kind"] != kind:
        raise OutputDirError(
            f"{what} {folder} holds the outputs of fedimg {marker['kind']}, not of fedimg {kind}: expected a "
            f"new or empty folder, or one an earlier fedimg {kind} wrote; choose another {what}"
        )


def claim(dst: str | Path, kind: str, src: str | Path | None = None, what: str = "DST") -> OutputDir:
    """Check that fedimg may write ``dst`` as a ``kind`` output, create it if needed, and lock it.

    Temporary files that killed runs left in it are removed once the lock is held.

    Args:
        dst: the output folder.
        kind: one of :data:`KINDS`.
        src: the input folder, which must not overlap ``dst``.
        what: how the user names the folder in messages (``DST``, ``--out``, ``--write-dicom``).

    Raises:
        OutputDirError: ``dst`` overlaps ``src``; is a file; is a non-empty folder without fedimg's
            marker; holds another kind of fedimg output; or another run holds its lock. Nothing is
            written in any of these cases.
    """
    precheck(dst, kind, src, what)
    folder = Path(dst)
    folder.mkdir(parents=True, exist_ok=True)
    _write_marker(folder, kind)
    fd = os.open(folder / MARKER, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OutputDirError(
                f"{what} {folder} is in use by another fedimg {kind} run (its lock is held): expected one run per "
                "output folder; wait for the other run to end, or choose another folder"
            ) from None
        raise
    out = OutputDir(path=folder, kind=kind, _fd=fd)
    out.remove_temp_files()
    return out


__all__ = [
    "JOURNAL",
    "KINDS",
    "MARKER",
    "OutputDir",
    "OutputDirError",
    "announce",
    "check_separate",
    "claim",
    "precheck",
    "read_journal",
    "read_marker",
]
