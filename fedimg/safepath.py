"""Paths built from untrusted names stay inside their folder.

Header values (a SOP Instance UID), case ids and site names end up in file
and folder names. Each such name must be one safe path component, and the
path built from it must resolve under its root: a crafted value such as
``1.2.840.10008.1/../../x`` or a symbolic link planted in an output folder
must never make fedimg write elsewhere.

Also here: how a file name that is not valid UTF-8 is shown in JSON
(:func:`printable_path`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TypeGuard

#: PS3.5 9.1: a UID is digits in dot-separated components, at most 64 characters.
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
UID_MAX_LEN = 64
_COMPONENT_MAX_LEN = 255  # NAME_MAX of common file systems


class UnsafePathError(ValueError):
    """A name is not one safe path component, or a path would leave its root."""


def _shown(name: str) -> str:
    """The name as an error message may quote it (short, no control characters)."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


def safe_component(name: str, what: str) -> str:
    """Return ``name`` if it is a single, ordinary path component.

    Refused: empty names, ``.`` and ``..``, names with a path separator
    (``/`` or ``\\``), a NUL or another control character, and names longer
    than 255 characters.

    Args:
        name: the would-be file or folder name.
        what: what the name is, for the error message (e.g. "site name").

    Raises:
        UnsafePathError: the name is not one safe component.
    """
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{what} is empty: expected a file or folder name")
    bad = ""
    if name in (".", ".."):
        bad = "is a relative folder reference"
    elif "/" in name or "\\" in name:
        bad = "holds a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        bad = "holds a control character"
    elif len(name) > _COMPONENT_MAX_LEN:
        bad = f"is longer than {_COMPONENT_MAX_LEN} characters"
    if bad:
        raise UnsafePathError(f"{what} {_shown(name)} {bad}: expected one file or folder name")
    return name


def is_uid(value: object) -> TypeGuard[str]:
    """Whether ``value`` follows the UID grammar: digits and dots, at most 64 characters (PS3.5 9.1)."""
    return isinstance(value, str) and len(value) <= UID_MAX_LEN and _UID_RE.fullmatch(value) is not None


def uid_component(value: str, what: str) -> str:
    """Return ``value`` if it is a UID, to be used as a file name.

    Raises:
        UnsafePathError: ``value`` is not digits and dots of at most 64
            characters. The value is not quoted (a malformed UID may carry
            an identifier).
    """
    if not is_uid(value):
        raise UnsafePathError(
            f"{what} is not a UID (expected digits and dots, at most {UID_MAX_LEN} "
            f"characters, PS3.5 9.1; got {len(str(value))} characters)"
        )
    return value


def child_path(root: str | os.PathLike[str], *parts: str, what: str = "path component") -> Path:
    """``root / part / ...``, every part one safe component, resolved inside ``root``.

    The result is checked after resolving symbolic links: a link planted
    inside ``root`` that points elsewhere is refused too.

    Args:
        root: the folder the path must stay in (need not exist yet).
        parts: names below ``root``, each checked with :func:`safe_component`.
        what: what the parts are, for the error message.

    Raises:
        UnsafePathError: a part is not a safe component, or the resolved
            path is not below the resolved ``root``.
    """
    base = Path(root).resolve()
    target = base
    for part in parts:
        target = target / safe_component(part, what)
    resolved = target.resolve()
    if resolved == base or base not in resolved.parents:
        raise UnsafePathError(
            f"{what} would leave its folder: {len(parts)} component(s) below the root "
            "resolve outside it (a symbolic link inside the folder?)"
        )
    return resolved


def printable_path(rel: str) -> str:
    """A relative path as written to JSON: valid Unicode, one line.

    A file name that is not valid UTF-8 reaches Python with each undecodable
    byte as a lone surrogate (``surrogateescape``), which cannot be written
    as UTF-8 and is invalid in strict JSON readers. Such bytes are shown as
    ``\\xNN`` (Python's ``backslashreplace``): ``caf\\xe9.dcm`` for the
    Latin-1 bytes ``b"caf\\xe9.dcm"``. Valid names are returned unchanged.
    """
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")
