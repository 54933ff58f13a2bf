"""Is the process that wrote something still running? (Linux /proc; pids are reused.)

The node's ledger asks it of a reservation's process, the server's `fedvox status` of the
ServerApp that last wrote a summary.json: a pid alone could name a newer, unrelated process, so
each record keeps the process's start time too.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive(pid: int | None, started: str | None) -> bool:
    """Is the process that made a record still running? Unknown counts as alive."""
    if pid is None:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = start_time(int(pid))
    return started is None or now is None or now == started


def this_process() -> dict[str, object]:
    """{pid, started, host} of the calling process, to be checked later with `alive`."""
    pid = os.getpid()
    return {"pid": pid, "started": start_time(pid), "host": socket.gethostname()}
