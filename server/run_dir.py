"""A run's folder: `summary.json`, checkpoints every round (+ `last`, `best`), ROC points.

Every file is rewritten atomically (`common.files`), so a run that dies keeps everything it
finished; `resume-from` reads the folder back and continues the round numbering from the last
checkpoint. `summary.json` is the run's record: config, model, data, one entry per round
(held-out metrics, every hospital's status and epsilon) and the final `status` with its
`reason`: finished | failed | stopped, or running while the ServerApp works. A run whose
ServerApp was killed cannot say so itself: `repair_status` (resume, `fedvox status`) finds
"running" with no live ServerApp process and writes "stopped".
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from common.config import RunConfig
from common.files import atomic_write, atomic_write_json, json_safe
from common.process import alive, this_process

SUMMARY = "summary.json"
FINISHED, FAILED, STOPPED, RUNNING = "finished", "failed", "stopped", "running"


class RunDir:
    """The folder of one run and its summary (kept in memory, written after every change)."""

    def __init__(self, path: Path, summary: dict[str, Any]) -> None:
        self.path = path
        self.checkpoints = path / "checkpoints"
        self.summary = summary

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: RunConfig, output_dir: Path, model: dict, data: dict) -> RunDir:
        """A new run folder; refuses one that already holds a run."""
        run_name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S")
        path = output_dir / run_name
        if (path / SUMMARY).exists():
            raise FileExistsError(
                f"{path} already holds a run; pick another run-name or continue it with "
                f'resume-from="{path}"'
            )
        summary = {
            "planned_rounds": cfg.planned_rounds,
            "run_name": run_name,
            "run_uid": uuid.uuid4().hex,
            "status": RUNNING,
            "started_at": time.time(),  # with ended_at: the run's wall (fedvox bench speed)
            "server": this_process(),  # so a killed run can be told from a running one
            "config": cfg.as_dict(),
            "model": model,
            "data": data,
            "rounds": [],
            "best": None,
        }
        return cls(path, summary)

    @classmethod
    def resume(cls, resume_from: Path) -> tuple[RunDir, dict[str, Any]]:
        """(run dir, last checkpoint) of a stopped run; clear errors naming the path."""
        path = resume_from.parent if resume_from.is_file() else resume_from
        last = path / "checkpoints" / "last.pt"
        if not (path / SUMMARY).is_file() or not last.is_file():
            raise FileNotFoundError(
                f"resume-from={resume_from}: expected a run folder with {SUMMARY} and "
                "checkpoints/last.pt"
            )
        previous = repair_status(path)
        run = cls(path, json.loads((path / SUMMARY).read_text()))
        checkpoint = load_checkpoint(last)
        if checkpoint["round"] != run.last_round:
            raise ValueError(
                f"resume-from={resume_from}: last.pt is round {checkpoint['round']} but "
                f"{SUMMARY} ends at round {run.last_round}"
            )
        server = previous.get("server") or {}
        # Only a run still marked running can have a live ServerApp; one process can host
        # several runs in turn (the Simulation Engine), so our own pid is not "another" server.
        still_marked = previous.get("status") == RUNNING and server.get("pid") != os.getpid()
        if still_marked and server.get("host") == this_process()["host"]:
            if alive(server.get("pid"), server.get("started")):
                raise RuntimeError(
                    f"resume-from={resume_from}: its ServerApp (pid {server['pid']}) is still "
                    "running; stop it first (flwr stop), or wait for it to end"
                )
        left = int(run.summary["planned_rounds"]) - run.last_round
        if left <= 0:
            raise ValueError(
                f"resume-from={resume_from}: the run already completed its "
                f"{run.summary['planned_rounds']} planned rounds (its nodes' noise is calibrated "
                "for them); start a new run instead"
            )
        run.summary["previous"] = {
            "status": previous.get("status"),
            "reason": previous.get("reason"),
        }
        run.summary.update(status=RUNNING, server=this_process(), reason=None)
        return run, checkpoint

    # -- reading ----------------------------------------------------------------------------
    @property
    def run_uid(self) -> str:
        return str(self.summary["run_uid"])

    @property
    def last_round(self) -> int:
        rounds = self.summary["rounds"]
        return int(rounds[-1]["round"]) if rounds else 0

    def best_score(self, metric: str) -> float:
        value = (self.summary.get("best") or {}).get(metric)
        return float(value) if value is not None else -math.inf

    # -- writing ----------------------------------------------------------------------------
    def write_summary(self) -> None:
        atomic_write_json(self.path / SUMMARY, self.summary, shared=True)

    def save_checkpoint(
        self,
        round_: int,
        state_dict: dict[str, torch.Tensor],
        model: dict,
        best: bool,
        predict: dict | None = None,
    ) -> None:
        """round-NNN.pt, and the same payload as last.pt (and best.pt when it is the best).
        `predict`: what `fedvox predict` needs besides the weights (common.predict)."""
        payload = {"round": round_, "model": model, "state_dict": state_dict}
        if predict is not None:
            payload["predict"] = predict
        for name in [f"round-{round_:03d}", "last"] + (["best"] if best else []):
            atomic_write(self.checkpoints / f"{name}.pt", lambda f: torch.save(payload, f), True)

    def save_artifact(self, kind: str, round_: int, payload: Any) -> None:
        """Per-round JSON beside the summary, e.g. `roc/round-003.json` (ROC points)."""
        atomic_write_json(self.path / kind / f"round-{round_:03d}.json", payload, shared=True)

    def end(self, status: str, reason: str) -> None:
        """The run's last word: finished | failed | stopped, and why."""
        self.summary.update(status=status, reason=reason, ended_at=time.time())
        if status == FAILED:
            self.summary["error"] = reason  # the key earlier fedvox versions wrote
        self.write_summary()


def write_failed(output_dir: Path, run_name: str, config: dict, reason: str) -> Path:
    """summary.json of a run that failed before it had a run folder (bad config, missing
    data): a new folder `output_dir/run_name`, never over an existing run's summary."""
    name = run_name if run_name and "/" not in run_name and run_name not in (".", "..") else ""
    path = output_dir / (name or time.strftime("%Y%m%d-%H%M%S"))
    if (path / SUMMARY).exists():
        path = output_dir / f"{path.name}-failed-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = {
        "run_name": path.name,
        "status": FAILED,
        "reason": reason,
        "error": reason,
        "ended_at": time.time(),
        "config": json_safe(dict(config)),
        "model": None,
        "data": None,
        "rounds": [],
        "best": None,
    }
    atomic_write_json(path / SUMMARY, summary, shared=True)
    return path


def repair_status(path: Path) -> dict[str, Any]:
    """The run's summary, with a "running" status whose ServerApp is gone made "stopped"
    (written back). A ServerApp on another machine cannot be checked: it counts as alive."""
    summary = json.loads((path / SUMMARY).read_text())
    server = summary.get("server") or {}
    if summary.get("status") != RUNNING:
        return summary
    same_host = server.get("host") in (None, this_process()["host"])
    if same_host and not alive(server.get("pid"), server.get("started")):
        last = summary["rounds"][-1]["round"] if summary.get("rounds") else None
        summary.update(
            status=STOPPED,
            reason=(
                "interrupted: the ServerApp ended without a word (killed, or its machine "
                f'stopped) after round {last}; continue it with resume-from="{path}"'
            ),
            ended_at=time.time(),
        )
        atomic_write_json(path / SUMMARY, summary, shared=True)
    return summary


# Keys a resumed run may set differently from the interrupted one: how long and with how
# few hospitals to wait, where the folder is named from. Rounds: a resumed run keeps the
# interrupted run's planned rounds (its nodes' noise is calibrated for them) whatever these say.
RESUME_MAY_CHANGE = frozenset(
    {
        "resume-from",
        "num-server-rounds",
        "total-rounds",
        "round-timeout",
        "min-nodes",
        "output-dir",
        "run-name",
        "holdout-every",
    }  # fmt: skip
)


def check_resume_config(run: RunDir, config: dict[str, Any], resume_from: Path) -> None:
    """ValueError naming every key whose value differs from the interrupted run's (its
    summary.json "config"): the model, the data and the nodes' privacy plan must not change."""
    before = run.summary.get("config") or {}
    changed = [
        f"{key}={config[key]!r} (the run had {before[key]!r})"
        for key in sorted(set(config) & set(before) - RESUME_MAY_CHANGE)
        if json_safe(config[key]) != before[key]
    ]
    if changed:
        raise ValueError(
            f"resume-from={resume_from}: {'; '.join(changed)}; resume with the keys in its "
            f'{SUMMARY} "config"'
        )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `RunDir.save_checkpoint` (weights only, safe to load)."""
    return torch.load(path, map_location="cpu", weights_only=True)
