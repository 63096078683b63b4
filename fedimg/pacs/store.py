"""Where pulled instances land: a raw folder whose names carry no study or series identifier.

Layout::

    DST/study-<hash of the Study Instance UID>/series-<hash of the Series Instance UID>/<SOP Instance UID>.dcm

The hashes are the first 16 hex digits of SHA-256: stable (a re-run finds
the same folders, which is what resume needs) and free of the UID's text.
The SOP Instance UID names the file so that "already present" is a lookup;
the three UIDs come from the PACS, so each must pass :func:`~fedimg.safepath.is_uid`
before it becomes part of a path.

Files are written once and never replaced: the bytes go to a temporary file
beside the target (``.fedimg-tmp-*``, removed by the next claim of the
folder if a run is killed), which is then hard-linked into place: that fails
when the target exists, so a file fedimg did not write is never overwritten.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

from fedimg.atomic import TMP_PREFIX
from fedimg.pacs.errors import PacsRequestError
from fedimg.safepath import UnsafePathError, child_path, is_uid

__all__ = ["InstanceStore", "series_folder", "study_folder"]

PRESENT, MISSING, OCCUPIED = "present", "missing", "occupied"


def _digest(kind: str, uid: str) -> str:
    return hashlib.sha256(f"{kind}:{uid}".encode("ascii")).hexdigest()[:16]


def study_folder(study_uid: str) -> str:
    """The folder name of a study (no identifier in it)."""
    return f"study-{_digest('study', study_uid)}"


def series_folder(series_uid: str) -> str:
    """The folder name of a series (no identifier in it)."""
    return f"series-{_digest('series', series_uid)}"


class InstanceStore:
    """The pulled instances under one root folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where an instance lives.

        Raises:
            PacsRequestError: (``bad_uid``) one of the UIDs is not a UID; (``occupied``) a folder on the way
                is a link leading out of the output folder.
        """
        for name, value in (("Study", study_uid), ("Series", series_uid), ("SOP", sop_uid)):
            if not is_uid(value):
                raise PacsRequestError(
                    "bad_uid",
                    f"the PACS sent a {name} Instance UID that is not a UID "
                    "(digits and dots, at most 64 characters); not stored",
                )
        try:
            # Resolved inside the root: a link planted in place of a study or series folder is refused.
            folder = child_path(self.root, study_folder(study_uid), series_folder(series_uid), what="pull folder")
        except UnsafePathError:
            raise PacsRequestError(
                "occupied", "a study or series folder of the output is a link leading out of it; nothing written there"
            ) from None
        return folder / f"{sop_uid}.dcm"

    def state(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """``present`` (a regular file is there), ``missing`` or ``occupied`` (something else is there)."""
        p = self.path_for(study_uid, series_uid, sop_uid)
        if p.is_symlink() or (p.exists() and not p.is_file()):
            return OCCUPIED
        return PRESENT if p.is_file() else MISSING

    def write(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> bool:
        """Store one instance's bytes atomically, never replacing a file.

        Returns:
            True when written, False when a file of that name was already there (left as it is).

        Raises:
            PacsRequestError: (``bad_uid``) a UID is not a UID; (``write_failed``) the disk refused.
        """
        target = self.path_for(study_uid, series_uid, sop_uid)
        if target.is_symlink() or target.exists():
            return False
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}pull.", suffix=".tmp", dir=target.parent)
        except OSError as exc:
            raise PacsRequestError(
                "write_failed",
                f"cannot create a file under the output folder ({type(exc).__name__}: {exc.strerror or 'error'})",
            ) from None
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, target)  # fails if the target exists: never replaces a file
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                # A file system without hard links: check, then rename (a narrow race, on our own folder).
                if target.is_symlink() or target.exists():
                    return False
                os.replace(tmp, target)
            return True
        except OSError as exc:
            raise PacsRequestError(
                "write_failed",
                f"cannot write an instance under the output folder ({type(exc).__name__}: {exc.strerror or 'error'})",
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
