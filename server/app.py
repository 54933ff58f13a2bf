"""The federation server: a Flower ServerApp with held-out evaluation every round.

    main: RunConfig.parse -> open_run (holdout, model, run folder; or resume one)
          -> run_rounds (server/rounds.py: train, aggregate, evaluate, record)
          -> finetune_round (once, if finetune-epochs > 0) -> summary.json status

Everything a round leaves behind (checkpoint, ROC points, summary.json entry) is written by
`server.recorder.RoundRecorder` after that round, so a run that dies keeps what it finished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.paths import default_output_dir, demo_data_dir
from common.protocol import RoundPlan
from common.site import SiteData, default_image_size, load_site, read_spec
from common.tasks import ModelSpec, build_task_model, task_for
from common.weights import fingerprint
from server.grid import ResponsiveGrid
from server.outputs import RunOutputs
from server.recorder import HoldoutEvaluator, RoundRecorder
from server.rounds import finetune_round, run_rounds
from server.run_dir import RunDir
from server.secagg import secure_training
from server.strategy import build_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    opened = open_run(RunConfig.parse(context.run_config))
    cfg = opened.cfg
    run, plan = opened.run, opened.plan
    recorder = RoundRecorder(
        run, HoldoutEvaluator(opened.task, opened.holdout), opened.model, plan.round_offset
    )
    outputs = RunOutputs(run, opened.holdout, run.last_round + cfg.num_server_rounds)
    recorder.outputs = outputs
    arrays = ArrayRecord(opened.model.state_dict())
    with outputs:  # one line per round, server.log; report.html + model card after each round
        try:
            if not opened.resumed:  # round 0 = the initial model (a resumed run has it already)
                recorder.record(0, opened.model.state_dict())
            grid = ResponsiveGrid(grid)
            strategy = build_strategy(cfg)
            arrays = run_rounds(
                grid,
                strategy,
                arrays,
                plan,
                cfg.num_server_rounds,
                cfg.round_timeout,
                recorder,
                evaluate_after=lambda r: cfg.evaluates_in(r, plan.total_rounds),
                secure=secure_training(grid, strategy, cfg),  # issue 18: None unless SecAgg+
            )
            if cfg.finetune_epochs and run.last_round >= plan.total_rounds:
                last = replace(plan, server_round=cfg.num_server_rounds)
                recorder.add_finetuned(finetune_round(grid, arrays, last, cfg.round_timeout))
        except BaseException as exc:
            run.end("failed", str(exc))
            raise
        run.end("finished")
        if run.last_round == plan.round_offset:
            log(WARNING, "fedvox: no round completed")
        log(INFO, "fedvox: outputs in %s (summary.json, checkpoints/best.pt, roc/)", run.path)


@dataclass
class OpenedRun:
    cfg: RunConfig  # with every "auto" key resolved for the data
    run: RunDir
    plan: RoundPlan
    task: Any
    holdout: SiteData
    model: torch.nn.Module
    resumed: bool


def open_run(cfg: RunConfig) -> OpenedRun:
    """The holdout, the global model (fresh or resumed) and the run folder of this invocation."""
    data_dir, holdout_dir = resolve_data(cfg)
    dataset = read_spec(holdout_dir)  # dataset.json: the task and 2D/3D pick the recipe
    cfg = cfg.resolved(dataset.task, dataset.spatial_dims)
    output_dir = cfg.path("output-dir") or default_output_dir()
    holdout = load_site(
        holdout_dir,
        split="all",
        image_size=cfg.input_size or default_image_size(holdout_dir),
        cache_dir=output_dir / ".cache",
        log=lambda m: log(INFO, m),
    )
    task = task_for(holdout.spec)
    spec = ModelSpec.of(holdout, cfg.model_options)
    resume = cfg.path("resume-from")
    if resume:
        run, checkpoint = RunDir.resume(resume)
        model = build_task_model(spec)
        model.load_state_dict(checkpoint["state_dict"])
        run.summary.setdefault("resumed", []).append(
            {
                "at_round": run.last_round,
                "time": time.time(),
                "config": cfg.as_dict(),
                "initial_weights_sha256": fingerprint(model.state_dict()),
            }
        )
        log(INFO, "fedvox: resuming %s after round %d", run.path, run.last_round)
    else:
        data = {
            "data_dir": str(data_dir) if data_dir else None,
            "holdout_dir": str(holdout_dir),
            "holdout_cases": len(holdout),
        }
        run = RunDir.create(cfg, output_dir, spec.as_dict(), data)
        torch.manual_seed(cfg.seed)
        model = build_task_model(spec)
    offset = run.last_round
    plan = RoundPlan(
        run_name=run.path.name,
        run_uid=run.run_uid,
        # The privacy plan: nodes calibrate their noise once for this many rounds.
        total_rounds=max(offset + cfg.num_server_rounds, int(run.summary["planned_rounds"])),
        image_size=spec.image_size,
        round_offset=offset,
        recipe=cfg.recipe_values(),
    )
    return OpenedRun(cfg, run, plan, task, holdout, model, resumed=bool(resume))


def resolve_data(cfg: RunConfig) -> tuple[Path | None, Path]:
    """(hospital data dir or None, holdout dir). Empty data-dir + holdout-dir = the demo."""
    data_dir, holdout = cfg.path("data-dir"), cfg.path("holdout-dir")
    if holdout is None and data_dir is None:
        from common.datasets import ensure_demo_data  # the vendored PneumoniaMNIST

        hospitals, alpha, seed = cfg.demo_hospitals, cfg.demo_alpha, cfg.seed
        data_dir = ensure_demo_data(
            demo_data_dir(hospitals, alpha, seed), hospitals=hospitals, alpha=alpha, seed=seed
        )
    if holdout is None:
        holdout = data_dir / "holdout"
    if not holdout.is_dir():
        raise FileNotFoundError(f"holdout-dir {holdout} does not exist")
    return data_dir, holdout
