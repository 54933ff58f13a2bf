"""A run's folder: `summary.json`, checkpoints every round (+ `last`, `best`), ROC points.

Every file is rewritten atomically (`common.files`), so a run that dies keeps everything it
finished; `resume-from` reads the folder back and continues the round numbering from the last
checkpoint. `summary.json` is the run's record: config, model, data, one entry per round
(held-out metrics, every hospital's status and epsilon) and the final `status`.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from common.config import RunConfig
from common.files import atomic_write, atomic_write_json

SUMMARY = "summary.json"


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
            "status": "running",
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
        run = cls(path, json.loads((path / SUMMARY).read_text()))
        checkpoint = load_checkpoint(last)
        if checkpoint["round"] != run.last_round:
            raise ValueError(
                f"resume-from={resume_from}: last.pt is round {checkpoint['round']} but "
                f"{SUMMARY} ends at round {run.last_round}"
            )
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
        atomic_write_json(self.path / SUMMARY, self.summary)

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
            atomic_write(self.checkpoints / f"{name}.pt", lambda f: torch.save(payload, f))

    def save_artifact(self, kind: str, round_: int, payload: Any) -> None:
        """Per-round JSON beside the summary, e.g. `roc/round-003.json` (ROC points)."""
        atomic_write_json(self.path / kind / f"round-{round_:03d}.json", payload)

    def end(self, status: str, error: str | None = None) -> None:
        self.summary["status"] = status
        if error is not None:
            self.summary["error"] = error
        self.write_summary()


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `RunDir.save_checkpoint` (weights only, safe to load)."""
    return torch.load(path, map_location="cpu", weights_only=True)
