"""`fedvox status RUN_DIR`: a run's status and reason, repaired if its ServerApp was killed.

`--resume-config` prints the run's config as `-c` values with `resume-from` set instead, for
`fedvox run . fedvox -c "$(fedvox status RUN_DIR --resume-config)"` (docs/deployment.md).

A ServerApp killed with SIGKILL (or on a machine that stopped) leaves summary.json saying
"running"; this finds no live ServerApp process behind it and writes "stopped" with the reason
(server/run_dir.py `repair_status`). Exit code: 0 finished, 1 failed, 2 stopped, 3 running.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CODES = {"finished": 0, "failed": 1, "stopped": 2, "running": 3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run folder (it holds summary.json)")
    parser.add_argument(
        "--resume-config",
        action="store_true",
        help="print the run's config as `fedvox run -c` values, with resume-from set",
    )


def run(args: argparse.Namespace) -> int:
    from server.run_dir import SUMMARY, repair_status

    path = args.run_dir.expanduser()
    if not (path / SUMMARY).is_file():
        print(f"fedvox status: {path} holds no {SUMMARY}")
        return 2
    if args.resume_config:
        print(resume_config(path))
        return 0
    try:
        summary = repair_status(path)
    except PermissionError:  # the operator reads a service user's run folder, cannot repair it
        import json

        summary = json.loads((path / SUMMARY).read_text())
        print(f"fedvox status: {path} is not writable here; run this as its owner to repair it")
    rounds = [r["round"] for r in summary.get("rounds", [])]
    status = summary.get("status", "unknown")
    span = f"{rounds[0]}-{rounds[-1]}" if rounds else "none"
    print(f"{path.name}: {status}; rounds {span} of {summary.get('planned_rounds', '?')} planned")
    if summary.get("reason") or summary.get("error"):
        print(f"reason: {summary.get('reason') or summary.get('error')}")
    rejected = [x for r in summary.get("rounds", []) for x in r.get("rejected", [])]
    for x in rejected:
        print(f"refused update: {x['site']}: {x['reason']}")
    return CODES.get(status, 2)


def resume_config(path: Path) -> str:
    """The interrupted run's config (summary.json "config", what the server checks a resume
    against) as `-c` values, plus resume-from: `fedvox run . fedvox -c "$(this)"`."""
    import json

    from server.run_dir import SUMMARY
    from simulations.harness.local import run_config_arg

    config = json.loads((path / SUMMARY).read_text()).get("config") or {}
    config = {k: v for k, v in config.items() if v is not None and k != "resume-from"}
    return run_config_arg({**config, "resume-from": str(path.resolve())})
