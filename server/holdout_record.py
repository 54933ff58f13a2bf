"""The server's own holdout, per round: what the report and the model card are drawn from.

summary.json keeps held-out NUMBERS; a reliability diagram, a confusion matrix at the chosen
threshold or a bootstrap confidence interval need the per-case predictions. The holdout is the
server's own data (never a hospital's), so keeping them is no privacy question. Per round:

* classification: `holdout/round-NNN.json`: case ids, true labels, predicted probabilities,
  and the threshold and temperature the round's metrics were computed with;
* segmentation: `holdout/round-NNN.npz`: per-case Dice per foreground class and a few
  held-out slices (image, true and predicted labels on the model grid) for contour plots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.files import atomic_write, atomic_write_json
from common.metrics import batched_logits
from common.site import SiteData
from common.tasks import Evaluation

HOLDOUT_DIR = "holdout"
SLICES = 3  # held-out cases drawn with contours


def save_round(
    run_dir: Path,
    global_round: int,
    holdout: SiteData,
    result: Evaluation,
    model: torch.nn.Module,
    central: dict[str, Any],
    flips: bool = False,
) -> None:
    folder = Path(run_dir) / HOLDOUT_DIR
    cases = [c.case_id for c in holdout.cases]
    if result.logits is not None:
        probs = result.probs
        record = {
            "round": global_round,
            "cases": cases,
            "labels": holdout.labels.tolist(),
            "probs": np.round(probs, 6).tolist(),
            "threshold": central.get("threshold", 0.5),
            "temperature": central.get("temperature", 1.0),
            "class_names": list(holdout.spec.class_names),
        }
        atomic_write_json(
            folder / f"round-{global_round:03d}.json", record, indent=None, shared=True
        )
    elif holdout.spec.is_segmentation:
        arrays = segmentation_record(model, holdout, result.per_case, flips)
        arrays["cases"] = np.asarray(cases)
        atomic_write(
            folder / f"round-{global_round:03d}.npz",
            lambda f: np.savez_compressed(f, **arrays),
            shared=True,
        )


@torch.no_grad()
def segmentation_record(
    model: torch.nn.Module, holdout: SiteData, per_case: np.ndarray, flips: bool = False
) -> dict[str, np.ndarray]:
    """Per-case Dice (N, foreground classes; NaN = structure absent: the round's evaluation)
    and SLICES slices, predicted as that evaluation did (`flips`: test-time mirroring)."""
    chosen = pick_cases(holdout.labels, SLICES)
    preds = torch.zeros((0,))
    if chosen:
        _, logits = next(batched_logits(model, holdout.images[chosen], len(chosen), flips))
        preds = logits.max(1).indices  # argmax over a non-innermost axis is slow on CPU
    images, truths, predicted = [], [], []
    for i, pred in zip(chosen, preds, strict=True):
        truth = holdout.labels[i, 0]
        at = best_slice(truth)
        images.append(_slice(holdout.images[i, 0], at).numpy())
        truths.append(_slice(truth, at).numpy().astype(np.uint8))
        predicted.append(_slice(pred, at).numpy().astype(np.uint8))
    return {
        "dice": np.asarray(per_case, dtype=np.float32),
        "slice_index": np.asarray(chosen, dtype=np.int64),
        "slice_image": np.asarray(images, dtype=np.float32),
        "slice_truth": np.asarray(truths),
        "slice_pred": np.asarray(predicted),
    }


def pick_cases(labels: torch.Tensor, n: int) -> list[int]:
    """The first n cases holding the highest (rarest) label value present, else the first n."""
    top = int(labels.max()) if labels.numel() else 0
    has = [i for i in range(len(labels)) if bool((labels[i] == top).any())]
    rest = [i for i in range(len(labels)) if i not in has]
    return sorted((has + rest)[:n])


def best_slice(mask: torch.Tensor) -> int | None:
    """3D: the axial (last-axis) slice with the most voxels of the highest label; 2D: None."""
    if mask.dim() == 2:
        return None
    top = int(mask.max())
    return int((mask == top).flatten(0, 1).sum(0).argmax()) if top > 0 else mask.shape[-1] // 2


def _slice(volume: torch.Tensor, at: int | None) -> torch.Tensor:
    return volume if at is None else volume[..., at]


def load_round(run_dir: Path, global_round: int | None) -> dict[str, Any] | None:
    """The holdout record of a round (None when absent, e.g. a run from an older fedvox)."""
    if global_round is None:
        return None
    stem = Path(run_dir) / HOLDOUT_DIR / f"round-{int(global_round):03d}"
    if stem.with_suffix(".json").is_file():
        return json.loads(stem.with_suffix(".json").read_text())
    if stem.with_suffix(".npz").is_file():
        with np.load(stem.with_suffix(".npz"), allow_pickle=False) as z:
            return {"round": int(global_round), **{k: z[k] for k in z.files}}
    return None
