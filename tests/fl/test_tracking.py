"""The server's TensorBoard receiver keeps scalars only and names files without the host name."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType
from nvflare.apis.fl_context import FLContext

from fedimg.fl.tracking import ScalarTBReceiver

pytestmark = pytest.mark.nvflare


def _shareable(key, value, kind):
    return AnalyticsData(key=key, value=value, data_type=kind, global_step=3).to_dxo().to_shareable()


def test_non_scalars_are_dropped_and_scalars_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rx = ScalarTBReceiver()
    rx.root_log_dir = str(tmp_path)  # what initialize() sets from the run directory
    ctx = FLContext()
    rx.save(ctx, _shareable("val/dice_mean", 0.75, AnalyticsDataType.SCALAR), "site-1")
    rx.save(ctx, _shareable("overlay", np.zeros((8, 8, 3), dtype=np.uint8), AnalyticsDataType.IMAGE), "site-1")
    rx.save(ctx, _shareable("note", "patient text", AnalyticsDataType.TEXT), "site-1")
    rx.finalize(ctx)
    assert rx.dropped == 2
    files = list((tmp_path / "site-1").glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].name.split(".")[4] == "fedimg"
    assert socket.gethostname() not in files[0].name
    assert b"patient text" not in files[0].read_bytes()
    acc = EventAccumulator(str(tmp_path / "site-1"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["val/dice_mean"] and not acc.Tags()["images"]
    (event,) = acc.Scalars("val/dice_mean")
    assert event.step == 3 and event.value == pytest.approx(0.75)
