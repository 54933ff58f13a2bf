"""Start real processes (tests, local simulations, benchmarks) and always end them, by PID.

Every process is started in its own session (= its own process group) with its output in a
log file. `Procs.close()` (also on test failure, via the `with` block or a fixture) ends, by
PID, each started process, its process group and every descendant found in /proc — Flower's
SuperLink starts `flower-superexec` in a NEW session (flwr.supercore.utils.
get_popen_detach_kwargs), so killing the group alone would leave it behind.

Nothing here kills by name. Ports are picked free at runtime; FLWR_HOME is a tmp dir.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, nothing phoned home/installed."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra)
    return env


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent PID; the command name (field 2) may hold spaces: split after ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        for c in _children(todo.pop()):
            if c not in seen:
                seen.append(c)
                todo.append(c)
    return seen


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is already dead


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    known: set[int] = field(default_factory=set)  # descendants seen while it ran

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def poll(self) -> int | None:
        return self.popen.poll()

    def remember_descendants(self) -> None:
        if self.popen.poll() is None:
            self.known.update(descendants(self.pid))


class Procs:
    """`with Procs(log_dir) as procs: procs.start(...)` — everything ends at the block's end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(
        self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None
    ) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def run(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        cwd: Path | None = None,
        timeout: float = 300,
    ) -> tuple[int, str]:
        """Start, wait for exit (killed at `timeout`), return (exit code, output)."""
        proc = self.start(name, argv, env, cwd)
        try:
            rc = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            msg = f"{name} did not finish in {timeout}s:\n{proc.log()[-4000:]}"
            raise AssertionError(msg) from None
        finally:
            self.stop(proc)  # a finished command may still have left children
        return rc, proc.log()

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        """SIGTERM then SIGKILL the process, its group and all its descendants, by PID."""
        proc.remember_descendants()
        pids = [proc.pid, *sorted(proc.known)]
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: pgid == pid
        except (ProcessLookupError, PermissionError):
            pass
        # poll: reap our direct child so it does not linger as a zombie
        end_pids(pids, grace, waiting=proc.popen.poll)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        # A killed process in uninterruptible sleep (a loaded machine's disk) dies a moment
        # later: wait for that, so a leak check right after does not see it still running.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)

    def close(self) -> None:
        # Snapshot descendants of everything first: once a parent dies its children are
        # re-parented and can no longer be found from it.
        for p in self.procs:
            p.remember_descendants()
        for p in reversed(self.procs):
            self.stop(p)

    def alive_pids(self) -> list[int]:
        """PIDs (started or descendants seen) that are still alive — for leak assertions."""
        pids = set()
        for p in self.procs:
            pids |= {p.pid, *p.known}
        return sorted(pid for pid in pids if _alive(pid))


def end_pids(
    pids: list[int], grace: float = 5.0, waiting: Callable[[], object] | None = None
) -> None:
    """SIGTERM these processes, SIGKILL what is left after `grace` seconds (by PID only);
    `waiting` is called while they are given time to exit."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        if waiting is not None:
            waiting()
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def pid_listening_on(port: int) -> int | None:
    """The process with a TCP socket listening on `port` (Linux /proc), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            parts = row.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(f"socket:[{parts[9]}]")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in inodes for fd in fds):
                return int(entry)
        except OSError:
            continue
    return None


def wait_for(
    check: Callable[[], object], timeout: float, what: str, logs: Callable[[], str] = lambda: ""
) -> object:
    """Poll `check()` until truthy; fail with `what` and the given logs after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs()[-6000:]}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class PeakSampler:
    """The largest value `measure()` returned, sampled every `period` seconds in a thread
    while the `with` block runs (the benchmarks' peak memory of a process tree)."""

    def __init__(self, measure: Callable[[], float], period: float = 1.0) -> None:
        self.measure, self.period, self.peak = measure, period, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.measure())
            self._stop.wait(self.period)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class ProcessGroup:
    """A `with` block around processes a subclass starts in `_start()`: every one of them is
    ended, by PID, when the block ends or when starting fails halfway."""

    procs: Procs

    def _start(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.procs.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.procs.close()
