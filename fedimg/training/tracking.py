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
from typing import Any

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


def write_case_pictures(writer: SummaryWriter, pictures: list[Any], step: int) -> None:
    """Write prediction-vs-reference pictures (site-local writers only) and how to read them.

    Tags are ``overlay/case_<index>`` (the case's index in the validation
    list, never an identifier); the text ``overlay/how_to_read``, at the same
    step, states the display convention and the legend.
    """
    from fedimg.tasks.pictures import HOW_TO_READ

    if pictures:
        writer.add_text("overlay/how_to_read", HOW_TO_READ, step)
    for i, picture in enumerate(pictures):
        writer.add_image(f"overlay/case_{i}", picture, step, dataformats="HWC")
    writer.flush()
