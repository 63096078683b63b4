"""Files shipped inside the package: the default configs and the job's client script.

``pip install fedimg`` (not only an editable checkout) must be able to run
``fedimg demo`` and ``fedimg fl run``: the configs live in ``fedimg/configs``
(the checkout's top-level ``configs`` is a link to it, so there is one copy),
and the client script NVFlare ships to every site in ``fedimg/fl/job``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def package_dir() -> Path:
    """The installed ``fedimg`` package folder."""
    return Path(str(resources.files("fedimg")))


def config_path(*parts: str) -> Path:
    """A shipped config, e.g. ``config_path("experiments", "seg_demo.yaml")``.

    Raises:
        FileNotFoundError: no such config in this installation.
    """
    path = package_dir().joinpath("configs", *parts)
    if not path.is_file():
        raise FileNotFoundError(f"no shipped config {'/'.join(parts)} in {package_dir() / 'configs'}")
    return path


def job_dir() -> Path:
    """The folder holding the job's ``client.py`` (what NVFlare copies into the job's ``custom/``)."""
    return package_dir() / "fl" / "job"


__all__ = ["config_path", "job_dir", "package_dir"]
