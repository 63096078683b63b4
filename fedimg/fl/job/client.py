"""NVFlare client script of fedimg's training job: fedimg's Client API loop.

Each site has fedimg installed; this script only hands control to it.
"""

from pathlib import Path

from fedimg.fl.client import run

if __name__ == "__main__":
    run(script_dir=Path(__file__).resolve().parent)
