"""Keep raw header values out of the console while reading untrusted DICOM.

pydicom warns about malformed values and may quote them ("Invalid value for
VR DA: '...'"); on a PACS export such a value can be a name or a date. The
refusal reasons fedimg records say what was wrong without the value, so these
warnings are silenced while fedimg reads inputs.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def quiet_dicom() -> Iterator[None]:
    """Silence pydicom's value-quoting warnings and log records inside the block.

    pydicom's checks of values read (``reading_validation_mode``) are turned off too: they only warn
    (the values are the same without them), the warnings are silenced here anyway, and they cost
    about a tenth of a header pass.
    """
    from pydicom import config

    logger = logging.getLogger("pydicom")
    level = logger.level
    validation = config.settings.reading_validation_mode
    logger.setLevel(logging.CRITICAL)
    if validation == config.WARN:
        config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        config.settings.reading_validation_mode = validation
        logger.setLevel(level)


def quiet_dicom_call(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: run ``fn`` inside :func:`quiet_dicom` (signature and docstring kept)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with quiet_dicom():
            return fn(*args, **kwargs)

    return wrapper
