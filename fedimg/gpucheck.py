"""``fedimg env --check-gpu``: a short self-test of a site's GPU before it joins a federation.

Three measurements on the device fedimg would train on, each the way
training uses it:

1. AMP training steps of the demo network (3D UNet) on random 64³ patches;
2. a cached dataset placed on the device (MONAI ``CacheDataset`` with
   ``EnsureTyped(device=...)``), as training caches a site's volumes;
3. one sliding-window inference of a 128³ volume, as validation and
   ``fedimg predict`` run it.

It prints throughput and peak memory, so a site can compare its GPU with the
federation's expectations and lower its own ``resources`` (cache rate,
sliding-window batch) if memory is short. It needs CUDA; without it the
command says so and exits 2. The same code runs on the CPU in the tests.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fedimg.runtime import setup


def self_test(device: str = "cuda", seconds: float = 20.0) -> dict[str, Any]:
    """Run the self-test on ``device`` for about ``seconds`` and return the measurements.

    Raises:
        fedimg.runtime.DeviceError: ``device`` is ``cuda`` and no CUDA device is visible.
    """
    from monai.data import CacheDataset
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import EnsureTyped

    rt = setup(device, amp=True, num_threads=0, seed=0)
    dev = rt.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    net = UNet(
        spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2
    ).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    scaler = rt.grad_scaler()
    x = torch.rand(2, 1, 64, 64, 64, device=dev)
    y = torch.randint(0, 3, (2, 1, 64, 64, 64), device=dev)
    budget = seconds / 2
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget or steps < 2:
        opt.zero_grad(set_to_none=True)
        with rt.autocast():
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        steps += 1
    _sync(dev)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    items = [{"image": torch.rand(1, 96, 96, 96)} for _ in range(4)]
    cache = CacheDataset(
        items, transform=EnsureTyped(keys="image", device=dev, track_meta=False), cache_rate=1.0, progress=False
    )
    on_device = all(cache[i]["image"].device.type == dev.type for i in range(len(cache)))
    _sync(dev)
    cache_s = time.perf_counter() - t0

    net.eval()
    volume = torch.rand(1, 1, 128, 128, 128, device=dev)
    t0 = time.perf_counter()
    with torch.no_grad(), rt.autocast():
        out = sliding_window_inference(volume, roi_size=(64, 64, 64), sw_batch_size=4, predictor=net, overlap=0.25)
    _sync(dev)
    infer_s = time.perf_counter() - t0
    report: dict[str, Any] = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "amp": rt.amp,
        "train_steps": steps,
        "train_steps_per_s": steps / train_s,
        "train_voxels_per_s": steps * x.numel() / train_s,
        "train_loss_finite": bool(torch.isfinite(loss.detach()).item()),
        "cache_on_device": on_device,
        "cache_s": cache_s,
        "sliding_window_128_s": infer_s,
        "sliding_window_output_shape": list(out.shape) if isinstance(out, torch.Tensor) else None,
    }
    if dev.type == "cuda":
        report["peak_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
        report["total_memory_gb"] = torch.cuda.get_device_properties(dev).total_memory / 2**30
    return report


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


__all__ = ["self_test"]
