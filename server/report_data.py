"""What the report and the model card say, computed from a run folder alone.

Everything comes from `summary.json` (rounds, hospitals, config) and the server's holdout
records (server/holdout_record.py), so `fedvox report RUN_DIR` works on a finished run as well
as inside the ServerApp after each round. Functions here return plain numbers and lists; the
plots are server/report_figures.py, the page server/report.py, the card server/model_card.py.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from common import metric_registry
from common.calibration import scale_probs
from server.holdout_record import load_round
from server.learnability import not_learned_warning

SOFTWARE = ("fedvox", "torch", "flwr", "opacus", "monai", "nibabel", "numpy", "matplotlib")


@dataclass
class RunView:
    path: Path
    summary: dict[str, Any]
    last: dict[str, Any] | None  # holdout record of the last scored round (holdout-every)
    best: dict[str, Any] | None  # ... of the best round

    @classmethod
    def load(cls, run_dir: Path, summary: dict[str, Any] | None = None) -> RunView:
        run_dir = Path(run_dir)
        if summary is None:
            summary = json.loads((run_dir / "summary.json").read_text())
        scored = [r for r in summary.get("rounds") or [] if r.get("holdout_scored") is not False]
        last_round = scored[-1]["round"] if scored else None
        best_round = (summary.get("best") or {}).get("round")
        last = load_round(run_dir, last_round)
        best = last if best_round == last_round else load_round(run_dir, best_round)
        return cls(run_dir, summary, last, best)

    @property
    def task(self) -> str:
        return str(self.summary.get("model", {}).get("task", "classification"))

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return self.summary.get("rounds") or []

    @property
    def last_scored(self) -> dict[str, Any]:
        """The summary entry of the last round whose model was scored on the holdout (every
        round, unless holdout-every skipped some); {} before any."""
        scored = [r for r in self.rounds if r.get("holdout_scored") is not False]
        return scored[-1] if scored else {}

    @property
    def best_round(self) -> int | None:
        return (self.summary.get("best") or {}).get("round")

    def series(self, key: str) -> list[float | None]:
        return [r.get("central", {}).get(key) for r in self.rounds]

    def metric_keys(self) -> list[str]:
        """Held-out metrics drawn per round: AUC etc., or Dice per class."""
        keys = [k for r in self.rounds for k in r.get("central", {})]
        if self.task == metric_registry.SEGMENTATION:
            return list(dict.fromkeys(k for k in keys if metric_registry.is_metric_key(k)))
        return [m.name for m in metric_registry.for_task(self.task) if m.name in keys]

    def sites(self) -> list[str]:
        names = {s for r in self.rounds for s in r.get("hospitals", {})}
        return sorted(names, key=lambda s: (len(s), s))  # hospital-2 before hospital-10

    def epsilon(self) -> dict[str, list[float | None]]:
        return {
            s: [r.get("hospitals", {}).get(s, {}).get("epsilon_run") for r in self.rounds]
            for s in self.sites()
        }

    def wall_s(self) -> float:
        return float(sum(round_seconds(r) for r in self.rounds))


def class_warnings(view: RunView) -> list[str]:
    """Segmentation: the classes the model has not learned (last evaluated round) and, from
    the hospitals' first released counts, whether the run could learn small classes at all."""
    warnings = []
    last = view.last_scored
    if last and (missed := not_learned_warning(last.get("central", {}))):
        warnings.append(f"After round {last['round']}: {missed}")
    if early := (view.summary.get("learnability") or {}).get("warning"):
        warnings.append(early)
    return warnings


def round_seconds(entry: dict[str, Any]) -> float:
    """A round's wall time: since the previous evaluation ended, plus its own evaluation."""
    return float(entry.get("wall_s") or 0) + float(entry.get("central_eval_s") or 0)


def classification_view(record: dict[str, Any]) -> dict[str, Any]:
    """ROC points, the operating point, confusion matrix and reliability bins of one round."""
    from sklearn.metrics import confusion_matrix, roc_curve

    labels = np.asarray(record["labels"], dtype=np.int64)
    probs = np.asarray(record["probs"], dtype=np.float64)
    k, threshold = probs.shape[1], float(record.get("threshold") or 0.5)
    pred = (probs[:, 1] >= threshold).astype(int) if k == 2 else probs.argmax(1)
    view: dict[str, Any] = {
        "round": record["round"],
        "threshold": threshold,
        "class_names": record.get("class_names") or [str(i) for i in range(k)],
        "confusion": confusion_matrix(labels, pred, labels=list(range(k))),
    }
    if k == 2 and len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, probs[:, 1])
        tn, fp, fn, tp = view["confusion"].ravel()
        view["roc"] = (fpr.tolist(), tpr.tolist())
        view["point"] = (fp / (fp + tn), tp / (tp + fn))
    if k == 2:
        calibrated = scale_probs(probs, float(record.get("temperature") or 1.0))
        view["reliability"] = [
            {"label": "before scaling", **reliability_bins(probs[:, 1], labels)},
            {"label": "after temperature scaling", **reliability_bins(calibrated[:, 1], labels)},
        ]
    return view


def reliability_bins(p: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict[str, list]:
    """Equal-width bins of P(positive): mean confidence, observed positive rate, count."""
    which = np.minimum((p * bins).astype(int), bins - 1)
    out: dict[str, list] = {"confidence": [], "observed": [], "counts": []}
    for b in range(bins):
        inside = which == b
        if inside.any():
            out["confidence"].append(float(p[inside].mean()))
            out["observed"].append(float(labels[inside].mean()))
            out["counts"].append(int(inside.sum()))
    return out


def site_table(view: RunView) -> tuple[list[str], list[list[str]]]:
    """Per-hospital rows: status per round, epsilon, local validation metrics (last round)."""
    metric_keys = _site_metric_keys(view)
    header = ["hospital", "status per round", "ε run", "ε lifetime", "δ", "train cases"]
    header += [f"val {k}" for k in metric_keys]
    rows = []
    for site in view.sites():
        entries = [r.get("hospitals", {}).get(site) for r in view.rounds[1:]]
        status = " ".join(_status_mark(e) for e in entries)
        last = next((e for e in reversed(entries) if e), {})
        ev = last.get("eval", {}) if isinstance(last.get("eval"), dict) else {}
        row = [site, status, _fmt(last.get("epsilon_run")), _fmt(last.get("epsilon_lifetime"))]
        row += [_fmt(last.get("delta"), "g"), str(last.get("num_examples") or "-")]
        row += [_fmt(ev.get(k)) for k in metric_keys]
        rows.append(row)
    return header, rows


def site_gap(view: RunView) -> dict[str, Any] | None:
    """Best and worst hospital by the task's score on its own validation part (last round)."""
    key = metric_registry.best_key(view.task)
    if not view.rounds:
        return None
    scores = {
        site: h["eval"][key]
        for site, h in view.rounds[-1].get("hospitals", {}).items()
        if isinstance(h.get("eval"), dict) and h["eval"].get(key) is not None
    }
    scores = {s: float(v) for s, v in scores.items() if np.isfinite(v)}
    if len(scores) < 2:
        return None
    best, worst = max(scores, key=scores.get), min(scores, key=scores.get)
    return {
        "metric": key,
        "best": (best, scores[best]),
        "worst": (worst, scores[worst]),
        "gap": scores[best] - scores[worst],
    }


def _site_metric_keys(view: RunView) -> list[str]:
    keys = [
        k
        for r in view.rounds
        for h in r.get("hospitals", {}).values()
        if isinstance(h.get("eval"), dict)
        for k in h["eval"]
    ]
    wanted = [k for k in dict.fromkeys(keys) if metric_registry.is_metric_key(k)]
    return wanted + (["loss"] if "loss" in keys else [])


def _status_mark(entry: dict | None) -> str:
    if not entry:
        return "·"
    return {"ok": "✓", "refused": "refused", "failed": "failed"}.get(entry.get("status"), "?")


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def environment() -> dict[str, str]:
    """Software versions and the machine the report (or a benchmark) was written on."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in SOFTWARE:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "-"
    out["cpu"] = _cpu_name()
    out["cores"] = str(os.cpu_count())
    # A container or taskset may grant fewer cores than the machine has; timings depend on these.
    if hasattr(os, "sched_getaffinity"):
        out["usable_cores"] = str(len(os.sched_getaffinity(0)))
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
