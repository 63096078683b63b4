"""What can go wrong when pulling from a PACS, in two kinds.

- :class:`PacsError`: the pull cannot start (a bad keys file, a bad address,
  a credential file open to others, a PACS that cannot be reached or refuses
  us). One line saying what was expected, what arrived and what to do; the
  command exits with status 2 before writing anything.
- :class:`PacsRequestError`: one request failed while the pull runs (a query,
  a retrieval). It carries a short reason code and a detail for the manifest
  row of the key concerned; the pull goes on with the next key.

Neither message ever holds a UID, an accession number the user did not type,
a patient attribute or the text of a peer's answer: only what fedimg itself
knows (status codes, counts, exception class names).
"""

from __future__ import annotations

from fedimg.errors import UserError

__all__ = ["PacsError", "PacsRequestError"]


class PacsError(UserError):
    """The pull cannot start: bad input or configuration, or the PACS cannot be used (exit status 2)."""


class PacsRequestError(Exception):
    """One request to the PACS failed; recorded in the manifest row of the key concerned.

    Attributes:
        reason: a short code (``connection``, ``timeout``, ``http_403``, ``dimse_status``, ...).
        detail: a sentence without identifiers.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
