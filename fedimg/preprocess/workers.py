"""Worker processes that die with the run that started them.

``convert`` and ``preprocess`` spread series over processes. A stopped run
must not leave them behind, still writing into DST:

- each worker asks the kernel for SIGKILL when its parent dies
  (``prctl(PR_SET_PDEATHSIG)`` on Linux), so even a SIGKILL of the main
  process takes the workers with it; a worker whose parent is already gone
  when it starts exits at once;
- workers ignore SIGINT: Ctrl-C reaches the whole process group, and only
  the main process decides what to do (it stops the workers and prints one
  line instead of a traceback from each of them);
- when the main process leaves the pool on an exception (an interrupt, a
  failure), queued work is cancelled and the workers are terminated instead
  of being waited for.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

from fedimg import signals


def default_workers() -> int:
    """One worker per available CPU."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: follow the parent's death, leave SIGINT to the parent, die quietly on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits the parent's handler otherwise
    signals.die_with_parent(parent_pid)


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel queued work and terminate the pool's processes now (no waiting for running tasks)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()


@contextlib.contextmanager
def worker_pool(workers: int, start_method: str | None = None) -> Iterator[ProcessPoolExecutor]:
    """A process pool whose workers die with this process and are stopped, not awaited, on an exception.

    Args:
        workers: number of processes.
        start_method: ``spawn`` where workers use torch (its thread pools do not survive ``fork``);
            None for the platform default.
    """
    ctx = multiprocessing.get_context(start_method)
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_die_with_parent, initargs=(os.getpid(),)
    )
    try:
        yield pool
    except BaseException:
        stop_workers(pool)
        raise
    else:
        pool.shutdown(wait=True)


class LazyPool:
    """A :func:`worker_pool` started on first use (a run with nothing to spread starts no process)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._cm: contextlib.AbstractContextManager[ProcessPoolExecutor] | None = None
        self._pool: ProcessPoolExecutor | None = None

    def get(self) -> ProcessPoolExecutor:
        """The pool, started now if it is not yet."""
        if self._pool is None:
            cm = worker_pool(self.workers)
            self._pool = cm.__enter__()
            self._cm = cm
        return self._pool

    def close(self, exc: BaseException | None) -> None:
        """Wait for the workers (``exc`` None) or stop them at once (an exception is leaving)."""
        cm, self._cm, self._pool = self._cm, None, None
        if cm is not None:
            cm.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)


@contextlib.contextmanager
def lazy_worker_pool(workers: int) -> Iterator[LazyPool]:
    """A :class:`LazyPool` whose workers, if started, are awaited on success and stopped on an exception."""
    lazy = LazyPool(workers)
    try:
        yield lazy
    except BaseException as exc:
        lazy.close(exc)
        raise
    lazy.close(None)


__all__ = ["LazyPool", "default_workers", "lazy_worker_pool", "stop_workers", "worker_pool"]
