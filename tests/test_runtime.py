"""Device selection, AMP and threads."""

from __future__ import annotations

import pytest
import torch

from fedimg import runtime


def test_cpu_is_always_available():
    rt = runtime.setup("cpu", amp=True, num_threads=1, seed=3)
    assert rt.device == torch.device("cpu")
    assert rt.amp is False  # AMP only on CUDA
    assert torch.get_num_threads() == 1


def test_auto_picks_cuda_only_when_present():
    dev = runtime.select_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(runtime.DeviceError) as exc:
        runtime.select_device("cuda")
    msg = str(exc.value)
    assert "no CUDA GPU" in msg and "--device auto" in msg


def test_unknown_device_rejected():
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        runtime.select_device("tpu")


def test_threads_split_between_sites():
    assert runtime.default_threads(1) >= runtime.default_threads(64) == 1


def test_seed_makes_torch_deterministic():
    runtime.set_seed(5)
    a = torch.rand(3)
    runtime.set_seed(5)
    assert torch.equal(a, torch.rand(3))


def test_environment_report_has_versions_and_no_hostname():
    import socket

    info = runtime.environment_report()
    assert info["torch"] and info["monai"] and info["pydicom"]
    assert socket.gethostname() not in str(info.values())


@pytest.mark.gpu
def test_cuda_runtime_uses_amp():
    rt = runtime.setup("cuda", amp=True)
    assert rt.is_cuda and rt.amp
    with rt.autocast():
        y = torch.nn.Linear(4, 4).to(rt.device)(torch.randn(2, 4, device=rt.device))
    assert y.dtype == torch.float16
