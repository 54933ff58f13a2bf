"""Progress bars: shown on a terminal for long work, silent anywhere else (common/progress.py).

The terminal case runs `fedvox prepare` in a child process whose stderr is a real
pseudo-terminal (os.openpty), long enough to pass the bar's delay; the child is ended by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from common import progress
from simulations.harness.procs import VENV_BIN


def test_track_passes_items_through_and_prints_nothing_off_a_terminal(capsys):
    with progress.enabled():
        assert list(progress.track(range(5), "work")) == [0, 1, 2, 3, 4]
    assert list(progress.track(iter("ab"), "work")) == ["a", "b"]  # display off
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def _read_all(fd: int, proc: subprocess.Popen, timeout: float) -> bytes:
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal (it exited)
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def test_prepare_shows_a_bar_on_a_terminal_and_none_in_a_pipe(tmp_path):
    # ~160 lung-CT slices take several seconds to draw: more than the bar's 2 s delay.
    argv = [str(VENV_BIN / "fedvox"), "prepare", "--phantom", "lung-ct-2d", "--hospitals", "1"]
    argv += ["--cases-per-site", "80", "--holdout-cases", "80", "--image-size", "64", "64"]
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [*argv, "--out", str(tmp_path / "tty")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    try:
        shown = _read_all(master, proc, timeout=600).decode(errors="replace")
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
    assert "drawing" in shown and "/80" in shown, shown[-2000:]
    piped = subprocess.run(
        [*argv, "--out", str(tmp_path / "pipe")], capture_output=True, text=True, timeout=600
    )
    assert piped.returncode == 0, piped.stderr
    assert "drawing" not in piped.stderr + piped.stdout and "\x1b[" not in piped.stderr
