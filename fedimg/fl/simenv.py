"""NVFlare's simulator run inside the calling process, without its fixed waits.

NVFlare's ``SimEnv`` starts the simulator as a new Python process
(``python -m nvflare...simulator``), which imports NVFlare, then forks the
server, which imports torch, MONAI and fedimg's controller again: about 5 s
of start-up on a 2-core machine before any site starts, paid by every run.
:class:`InProcessSimEnv` runs NVFlare's own ``SimulatorRunner`` (its Python
API, the one ``simulator.py`` calls) from the calling process instead, so the
forked server finds those modules already imported. The sites still run in
their own processes, as in NVFlare. A process that already runs NVFlare
networking of its own falls back to ``SimEnv``'s new process (a fork would
inherit that state without its threads).

Five fixed waits of NVFlare 2.9's runner are shortened here, measured with
``benchmarks/bench_training.py``: the server process's 3 s shutdown grace
after the run has ended (0.2 s here), the server's 3 s check for the end of
the run (0.25 s here), the 1 s checks that the server has started, the 1 s
between attempts to reach a starting site process and the 1 s pause before
each site thread starts (0.05 s each here). Each overridden method is
NVFlare's own, with only the wait changed. And once every site process has
exited, the server stops waiting 2 s for late site events (none can come).
The server process dies with the calling process, even on SIGKILL.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nvflare.apis.fl_constant import MachineStatus, RunProcessKey
from nvflare.fuel.f3.mpm import MainProcessMonitor as mpm
from nvflare.fuel.utils.log_utils import FL_LOG_LEVEL
from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner, SimulatorRunner
from nvflare.private.fed.app.utils import kill_child_processes
from nvflare.private.fed.simulator.simulator_const import SimulatorConstants
from nvflare.private.fed.utils.fed_utils import split_gpus
from nvflare.recipe import SimEnv
from nvflare.security.logging import secure_format_exception

logger = logging.getLogger(__name__)

# NVFlare's values: 3 s, 1 s, 1 s, 1 s (nvflare/private/fed/app/simulator/simulator_runner.py), 3 s (fed_server.py).
SHUTDOWN_GRACE_S = 0.2
CONNECT_RETRY_S = 0.05
THREAD_START_S = 0.05
ENGINE_CHECK_S = 0.25
SERVER_START_CHECK_S = 0.05
_NVFLARE_RUNNER = "nvflare.private.fed.app.simulator.simulator_runner"


class _ClientRunner(SimulatorClientRunner):
    """NVFlare's site-process runner, polling for a starting site process every 0.05 s instead of 1 s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = logging.getLogger(_NVFLARE_RUNNER + ".SimulatorClientRunner")  # NVFlare's, not fedimg's

    def _create_connection(self, open_port: int, timeout: float = 60.0) -> Any:
        from multiprocessing.connection import Client

        start = time.monotonic()
        while True:
            try:
                return Client(("localhost", open_port))
            except OSError:
                # The site process is still importing: it binds the port when it is ready.
                if time.monotonic() - start > timeout:
                    raise RuntimeError(
                        f"the simulated site process did not open its port {open_port} within {timeout:.0f} s"
                    ) from None
                time.sleep(CONNECT_RETRY_S)

    def run_client_thread(self, num_of_threads: int, gpu: Any, lock: Any, end_run_for_all: bool, timeout=60) -> None:
        """NVFlare's loop (``SimulatorClientRunner.run_client_thread``), without its 1 s pause before the first site."""
        stop_run, client_to_run, pause = False, None, THREAD_START_S
        try:
            while not stop_run:
                time.sleep(pause)
                pause = 1.0  # NVFlare's pause between the sites a thread takes turns with
                with lock:
                    client = client_to_run or self.get_next_run_client(gpu)
                client.simulate_running = True
                stop_run, client_to_run, end_run_client = self.do_one_task(
                    client, num_of_threads, gpu, lock, timeout=timeout
                )
                if end_run_client:
                    with lock:
                        self.clients_finished_end_run.append(end_run_client)
                client.simulate_running = False
            if end_run_for_all:
                self._end_run_clients(gpu, lock, num_of_threads, timeout)
        except Exception as exc:  # noqa: BLE001 - NVFlare's own handling: the thread reports and ends
            self.logger.error(f"run_client_thread error: {secure_format_exception(exc)}")


class _Runner(SimulatorRunner):
    """NVFlare's ``SimulatorRunner`` with the shorter waits and the faster site-process runner."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # NVFlare names a component's logger after its class's module: keep its records under NVFlare's name,
        # which fedimg's console leaves out (they are the simulator's, not fedimg's progress).
        self.logger = logging.getLogger(_NVFLARE_RUNNER + ".SimulatorRunner")

    def run(self) -> int:
        """NVFlare's ``SimulatorRunner.run``, with its two forked processes following this one's death.

        NVFlare's server process and its result-passing manager would outlive a
        SIGKILL of the calling process and go on writing the run; here the
        kernel kills them with it (the site processes then stop themselves: they
        watch the server's process).
        """
        from multiprocessing import Process
        from multiprocessing.managers import SyncManager

        from fedimg.signals import die_with_parent

        parent = os.getpid()
        manager = SyncManager()
        manager.start(die_with_parent, (parent,))
        try:
            status = manager.dict()
            process = Process(target=self._run_following, args=(status, parent))
            process.start()
            process.join()
            return self._get_return_code(status, process, self.workspace)
        except KeyboardInterrupt:  # NVFlare's own handling: stop every process of the run
            kill_child_processes(parent)
            return -9
        finally:
            manager.shutdown()

    def _run_following(self, return_dict: Any, parent: int) -> None:
        from fedimg.signals import die_with_parent

        die_with_parent(parent)
        self.run_process(return_dict)

    def run_process(self, return_dict: Any) -> None:
        from nvflare.fuel.common.exit_codes import ProcessExitCode

        try:
            status = mpm.run(
                main_func=self.simulator_run_main,
                run_dir=self.workspace,
                shutdown_grace_time=SHUTDOWN_GRACE_S,
                cleanup_grace_time=6,
            )
        except Exception as exc:  # noqa: BLE001 - NVFlare's own handling: report, return the status
            self.logger.error(f"Simulator main run with exception: {secure_format_exception(exc)}")
            status = ProcessExitCode.EXCEPTION
        return_dict["run_status"] = status

    def simulator_run_main(self) -> int:
        """NVFlare's ``SimulatorRunner.simulator_run_main``, checking every 0.05 s (not 1 s) that the server started."""
        if not self.setup():
            return 1
        try:
            self.create_clients()
            self.server.engine.run_processes[SimulatorConstants.JOB_NAME] = {
                RunProcessKey.JOB_HANDLE: None,
                RunProcessKey.JOB_ID: SimulatorConstants.JOB_NAME,
                RunProcessKey.PARTICIPANTS: self.server.engine.client_manager.clients,
            }
            self.logger.info("Deploy and start the Server App.")
            server_thread = threading.Thread(target=self.start_server_app, args=[copy.deepcopy(self.args)])
            server_thread.start()
            while self.server.engine.engine_info.status != MachineStatus.STARTED:
                time.sleep(SERVER_START_CHECK_S)
                if not server_thread.is_alive():
                    raise RuntimeError("Could not start the Server App.")
            if self.args.gpu:
                gpus = split_gpus(self.args.gpu)
                groups = self.split_clients(self.federated_clients, gpus)
            else:
                gpus, groups = [None], [self.federated_clients]
            with ThreadPoolExecutor(max_workers=len(gpus)) as pool:
                for group, gpu in zip(groups, gpus):
                    pool.submit(self.client_run, self.server_custom_folder, group, gpu)
            self._no_more_site_events()
            self.server.abort_run()  # every site has finished: end the server's run
            server_thread.join()
            return self._get_server_run_status()
        except Exception as exc:  # noqa: BLE001 - NVFlare's own handling: log, return a failure status
            self.logger.error(f"Simulator run error: {secure_format_exception(exc)}")
            return 2
        finally:
            self.deployer.close()

    def _no_more_site_events(self) -> None:
        """Every site process has exited: the server need not wait for late events from them.

        NVFlare's server-side event runner holds the end of a run until no site
        event (TensorBoard scalars) has arrived for 2 s, for events still on
        their way. Events already received are still processed first.
        """
        from nvflare.widgets.fed_event import ServerFedEventRunner

        for handler in getattr(getattr(self.server, "run_manager", None), "handlers", None) or []:
            if isinstance(handler, ServerFedEventRunner):
                handler.queue_empty_period = 0.0

    def setup(self) -> bool:
        ready = super().setup()
        if ready and self.server is not None:
            # The server's main loop checks every 3 s whether the run has ended (NVFlare's deployer default).
            self.server.check_engine_frequency = ENGINE_CHECK_S
        return ready

    def client_run(self, server_custom_folder: str, clients: list, gpu: Any) -> None:
        runner = _ClientRunner(
            server_custom_folder, self.args, clients, self.client_config, self.deploy_args, self.build_ctx
        )
        runner.run(gpu)


def nvflare_networking_in_use() -> str | None:
    """What NVFlare networking this process runs already (its event loop, communicators), if any."""
    from nvflare.fuel.f3 import communicator
    from nvflare.fuel.f3.drivers.aio_context import AioContext

    if AioContext._global_ctx is not None:  # noqa: SLF001 - NVFlare keeps no public handle on it
        return "NVFlare's event loop running"
    if communicator._running_instances:  # noqa: SLF001
        return "NVFlare communicators running"
    if mpm._stopping:  # noqa: SLF001 - an NVFlare process that has been shutting down
        return "NVFlare's process monitor shutting down"
    return None


class InProcessSimEnv(SimEnv):
    """``SimEnv`` whose simulator runs from this process (see the module's docstring); the same arguments."""

    def deploy(self, job: Any) -> str:
        """Write the job's folder, then run it in NVFlare's simulator; returns the job's name.

        A process that already holds NVFlare connections of its own (an admin
        session, a POC run) cannot fork a server cleanly: the child would
        inherit their state without their threads. It runs the simulator as
        NVFlare does, in a new process.

        Raises:
            RuntimeError: the simulator returned a failure status (as ``SimEnv``).
        """
        busy = nvflare_networking_in_use()
        if busy:
            logger.info("NVFlare simulator in its own process: this process already has %s", busy)
            return super().deploy(job)
        workspace = os.path.join(self.workspace_root, job.name)
        self._ensure_default_component_policy(workspace)
        log_config = self.log_config or os.environ.get(FL_LOG_LEVEL)
        with tempfile.TemporaryDirectory(prefix="fedimg_job_") as root:
            job.export_job(root)
            runner = _Runner(
                job_folder=os.path.join(root, job.name),
                workspace=workspace,
                clients=",".join(self.clients) if self.clients else None,
                n_clients=None if self.clients else self.num_clients,
                threads=self.num_threads,
                gpu=self.gpu_config,
                log_config=log_config,
            )
            status = runner.run()
        self.last_run_failed = status not in (None, 0)
        if self.last_run_failed:
            raise RuntimeError(
                f"Simulation failed with return code {status}. Logs are in per-site subdirectories under "
                f"{workspace}, e.g. server/simulate_job/log.txt"
            )
        return job.name
