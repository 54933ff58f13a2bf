"""A benchmark stopped with SIGTERM (a CI timeout, `kill`) ends everything it started.

Real processes: `fedvox bench utility --quick` starts a private Flower SuperLink, a simulation
and Ray workers; after SIGTERM none of them may be left (a leftover holds CI's output open).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from procs import descendants, wait_for

from simulations.harness.procs import _alive, flwr_env


def test_sigterm_during_a_benchmark_leaves_no_process_behind(tmp_path):
    work = tmp_path / "work"
    env = flwr_env(tmp_path / "flwr-home")
    cmd = [
        sys.executable,
        "-m",
        "simulations.cli",
        "bench",
        "utility",
        "--quick",
        "--settings",
        "fl",
        "--workdir",
        str(work),
        "--out",
        str(tmp_path / "u.json"),
    ]
    # `python -m simulations.cli` calls main() with argv=None, like the console command.
    bench = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    seen: set[int] = set()
    try:
        # Wait until the federation is really running: a simulation process under the SuperLink.
        def running() -> bool:
            seen.update(descendants(bench.pid))
            return len(seen) >= 3 and any((work / "runs").glob("*/summary.json"))

        wait_for(running, timeout=240, what="the benchmark's federation to start")
        seen.update(descendants(bench.pid))
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=120) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in seen):
            time.sleep(0.5)
        assert [p for p in seen if _alive(p)] == []
    finally:
        for pid in [bench.pid, *seen]:  # whatever happened above, end it all
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        bench.wait(timeout=30)
