"""What the simulator's console leaves out: NVFlare notices of a normal run end (they stay in the log files).

Kept apart from :mod:`fedimg.fl.simulate` because every simulated site
process loads it while it configures logging, before it imports anything else.
"""

from __future__ import annotations

import logging

# (logger name, words in the message): notices every normal run prints, which read like problems.
ROUTINE = (
    # Each site, twice, when the server ends the run: "ask to stop job: reason: END_RUN received".
    ("nvflare.client.in_process.api.InProcessClientAPI", "END_RUN received"),
    # MONAI's pydicom reader on a machine without NVIDIA's image codec (every CPU-only site).
    ("nvimgcodec_pydicom_plugin", "nvImageCodec is not available"),
)


class RoutineNotices(logging.Filter):
    """Drops :data:`ROUTINE` records at WARNING level or below; errors always pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING:
            return True
        message = record.getMessage()
        return not any(record.name == name and words in message for name, words in ROUTINE)
