"""Pull studies from a PACS into a site's raw folder (``fedimg pull``).

- :mod:`fedimg.pacs.keys`: the keys CSV (accession numbers or Study Instance UIDs) and UID grammar;
- :mod:`fedimg.pacs.source`: where the PACS is and how to authenticate (typed, validated);
- :mod:`fedimg.pacs.client`: what a pull asks of a PACS, whatever the protocol;
- :mod:`fedimg.pacs.dicomweb` / :mod:`fedimg.pacs.dimse`: QIDO-RS + WADO-RS, C-FIND + C-GET;
- :mod:`fedimg.pacs.store`: the folder layout and write-once instance files;
- :mod:`fedimg.pacs.pull`: the run, its manifest and its summary.

Nothing here imports torch, MONAI or NVFlare.
"""

from __future__ import annotations

from fedimg.pacs.errors import PacsError, PacsRequestError

__all__ = ["PacsError", "PacsRequestError"]
