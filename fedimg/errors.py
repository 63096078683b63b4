"""The one base class of problems a user can fix.

Every error that means "the input, the config or the environment is not
what fedimg needs" derives from :class:`UserError`. The ``fedimg`` command
reports such an error in one line (what was expected, what arrived, what to
do) and exits with status 2, without importing the modules that define the
subclasses: ``fedimg convert`` never imports torch or NVFlare to learn how
to report a bad source folder.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected problem with the input, the config or the machine; the message says how to fix it."""


__all__ = ["UserError"]
