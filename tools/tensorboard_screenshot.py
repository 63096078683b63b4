"""Screenshots of fedimg's TensorBoard view, for the README (needs Chromium: ``apt-get install chromium``).

Starts TensorBoard on a free local port over LOGDIR, opens the given
dashboard in headless Chromium, writes a PNG, and stops TensorBoard::

    python tools/tensorboard_screenshot.py demo_out/nvflare/seg_demo/server/simulate_job/tb_events \
        docs/img/tensorboard_custom_scalars.png --dashboard custom_scalars

The page shows only what the server's TensorBoard holds: scalar curves and
tables/heatmaps of aggregate numbers, no patient image.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logdir")
    p.add_argument("png")
    p.add_argument(
        "--dashboard", default="custom_scalars", help="TensorBoard dashboard: custom_scalars, timeseries, text, images"
    )
    p.add_argument("--size", default="1400,1000", help="window size W,H")
    p.add_argument("--wait", type=int, default=12000, help="milliseconds of page time before the picture")
    args = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        p.error("Chromium not found: install it (Debian: apt-get install chromium)")
    port = _free_port()
    tb = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(60):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            p.error("TensorBoard did not start")
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    f"--user-data-dir={profile}",
                    f"--window-size={args.size}",
                    "--hide-scrollbars",
                    f"--virtual-time-budget={args.wait}",
                    f"--screenshot={Path(args.png).resolve()}",
                    f"{url}#{args.dashboard}",
                ],
                check=True,
                timeout=120,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    finally:
        tb.terminate()
        tb.wait(timeout=20)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
