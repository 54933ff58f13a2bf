"""After every round: score the global model on the holdout, keep a checkpoint, write it down.

`HoldoutEvaluator` is the one held-out evaluation of fedvox (the server's, every round, and the
benchmarks' pooled reference): it picks the decision threshold and temperature from the
hospitals' VALIDATION aggregates (`common.calibration`), predicts the holdout once, and
measures the result. `RoundRecorder` adds what a round leaves behind: the checkpoint
(`best` by the task's score), ROC points, the round's entry in summary.json (held-out
metrics, every hospital's status, epsilon and local validation metrics) and one log line.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from flwr.common.logger import log

from common import metric_registry
from common.calibration import Calibration, calibrated_metrics, choose_calibration
from common.eval_release import local_metrics
from common.feature_cache import persisted
from common.predict import predict_fields
from common.protocol import NodeReply
from common.site import SiteData
from common.tasks import Evaluation, Task
from common.weights import fingerprint
from server.learnability import NOT_LEARNED_DICE, learnability, not_learned, not_learned_warning
from server.run_dir import RunDir

if TYPE_CHECKING:
    from server.outputs import RunOutputs


class HoldoutEvaluator:
    def __init__(self, task: Task, holdout: SiteData, features_file: Path | None = None) -> None:
        self.task = task
        self.holdout = holdout
        self.features_file = features_file  # fixed front ends' holdout features, kept on disk

    def evaluate(
        self, model: torch.nn.Module, validation: list[dict[str, Any]], flips: bool = False
    ) -> tuple[dict[str, float | None], Evaluation, Calibration | None]:
        """(held-out metrics, the evaluation, the calibration) of `model`; `validation` are
        the hospitals' releases about this very model (noisy validation histograms); `flips`:
        segmentation predicted with test-time mirroring."""
        calib = choose_calibration(validation)
        chosen = {"threshold": calib.threshold} if calib and calib.threshold is not None else {}
        if flips:
            chosen["flips"] = True  # run config test-time-flips: segmentation only
        with persisted(self.features_file):
            result = self.task.evaluate(model, self.holdout.images, self.holdout.labels, **chosen)
        central = {k: result.metrics.get(k) for k in self.task.central_keys if k in result.metrics}
        if calib is not None and result.logits is not None:
            central.update(calibrated_metrics(result.probs, self.holdout.labels.numpy(), calib))
        return central, result, calib


def scores_holdout(global_round: int, every: int, last_round: int | None) -> bool:
    """Is the global model scored on the holdout after `global_round`? After round 0, every
    `every`-th round (run config holdout-every) and the invocation's `last_round` (None:
    unknown, so every round): the holdout can cost as much CPU as the hospitals' training
    (3D segmentation: 40 volumes of 64^3, docs/benchmarks.md)."""
    return (
        every <= 1 or global_round % every == 0 or last_round is None or global_round >= last_round
    )


class RoundRecorder:
    def __init__(
        self,
        run: RunDir,
        evaluator: HoldoutEvaluator,
        model: torch.nn.Module,
        offset: int,
        test_time_flips: bool = False,
        holdout_every: int = 1,
    ) -> None:
        self.run = run
        self.evaluator = evaluator
        self.model = model  # the server's copy of the global model
        self.offset = offset  # rounds done before this invocation (resume)
        self.best_score = run.best_score(evaluator.task.best_metric)
        self.last_time = time.time()
        self.threshold_margin: float | None = None  # the last calibration's
        self.outputs: RunOutputs | None = None  # progress line, report (set by server/app.py)
        self.test_time_flips = test_time_flips  # how the model is to predict (run config)
        self.holdout_every = holdout_every  # run config holdout-every

    def record(
        self,
        server_round: int,
        state_dict: dict[str, torch.Tensor],
        train: list[NodeReply] = (),
        evaluate: list[NodeReply] = (),
        used: set[str] | None = None,
    ) -> dict[str, float | None]:
        """Evaluate, checkpoint and log the global model after `server_round`; `used`: the
        hashes of the releases the server used so far (each hospital's entry says if its was)."""
        started = time.time()
        global_round = self.offset + server_round
        self.model.load_state_dict(state_dict)
        validation = [r.metrics for r in evaluate if r.ok]
        # test-time-flips: this invocation's last round is evaluated mirrored, as predict uses
        # the model; earlier ones single-pass (8 passes a round: ~40 % more, docs/benchmarks.md)
        flips = self.test_time_flips and global_round == getattr(self.outputs, "last_round", None)
        central, result, calib, operating = self._score(global_round, validation, flips)
        self.threshold_margin = calib.threshold_margin if calib else None
        task = self.evaluator.task
        score = task.score(result.metrics) if result is not None else None
        is_best = score is not None and score > self.best_score
        if is_best:
            self.best_score = score
            self.run.summary["best"] = {"round": global_round, task.best_metric: score}
        self._checkpoint(global_round, is_best, operating, result)
        self.run.summary["rounds"].append(
            {
                "round": global_round,
                "central": central,
                # false: skipped by holdout-every ("central" is {})
                "holdout_scored": result is not None,
                "test_time_flips": flips,
                "weights_sha256": fingerprint(self.model.state_dict()),
                # Wall clock since the previous round's evaluation ended (round 0: since start).
                "wall_s": started - self.last_time,
                "central_eval_s": time.time() - started,
                "hospitals": hospitals_entry(
                    train, evaluate, self.threshold_margin, self._class_names, used or set()
                ),
                # Updates the server refused before aggregation (server/checks.py).
                "rejected": [r.summary() for r in train if r.status == "rejected"],
            }
        )
        self._judge_classes(global_round, central if result is not None else None, train)
        self.run.write_summary()
        self.last_time = time.time()
        if result is not None:
            self._log(global_round, central)
        if self.outputs is not None:
            self.outputs.after_round(global_round, result, self.model, flips)
        return central

    def _checkpoint(
        self, global_round: int, best: bool, operating: dict[str, Any], result: Evaluation | None
    ) -> None:
        holdout = self.evaluator.holdout
        self.run.save_checkpoint(
            global_round,
            self.model.state_dict(),
            self.run.summary["model"],
            best=best,
            predict=predict_fields(
                holdout.preprocess, holdout.spec.class_names, operating, self.test_time_flips
            ),
        )
        for name, artifact in (result.artifacts if result is not None else {}).items():
            self.run.save_artifact(name, global_round, artifact)

    def _score(
        self, global_round: int, validation: list[dict[str, Any]], flips: bool
    ) -> tuple[dict[str, float | None], Evaluation | None, Calibration | None, dict[str, Any]]:
        """(held-out metrics, the evaluation, the calibration, the checkpoint's operating
        point); a round `holdout-every` skips has no metric and no evaluation (None), but its
        checkpoint still gets the operating point the hospitals' releases choose."""
        last_round = getattr(self.outputs, "last_round", None)
        if scores_holdout(global_round, self.holdout_every, last_round):
            central, result, calib = self.evaluator.evaluate(self.model, validation, flips)
            return central, result, calib, central
        calib = choose_calibration(validation)
        point = {"threshold": calib.threshold, "temperature": calib.temperature} if calib else {}
        return {}, None, calib, point

    def add_finetuned(self, replies: list[NodeReply]) -> None:
        """Each hospital's fine-tuned-copy metrics, beside its last-round evaluation."""
        hospitals = self.run.summary["rounds"][-1]["hospitals"]
        for r in replies:
            entry = hospitals.setdefault(r.site, {}).setdefault("eval", {})
            if r.ok:
                tuned = local_metrics(r.metrics, self.threshold_margin, self._class_names)
                entry.update({f"finetuned-{k}": v for k, v in tuned.items()})
                entry["finetuned-epsilon-run"] = r.metrics.get("epsilon-run")
            else:
                entry.update({"finetune-status": r.status, "finetune-reason": r.reason})
        self.run.write_summary()

    def _judge_classes(
        self, global_round: int, central: dict[str, float | None] | None, train: list[NodeReply]
    ) -> None:
        """Segmentation: with the first released counts, can the run learn small classes
        (a warning while most of the budget is still unspent); after every scored round
        (`central` None: not scored), which classes the model has not learned (a warning after
        this invocation's last round)."""
        if getattr(self.evaluator.task, "name", None) != metric_registry.SEGMENTATION:
            return
        summary = self.run.summary
        if "learnability" not in summary and train:
            entry = learnability(summary, list(train))
            if entry is not None:
                summary["learnability"] = entry
                if entry["warning"]:
                    log(WARNING, "fedvox: %s", entry["warning"])
        if central is None:
            return
        missed = not_learned(central)
        summary["not_learned"] = {
            "round": global_round,
            "floor": NOT_LEARNED_DICE,
            "classes": missed,
        }
        if missed and global_round == getattr(self.outputs, "last_round", None):
            log(WARNING, "fedvox: %s", not_learned_warning(central))

    @property
    def _class_names(self) -> tuple[str, ...]:
        return tuple(self.evaluator.holdout.spec.class_names)

    def _log(self, global_round: int, central: dict[str, float | None]) -> None:
        hospitals = self.run.summary["rounds"][-1]["hospitals"].values()
        eps = [h["epsilon_lifetime"] for h in hospitals if h.get("epsilon_lifetime") is not None]
        shown = "  ".join(
            f"{k} {v:.4f}" for k, v in central.items() if v is not None and k != "loss"
        )
        log(
            INFO,
            "fedvox round %d: held-out %s  max hospital lifetime epsilon %s",
            global_round,
            shown,
            f"{max(eps):.2f}" if eps else "-",
        )


def hospitals_entry(
    train: list[NodeReply],
    evaluate: list[NodeReply],
    threshold_margin: float | None = None,
    class_names: tuple[str, ...] = (),
    used: set[str] = frozenset(),
) -> dict[str, dict]:
    """Per-hospital view of one round: training status and epsilon; local validation metrics
    computed here from the hospital's DP release (at the round's pooled threshold); for each
    release its hash and whether the server used it."""
    out: dict[str, dict[str, Any]] = {}
    for r in train:
        m = r.metrics
        out.setdefault(r.site, {}).update(
            {
                "status": r.status,
                "reason": r.reason or None,
                # None under secure aggregation: the count left the hospital only masked.
                "num_examples": int(m["num-examples"]) if "num-examples" in m else None,
                "epsilon_run": m.get("epsilon-run"),
                "epsilon_lifetime": m.get("epsilon-lifetime"),
                "delta": m.get("delta"),
                "noise_multiplier": m.get("noise-multiplier"),
                "data_s": m.get("data-s"),
                "compute_s": m.get("compute-s"),
                "release": r.release or None,
                "used": bool(r.release) and r.release in used,
            }
        )
    for r in evaluate:
        entry = out.setdefault(r.site, {"status": r.status})
        if r.ok:
            entry["eval"] = {
                **local_metrics(r.metrics, threshold_margin, class_names),
                "epsilon_run": r.metrics.get("epsilon-run"),
                "data-s": r.metrics.get("data-s"),
                "compute-s": r.metrics.get("compute-s"),
                "release": r.release or None,
                "used": bool(r.release) and r.release in used,
            }
        else:
            entry["eval"] = {"status": r.status, "reason": r.reason}
    return out
