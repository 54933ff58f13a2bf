"""What a run leaves for people, after every round: a progress line, server.log, the holdout
record, report.html and model-card.md.

`RunOutputs` is entered by the ServerApp for the whole run (server/app.py) and called by the
recorder after each round (`after_round`). None of it may fail a run: every error here is
logged to server.log and the run goes on.
"""

from __future__ import annotations

from logging import DEBUG, INFO, WARNING
from typing import Any

import torch
from flwr.common.logger import log

from common import metric_registry
from common.site import SiteData
from common.tasks import Evaluation
from server.console import LOG_FILE, RunLog
from server.holdout_record import save_round
from server.report import REPORT, ReportWriter
from server.run_dir import RunDir


class RunOutputs:
    """`with RunOutputs(run, holdout, last_round):` around a run's rounds."""

    def __init__(self, run: RunDir, holdout: SiteData, last_round: int) -> None:
        self.run = run
        self.holdout = holdout
        self.last_round = last_round  # the round this invocation ends with
        self.first_round = run.last_round + 1  # rounds before were a previous invocation's
        self.log = RunLog(run.path)
        self.report = ReportWriter(run.path)

    def __enter__(self) -> RunOutputs:
        self.log.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.finish()
        finally:
            self.log.__exit__(*exc)

    def after_round(
        self,
        global_round: int,
        result: Evaluation | None,
        model: torch.nn.Module,
        flips: bool = False,
    ) -> None:
        """Keep the holdout predictions (`result` None: the holdout was not scored this
        round), print the round's line, refresh the report."""
        central = self.run.summary["rounds"][-1]["central"]
        if result is not None:
            _safely(
                "holdout record",
                save_round,
                self.run.path,
                global_round,
                self.holdout,
                result,
                model,
                central,
                flips,
            )
        log(INFO, "%s", self.progress_line(global_round))
        cost = _safely("report", self.report.refresh, self.run.summary)
        if cost is not None:
            log(DEBUG, "report refreshed in %.3f s", cost)  # server.log only

    def progress_line(self, global_round: int) -> str:
        """round i/N · held-out AUC (or Dice) · max epsilon · round time · ETA."""
        entry = self.run.summary["rounds"][-1]
        central, hospitals = entry["central"], entry["hospitals"].values()
        task = (self.run.summary.get("model") or {}).get("task", "classification")
        key = metric_registry.best_key(task)
        label = metric_registry.label(key)
        score, scored_at = central.get(key), global_round
        if entry.get("holdout_scored") is False:  # holdout-every: the last scored round's
            scored = [r for r in self.run.summary["rounds"] if r.get("central")]
            score = scored[-1]["central"].get(key) if scored else None
            scored_at = scored[-1]["round"] if scored else None
        eps = [h["epsilon_run"] for h in hospitals if h.get("epsilon_run") is not None]
        seconds = float(entry.get("wall_s") or 0) + float(entry.get("central_eval_s") or 0)
        shown = f"held-out {label} {score:.3f}" if score is not None else f"held-out {label} -"
        if score is not None and scored_at != global_round:
            shown += f" (round {scored_at})"
        parts = [f"fedvox round {global_round}/{self.last_round}", shown]
        if global_round == 0:
            return " · ".join(parts + ["initial model"])
        budget = self.run.summary["config"].get("target-epsilon")
        parts.append(f"max ε {max(eps):.2f} of {budget:g}" if eps else "max ε -")
        parts.append(f"round {_duration(seconds)}")
        done = [
            float(r.get("wall_s") or 0) + float(r.get("central_eval_s") or 0)
            for r in self.run.summary["rounds"]
            if r["round"] >= self.first_round
        ]
        left = self.last_round - global_round
        if left > 0 and done:
            parts.append(f"ETA {_duration(left * sum(done) / len(done))}")
        return " · ".join(parts)

    def finish(self) -> None:
        """The final report and model card (after run.end, so they show the run's status)."""
        if _safely("final report", self.report.write, self.run.summary) is not None:
            log(
                INFO,
                "fedvox: report %s, model card %s, details in %s",
                self.run.path / REPORT,
                self.run.path / "model-card.md",
                self.run.path / LOG_FILE,
            )


def _safely(what: str, fn: Any, *args: Any) -> Any:
    """fn(*args); an exception is logged (with its traceback, to server.log) and swallowed:
    a plot must never cost a hospital its training round."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - by design: outputs never fail the run
        log(WARNING, "fedvox: %s failed (%s: %s); the run goes on", what, type(e).__name__, e)
        log(DEBUG, "fedvox: %s traceback", what, exc_info=True)
        return None


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"
