"""TensorBoard in headless Chromium: screenshots for the docs, and what the page fetched, for the browser test.

Needs Chromium (Debian: ``apt-get install chromium``; ``.ci/run`` installs it
when missing). Starts TensorBoard on a free loopback port over LOGDIR, opens
the given dashboard in headless Chromium, waits until the page has fetched
its data and no request is pending, writes a PNG, and stops both::

    python tools/tensorboard_screenshot.py demo_out/nvflare/seg_demo/server/simulate_job/tb_events \\
        docs/img/tensorboard_curves.png --dashboard custom_scalars

Chromium is driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages ending in a NUL byte on file
descriptors 3 and 4), so no port is opened and no package beyond the
standard library is needed. :class:`TensorBoard` and :class:`HeadlessChromium`
are also used by ``tests/fl/test_tensorboard_browser.py``.

The server's TensorBoard holds only scalar curves and tables/heatmaps of
aggregate numbers; the pictures of cases exist only in a site's own
``local_logdir``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_chromium() -> str | None:
    """The Chromium executable on PATH, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _stop_group(proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """Stop a process started in its own session, and whatever it started (its process group)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children left behind (none, normally)
    except ProcessLookupError:
        pass


class TensorBoard:
    """TensorBoard serving ``logdir`` on a free loopback port, as a context manager.

    Args:
        logdir: the folder of runs (one sub-folder per run).
        start_timeout: seconds to wait for the server to answer.
    """

    def __init__(self, logdir: str | Path, start_timeout: float = 60.0) -> None:
        self.logdir = Path(logdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = Path(sys.executable).with_name("tensorboard")
        command = [str(script)] if script.is_file() else [sys.executable, "-m", "tensorboard.main"]
        self.proc = subprocess.Popen(
            [*command, "--logdir", str(self.logdir), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its data server child goes with it
        )
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                self.get_json("/data/runs")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"TensorBoard did not answer on {self.url} within {start_timeout:g} s "
                        f"(exit code {self.proc.returncode}); run it by hand to see why"
                    ) from None
                time.sleep(0.3)

    def get_json(self, path: str) -> Any:
        """GET ``path`` (e.g. ``/data/runs``) from the server and decode its JSON."""
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def wait_for_runs(self, runs: Sequence[str], timeout: float = 60.0) -> list[str]:
        """Wait until the server lists every run in ``runs`` (it loads event files in the background)."""
        deadline = time.monotonic() + timeout
        while True:
            listed = list(self.get_json("/data/runs"))
            if set(runs) <= set(listed) or time.monotonic() > deadline:
                return listed
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the server and its data server."""
        _stop_group(self.proc)

    def __enter__(self) -> TensorBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HeadlessChromium:
    """Headless Chromium driven over the DevTools protocol on a pipe, one page, as a context manager.

    Args:
        executable: the Chromium binary (default: :func:`find_chromium`).
        size: the window size in pixels (width, height).
    """

    def __init__(self, executable: str | None = None, size: tuple[int, int] = (1400, 1000)) -> None:
        exe = executable or find_chromium()
        if exe is None:
            raise FileNotFoundError("Chromium not found on PATH: install it (Debian: apt-get install chromium)")
        self._profile = tempfile.TemporaryDirectory(prefix="fedimg-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds() -> None:  # in the child: the pipe ends as file descriptors 3 (commands) and 4 (replies)
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={self._profile.name}",
                f"--window-size={size[0]},{size[1]}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            preexec_fn=fds,  # only dup2 before exec
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # renderer, GPU and utility processes go with it
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        target = self.send("Target.createTarget", {"url": "about:blank"})
        self._session = self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})[
            "sessionId"
        ]
        self.page("Network.enable")
        self.page("Page.enable")
        self.page(
            "Emulation.setDeviceMetricsOverride",
            {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False},
        )

    # ---------------------------------------------------------------- protocol

    def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Send one DevTools command and return its result; events that arrive meanwhile are kept."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for reply in self._read(deadline - time.monotonic()):
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"Chromium refused {method}: {reply['error'].get('message')}")
                    return reply.get("result", {})
                self.events.append(reply)

    def page(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """A command to the page's session."""
        return self.send(method, params, session=self._session, timeout=timeout)

    def _read(self, timeout: float) -> list[dict[str, Any]]:
        if timeout <= 0:
            raise TimeoutError("Chromium did not answer in time")
        ready, _, _ = select.select([self._from_chrome], [], [], timeout)
        if not ready:
            return []
        chunk = os.read(self._from_chrome, 1 << 20)
        if not chunk:
            raise RuntimeError(f"Chromium closed its DevTools pipe (exit code {self.proc.poll()})")
        self._buf += chunk
        out = []
        while b"\0" in self._buf:
            raw, self._buf = self._buf.split(b"\0", 1)
            out.append(json.loads(raw))
        return out

    def pump(self, seconds: float) -> None:
        """Collect events for ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.events.extend(self._read(max(0.01, deadline - time.monotonic())))

    # ---------------------------------------------------------------- what the page did

    def requested(self) -> list[str]:
        """Every URL the page requested so far."""
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def responses(self) -> dict[str, int]:
        """URL -> HTTP status of every response the page received so far."""
        return {
            e["params"]["response"]["url"]: int(e["params"]["response"]["status"])
            for e in self.events
            if e.get("method") == "Network.responseReceived"
        }

    def _pending(self) -> int:
        started, ended = set(), set()
        for e in self.events:
            method = e.get("method")
            if method == "Network.requestWillBeSent":
                started.add(e["params"]["requestId"])
            elif method in ("Network.loadingFinished", "Network.loadingFailed"):
                ended.add(e["params"]["requestId"])
        return len(started - ended)

    def open(
        self,
        url: str,
        until: Callable[[list[str]], bool] | None = None,
        timeout: float = 60.0,
        quiet: float = 1.5,
        settle: float = 2.0,
    ) -> None:
        """Load ``url`` and wait: until ``until(requested URLs)`` holds and no request is pending for ``quiet`` s.

        Then ``settle`` more seconds, for the page to draw what it fetched.

        Raises:
            TimeoutError: the page did not get there within ``timeout`` seconds.
        """
        self.events.clear()
        self.page("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout
        idle_since: float | None = None
        while True:
            self.pump(0.25)
            now = time.monotonic()
            done = until is None or until(self.requested())
            if done and self._pending() == 0:
                idle_since = idle_since or now
                if now - idle_since >= quiet:
                    break
            else:
                idle_since = None
            if now > deadline:
                raise TimeoutError(f"the page {url} did not finish loading within {timeout:g} s")
        self.pump(settle)  # charts draw after their data arrived

    def text(self) -> str:
        """The page's visible text, shadow DOM included (TensorBoard's dashboards are web components)."""
        script = """(() => {
            const out = [];
            const walk = (node) => {
                if (node.shadowRoot) walk(node.shadowRoot);
                for (const child of node.childNodes) {
                    if (child.nodeType === Node.TEXT_NODE) {
                        const t = child.textContent.trim();
                        if (t) out.push(t);
                    } else if (child.nodeType === Node.ELEMENT_NODE && !['SCRIPT', 'STYLE'].includes(child.tagName)) {
                        walk(child);
                    }
                }
            };
            walk(document);
            return out.join('\\n');
        })()"""
        return str(self.page("Runtime.evaluate", {"expression": script, "returnByValue": True})["result"]["value"])

    def click(self, label: str, settle: float = 2.0) -> None:
        """Click the control whose visible text is ``label`` (shadow DOM included), e.g. a dashboard's checkbox.

        Raises:
            LookupError: no element on the page shows that text.
        """
        script = """((label) => {
            const hits = [];
            const walk = (node) => {
                if (node.shadowRoot) walk(node.shadowRoot);
                for (const child of node.children || []) {
                    if ((child.innerText || '').trim() === label) hits.push(child);
                    walk(child);
                }
            };
            walk(document);
            if (!hits.length) return false;
            hits[hits.length - 1].click();  // the innermost element with exactly that text
            return true;
        })("""
        script += json.dumps(label) + ")"
        found = self.page("Runtime.evaluate", {"expression": script, "returnByValue": True})["result"]["value"]
        if not found:
            raise LookupError(f"nothing on the page reads {label!r}")
        self.pump(settle)

    def screenshot(self, path: str | Path) -> Path:
        """Write the page as a PNG."""
        data = self.page("Page.captureScreenshot", {"format": "png"})["data"]
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return out

    def close(self) -> None:
        """Close the browser (all its processes) and the pipes."""
        try:
            if self.proc.poll() is None:
                self.send("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        _stop_group(self.proc)
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
        self._profile.cleanup()

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logdir")
    p.add_argument("png")
    p.add_argument(
        "--dashboard",
        default="custom_scalars",
        help="TensorBoard dashboard and hash options: custom_scalars, scalars, timeseries, text, images, "
        "e.g. 'images&tagFilter=cross_site'",
    )
    p.add_argument("--size", default="1400,1000", help="window size W,H")
    p.add_argument("--settle", type=float, default=3.0, help="seconds after the data arrived, for the charts to draw")
    p.add_argument(
        "--click",
        action="append",
        default=[],
        metavar="TEXT",
        help="click the control that reads TEXT before the picture (e.g. 'Show actual image size'); repeatable",
    )
    args = p.parse_args()
    if find_chromium() is None:
        p.error("Chromium not found: install it (Debian: apt-get install chromium)")
    width, height = (int(v) for v in args.size.split(","))
    with TensorBoard(args.logdir) as tb, HeadlessChromium(size=(width, height)) as browser:
        browser.open(
            f"{tb.url}/#{args.dashboard}",
            until=lambda urls: any("/data/plugin/" in u for u in urls),
            settle=args.settle,
        )
        for label in args.click:
            browser.click(label, settle=args.settle)
        browser.screenshot(args.png)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
