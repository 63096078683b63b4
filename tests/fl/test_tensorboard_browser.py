"""TensorBoard as a radiologist opens it: the Scalars and Text views loaded in headless Chromium.

The event files are written by fedimg's own writers in a federated run's
layout (``tb_events/site-1``, ``site-2``, ``global``; the same tags in every
run; the cross-site table and heatmap in ``global``). TensorBoard serves them
on a free loopback port; Chromium, driven over the DevTools protocol
(``tools/tensorboard_screenshot.py``), loads the views. The test checks what
the page fetched (run list, tags, the table's text), what it shows (run and
tag names, the table's cells with interval and n), TensorBoard's own JSON
endpoints, and that neither TensorBoard nor Chromium is left running.

Needs Chromium (Debian package ``chromium``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import importlib.util
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, tiny_experiment

pytestmark = [pytest.mark.slow, pytest.mark.integration]
SITES = ("site-1", "site-2")
RUNS = (*SITES, "global")


def _tool():
    spec = importlib.util.spec_from_file_location(
        "tensorboard_screenshot", REPO / "tools" / "tensorboard_screenshot.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cross_site_results() -> dict:
    """NVFlare's cross_val_results.json shape: evaluating site -> model -> flat metrics (with intervals)."""
    out = {}
    for i, site in enumerate(SITES):
        out[site] = {}
        for j, model in enumerate(("SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt", *SITES)):
            dice = 0.912 - 0.03 * i - 0.01 * j
            out[site][model] = {
                "val_dice": dice,
                "val_dice_ci_low": dice - 0.04,
                "val_dice_ci_high": min(1.0, dice + 0.04),
                "val_hd95_lesion": 3.0,
                "val_voxel_mm": 3.0,
                "val_cases": 6.0 + i,
            }
    return out


@pytest.fixture(scope="module")
def tb_events(tmp_path_factory) -> Path:
    """Event files as a federated run writes them, by fedimg's writers."""
    from fedimg.fl.report import cross_site_matrix, matrix_heatmap, matrix_markdown, write_report_to_tensorboard
    from fedimg.fl.tracking import GLOBAL_RUN, scalar_layout
    from fedimg.training.tracking import local_writer

    root = tmp_path_factory.mktemp("run") / "tb_events"
    exp = tiny_experiment()
    for k, run in enumerate(RUNS):
        writer = local_writer(root / run)
        if run == GLOBAL_RUN:
            writer.add_custom_scalars(scalar_layout(exp))
        for step in range(4):
            writer.add_scalar("val/dice_mean", 0.5 + 0.1 * step - 0.02 * k, step)
            writer.add_scalar("val/dice/lesion", 0.3 + 0.1 * step - 0.02 * k, step)
            if run != GLOBAL_RUN:
                writer.add_scalar("train/loss", 1.2 - 0.2 * step + 0.05 * k, step + 1)
        writer.close()
    results = _cross_site_results()
    matrices = [cross_site_matrix(results, m) for m in ("val_dice", "val_hd95_lesion")]
    text = "\n\n".join(matrix_markdown(m) for m in matrices)
    write_report_to_tensorboard(str(root / GLOBAL_RUN), "cross_site", text, matrix_heatmap(matrices[0]))
    return root


def _alive(pgid: int) -> list[int]:
    """Processes (not zombies) still in the process group ``pgid``."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


def test_scalars_and_text_views_load_in_a_browser(tb_events, tmp_path):
    tool = _tool()
    if tool.find_chromium() is None:
        pytest.skip("Chromium is not installed (Debian package chromium; .ci/run installs it when missing)")
    tb = tool.TensorBoard(tb_events)
    browser = None
    try:
        # TensorBoard's own JSON endpoints: every run, with the same tags.
        assert sorted(tb.wait_for_runs(RUNS)) == sorted(RUNS)
        scalar_tags = tb.get_json("/data/plugin/scalars/tags")
        for run in RUNS:
            assert {"val/dice_mean", "val/dice/lesion"} <= set(scalar_tags[run]), run
        for site in SITES:
            assert "train/loss" in scalar_tags[site]
        assert tb.get_json("/data/plugin/text/tags") == {"global": ["cross_site/table/text_summary"]}

        browser = tool.HeadlessChromium(size=(1400, 1000))
        # Scalars view: the page asks for the runs and tags, then the curves of every run.
        browser.open(
            f"{tb.url}/#scalars",
            until=lambda urls: any("/data/plugin/scalars/scalars" in u for u in urls),
        )
        urls = browser.requested()
        assert any(u.endswith("/data/runs") for u in urls)
        assert any("/data/plugin/scalars/tags" in u for u in urls)
        statuses = browser.responses()
        assert all(code == 200 for u, code in statuses.items() if "/data/" in u), statuses
        shown = browser.text()
        for name in (*RUNS, "val/dice_mean", "val/dice/lesion", "train/loss"):
            assert name in shown, f"{name} not on the Scalars page"
        shot = browser.screenshot(tmp_path / "scalars.png")

        # Text view: the cross-site table of the global run, each cell with its interval and n.
        browser.open(f"{tb.url}/#text", until=lambda urls: any("/data/plugin/text/text?" in u for u in urls))
        fetched = [urllib.parse.urlparse(u) for u in browser.requested() if "/data/plugin/text/text?" in u]
        queries = [urllib.parse.parse_qs(u.query) for u in fetched]
        assert any(q.get("run") == ["global"] and q.get("tag") == ["cross_site/table/text_summary"] for q in queries)
        shown = browser.text()
        assert "final global model" in shown and "site-2's own model" in shown
        assert "0.912 (0.87–0.95), n=6" in shown  # value, 95% bootstrap interval, cases
        assert "≤ voxel size (3 mm), n=7" in shown  # an HD95 at the voxel size says so
        browser.screenshot(tmp_path / "text.png")
    finally:
        if browser is not None:
            browser.close()
        tb.stop()

    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (1000, 1400) and img.std() > 10  # a drawn page, not a blank one
    # Nothing left running: neither TensorBoard (and its data server) nor any Chromium process.
    for proc in (tb.proc, browser.proc):
        assert proc.poll() is not None
        assert not _alive(proc.pid), f"processes left in the group of {proc.args[0]}"
    assert (tmp_path / "text.png").stat().st_size > 1000
