"""What SecAgg+'s quantisation costs, paired: the same DP updates aggregated two ways.

    python -m simulations.benchmarks.secagg_cost [--rounds 3] [--hospitals 5] [--out result.json]

Two federations on the demo data walk side by side from the same initial model. Every round,
each hospital trains with DP-SGD (`client.train.local_sgd`, the run's recipe) from its
federation's global model with the SAME torch seed in both; then one federation takes plain
FedAvg of the updates, the other the aggregate Flower's SecAgg+ computes: Flower's own
`quantize` of weight/max_weight x update (fedvox's settings, common/secagg_settings.py), the integer
sum, `dequantize` and the division by the summed quantised weights, exactly as
`SecAggPlusWorkflow.unmask_stage` does. The pairwise and private masks are left out: they
cancel exactly in the modular sum, so the unmasked sum is the same integers. Reported: the
largest coordinate difference between the two global models and both held-out AUCs per round.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from client.train import LocalTraining, local_sgd, steps_per_epoch
from common.config import RunConfig
from common.privacy import calibrate_noise_multiplier, pinned_generators
from common.secagg_settings import QUANTIZATION
from common.site import SiteData, load_site
from common.tasks import ModelSpec, build_task_model, task_for


def secagg_mean(updates: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    """The weighted mean SecAgg+ unmasks (flwr secaggplus_mod + SecAggPlusWorkflow maths)."""
    q = QUANTIZATION
    total_q, summed = 0, None
    for update, w in zip(updates, weights, strict=True):
        q_ratio = round(min(w, q.max_weight) / q.max_weight * q.quantization_range)
        scaled = [u * (q_ratio / q.quantization_range) for u in update]
        ints = [
            a.astype(np.int64) for a in quantize(scaled, q.clipping_range, q.quantization_range)
        ]
        summed = ints if summed is None else [a + b for a, b in zip(summed, ints, strict=True)]
        total_q += q_ratio
    out = dequantize(summed, q.clipping_range, q.quantization_range)
    offset = -(len(updates) - 1) * q.clipping_range
    return [(a + offset) * (q.quantization_range / total_q) for a in out]


def plain_mean(updates: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    total = sum(weights)
    return [
        sum(w * u[i] for u, w in zip(updates, weights, strict=True)) / total
        for i in range(len(updates[0]))
    ]


def _train_round(
    state: dict, sites: list[SiteData], cfg: RunConfig, sigma: float, seed: int
) -> list[list[np.ndarray]]:
    """Every hospital's DP update from `state`, each with its own fixed seed."""
    updates = []
    for i, data in enumerate(sites):
        torch.manual_seed(seed * 1000 + i)
        model = build_task_model(ModelSpec.of(data, cfg.model_options))
        model.load_state_dict(state)
        settings = LocalTraining.from_config(cfg)
        with pinned_generators(seed * 1000 + i):  # the same masks and noise in both federations
            local_sgd(
                model,
                data.images,
                data.labels,
                settings,
                sigma,
                task_for(data.spec).loss_fn(cfg.structure_weight),
            )
        trained = getattr(model, "_module", model).state_dict()
        updates.append([(trained[k] - state[k]).double().numpy() for k in state])
    return updates


def _auc(state: dict, holdout: SiteData, cfg: RunConfig) -> float:
    model = build_task_model(ModelSpec.of(holdout, cfg.model_options))
    model.load_state_dict(state)
    evaluation = task_for(holdout.spec).evaluate(model, holdout.images, holdout.labels)
    return float(evaluation.metrics["auc"])


def _apply(state: dict, mean: list[np.ndarray]) -> dict:
    return {
        k: (v.double() + torch.from_numpy(m)).to(v.dtype)
        for (k, v), m in zip(state.items(), mean, strict=True)
    }


def run(data_dir: Path, rounds: int, epsilon: float) -> dict:
    cfg = RunConfig.parse({"target-epsilon": epsilon}).resolved("classification", 2)
    cache = data_dir / ".cache"
    sites = [
        load_site(p, split="train", cache_dir=cache) for p in sorted(data_dir.glob("hospital-*"))
    ]
    holdout = load_site(data_dir / "holdout", split="all", cache_dir=cache)
    torch.manual_seed(0)
    start = build_task_model(ModelSpec.of(holdout, cfg.model_options)).state_dict()
    smallest = min(len(s) for s in sites)
    per_epoch = steps_per_epoch(smallest, cfg.batch_size)
    sigma = calibrate_noise_multiplier(
        epsilon,
        cfg.target_delta,
        1 / per_epoch,
        cfg.num_server_rounds * cfg.local_epochs * per_epoch,
        "rdp",
    )
    weights = [float(len(s)) for s in sites]
    plain, secure, rows = start, start, []
    for r in range(1, rounds + 1):
        up_plain = _train_round(plain, sites, cfg, sigma, r)
        up_secure = _train_round(secure, sites, cfg, sigma, r)
        plain = _apply(plain, plain_mean(up_plain, weights))
        secure = _apply(secure, secagg_mean(up_secure, weights))
        diff = max(float((plain[k] - secure[k]).abs().max()) for k in plain)
        rows.append(
            {"round": r, "max_abs_diff": diff, "auc_fedavg": _auc(plain, holdout, cfg),
             "auc_secagg": _auc(secure, holdout, cfg)}
        )  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return {"epsilon": epsilon, "sigma": sigma, "quantization": vars(QUANTIZATION), "rounds": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from common.datasets import ensure_demo_data
    from common.paths import demo_data_dir

    torch.set_num_threads(1)
    n = args.hospitals
    data = ensure_demo_data(demo_data_dir(n, 0.5, 0), hospitals=n, alpha=0.5, seed=0)
    result = run(data, args.rounds, args.epsilon)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
