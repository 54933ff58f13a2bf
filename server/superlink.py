"""fedvox's central server: Flower's own `flower-superlink`, made to hold many hospitals.

    python -m server.superlink -- <flower-superlink arguments>

Flower 1.42 keeps the SuperLink's state (`--database`) in SQLite through SQLAlchemy and sets
`PRAGMA busy_timeout = 5000` on every connection (`flwr.supercore.constant.SQLITE_PRAGMAS`):
a write that waits more than 5 s for the database lock fails with "database is locked" and
the request with HTTP 500. On a busy 2-core host with 10 SuperNodes pushing replies at once
(and ClientApps importing torch), the thread that holds the lock is starved of CPU for
longer than that, and the 500s lost replies (a SuperNode drops a reply whose push failed) and
killed the SuperLink's SuperExec (a 500 ends its polling loop: every later run stayed
"pending"). The `--database` URL cannot change it: the pragma runs after connecting.

This wrapper starts Flower's unmodified `flower-superlink` entry point in this process with:

1. `busy_timeout` raised to `BUSY_TIMEOUT_MS` (a write waits for the lock instead of failing);
2. the SuperExec it launches for ServerApps restarted if it ever exits with an error while
   the SuperLink is alive (`python -m server.superlink superexec ...`, Flower's own SuperExec
   in a loop), so one failed request cannot leave later runs pending forever.

Everything else — arguments, TLS, node authentication, the database file — is Flower's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

BUSY_TIMEOUT_MS = 120_000  # a write waits up to 2 min for the lock on a loaded host
RESTART_PAUSE_S = 2.0


def install() -> None:
    """Patch the two settings above into Flower's modules (refuse if they are not there)."""
    import importlib

    from flwr.supercore import sql_mixin

    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the module

    pragmas = getattr(sql_mixin, "SQLITE_PRAGMAS", None)
    command = getattr(fs, "_get_superexec_command", None)
    if pragmas is None or command is None:
        raise RuntimeError("fedvox's SuperLink wrapper needs flwr==1.42.0 (SQLITE_PRAGMAS)")
    sql_mixin.SQLITE_PRAGMAS = tuple(
        (k, str(BUSY_TIMEOUT_MS) if k == "busy_timeout" else v) for k, v in pragmas
    )

    def superexec_command(*args: object, **kwargs: object) -> list[str]:
        flower = command(*args, **kwargs)  # ["flower-superexec", <its arguments>]
        return [sys.executable, "-m", "server.superlink", "superexec", *flower[1:]]

    fs._get_superexec_command = superexec_command


def superexec(args: list[str]) -> int:
    """Flower's `flower-superexec` with `args`, started again whenever it fails while its
    SuperLink (--parent-pid) lives; it ends with the SuperLink, as Flower's does."""
    parent = None
    if "--parent-pid" in args:
        parent = int(args[args.index("--parent-pid") + 1])
    while True:
        code = subprocess.call([_flower_superexec(), *args])
        if code == 0 or (parent is not None and not _alive(parent)):
            return code
        print(f"fedvox: the SuperLink's SuperExec exited ({code}); restarting it", flush=True)
        time.sleep(RESTART_PAUSE_S)


def _flower_superexec() -> str:
    beside = Path(sys.executable).parent / "flower-superexec"  # this Python's own Flower
    return str(beside) if beside.exists() else "flower-superexec"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["superexec"]:
        return superexec(argv[1:])
    rest = argv[1:] if argv[:1] == ["--"] else argv
    install()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *rest]
    flower_superlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
