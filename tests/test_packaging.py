"""``pip install fedimg`` (a wheel, not the checkout) runs from anywhere: configs and the job client ship with it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the fedimg wheel; its dependencies come from this venv, read-only."""
    base = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ beside the sources, and the checkout stays as it is.
    source = base / "source"
    shutil.copytree(
        REPO,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "*.egg-info", "demo_out", "workspace", "bench_out", "__pycache__", ".pytest_cache"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(base / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheel = next((base / "dist").glob("fedimg-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True, timeout=300)
    py = base / "venv" / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The dependencies (torch, MONAI, NVFlare...) of this environment, added as a plain path: its .pth files,
    # among them the editable install of the checkout, are not processed, so only the wheel provides fedimg.
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return base / "venv"


def _run(venv: Path, *args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_the_wheel_runs_fedimg_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    where = _run(
        installed, str(installed / "bin" / "python"), "-c", "import fedimg; print(fedimg.__file__)", cwd=tmp_path
    )
    assert str(installed) in where.stdout, where.stdout + where.stderr  # the wheel's copy, not the checkout
    demo_help = _run(installed, "fedimg", "demo", "--help", cwd=tmp_path)
    assert demo_help.returncode == 0 and "demo_out" in demo_help.stdout
    # A tiny federation, all from the installed package: synthetic sites, preprocessing, the simulator.
    run = _run(
        installed,
        "fedimg",
        "demo",
        str(tmp_path / "demo"),
        "--sites",
        "2",
        "--cases",
        "2",
        "--rounds",
        "1",
        "--device",
        "cpu",
        "--quiet",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "demo" / "summary.json").is_file()
    client = next((tmp_path / "demo" / "nvflare").rglob("custom/client.py"))
    assert str(REPO) not in client.read_text()
