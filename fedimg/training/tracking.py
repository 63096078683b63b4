"""Site-local TensorBoard writing without the host name.

TensorBoard names event files ``events.out.tfevents.<time>.<hostname>...``;
a host name identifies a hospital machine, so fedimg's own writers use a
fixed, neutral name instead.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


@contextmanager
def neutral_hostname(name: str) -> Iterator[None]:
    """Within this block, ``socket.gethostname()`` returns ``name`` (for event file names)."""
    original = socket.gethostname
    socket.gethostname = lambda: name
    try:
        yield
    finally:
        socket.gethostname = original


def local_writer(logdir: str | Path, tag: str = "fedimg") -> SummaryWriter:
    """A SummaryWriter whose event file name carries ``tag`` instead of the host name."""
    Path(logdir).mkdir(parents=True, exist_ok=True)
    with neutral_hostname(tag):
        # SummaryWriter creates its event file in __init__, while the name is patched.
        writer = SummaryWriter(log_dir=str(logdir))
    return writer
