"""Where fedvox keeps things when a config leaves a path empty.

Every default is absolute: Flower runs apps in the SuperLink's working
directory, where a relative path would silently land somewhere unexpected.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def fedvox_home() -> Path:
    """`$FEDVOX_HOME`, else `~/.fedvox`."""
    return Path(os.environ.get("FEDVOX_HOME") or Path.home() / ".fedvox").expanduser().resolve()


def demo_data_dir(hospitals: int, alpha: float, seed: int) -> Path:
    """Where the vendored PneumoniaMNIST is prepared for the default demo."""
    return fedvox_home() / "data" / f"pneumoniamnist-{hospitals}h-dirichlet{alpha:g}-seed{seed}"


def default_output_dir() -> Path:
    return fedvox_home() / "runs"


def absolute(path: str | Path, setting: str) -> Path:
    """An absolute path for a config value, or a clear error naming the setting."""
    p = Path(str(path)).expanduser()
    if not p.is_absolute():
        raise ValueError(
            f"{setting}={str(path)!r} is a relative path; Flower runs apps in the SuperLink's "
            "working directory, so give an absolute path"
        )
    return p


def list_sites(data_dir: Path) -> list[Path]:
    """The `hospital-*` folders of a data dir, in numeric order (hospital-2 < hospital-10)."""
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data-dir {data_dir} does not exist or is not a folder")

    def number(p: Path) -> tuple[int, str]:
        m = re.search(r"(\d+)$", p.name)
        return (int(m.group(1)) if m else 1 << 30, p.name)

    sites = sorted((p for p in data_dir.glob("hospital-*") if p.is_dir()), key=number)
    if not sites:
        raise FileNotFoundError(f"data-dir {data_dir} holds no hospital-* folders")
    return sites
