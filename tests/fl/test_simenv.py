"""The in-process simulator environment: NVFlare's runner with its fixed waits shortened.

Whole runs through it are every simulator test (tests/fl/test_simulation.py and
the rest); these check the pieces that differ from NVFlare's own runner.
"""

from __future__ import annotations

import socket
import threading
import types
from multiprocessing.connection import Listener

import pytest

pytest.importorskip("nvflare")

from fedimg.fl import simenv  # noqa: E402 - after the skip


def _client_runner() -> simenv._ClientRunner:
    runner = simenv._ClientRunner.__new__(simenv._ClientRunner)  # only _create_connection is used
    return runner


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_a_site_process_that_opens_its_port_late_is_still_reached():
    port = _free_port()
    accepted = []

    def open_late() -> None:
        threading.Event().wait(0.3)  # the site process is still importing
        with Listener(("localhost", port)) as listener, listener.accept() as conn:
            accepted.append(conn.recv())

    t = threading.Thread(target=open_late)
    t.start()
    conn = _client_runner()._create_connection(port, timeout=20.0)
    conn.send("hello")
    t.join(timeout=20)
    conn.close()
    assert accepted == ["hello"]


def test_a_site_process_that_never_opens_its_port_is_a_clear_error():
    port = _free_port()
    with pytest.raises(RuntimeError, match=f"did not open its port {port}"):
        _client_runner()._create_connection(port, timeout=0.2)


def test_once_every_site_has_exited_the_server_stops_waiting_for_late_site_events():
    from nvflare.widgets.fed_event import ServerFedEventRunner

    events = ServerFedEventRunner()
    assert events.queue_empty_period > 0  # NVFlare waits this long after the last site event
    other = types.SimpleNamespace(queue_empty_period=5.0)  # not an event runner: left alone
    runner = simenv._Runner.__new__(simenv._Runner)
    runner.server = types.SimpleNamespace(run_manager=types.SimpleNamespace(handlers=[other, events]))
    runner._no_more_site_events()
    assert events.queue_empty_period == 0.0
    assert other.queue_empty_period == 5.0


def test_a_server_without_a_run_is_left_alone():
    runner = simenv._Runner.__new__(simenv._Runner)
    runner.server = types.SimpleNamespace(run_manager=None)
    runner._no_more_site_events()  # the run never started: nothing to change


def test_the_server_checks_for_the_end_of_its_run_sooner_than_nvflares_3_s(monkeypatch):
    from nvflare.private.fed.app.simulator.simulator_runner import SimulatorRunner

    server = types.SimpleNamespace(check_engine_frequency=3.0)

    def setup(self) -> bool:
        self.server = server
        return True

    monkeypatch.setattr(SimulatorRunner, "setup", setup)
    runner = simenv._Runner.__new__(simenv._Runner)
    assert runner.setup() is True
    assert server.check_engine_frequency == simenv.ENGINE_CHECK_S < 3.0


def test_a_process_without_nvflare_networking_forks_and_one_with_it_does_not():
    import subprocess
    import sys

    code = (
        "from fedimg.fl.simenv import nvflare_networking_in_use as busy\n"
        "print(busy())\n"
        "from nvflare.fuel.f3.drivers.aio_context import AioContext\n"
        "AioContext.get_global_context()\n"
        "print(busy())\n"
    )
    # A process of its own: NVFlare's event loop, once started, stays for the life of the process.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.splitlines() == ["None", "NVFlare's event loop running"]


def test_with_nvflare_networking_in_use_the_simulator_runs_in_its_own_process(monkeypatch):
    from nvflare.recipe import SimEnv

    calls = []
    monkeypatch.setattr(simenv, "nvflare_networking_in_use", lambda: "NVFlare's event loop running")
    monkeypatch.setattr(SimEnv, "deploy", lambda self, job: calls.append(job) or "job")

    def no_fork(*args, **kwargs):
        raise AssertionError("the in-process runner was used")

    monkeypatch.setattr(simenv, "_Runner", no_fork)
    env = simenv.InProcessSimEnv(clients=["site-1"], num_clients=1, workspace_root="/nonexistent")
    assert env.deploy("the job") == "job"
    assert calls == ["the job"]
