"""The simulator's console leaves out NVFlare's notices of a normal run end; everything else is shown."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fedimg.fl.console import RoutineNotices

API = "nvflare.client.in_process.api.InProcessClientAPI"


def _record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_the_normal_end_of_a_run_is_not_shown_but_an_abort_is():
    keep = RoutineNotices().filter
    assert not keep(_record(API, logging.WARNING, "ask to stop job: reason: END_RUN received"))
    assert not keep(_record(API, logging.WARNING, "request to stop the job for reason END_RUN received"))
    assert keep(_record(API, logging.ERROR, "ask to abort job: reason: END_RUN received"))
    assert keep(_record(API, logging.WARNING, "request to stop the job for reason the server stopped"))
    assert keep(_record("fedimg.fl.client", logging.WARNING, "END_RUN received"))


def test_the_simulators_log_config_filters_its_console(tmp_path):
    import logging.config

    from fedimg.fl.simulate import quiet_log_config

    cfg = json.loads(Path(quiet_log_config(tmp_path / "log.json")).read_text())
    assert "RoutineNotices" in cfg["handlers"]["consoleHandler"]["filters"]
    factory = cfg["filters"]["RoutineNotices"]["()"]
    assert logging.config.BaseConfigurator({}).resolve(factory) is RoutineNotices  # what dictConfig imports
