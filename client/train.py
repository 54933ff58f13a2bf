"""A hospital's local update: DP-SGD (Opacus) on its own cases, from the global model.

`local_sgd(model, images, labels, settings, noise_multiplier)` is the one training loop of
fedvox: every round, the local fine-tuning and the benchmarks' pooled reference call it.
`LocalTraining` holds its optimiser, clipping and augmentation settings (built from the run
config with `LocalTraining.from_config`), so callers pass one object instead of a dozen
keywords.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common import feature_cache
from common.config import RunConfig
from common.feature_cache import CaseRows, collate_rows
from common.privacy import HistoryEntry, PoissonLoader, make_private, steps_taken
from common.schedule import cosine_decay, run_progress
from common.weights import unwrap


@dataclass
class TrainResult:
    loss: float
    history: list[HistoryEntry]  # (sigma, q, steps) the accountant recorded this round


@dataclass(frozen=True)
class LocalTraining:
    """How a node trains: everything but the data and the noise multiplier."""

    epochs: int
    batch_size: int
    learning_rate: float
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    momentum: float = 0.9
    proximal_mu: float = 0.0
    augmentation: bool = False
    max_physical_batch: int = 0
    # The case count DP-SGD's sampling is planned for: steps per epoch ceil(n / batch_size),
    # sample rate 1 / steps, expected batch n / steps. 0: the data's own count; a node passes
    # its DP-released count, so nothing it sends depends on the exact one.
    planned_examples: int = 0
    # How far the run is: 0 in its first round, (r - 1) / R in round r of R, 1 after it (local
    # fine-tuning). A model whose training view changes over a run reads it (slice-unet's
    # focus share); it changes what is drawn from a case, never how cases are sampled.
    progress: float = 0.0

    @classmethod
    def from_config(
        cls,
        cfg: RunConfig,
        *,
        epochs: int | None = None,
        learning_rate: float | None = None,
        proximal_mu: float = 0.0,
        progress: float = 0.0,
        planned_examples: int = 0,
    ) -> LocalTraining:
        """The run config's settings; `epochs`/`learning_rate` override (schedule, fine-tuning)."""
        return cls(
            epochs=cfg.local_epochs if epochs is None else epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate if learning_rate is None else learning_rate,
            max_grad_norm=cfg.max_grad_norm,
            accountant=cfg.accountant,
            momentum=cfg.momentum,
            proximal_mu=proximal_mu,
            augmentation=cfg.augmentation,
            max_physical_batch=cfg.max_physical_batch,
            planned_examples=planned_examples,
            progress=progress,
        )


def scheduled_learning_rate(base: float, schedule: str, round_: int, total_rounds: int) -> float:
    """The local learning rate of global round `round_` (1-based) of `total_rounds`.

    "constant": `base` every round. "cosine": `base` in round 1 decaying along a half cosine
    towards 0 after the last round — DP noise enters every step in proportion to the learning
    rate, so smaller late steps leave less noise in the final model (at no privacy cost).
    """
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return base * cosine_decay(run_progress(round_, total_rounds))
    raise ValueError(f'learning-rate-schedule="{schedule}": expected "constant" or "cosine"')


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """DP-SGD steps in one epoch: Opacus samples with q = 1/len(loader)."""
    return max(1, -(-num_examples // batch_size))


def augment(
    x: torch.Tensor,
    labels: torch.Tensor | None = None,
    shift: float = 0.1,
    rotate_deg: float = 10.0,
    scale: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random small affine per case (shift up to `shift` of the size, rotation, zoom), 2D or 3D.

    Batched with torch's affine_grid/grid_sample so it costs ~nothing next to a DP step;
    MONAI's RandAffine draws and warps one case at a time, which is far slower on a 2D batch
    (docs/benchmarks.md, "Own code where a library exists").
    It changes the inputs, not the sampling: each case still contributes one clipped
    gradient per step, so the privacy accounting is unaffected. Label maps (segmentation:
    `labels` with the images' spatial shape) move with their image (nearest neighbour,
    background outside); class labels are returned as they are.
    """
    n, d = x.shape[0], x.dim() - 2
    theta = torch.zeros(n, d, d + 1, dtype=x.dtype)
    angle = (torch.rand(n) * 2 - 1) * math.radians(rotate_deg)
    zoom = 1 + (torch.rand(n) * 2 - 1) * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    if d == 3:  # rotate in the first two axes only, zoom the third alike
        theta[:, 2, 2] = 1 / zoom
    theta[:, :, d] = (torch.rand(n, d) * 2 - 1) * 2 * shift  # grid units span [-1, 1]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    if labels is None or labels.shape[2:] != x.shape[2:]:
        return moved, labels
    masks = F.grid_sample(labels.float(), grid, mode="nearest", align_corners=False)
    return moved, masks.round().to(labels.dtype)


def _physical_batches(loader, optimizer, max_physical_batch: int):
    """The loader's batches, split into chunks of <= max_physical_batch under DP."""
    if max_physical_batch <= 0 or not hasattr(optimizer, "signal_skip_step"):
        yield from loader
        return
    with BatchMemoryManager(
        data_loader=loader, max_physical_batch_size=max_physical_batch, optimizer=optimizer
    ) as physical:
        yield from physical


def _training_inputs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: LocalTraining
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a sampled batch trains on: the model's view of each case (slice-unet: one slice
    stack of each volume; already taken by the loader from a `_cases` dataset: a view of a
    view is the view), then augmented. Both act per case after sampling, so each case still
    gives one clipped gradient a step."""
    training_view = getattr(model, "training_view", None)
    if training_view is not None:
        x, y = training_view(x, y, settings.progress)
    if settings.augmentation and len(x):
        x, y = augment(x, y)
    return x, y


def _cases(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: LocalTraining
) -> CaseRows:
    """The dataset the loader samples. A model with a training view (slice-unet) has it taken
    straight from the sampled rows: gathering ~96 whole 64^3 volumes (and their label maps)
    a batch to keep one slice stack of each was ~13 % of a 3D segmentation round."""
    cases = CaseRows(images, labels)
    training_view = getattr(model, "training_view", None)
    if training_view is not None:
        cases.view = lambda x, y, rows: training_view(x, y, settings.progress, rows)
    return cases


def _loader(dataset: TensorDataset, s: LocalTraining, private: bool) -> DataLoader:
    """Shuffled batches; under DP Poisson batches from a fresh generator, q = 1 / steps, the
    steps from the planned count (a node's released one), not the dataset's exact size."""
    if not private:
        return DataLoader(dataset, batch_size=s.batch_size, shuffle=True, collate_fn=collate_rows)
    planned = s.planned_examples or len(dataset)
    steps = steps_per_epoch(planned, s.batch_size)
    return PoissonLoader(dataset, steps, expected_batch_size=planned / steps)


def local_sgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: LocalTraining,
    noise_multiplier: float | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    private: Callable[..., tuple] = make_private,  # no node passes it; only fedvox audit does
) -> TrainResult:
    """Train `model` in place: Opacus DP-SGD (Poisson sampling, per-sample clipping, noise).

    FedProx's proximal term mu/2 * ||w - w_global||^2 is a separate, data-independent step
    after each private update: it needs no clipping or noise and costs no privacy.

    `max_physical_batch` (DP only; 0 = off): a logical (Poisson) batch larger than this is
    split by Opacus' BatchMemoryManager into physical chunks whose clipped gradients are
    summed before the one noisy step, so a large `batch_size` costs the memory of a small one
    with exactly the same privacy accounting.

    `noise_multiplier=None` trains WITHOUT differential privacy (plain SGD, no clipping):
    the non-private reference of the utility benchmark (epsilon = inf); history is empty.
    """
    s = settings
    feature_cache.known(images)  # batches are its rows: a fixed front end finds them unhashed
    loader = _loader(_cases(model, images, labels, s), s, private=noise_multiplier is not None)
    optimizer = torch.optim.SGD(model.parameters(), lr=s.learning_rate, momentum=s.momentum)
    global_params = [p.detach().clone() for p in model.parameters()] if s.proximal_mu > 0 else []
    model.train()  # Opacus refuses a module in eval mode (e.g. after an evaluation)
    engine = None
    dp_model, dp_optimizer, dp_loader = model, optimizer, loader
    if noise_multiplier is not None:
        dp_model, dp_optimizer, dp_loader, engine = private(
            model, optimizer, loader, noise_multiplier, s.max_grad_norm, s.accountant
        )
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    losses: list[float] = []
    with warnings.catch_warnings():
        # Expected with Opacus hooks: image inputs never require gradients.
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        for _ in range(s.epochs):
            for x, y in _physical_batches(dp_loader, dp_optimizer, s.max_physical_batch):
                dp_optimizer.zero_grad(set_to_none=True)
                x, y = _training_inputs(model, x, y, s)
                out = dp_model(x)
                # An empty Poisson batch is still a DP step (noise only): skipping it
                # would change the sampling the accountant assumes.
                loss = loss_fn(out, y) if len(y) else out.sum() * 0.0
                loss.backward()
                dp_optimizer.step()
                if len(y):
                    losses.append(float(loss.detach()))
                if s.proximal_mu > 0 and not getattr(dp_optimizer, "_is_last_step_skipped", False):
                    _proximal_step(unwrap(dp_model), global_params, s.learning_rate * s.proximal_mu)
    loss = float(np.mean(losses)) if losses else float("nan")
    if engine is None:
        return TrainResult(loss=loss, history=[])
    history = steps_taken(engine)
    dp_model._close()  # leave the caller a plain module again (Opacus hooks removed)
    return TrainResult(loss=loss, history=history)


@torch.no_grad()
def _proximal_step(model: nn.Module, global_params: list[torch.Tensor], rate: float) -> None:
    for p, g in zip(model.parameters(), global_params, strict=True):
        p.sub_(rate * (p - g))
