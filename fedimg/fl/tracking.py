"""Server-side TensorBoard: scalars from the sites, the federation's curves, the cross-site report.

* :class:`ScalarTBReceiver`: NVFlare's ``TBAnalyticsReceiver`` writes whatever
  the sites stream (images, text, histograms) into
  ``tb_events/<site>/events.out.tfevents.<time>.<host>...``. This receiver
  drops every non-scalar record with a warning, since only scalar metrics may
  leave a site, and names its event files without the server's host name.
* :func:`scalar_layout`: TensorBoard "Custom Scalars" charts that overlay every
  site and the federation (``global``) per measure. Every site is its own run
  (``tb_events/<site>``) and the federation is the run ``global``; all write
  the same tags (``val/<metric>``, ``train/loss``, ``test/<metric>``), so any
  chart of a tag overlays them, the run names as the legend.
* :class:`CrossSiteReport`: after cross-site evaluation, writes the matrix as
  JSON and Markdown next to NVFlare's ``cross_val_results.json`` and, as a
  table and a heatmap of aggregate numbers, into the ``global`` TensorBoard run.
"""

from __future__ import annotations

import json
import os

from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType
from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.file_utils import resolve_path_under_root
from nvflare.app_common.widgets.validation_json_generator import ValidationJsonGenerator
from nvflare.app_opt.tracking.tb.tb_event_writer import TensorBoardEventWriter
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver

from fedimg.config import ExperimentConfig
from fedimg.fl.report import cross_site_matrix, matrix_heatmap, matrix_markdown, write_report_to_tensorboard
from fedimg.training.tracking import neutral_hostname

SCALAR_TYPES = frozenset(
    {AnalyticsDataType.SCALAR, AnalyticsDataType.SCALARS, AnalyticsDataType.METRIC, AnalyticsDataType.METRICS}
)
GLOBAL_RUN = "global"  # the federation's own TensorBoard run; no site may have this name


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
            self.log_warning(
                fl_ctx,
                f"dropped a {data.data_type.value} record from {record_origin}: "
                "only scalar metrics are accepted by this server",
                fire_event=False,
            )
            return
        if record_origin not in self.writers_table:
            peer_log_dir = resolve_path_under_root(self.root_log_dir, record_origin, "record_origin")
            with neutral_hostname("fedimg"):
                self.writers_table[record_origin] = TensorBoardEventWriter(log_dir=peer_log_dir)
        super().save(fl_ctx, shareable, record_origin)


def scalar_layout(exp: ExperimentConfig) -> dict:
    """Custom-scalar charts: one per measure, every site and the federation in the same chart.

    Every run (each site, and ``global``: the case-weighted mean over sites)
    writes ``val/<metric>`` and ``train/loss``; a chart's regular expression
    selects a tag, TensorBoard draws it for every run.
    """
    classes = list(exp.task.class_names)
    if exp.task.is_segmentation:
        val = [("Dice overlap, mean over structures (higher is better)", "dice_mean")]
        val += [(f"Dice overlap: {c}", f"dice/{c}") for c in classes]
        val += [(f"95% Hausdorff distance, mm: {c} (lower is better)", f"hd95/{c}") for c in classes]
    else:
        val = [
            ("AUC, mean over classes (0.5 chance, 1 perfect)", "auc_mean"),
            ("Balanced accuracy (mean sensitivity over classes)", "balanced_accuracy"),
        ]
        val += [(f"Sensitivity: {c}", f"sensitivity/{c}") for c in classes]
        val += [(f"Specificity: {c}", f"specificity/{c}") for c in classes]
    charts = [[title, ["Multiline", [rf"^val/{key}$"]]] for title, key in val]
    return {
        "Validation: every hospital and the federation (x: rounds of aggregation)": {t: c for t, c in charts},
        "Training": {"Training loss at each hospital (should fall)": ["Multiline", [r"^train/loss$"]]},
    }


class CrossSiteReport(ValidationJsonGenerator):
    """Collects the cross-site validation results and writes a readable report at the end of the run.

    Args:
        metrics: metrics to tabulate, the key metric first (e.g. ``["val_dice", "val_dice_lesion"]``).
        tb_folder: the server's TensorBoard folder; the report goes to its ``global`` run.
    """

    def __init__(self, metrics: list[str], tb_folder: str = "tb_events") -> None:
        super().__init__(json_file_name="cross_site_matrix_raw.json")
        self.metrics = list(metrics)
        self.tb_folder = tb_folder

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Collect results (as NVFlare's generator does); at END_RUN also write the report."""
        super().handle_event(event_type, fl_ctx)
        if event_type != EventType.END_RUN or not self._val_results:
            return
        try:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            out_dir = os.path.join(run_dir, AppConstants.CROSS_VAL_DIR)
            os.makedirs(out_dir, exist_ok=True)
            results = json.loads(json.dumps(self._val_results, default=float))
            matrices = [cross_site_matrix(results, m) for m in self.metrics]
            with open(os.path.join(out_dir, "cross_site_matrix.json"), "w", encoding="utf-8") as fh:
                json.dump(
                    {"matrices": [{k: v for k, v in m.items() if k != "all"} for m in matrices], "results": results},
                    fh,
                    indent=1,
                )
            text = "\n\n".join(matrix_markdown(m) for m in matrices)
            with open(os.path.join(out_dir, "cross_site_matrix.md"), "w", encoding="utf-8") as fh:
                fh.write("# Cross-site evaluation\n\n" + text + "\n")
            write_report_to_tensorboard(
                os.path.join(run_dir, self.tb_folder, GLOBAL_RUN), "cross_site", text, matrix_heatmap(matrices[0])
            )
        except Exception as exc:  # noqa: BLE001 - a report failure must not fail a finished run
            self.log_error(fl_ctx, f"cross-site report not written: {type(exc).__name__}: {exc}", fire_event=False)
