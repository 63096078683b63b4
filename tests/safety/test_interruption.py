"""A stopped run stops everything it started, leaves no half-written file, and says so in one line.

The runs are real ``fedimg`` processes on a synthetic export large enough
that worker processes are busy when the signal arrives.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedimg.atomic import TMP_PREFIX
from fedimg.preprocess.outdir import JOURNAL

REPO = Path(__file__).resolve().parents[2]
CT_SPEC = REPO / "configs" / "preprocessing" / "ct_phantom.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic site of 12 CT studies (about 700 files)."""
    from fedimg.synth import generate

    res = generate(tmp_path_factory.mktemp("big") / "raw", n_sites=1, n_cases=12, seed=3, progress=False)
    return res.out_dir / next(iter(res.sites))


def _start(args: list[str]) -> subprocess.Popen:
    # A session of its own: a signal to its group reaches the workers too, as Ctrl-C in a terminal does.
    return subprocess.Popen(
        [sys.executable, "-m", "fedimg.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_workers(proc: subprocess.Popen, dst: Path, n: int = 2, timeout: float = 240) -> list[psutil.Process]:
    """The run's worker processes, once they have started writing outputs."""
    deadline = time.monotonic() + timeout
    main = psutil.Process(proc.pid)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be interrupted: {proc.communicate()[1][-2000:]}")
        workers = [c for c in main.children(recursive=True) if c.is_running()]
        if len(workers) >= n and (dst / JOURNAL).is_file():
            return workers
        time.sleep(0.05)
    pytest.fail("no worker process started writing in time")


def _gone(procs: list[psutil.Process], timeout: float = 15) -> list[int]:
    """Pids still running (not exited, not zombies) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return []
        time.sleep(0.1)
    return alive


def _snapshot(dst: Path) -> dict[str, str]:
    return {
        p.relative_to(dst).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(dst.rglob("*"))
        if p.is_file()
    }


def _temp_files(dst: Path) -> list[Path]:
    return [p for p in dst.rglob("*") if p.name.startswith(TMP_PREFIX)]


def test_sigkill_of_convert_takes_its_workers_along(export: Path, tmp_path: Path) -> None:
    dst = tmp_path / "conv"
    proc = _start(["convert", str(export), str(dst), "--workers", "2", "--quiet"])
    workers = _wait_for_workers(proc, dst)
    proc.kill()
    proc.communicate(timeout=30)
    assert _gone(workers) == [], "worker processes outlived a SIGKILLed convert"
    settled = _snapshot(dst)
    time.sleep(2)
    assert _snapshot(dst) == settled, "something still writes into DST after the run was killed"

    # The next run finishes the job and leaves no temporary file behind.
    rerun = subprocess.run(
        [sys.executable, "-m", "fedimg.cli", "convert", str(export), str(dst), "--workers", "2", "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert _temp_files(dst) == []
    assert len(list((dst / "series").glob("*.nii.gz"))) == 12


def test_sigterm_of_convert_is_one_line_and_leaves_no_temp_file(export: Path, tmp_path: Path) -> None:
    dst = tmp_path / "conv"
    proc = _start(["convert", str(export), str(dst), "--workers", "2", "--quiet"])
    workers = _wait_for_workers(proc, dst)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0]
    assert _gone(workers) == []
    assert _temp_files(dst) == []


def test_ctrl_c_of_preprocess_stops_the_spawned_workers(export: Path, tmp_path: Path) -> None:
    dst = tmp_path / "pre"
    proc = _start(
        [
            "preprocess",
            str(export),
            str(dst),
            "--spec",
            str(CT_SPEC),
            "--site",
            "site-1",
            "--no-deid",
            "--workers",
            "2",
            "--quiet",
        ]
    )
    workers = _wait_for_workers(proc, dst)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group gets SIGINT
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "warning: --no-deid" not in ln]
    assert len(lines) == 1 and "stopped by SIGINT" in lines[0]
    assert _gone(workers) == []
    assert _temp_files(dst) == []


@pytest.mark.nvflare
def _demo_with_sites(out: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """A demo run, once its 2 simulated site processes run; returns it and every process it started."""
    proc = _start(
        ["demo", "--out", str(out), "--sites", "2", "--cases", "3", "--rounds", "20", "--device", "cpu", "--quiet"]
    )
    main = psutil.Process(proc.pid)
    deadline = time.monotonic() + 400
    sites: list[psutil.Process] = []
    while time.monotonic() < deadline and len(sites) < 2:
        if proc.poll() is not None:
            pytest.fail(f"the demo ended before it could be stopped: {proc.communicate()[1][-2000:]}")
        try:
            family = main.children(recursive=True)
            sites = [p for p in family if "simulator_worker" in " ".join(p.cmdline())]
        except psutil.Error:
            pass
        time.sleep(0.2)
    assert len(sites) == 2, "the simulator's site processes never started"
    return proc, main.children(recursive=True)


def test_stopping_the_demo_stops_the_simulator_it_started(tmp_path: Path) -> None:
    proc, family = _demo_with_sites(tmp_path / "demo")
    proc.terminate()  # only the demo's own process, as `kill PID` or a scheduler would
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    assert "stopped by SIGTERM" in err.strip().splitlines()[-1]
    assert _gone(family, timeout=30) == [], "NVFlare processes outlived the stopped demo"


def test_sigkill_of_the_demo_takes_the_simulator_along(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc, family = _demo_with_sites(out)
    proc.kill()  # no handler runs: only the kernel and the processes themselves can stop the rest
    proc.communicate(timeout=60)
    assert _gone(family, timeout=30) == [], "NVFlare processes outlived the SIGKILLed demo"
    settled = _snapshot(out)
    time.sleep(2)
    assert _snapshot(out) == settled, "something still writes into the demo's folder after it was killed"
