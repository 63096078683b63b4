"""The one place that decides device, AMP, threads and seeds.

Nothing else in fedimg calls ``torch.cuda.is_available()`` or builds a
``torch.device`` from a string. The GPU index is whatever
``CUDA_VISIBLE_DEVICES`` exposes as ``cuda:0``: the simulator and real sites
choose the physical GPU by setting that variable per process.
"""

from __future__ import annotations

import logging
import os
import platform
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedimg.errors import UserError

logger = logging.getLogger(__name__)


class DeviceError(UserError, RuntimeError):
    """The requested device is not available."""


@dataclass(frozen=True)
class Runtime:
    """Resolved execution settings for one process.

    Attributes:
        device: the torch device to place models and batches on.
        amp: whether to use automatic mixed precision (CUDA only).
        num_threads: PyTorch intra-op threads in use.
    """

    device: torch.device
    amp: bool
    num_threads: int

    @property
    def is_cuda(self) -> bool:
        """True when training runs on a GPU."""
        return self.device.type == "cuda"

    def autocast(self) -> Any:
        """Autocast context for forward passes (a no-op when AMP is off)."""
        return torch.autocast(device_type=self.device.type, enabled=self.amp)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Gradient scaler matching :attr:`amp` (disabled scaler when AMP is off)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp)


def select_device(preference: str = "auto") -> torch.device:
    """Pick the torch device.

    Args:
        preference: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.

    Raises:
        DeviceError: ``cuda`` was asked for but no CUDA device is visible.
        ValueError: an unknown preference.
    """
    pref = preference.lower()
    if pref not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be one of auto, cpu, cuda; got {preference!r}")
    if pref == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)  # index within CUDA_VISIBLE_DEVICES
    if pref == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise DeviceError(
            "device 'cuda' was requested but no CUDA GPU is available to PyTorch"
            f"{hint} (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
            "use --device auto to fall back to the CPU, or --device cpu"
        )
    return torch.device("cpu")


def default_threads(workers_sharing_cpu: int = 1) -> int:
    """Threads per process when ``workers_sharing_cpu`` processes share the CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // max(1, workers_sharing_cpu))


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def setup(
    device: str = "auto",
    amp: bool = True,
    num_threads: int = 0,
    seed: int | None = None,
    workers_sharing_cpu: int = 1,
) -> Runtime:
    """Resolve device, AMP, threads and seed for this process.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``.
        amp: request mixed precision; honoured only on CUDA (CPU AMP is slower
            for 3D convolutions and changes numerics for no gain).
        num_threads: PyTorch threads; 0 picks ``cpus // workers_sharing_cpu``.
        seed: if given, seeds every RNG.
        workers_sharing_cpu: how many training processes share this machine
            (e.g. simulated sites), used when ``num_threads`` is 0.
    """
    dev = select_device(device)
    threads = num_threads or default_threads(workers_sharing_cpu)
    torch.set_num_threads(threads)
    if seed is not None:
        set_seed(seed)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rt = Runtime(device=dev, amp=bool(amp and dev.type == "cuda"), num_threads=threads)
    logger.debug("runtime: device=%s amp=%s threads=%d", rt.device, rt.amp, rt.num_threads)
    return rt


def environment_report() -> dict[str, Any]:
    """Versions and hardware facts for ``fedimg env`` and run records (no host name)."""
    import monai
    import pydicom

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.system() + "-" + platform.machine(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "monai": monai.__version__,
        "pydicom": pydicom.__version__,
        "numpy": np.__version__,
    }
    try:  # the version only: fedimg.fl is the one package that imports nvflare
        from importlib.metadata import version

        info["nvflare"] = version("nvflare")
    except Exception:  # noqa: BLE001 - optional at report time
        info["nvflare"] = None
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def visible_gpu_count() -> int:
    """Number of CUDA devices visible to this process (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
