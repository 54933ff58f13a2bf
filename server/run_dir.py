"""A run's outputs: checkpoints every round, `best`, ROC points and `summary.json`.

`summary.json` is rewritten atomically after every round, so a run that dies
keeps everything it finished; `resume-from` reads it back and continues the
round numbering from the last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

SUMMARY = "summary.json"


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null (json.dump would write invalid JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as f:
        json.dump(_clean(payload), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoints = path / "checkpoints"

    # -- checkpoints -----------------------------------------------------------
    def save_checkpoint(
        self,
        round_: int,
        state_dict: dict[str, torch.Tensor],
        model_config: dict[str, Any],
        best: bool,
    ) -> Path:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        payload = {"round": round_, "model": model_config, "state_dict": state_dict}
        target = self.checkpoints / f"round-{round_:03d}.pt"
        tmp = target.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, target)
        for alias in ["last"] + (["best"] if best else []):
            torch.save(payload, self.checkpoints / f"{alias}.tmp")
            os.replace(self.checkpoints / f"{alias}.tmp", self.checkpoints / f"{alias}.pt")
        return target

    def save_artifact(self, kind: str, round_: int, payload: Any) -> None:
        """Per-round JSON beside the summary, e.g. `roc/round-003.json` (ROC points)."""
        write_json(self.path / kind / f"round-{round_:03d}.json", payload)

    # -- summary ---------------------------------------------------------------
    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / SUMMARY, summary)

    def read_summary(self) -> dict[str, Any]:
        return json.loads((self.path / SUMMARY).read_text())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `RunDir.save_checkpoint` (weights only, safe to load)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def resolve_resume(resume_from: Path) -> tuple[RunDir, dict[str, Any], dict[str, Any]]:
    """(run dir, summary, last checkpoint) of a stopped run; clear errors naming the path."""
    run_path = resume_from.parent if resume_from.is_file() else resume_from
    summary_path = run_path / SUMMARY
    last = run_path / "checkpoints" / "last.pt"
    if not summary_path.is_file() or not last.is_file():
        raise FileNotFoundError(
            f"resume-from={resume_from}: expected a run folder with {SUMMARY} and "
            "checkpoints/last.pt"
        )
    run = RunDir(run_path)
    return run, run.read_summary(), load_checkpoint(last)
