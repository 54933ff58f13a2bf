"""Writing files so that a crash never leaves half of one: the one atomic-write helper.

Every file fedvox rewrites in place (summary.json, checkpoints, the privacy ledger, the
decoded-data cache, reports) goes through `atomic_write`: the bytes go to a temp file in the
same folder, are fsynced, and are renamed over the target; the folder is fsynced too, so the
rename itself survives a power cut. A reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_dir(folder: Path | str) -> None:
    """Make a rename or a new file in `folder` durable (no-op where folders can't be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], Any]) -> Path:
    """Replace `path` with what `write(f)` writes into a binary file object, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def json_safe(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (json.dump would write invalid JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_json(path: Path | str, payload: Any, indent: int | None = 1) -> Path:
    """`payload` as JSON (NaN/inf as null), written atomically."""
    text = json.dumps(json_safe(payload), indent=indent)
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))
