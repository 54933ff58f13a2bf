"""`model-card.md`: what the model is for, what it was trained on, what it cost in privacy and
how well it did, with the uncertainty a clinician needs to judge that.

Held-out numbers come with 95 % bootstrap confidence intervals (percentile method, cases
resampled with replacement) computed from the server's own holdout predictions of the last
round (server/holdout_record.py); segmentation intervals resample per-case Dice.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from common import metric_registry
from common.calibration import operating_point_warning
from server.report_data import RunView, class_warnings, site_gap

MODEL_CARD = "model-card.md"
BOOTSTRAP = 1000


def bootstrap_classification(
    probs: np.ndarray, labels: np.ndarray, threshold: float, n: int = BOOTSTRAP, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """Binary: {metric: (estimate, low, high)} for every registered binary metric
    (common/metric_registry.py), all resamples at once where the metric can (AUC by the rank
    formula), else one resample at a time."""
    probs, y = np.asarray(probs, float), np.asarray(labels, int)
    rng = np.random.default_rng(seed)
    idx = np.vstack([np.arange(len(y)), rng.integers(0, len(y), (n, len(y)))])  # row 0 = data
    ps, ys = probs[:, 1][idx], y[idx]
    out = {}
    with np.errstate(all="ignore"):
        for m in metric_registry.for_task(metric_registry.CLASSIFICATION, 2):
            if m.resampled is not None:
                values = m.resampled(ps, ys, threshold)
            else:
                values = np.array([m.compute(probs[i], y[i], threshold) for i in idx])
            out[m.name] = _interval(np.asarray(values, float))
    return out


def bootstrap_means(
    per_case: np.ndarray, names: list[str], n: int = BOOTSTRAP, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """Per-column nan-mean of per-case scores (e.g. Dice) with a bootstrap interval."""
    rng = np.random.default_rng(seed)
    idx = np.vstack([np.arange(len(per_case)), rng.integers(0, len(per_case), (n, len(per_case)))])
    out = {}
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of a resample without it
        for j, name in enumerate(names):
            out[name] = _interval(np.nanmean(per_case[:, j][idx], axis=1))
    return out


def _interval(values: np.ndarray) -> tuple[float, float, float]:
    """(estimate on the data itself = row 0, 2.5th and 97.5th percentile of the resamples)."""
    rest = values[1:][np.isfinite(values[1:])]
    if not np.isfinite(values[0]) or not len(rest):
        return (float("nan"),) * 3
    low, high = np.percentile(rest, [2.5, 97.5])
    return float(values[0]), float(low), float(high)


def model_card(view: RunView) -> str:
    s = view.summary
    lines = [
        f"# Model card: fedvox run {s.get('run_name', view.path.name)}",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M')} · run status **{s.get('status')}** · "
        f"{len(view.rounds)} evaluated rounds · checkpoints in `checkpoints/` "
        f"(`last.pt` = round {view.rounds[-1]['round'] if view.rounds else '-'}, "
        f"`best.pt` = round {view.best_round}).",
        "",
        *_intended_use(view),
        *_data(view),
        *_privacy(view),
        *_performance(view),
        *_calibration(view),
        *_spread(view),
        *_limits(view),
    ]
    return "\n".join(lines) + "\n"


def _intended_use(view: RunView) -> list[str]:
    m, prep = view.summary.get("model", {}), view.summary.get("config", {})
    classes = ", ".join(view.last.get("class_names", [])) if view.last else ""
    return [
        "## Intended use",
        "",
        f"Research use: a {m.get('spatial_dims')}D {view.task} model ({m.get('arch')}, input "
        f"{'x'.join(map(str, m.get('image_size', [])))})"
        + (f" for classes {classes}," if classes else ",")
        + " trained by federated learning with differential privacy (fedvox: Flower + Opacus).",
        "Not a medical device and not validated for clinical decisions. Apply it with "
        "`fedvox predict --run <this folder>`, which preprocesses exactly as in training.",
        f"Seed {prep.get('seed')}, strategy {prep.get('strategy')}.",
        "",
    ]


def _data(view: RunView) -> list[str]:
    d = view.summary.get("data", {})
    lines = [
        "## Data",
        "",
        f"- Server holdout: {d.get('holdout_cases')} cases"
        + (f" ({_class_counts(view)})" if view.last and "labels" in view.last else ""),
    ]
    for site in view.sites():
        last = next(
            (r["hospitals"][site] for r in reversed(view.rounds) if site in r.get("hospitals", {})),
            {},
        )
        lines.append(f"- {site}: {last.get('num_examples') or '-'} training cases (last round)")
    lines += ["", "Hospitals' images never left them; only weights and aggregate metrics did.", ""]
    return lines


def _class_counts(view: RunView) -> str:
    labels = np.asarray(view.last["labels"], int)
    names = view.last.get("class_names") or []
    return ", ".join(f"{n} {int((labels == i).sum())}" for i, n in enumerate(names))


def _privacy(view: RunView) -> list[str]:
    cfg = view.summary.get("config", {})
    lines = [
        "## Privacy",
        "",
        f"DP-SGD {'on' if cfg.get('dp', True) else 'OFF'}; target ε = {cfg.get('target-epsilon')}, "
        f"δ = {cfg.get('target-delta')} per hospital over the run, accountant "
        f"`{cfg.get('accountant')}`, clipping norm {cfg.get('max-grad-norm')}.",
        "",
        "| hospital | ε (this run) | ε (dataset lifetime) | δ | noise multiplier | accountant |",
        "|---|---|---|---|---|---|",
    ]
    for site in view.sites():
        h = next(
            (
                r["hospitals"][site]
                for r in reversed(view.rounds)
                if r.get("hospitals", {}).get(site, {}).get("epsilon_run") is not None
            ),
            {},
        )
        lines.append(
            f"| {site} | {_f(h.get('epsilon_run'))} | {_f(h.get('epsilon_lifetime'))} | "
            f"{h.get('delta', '-')} | {_f(h.get('noise_multiplier'))} | {cfg.get('accountant')} |"
        )
    return lines + [""]


def _performance(view: RunView) -> list[str]:
    lines = ["## Held-out performance (server's holdout, last round, 95 % bootstrap CI)", ""]
    record = view.last
    if record is None:
        return lines + ["No holdout predictions recorded.", ""]
    if view.rounds and record.get("round") != view.rounds[-1]["round"]:
        lines += [
            f"Of round {record.get('round')}, the last one the holdout was scored in "
            f"(`holdout-every`); the run stopped after round {view.rounds[-1]['round']}.",
            "",
        ]
    if view.task == "segmentation":
        names = list(metric_registry.segmentation_classes(view.metric_keys()))
        stats = bootstrap_means(np.asarray(record["dice"], float), names)
    elif np.asarray(record["probs"]).shape[1] == 2:
        stats = bootstrap_classification(
            np.asarray(record["probs"]), np.asarray(record["labels"]), record.get("threshold", 0.5)
        )
    else:
        return lines + ["Confidence intervals are computed for binary tasks only.", ""]
    lines += ["| metric | estimate | 95 % CI |", "|---|---|---|"]
    lines += [f"| {k} | {_f(e)} | {_f(lo)}–{_f(hi)} |" for k, (e, lo, hi) in stats.items()]
    if view.task == "segmentation":
        lines += [line for w in class_warnings(view) for line in ("", f"**Warning.** {w}")]
    if view.last_scored.get("test_time_flips"):
        lines += [
            "",
            "Predicted with test-time mirroring (the softmax averaged over each scan and its "
            "mirror images along every axis), as `fedvox predict` uses this model; the "
            "earlier rounds' numbers are single-pass.",
        ]
    best = view.best_round
    if best is not None and view.last_scored and best != view.last_scored["round"]:
        lines += [
            "",
            f"`best.pt` (round {best}) was chosen by this same holdout, so its "
            "held-out numbers are optimistic; the last round's are not.",
        ]
    return lines + [""]


def _calibration(view: RunView) -> list[str]:
    c = view.last_scored.get("central", {})
    if c.get("temperature") is None:
        return []
    return [
        "## Calibration",
        "",
        f"Temperature T = {_f(c.get('temperature'))} and decision threshold "
        f"{_f(c.get('threshold'))} on P(positive), chosen on the hospitals' validation "
        f"aggregates. Expected calibration error on the holdout: {_f(c.get('ece-raw'))} "
        f"before, {_f(c.get('ece'))} after temperature scaling. `fedvox predict` reports the "
        "scaled probability and labels at this threshold.",
        "",
        *([f"**Warning.** {warning}", ""] if (warning := operating_point_warning(c)) else []),
    ]


def _spread(view: RunView) -> list[str]:
    gap = site_gap(view)
    if gap is None:
        return []
    (b, bv), (w, wv) = gap["best"], gap["worst"]
    return [
        "## Per-site spread",
        "",
        f"Local validation {gap['metric']} (last round): best {b} {bv:.3f}, worst {w} {wv:.3f},"
        f" gap {gap['gap']:.3f}. Local validation parts are small; treat single values loosely.",
        "",
    ]


def _limits(view: RunView) -> list[str]:
    return [
        "## Known limits",
        "",
        "- The holdout is one site's data; performance on other scanners and populations may "
        "differ (see the per-site spread).",
        "- DP noise costs accuracy; the ε above bounds what the weights reveal about any one "
        "training case, not what the model's outputs mean clinically.",
        "- Inputs are resized to the model's input size; structures far smaller than a voxel "
        "at that size cannot be found.",
        "- Saliency maps (Grad-CAM) show where the model looked, not why; they are coarse.",
        "",
    ]


def _f(value: Any) -> str:
    if isinstance(value, (int, float)) and np.isfinite(value):
        return f"{value:.3f}"
    return "-"
