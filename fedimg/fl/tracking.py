"""Server-side TensorBoard receiver: scalars only, no host name in event file names.

NVFlare's ``TBAnalyticsReceiver`` writes whatever the sites stream (images,
text, histograms) into ``tb_events/<site>/events.out.tfevents.<time>.<host>...``.
This receiver drops every non-scalar record with a warning, since only scalar
metrics may leave a site, and names its event files without the server's host name.
"""

from __future__ import annotations

from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.utils.file_utils import resolve_path_under_root
from nvflare.app_opt.tracking.tb.tb_event_writer import TensorBoardEventWriter
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver

from fedimg.training.tracking import neutral_hostname

SCALAR_TYPES = frozenset({AnalyticsDataType.SCALAR, AnalyticsDataType.SCALARS, AnalyticsDataType.METRIC,
                          AnalyticsDataType.METRICS})


class ScalarTBReceiver(TBAnalyticsReceiver):
    """A ``TBAnalyticsReceiver`` that accepts scalar metrics only.

    Args:
        tb_folder: folder (under the run directory) for the event files.
    """

    def __init__(self, tb_folder: str = "tb_events") -> None:
        super().__init__(tb_folder=tb_folder)
        self.dropped = 0

    def save(self, fl_ctx: FLContext, shareable: Shareable, record_origin: str) -> None:
        """Write scalars; drop and report anything else."""
        try:
            data = AnalyticsData.from_dxo(from_shareable(shareable))
        except Exception:  # noqa: BLE001 - malformed analytics are dropped, not fatal
            data = None
        if data is None:
            return
        if data.data_type not in SCALAR_TYPES:
            self.dropped += 1
            # Neither tag nor value is logged: they are exactly what must not leave the site.
            self.log_warning(fl_ctx, f"dropped a {data.data_type.value} record from {record_origin}: "
                                     "only scalar metrics are accepted by this server", fire_event=False)
            return
        if record_origin not in self.writers_table:
            peer_log_dir = resolve_path_under_root(self.root_log_dir, record_origin, "record_origin")
            with neutral_hostname("fedimg"):
                self.writers_table[record_origin] = TensorBoardEventWriter(log_dir=peer_log_dir)
        super().save(fl_ctx, shareable, record_origin)
