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

Against the local simulation, hospitals are trained in parallel: unless the user set
`client-resources-num-cpus`, each simulated hospital gets the machine's cores divided among
as many Ray actors as there are hospitals (at most one per core; Ray gives each actor's torch
that many threads). Flower's own default, 2 CPUs a client, trains them one after another on
a 2-core machine.

Flower builds the app bundle (FAB) by listing every file under the app folder before it
filters them, a virtual environment's tens of thousands included (~4-10 s on 2 cores with the
README's `.venv` in the checkout). `flwr run` is handed a temporary copy of the app instead,
holding what Flower could bundle (its file types, minus what .gitignore excludes), walked
without entering ignored folders: the same FAB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pathspec

from simulations.harness.procs import descendants, end_pids, pid_listening_on, port_open

# `flwr run` options that take a value (so the positionals can be told apart).
VALUE_OPTIONS = {"--federation", "--run-config", "-c", "--federation-config", "--format"}
LOCAL_PORT_ENV = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
EXIT = {"finished": 0, "failed": 1, "stopped": 2}
SUMMARY_LINE = re.compile(r"(?:outputs in|summary in) (/\S+?)[,)\s]")
FLOWER_DEFAULT_SUPERNODES = 2  # Flower 1.42's local simulation, when none is given
# The file types Flower 1.42 puts in a FAB (flwr.common.constant.FAB_INCLUDE_PATTERNS)
FAB_SUFFIXES = {".py", ".toml", ".md", ".yaml", ".yml", ".json", ".jsonl"}
FAB_NAMES = {"LICENSE", ".gitignore"}
NEVER_ENTERED = {".git", ".venv", "__pycache__", ".flwr"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "flwr_args", nargs=argparse.REMAINDER, help="`flwr run` arguments: [APP] [SUPERLINK] ..."
    )


def run(args: argparse.Namespace) -> int:
    argv = with_client_resources([a for a in args.flwr_args if a != "--"], _cores())
    local_port = _local_port()
    was_up = port_open(local_port)
    with tempfile.TemporaryDirectory(prefix="fedvox-app-") as tmp:
        try:
            return _run_and_wait(with_app_copy(argv, Path(tmp)))
        finally:
            if not was_up and port_open(local_port):
                _end_local_superlink(local_port)


def with_app_copy(argv: list[str], into: Path) -> list[str]:
    """`argv` with its app folder replaced by a copy in `into` of the files Flower may put
    in its bundle; `argv` itself where the app is not a plain local folder Flower's
    defaults describe (a hub app, a missing folder, fab-include patterns of its own)."""
    at = _positional_indices(argv)
    app = Path(argv[at[0]] if at else ".")
    try:
        pyproject = tomllib.loads((app / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return argv  # not a local app folder: Flower says what is wrong with it
    if "fab-include" in pyproject.get("tool", {}).get("flwr", {}).get("app", {}):
        return argv
    ignored = _gitignore(app)
    for root, dirs, files in os.walk(app):
        here = Path(root).relative_to(app)
        dirs[:] = [
            d
            for d in dirs
            if d not in NEVER_ENTERED
            and not ignored.match_file(f"{(here / d).as_posix()}/")
            and not (Path(root, d) / "pyvenv.cfg").exists()
        ]
        for name in files:
            rel = here / name
            wanted = Path(name).suffix in FAB_SUFFIXES or name in FAB_NAMES
            if (
                wanted
                and not Path(root, name).is_symlink()
                and not ignored.match_file(rel.as_posix())
            ):
                (into / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(root, name), into / rel)
    if not at:
        return [str(into), *argv]
    return [*argv[: at[0]], str(into), *argv[at[0] + 1 :]]


def _gitignore(app: Path) -> pathspec.PathSpec:
    try:
        lines = (app / ".gitignore").read_text().splitlines()
    except OSError:
        lines = []
    return pathspec.GitIgnoreSpec.from_lines(lines)


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
    at = _positional_indices(argv)
    return argv[at[1]] if len(at) > 1 else None


def _positional_indices(argv: list[str]) -> list[int]:
    """Where `flwr run`'s positionals [APP] [SUPERLINK] are in `argv`."""
    at, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a in VALUE_OPTIONS:
            skip = True
        elif not a.startswith("-"):
            at.append(i)
    return at


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


def with_client_resources(argv: list[str], cores: int) -> list[str]:
    """`argv` with `client-resources-num-cpus` added to its federation config when the run
    goes to the local simulation and the user did not set it: `cores` shared by as many Ray
    actors as hospitals, at most one per core (2 cores, 5 hospitals: 2 actors of 1 CPU) unless
    fewer than twice as many hospitals as cores: then one actor each (2 cores, 3 hospitals:
    3 actors of 1 thread)."""
    overrides = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--federation-config"]
    overrides += [a.split("=", 1)[1] for a in argv if a.startswith("--federation-config=")]
    federation = " ".join(overrides)
    if (
        "client-resources-num-cpus" in federation
        or any(o.endswith(".toml") for o in overrides)  # a file: Flower takes nothing beside it
        or not _is_local_simulation(_superlink_arg(argv))
    ):
        return argv
    found = re.search(r"num-supernodes\s*=\s*(\d+)", federation)
    hospitals = int(found[1]) if found else FLOWER_DEFAULT_SUPERNODES
    if cores < hospitals < 2 * cores and "init-args-num-cpus" not in federation:
        # One actor of 1 thread per hospital, the cores shared: 3 hospitals on 2 actors ran
        # two together and the third alone (a core idle), 13-15 s rounds of the 3D
        # segmentation recipe against 12 s with 3 actors. Ray counts logical CPUs, and
        # Flower's client CPUs are whole numbers, so Ray is told there are `hospitals`.
        extra = f"client-resources-num-cpus=1 init-args-num-cpus={hospitals}"
        return [*argv, "--federation-config", extra]
    cpus = max(1, cores // max(1, min(cores, hospitals)))
    return [*argv, "--federation-config", f"client-resources-num-cpus={cpus}"]


def _is_local_simulation(superlink: str | None) -> bool:
    """Does `flwr run` send this run to a local simulation (connection address ":local:")?"""
    home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    try:
        config = tomllib.loads((home / "config.toml").read_text()).get("superlink", {})
    except (OSError, tomllib.TOMLDecodeError):
        config = {}  # no config yet: `flwr run` creates one whose default is "local"
    name = superlink or config.get("default", "local")
    connection = config.get(name)
    if isinstance(connection, dict):
        return connection.get("address") == ":local:"
    return name == "local"


def _cores() -> int:
    """The cores this process may use (its affinity set, as Ray sees them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _local_port() -> int:
    return int(os.environ.get(LOCAL_PORT_ENV, "39091"))


def _end_local_superlink(port: int) -> None:
    """End the detached local SuperLink that `flwr run` started, and what it started."""
    pid = pid_listening_on(port)
    if pid is None:
        return
    end_pids([pid, *descendants(pid)])
    print(f"fedvox run: ended the local SuperLink flwr run started (pid {pid})", flush=True)
