"""Round overhead: NVFlare's fixed waits are shortened where fedimg runs (unit level; timings are in benchmarks)."""

from __future__ import annotations

import sys
import time
import types

from fedimg.fl import client


def test_the_simulator_workers_fixed_retry_sleep_is_capped_and_nothing_else_changes(monkeypatch):
    worker = types.ModuleType("__mp_main__")
    worker.ClientTaskWorker = object
    worker.FETCH_TASK_RUN_RETRY = 3
    worker.time = time
    monkeypatch.setitem(sys.modules, "__mp_main__", worker)
    client._shorten_simulator_retry(0.01)
    assert isinstance(worker.time, client._ShortSleeps)
    t0 = time.perf_counter()
    worker.time.sleep(0.5)  # what the worker does after a "try again"
    assert time.perf_counter() - t0 < 0.3
    assert worker.time.time() > 0 and worker.time.monotonic() > 0  # everything else is the real module
    # A module that is not NVFlare's worker is never touched.
    other = types.ModuleType("__main__")
    other.time = time
    monkeypatch.setitem(sys.modules, "__main__", other)
    client._shorten_simulator_retry(0.01)
    assert other.time is time


def test_the_client_api_and_executor_polling_are_set_after_init(monkeypatch):
    from nvflare.app_common.executors.client_api import in_process_backend

    monkeypatch.setattr(in_process_backend, "_RESULT_POLL_INTERVAL", 0.5)
    api = types.SimpleNamespace(result_check_interval=2.0)
    client.fast_result_polling(types.SimpleNamespace(api=api), 0.02)
    assert api.result_check_interval == 0.02 and in_process_backend._RESULT_POLL_INTERVAL == 0.02


def test_the_controllers_task_check_period_reaches_the_communicator():
    from tests.conftest import controller_for

    ctl = controller_for()
    comm = types.SimpleNamespace(_task_check_period=0.2, task_check_period=None)
    try:
        ctl.set_communicator(comm)
    except TypeError:  # the base class type-checks the communicator: use NVFlare's own
        from nvflare.apis.impl.wf_comm_server import WFCommServer

        comm = WFCommServer()
        ctl.set_communicator(comm)
    assert comm._task_check_period == ctl._task_check_period == 0.02
