"""`fedvox run`: `flwr run`, waited for, with an exit code that tells the truth.

`flwr run` returns 0 once the run is submitted, whatever the ServerApp does after. This takes
the same arguments, calls Flower's own `flwr run` (log streamed), waits until Flower says the
run ended, reads the run's summary.json, prints one line (status, reason, summary path) and
exits with:

    0  finished        1  failed (bad config, no usable update, ServerApp crash)
    2  stopped or lost (flwr stop, killed; or no status to be found)

`flwr run` against a local-simulation connection starts a detached SuperLink that outlives
it; if this command's `flwr run` started one, it is ended here (by the PID that listens on
Flower's local port, never by name).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from simulations.harness.procs import descendants, end_pids, pid_listening_on, port_open

# `flwr run` options that take a value (so the positionals can be told apart).
VALUE_OPTIONS = {"--federation", "--run-config", "-c", "--federation-config", "--format"}
LOCAL_PORT_ENV = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
EXIT = {"finished": 0, "failed": 1, "stopped": 2}
SUMMARY_LINE = re.compile(r"(?:outputs in|summary in) (/\S+?)[,)\s]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "flwr_args", nargs=argparse.REMAINDER, help="`flwr run` arguments: [APP] [SUPERLINK] ..."
    )


def run(args: argparse.Namespace) -> int:
    argv = [a for a in args.flwr_args if a != "--"]
    local_port = _local_port()
    was_up = port_open(local_port)
    try:
        return _run_and_wait(argv)
    finally:
        if not was_up and port_open(local_port):
            _end_local_superlink(local_port)


def _run_and_wait(argv: list[str]) -> int:
    flwr = shutil.which("flwr") or str(Path(sys.executable).parent / "flwr")
    streamed = argv if "--stream" in argv else [*argv, "--stream"]
    output = _tee([flwr, "run", *streamed])
    found = re.search(r"started run (\d+)", output)
    if found is None:
        print("fedvox run: Flower did not start the run (see above)", file=sys.stderr)
        return 1
    run_id = found.group(1)
    flower_status = _wait_for_end(flwr, _superlink_arg(argv), run_id)
    summary_path = _summary_path(output, argv)
    status, reason = _verdict(flower_status, summary_path)
    where = f" (summary: {summary_path})" if summary_path else ""
    print(f"fedvox run: run {run_id} {status}: {reason}{where}", flush=True)
    return EXIT.get(status, 2)


def _tee(argv: list[str]) -> str:
    """Run `argv`, echoing its output as it comes; return all of it."""
    out = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            out.append(line)
    return "".join(out)


def _superlink_arg(argv: list[str]) -> str | None:
    """The SUPERLINK positional of `flwr run [APP] [SUPERLINK]`, if given."""
    positionals, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in VALUE_OPTIONS:
            skip = True
        elif not a.startswith("-"):
            positionals.append(a)
    return positionals[1] if len(positionals) > 1 else None


def _wait_for_end(flwr: str, superlink: str | None, run_id: str, poll_s: float = 3.0) -> str:
    """Flower's status of the run once it ended ("finished:completed" ...), or "unknown"."""
    argv = [flwr, "ls", *([superlink] if superlink else []), "--run-id", run_id]
    failures = 0
    while True:
        result = subprocess.run(
            [*argv, "--format", "json"], capture_output=True, text=True, check=False
        )
        status = _status_of(result.stdout, run_id)
        if status is None:
            failures += 1
            if failures >= 5:
                return "unknown"
        elif status.startswith("finished"):
            return status
        time.sleep(poll_s)


def _status_of(text: str, run_id: str) -> str | None:
    try:
        data = json.loads(text[text.index("{") :])
    except ValueError:
        return None
    for run in data.get("runs", []):
        if str(run.get("run-id")) == run_id:
            return str(run.get("status"))
    return None


def _summary_path(output: str, argv: list[str]) -> Path | None:
    """Where the ServerApp wrote summary.json: its log line, else -c output-dir/run-name."""
    for match in SUMMARY_LINE.finditer(output):
        candidate = Path(match.group(1))
        candidate = candidate if candidate.name == "summary.json" else candidate / "summary.json"
        if candidate.is_file():
            return candidate
    config = " ".join(argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--run-config"))
    out_dir = re.search(r'output-dir\s*=\s*"([^"]+)"', config)
    name = re.search(r'run-name\s*=\s*"([^"]+)"', config)
    if out_dir and name and (Path(out_dir[1]) / name[1] / "summary.json").is_file():
        return Path(out_dir[1]) / name[1] / "summary.json"
    return None


def _verdict(flower_status: str, summary_path: Path | None) -> tuple[str, str]:
    """(finished | failed | stopped, reason): summary.json's word, checked against Flower's."""
    summary = json.loads(summary_path.read_text()) if summary_path else {}
    status, reason = summary.get("status"), summary.get("reason") or summary.get("error")
    if flower_status.endswith("failed") and status != "failed":
        return "failed", reason or "the ServerApp failed (see the run's log: flwr log)"
    if flower_status.endswith("stopped"):
        return "stopped", reason or "stopped (flwr stop)"
    if status in EXIT:
        return status, reason or ""
    if status == "running":
        return "stopped", (
            "the run did not end normally (Flower: "
            f"{flower_status}; summary.json still says running, `fedvox status` repairs it "
            "once its ServerApp is gone; continue it with resume-from)"
        )
    return "stopped", f"no summary.json status; Flower says {flower_status}"


def _local_port() -> int:
    return int(os.environ.get(LOCAL_PORT_ENV, "39091"))


def _end_local_superlink(port: int) -> None:
    """End the detached local SuperLink that `flwr run` started, and what it started."""
    pid = pid_listening_on(port)
    if pid is None:
        return
    end_pids([pid, *descendants(pid)])
    print(f"fedvox run: ended the local SuperLink flwr run started (pid {pid})", flush=True)
