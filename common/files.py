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


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], Any], shared: bool = False) -> Path:
    """Replace `path` with what `write(f)` writes into a binary file object, atomically.

    The file is private (0600, mkstemp's mode) unless `shared`: then it gets the mode open()
    would give it (0666 less the umask), so that a service's UMask decides who may read it,
    e.g. the operator's group reading the SuperLink's run folders (docs/deployment.md)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        if shared:
            os.fchmod(fd, 0o666 & ~_umask())
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


def _umask() -> int:
    """This process's umask, read without changing it (Linux); else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def json_safe(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (json.dump would write invalid JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_json(
    path: Path | str, payload: Any, indent: int | None = 1, shared: bool = False
) -> Path:
    """`payload` as JSON (NaN/inf as null), written atomically (`shared`: as atomic_write)."""
    text = json.dumps(json_safe(payload), indent=indent)
    return atomic_write(path, lambda f: f.write(text.encode()), shared)


def atomic_write_text(path: Path | str, text: str, shared: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()), shared)
