"""Stopping a run: SIGINT and SIGTERM end it with one line and take every process it started along.

The ``fedimg`` command installs :func:`install`. A signal then raises
:class:`Interrupted` in the main thread, so ``finally`` blocks run (temporary
files are removed, the output folder's lock is released) and the command
stops its worker processes and simulators (:func:`stop_descendants`) before
it exits with ``128 + signal number``.

NVFlare's simulator catches the interrupt itself (it kills its site processes
and returns); :func:`check` lets fedimg notice that a run ended because it
was asked to stop, rather than report it as a failed run.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

_received: int | None = None


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop (SIGINT or SIGTERM).

    Attributes:
        signum: the signal received.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + self.signum


def _handler(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = signum
    raise Interrupted(signum)


def install() -> dict[int, Any]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted`; returns the handlers replaced (for :func:`restore`).

    Outside the main thread (where Python cannot handle signals) nothing changes.
    """
    global _received
    _received = None
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`install` replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def check() -> None:
    """Raise :class:`Interrupted` if a stop signal arrived, even if a library swallowed its exception."""
    if _received is not None:
        raise Interrupted(_received)


def stop_descendants(timeout: float = 5.0) -> int:
    """Terminate every process this one started (recursively), then kill those still alive.

    Returns:
        How many processes were stopped.
    """
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return len(children)


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """In a child process: the kernel kills it (SIGKILL) when its parent dies, even by SIGKILL (Linux).

    A child whose parent is already gone when this runs exits at once.
    """
    import ctypes
    import ctypes.util
    import os
    import sys

    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)


__all__ = ["Interrupted", "check", "die_with_parent", "install", "restore", "stop_descendants"]
