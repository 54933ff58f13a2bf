"""The pooled, non-private reference: every hospital's training cases in one place.

What one big hospital could reach without privacy: the same model, optimiser settings and
number of epochs as the federation sees (rounds x local epochs), trained in-process with the
node's own loop (`client.train.local_sgd`, no noise) and measured by the server's own
held-out evaluation (`server.recorder.HoldoutEvaluator`: threshold and temperature from the
hospitals' validation parts, then the holdout).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from client.train import LocalTraining, local_sgd, scheduled_learning_rate
from common.config import RunConfig
from common.eval_release import release
from common.filterbank3d import has_statistics, set_exact_mean
from common.paths import list_sites
from common.schedule import run_progress
from common.site import default_image_size, load_site, read_spec
from common.tasks import ModelSpec, build_task_model, task_for
from server.recorder import HoldoutEvaluator
from simulations.benchmarks.table import held_out_numbers


def run_centralised(data_dir: Path, cfg: RunConfig, seed: int, cache_dir: Path) -> dict:
    """Train on the pooled training parts; the benchmark's numbers of the final model."""
    t0 = time.monotonic()
    dataset = read_spec(data_dir / "holdout")  # the recipe the server would resolve
    cfg = cfg.resolved(dataset.task, dataset.spatial_dims)
    size = cfg.input_size or default_image_size(data_dir / "holdout")  # the server's choice

    def load(site: Path, split: str):
        return load_site(site, split=split, image_size=size, cache_dir=cache_dir, log=lambda m: 0)

    sites = list_sites(data_dir)
    train = [load(s, "train") for s in sites]
    val = {s.name: load(s, "val") for s in sites}
    holdout = load(data_dir / "holdout", "all")
    task = task_for(holdout.spec)
    torch.manual_seed(seed)
    model = build_task_model(ModelSpec.of(holdout, cfg.model_options))
    images = torch.cat([d.images for d in train])
    labels = torch.cat([d.labels for d in train])
    if has_statistics(model):  # filterbank-3d: the exact pooled feature mean (no privacy here)
        set_exact_mean(model, images)
    for settings in _schedule(cfg):
        loss_fn = task.loss_fn(cfg.structure_weight, settings.progress)
        local_sgd(model, images, labels, settings, None, loss_fn)

    site_eval = {
        name: task.evaluate(model, d.images, d.labels) for name, d in val.items() if len(d)
    }
    # Non-private throughout: exact validation counts (the fl reference without DP does the same).
    validation = [
        release(e.logits, val[n].labels, e.per_case, noise=0.0) for n, e in site_eval.items()
    ]
    # the holdout as the federation's final round sees it (test-time flips where set)
    flips = bool(cfg.test_time_flips)
    central, _, _ = HoldoutEvaluator(task, holdout).evaluate(model, validation, flips)
    out = {
        "round": cfg.num_server_rounds * cfg.local_epochs,
        **held_out_numbers(central),
        "site_auc": {n: e.metrics.get("auc") for n, e in site_eval.items()},
        "dice": {k[5:]: float(v) for k, v in central.items() if k.startswith("dice-")},
        "site_dice": {n: e.metrics.get("dice-mean") for n, e in site_eval.items()},
        "max_epsilon_spent": None,
        "wall_s": time.monotonic() - t0,
    }
    if holdout.spec.is_segmentation:
        out["site_auc"] = {}
    else:
        out["site_dice"] = {}
    return out


def _schedule(cfg: RunConfig) -> list[LocalTraining]:
    """A constant rate trains in one go; a schedule trains as many "rounds" as the federation,
    each with a fresh optimiser at that round's rate and progress (slice-unet's focus share),
    like a hospital's local training."""
    rounds = cfg.num_server_rounds
    if cfg.learning_rate_schedule == "constant":
        return [LocalTraining.from_config(cfg, epochs=rounds * cfg.local_epochs)]
    return [
        LocalTraining.from_config(
            cfg,
            learning_rate=scheduled_learning_rate(
                cfg.learning_rate, cfg.learning_rate_schedule, r, rounds
            ),
            progress=run_progress(r, rounds),
        )
        for r in range(1, rounds + 1)
    ]
