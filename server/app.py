"""The federation server: a Flower ServerApp with held-out evaluation every round.

Flow: resolve data + run folder -> initial (or resumed) global model -> the
chosen Flower strategy runs the rounds -> after every round `evaluate_round`
scores the global model on the holdout folder, writes a checkpoint (and
`best`), ROC points and `summary.json`.
"""

from __future__ import annotations

import math
import time
import uuid
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.calibration import SUMMARY_KEYS, calibrated_metrics, choose_calibration
from common.metrics import predict_probs
from common.paths import absolute, default_output_dir, demo_data_dir
from common.site import default_image_size, load_site
from common.tasks import model_options, task_for
from common.weights import fingerprint
from server.grid import ResponsiveGrid
from server.run_dir import RunDir, resolve_resume
from server.strategy import build_strategy

app = ServerApp()


def _path(cfg: dict[str, Any], key: str) -> Path | None:
    return absolute(cfg[key], key) if cfg.get(key) else None


def resolve_data(cfg: dict[str, Any]) -> tuple[Path | None, Path]:
    """(hospital data dir or None, holdout dir). Empty data-dir + holdout-dir = the demo."""
    data_dir, holdout = _path(cfg, "data-dir"), _path(cfg, "holdout-dir")
    if holdout is None and data_dir is None:
        from common.datasets import ensure_demo_data  # the vendored PneumoniaMNIST

        data_dir = ensure_demo_data(
            demo_data_dir(
                int(cfg.get("demo-hospitals", 5)),
                float(cfg.get("demo-alpha", 0.5)),
                int(cfg.get("seed", 0)),
            ),
            hospitals=int(cfg.get("demo-hospitals", 5)),
            alpha=float(cfg.get("demo-alpha", 0.5)),
            seed=int(cfg.get("seed", 0)),
        )
    if holdout is None:
        holdout = data_dir / "holdout"
    if not holdout.is_dir():
        raise FileNotFoundError(f"holdout-dir {holdout} does not exist")
    return data_dir, holdout


def _image_size(cfg: dict[str, Any]) -> tuple[int, ...] | None:
    raw = str(cfg.get("image-size", "")).strip()
    if not raw:
        return None
    try:
        return tuple(int(s) for s in raw.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise ValueError(f'image-size={raw!r}: expected e.g. "28,28" or "32,32,32"') from None


@app.main()
def main(grid: Grid, context: Context) -> None:
    t_main = time.time()
    cfg = dict(context.run_config)
    rounds = int(cfg["num-server-rounds"])
    data_dir, holdout_dir = resolve_data(cfg)
    output_dir = _path(cfg, "output-dir") or default_output_dir()

    holdout = load_site(
        holdout_dir,
        split="all",
        image_size=_image_size(cfg) or default_image_size(holdout_dir),
        cache_dir=output_dir / ".cache",
        log=lambda m: log(INFO, m),
    )
    task = task_for(holdout.spec)
    model_config = {
        "task": task.name,
        "spatial_dims": holdout.spatial_dims,
        "in_channels": holdout.in_channels,
        "num_classes": holdout.num_classes,
        **model_options(cfg),
        "image_size": list(holdout.images.shape[2:]),
    }

    def new_model() -> torch.nn.Module:
        return task.build_model(
            holdout.spatial_dims,
            holdout.in_channels,
            holdout.num_classes,
            image_size=tuple(holdout.images.shape[2:]),
            **model_options(cfg),
        )

    resume = _path(cfg, "resume-from")
    if resume:
        run, summary, checkpoint = resolve_resume(resume)
        offset = int(summary["rounds"][-1]["round"]) if summary["rounds"] else 0
        if checkpoint["round"] != offset:
            raise ValueError(
                f"resume-from={resume}: last.pt is round {checkpoint['round']} but "
                f"summary.json ends at round {offset}"
            )
        model = new_model()
        model.load_state_dict(checkpoint["state_dict"])
        summary.setdefault("resumed", []).append(
            {
                "at_round": offset,
                "time": time.time(),
                "config": cfg,
                "initial_weights_sha256": fingerprint(model.state_dict()),
            }
        )
        best_score = float((summary.get("best") or {}).get(task.best_metric) or -math.inf)
        log(INFO, "fedvox: resuming %s after round %d", run.path, offset)
    else:
        run_name = str(cfg.get("run-name") or time.strftime("%Y%m%d-%H%M%S"))
        run = RunDir(output_dir / run_name)
        if (run.path / "summary.json").exists():
            raise FileExistsError(
                f"{run.path} already holds a run; pick another run-name or continue it with "
                f'resume-from="{run.path}"'
            )
        offset, best_score = 0, -math.inf
        torch.manual_seed(int(cfg.get("seed", 0)))
        model = new_model()
        summary = {
            "planned_rounds": max(rounds, int(cfg.get("total-rounds", 0) or 0)),
            "run_name": run_name,
            "run_uid": uuid.uuid4().hex,
            "status": "running",
            "config": cfg,
            "model": model_config,
            "data": {
                "data_dir": str(data_dir) if data_dir else None,
                "holdout_dir": str(holdout_dir),
                "holdout_cases": len(holdout),
            },
            "rounds": [],
            "best": None,
        }

    strategy = build_strategy(
        str(cfg.get("strategy", "fedavg")), cfg, min_nodes=int(cfg.get("min-nodes", 2))
    )
    node_config = ConfigRecord(
        {
            "run-name": run.path.name,
            "run-uid": summary["run_uid"],
            "round-offset": offset,
            # The privacy plan: nodes calibrate their noise once for this many rounds.
            "total-rounds": max(offset + rounds, int(summary.get("planned_rounds", 0))),
            "image-size": model_config["image_size"],
        }
    )

    clock = {"last": t_main}

    def evaluate_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal best_score
        if resume and server_round == 0:
            return None  # round `offset` is already in the summary
        global_round = offset + server_round
        t_eval = time.time()
        model.load_state_dict(arrays.to_torch_state_dict())
        replies = getattr(strategy, "hospital_replies", {}).get(server_round, {})
        # Decision threshold + temperature from the hospitals' validation aggregates for
        # this very model (common/calibration.py); the holdout only measures the result.
        calib = choose_calibration(
            [r.get("metrics", {}) for r in replies.get("evaluate", []) if r["status"] == "ok"]
        )
        chosen = {"threshold": calib.threshold} if calib and calib.threshold is not None else {}
        result = task.evaluate(model, holdout.images, holdout.labels, **chosen)
        central = {k: result.metrics.get(k) for k in task.central_keys if k in result.metrics}
        if calib is not None:
            probs = predict_probs(model, holdout.images)
            central.update(calibrated_metrics(probs, holdout.labels.numpy(), calib))
        score = task.score(result.metrics)
        is_best = score is not None and score > best_score
        if is_best:
            best_score = score
            summary["best"] = {"round": global_round, task.best_metric: score}
        run.save_checkpoint(global_round, model.state_dict(), model_config, best=is_best)
        for name, artifact in result.artifacts.items():
            run.save_artifact(name, global_round, artifact)
        summary["rounds"].append(
            {
                "round": global_round,
                "central": central,
                "weights_sha256": fingerprint(model.state_dict()),
                # Wall clock since the previous round's evaluation ended (round 0: since start).
                "wall_s": t_eval - clock["last"],
                "central_eval_s": time.time() - t_eval,
                "hospitals": _hospitals(replies),
            }
        )
        run.write_summary(summary)
        clock["last"] = time.time()
        eps = [
            h["epsilon_lifetime"]
            for h in summary["rounds"][-1]["hospitals"].values()
            if h.get("epsilon_lifetime") is not None
        ]
        shown = "  ".join(
            f"{k} {v:.4f}" for k, v in central.items() if v is not None and k != "loss"
        )
        log(
            INFO,
            "fedvox round %d: held-out %s  max hospital epsilon %s",
            global_round,
            shown,
            f"{max(eps):.2f}" if eps else "-",
        )
        return MetricRecord({k: float(v) for k, v in central.items() if v is not None})

    try:
        strategy.start(
            grid=ResponsiveGrid(grid),
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=rounds,
            timeout=float(cfg.get("round-timeout", 3600)),
            train_config=ConfigRecord(dict(node_config)),
            evaluate_config=ConfigRecord(dict(node_config)),
            evaluate_fn=evaluate_round,
        )
    except BaseException as exc:
        summary["status"] = "failed"
        summary["error"] = str(exc)
        run.write_summary(summary)
        raise
    summary["status"] = "finished"
    run.write_summary(summary)
    if not summary["rounds"]:
        log(WARNING, "fedvox: no round completed")
    log(INFO, "fedvox: outputs in %s (summary.json, checkpoints/best.pt, roc/)", run.path)


def _hospitals(replies: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per-hospital view of one round: training status, epsilon, local evaluation."""
    out: dict[str, dict[str, Any]] = {}
    for r in replies.get("train", []):
        m = r.get("metrics", {})
        entry = out.setdefault(r["site"], {})
        entry.update(
            {
                "status": r["status"],
                "reason": r["reason"] or None,
                "num_examples": int(m.get("num-examples", 0)),
                "epsilon_run": m.get("epsilon-run"),
                "epsilon_lifetime": m.get("epsilon-lifetime"),
                "delta": m.get("delta"),
                "train_loss": m.get("train-loss"),
                "noise_multiplier": m.get("noise-multiplier"),
                "steps": m.get("steps"),
                "data_s": m.get("data-s"),
                "compute_s": m.get("compute-s"),
            }
        )
    for r in replies.get("evaluate", []):
        entry = out.setdefault(r["site"], {"status": r["status"]})
        if r["status"] == "ok":
            # Calibration aggregates are used above, not kept (long lists).
            entry["eval"] = {k: v for k, v in r.get("metrics", {}).items() if k not in SUMMARY_KEYS}
        else:
            entry["eval"] = {"status": r["status"], "reason": r["reason"]}
    return out
