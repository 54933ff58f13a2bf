"""Small segmentation classes: which ones a run did not learn, and whether it can learn them.

A held-out Dice of 0.000 for a class reads like a number; it means the model never marks that
class. Dice is averaged over the cases that have the class, and a model that predicts nothing
of it scores 0 on each of them, so a class under `NOT_LEARNED_DICE` is named "not learned" in
summary.json, the console, report.html and the model card (`not_learned`).

Whether a run can learn a small class at all depends on how much DP noise its steps carry
against the clipped per-case gradients (docs/benchmarks.md, "Small structures"). The server
knows, from the first training replies, each hospital's released (noisy, rounded) case count
R_k and noise multiplier sigma_k, and from the plan the batch size and the steps of the run.
Hospital k takes T_k = rounds x local epochs x ceil(R_k / batch) steps of expected batch
B_k = R_k / ceil(R_k / batch); each step adds Gaussian noise of std sigma_k C / B_k per
coordinate to a mean of clipped gradients (norm <= C). FedAvg (weights w_k, the released
counts) sums them, so over the run the clipped signal grows as sum_k w_k T_k and the noise as
sqrt(sum_k w_k^2 T_k (sigma_k / B_k)^2): their ratio, in units of one case's clipped gradient,
is `run_signal_to_noise`. Only released or planned values enter it: nothing new leaves a node.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from common import metric_registry
from common.protocol import NodeReply

NOT_LEARNED_DICE = 0.1  # a class whose held-out Dice stays below this is "not learned"
# Between the run signal-to-noise at which the 3D segmentation recipe learned the lung-CT
# phantom's nodule (~20-60 voxels at 64^3) at epsilon 8 on every seed (~445: 3 hospitals x
# 200 cases) and those at which it lost it or found it late and partly (240-290: 3 x 120);
# docs/benchmarks.md, "3D: small structures".
SMALL_CLASS_SNR = 350.0


def not_learned(central: dict[str, Any]) -> dict[str, float]:
    """{class name: held-out Dice} of each segmentation class under `NOT_LEARNED_DICE` (a class
    no holdout case has, Dice NaN, is not judged)."""
    out = {}
    for key, name in metric_registry.segmentation_classes(central).items():
        value = central.get(key)
        if isinstance(value, (int, float)) and value < NOT_LEARNED_DICE:
            out[name] = float(value)
    return out


def not_learned_warning(central: dict[str, Any]) -> str | None:
    """A sentence for the console, the report and the model card naming the classes the model
    has not learned (None when there are none)."""
    missed = not_learned(central)
    if not missed:
        return None
    named = ", ".join(f"{name} (held-out Dice {dice:.3f})" for name, dice in missed.items())
    return (
        f"Not learned: {named}. A Dice under {NOT_LEARNED_DICE:g} is what a model that never "
        "marks the class scores (0 on every case that has it): the model does not find "
        "this class, and its Dice is no measure of quality. Do not use the model for it."
    )


def run_signal_to_noise(
    counts: Iterable[float], sigmas: Iterable[float], batch: int, epochs_per_run: int
) -> float | None:
    """The clipped signal against the DP noise of the whole federated run (module docstring),
    from each hospital's released count and noise multiplier; `epochs_per_run`: rounds x
    local epochs (+ fine-tuning epochs). None without a usable count."""
    pairs = [(float(r), float(s)) for r, s in zip(counts, sigmas, strict=True) if r > 0]
    total = sum(r for r, _ in pairs)
    if not pairs or total <= 0:
        return None
    signal = noise_var = 0.0
    for r, sigma in pairs:
        per_epoch = max(1, math.ceil(r / max(1, batch)))
        steps, expected_batch, w = epochs_per_run * per_epoch, r / per_epoch, r / total
        signal += w * steps
        noise_var += w * w * steps * (sigma / expected_batch) ** 2
    return math.inf if noise_var == 0 else signal / math.sqrt(noise_var)


def learnability(summary: dict[str, Any], train: list[NodeReply]) -> dict[str, Any] | None:
    """summary.json's "learnability" entry from a round's training replies (the first round
    with released counts): the run's signal-to-noise and, below `SMALL_CLASS_SNR`, a warning.
    None for classification, runs without DP, or replies without counts (secure
    aggregation: the counts leave a node only masked)."""
    cfg = summary.get("config") or {}
    task = (summary.get("model") or {}).get("task")
    if task != metric_registry.SEGMENTATION or cfg.get("dp") is False:
        return None
    used = [
        r
        for r in train
        if r.ok
        and float(r.metrics.get("num-examples") or 0) > 0
        and r.metrics.get("noise-multiplier") is not None
    ]
    if not used:
        return None
    counts = [float(r.metrics["num-examples"]) for r in used]
    sigmas = [float(r.metrics["noise-multiplier"]) for r in used]
    epochs = int(summary.get("planned_rounds") or 0) * int(cfg.get("local-epochs") or 1)
    epochs += int(cfg.get("finetune-epochs") or 0)
    snr = run_signal_to_noise(counts, sigmas, int(cfg.get("batch-size") or 1), epochs)
    if snr is None:
        return None
    entry = {
        "signal_to_noise": round(snr, 1),
        "threshold": SMALL_CLASS_SNR,
        "released_counts": counts,
        "noise_multipliers": sigmas,
        "warning": None,
    }
    if snr < SMALL_CLASS_SNR:
        entry["warning"] = (
            f"Small structures at risk: with {len(used)} hospital(s) of ~"
            f"{sum(counts) / len(counts):.0f} released training cases each and noise "
            f"multiplier {max(sigmas):.2f} at ε {cfg.get('target-epsilon')}, the run's "
            f"signal-to-noise is {snr:.0f}, below the {SMALL_CLASS_SNR:.0f} the 3D lung-CT "
            "phantom's nodule needed (docs/benchmarks.md). Small classes will probably not be "
            "learned; more cases per hospital, more hospitals or a larger ε would help."
        )
    return entry
