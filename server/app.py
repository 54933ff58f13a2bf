"""The federation server: a Flower ServerApp with held-out evaluation every round.

    main: RunConfig.parse -> open_run (holdout, model, run folder; or resume one)
          -> RoundLoop.run (server/rounds.py: train, check, aggregate, evaluate, record)
          -> RoundLoop.finetune (once, if finetune-epochs > 0) -> summary.json status

Everything a round leaves behind (checkpoint, ROC points, summary.json entry) is written by
`server.recorder.RoundRecorder` after that round, so a run that dies keeps what it finished.
Every way a run ends writes summary.json with `status` (finished | failed | stopped) and a
`reason`, a bad config or missing data included (then in a folder of its own), and the
ServerApp then raises, so Flower records the run as failed too (`fedvox run` exits non-zero).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.feature_cache import FEATURES_FILE
from common.paths import default_output_dir, demo_data_dir
from common.protocol import RoundPlan
from common.site import SiteData, default_image_size, load_site, read_spec
from common.tasks import ModelSpec, build_task_model, task_for
from common.weights import fingerprint, load_checkpoint_weights, norm_parameter_names
from server.checks import UpdateChecker
from server.grid import ResponsiveGrid, node_names, wait_for_simulation_runtime
from server.outputs import RunOutputs
from server.recorder import HoldoutEvaluator, RoundRecorder
from server.rounds import RoundLoop
from server.run_dir import FAILED, FINISHED, STOPPED, RunDir, check_resume_config, write_failed
from server.secagg_round import secure_training
from server.strategy import build_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    raw = dict(context.run_config)
    wait_for_simulation_runtime(grid)  # nothing runs beside ray.init() (see its docstring)
    try:
        opened = open_run(RunConfig.parse(raw))
    except Exception as exc:  # before a run folder exists: still a summary.json, then raise
        where = write_failed(_output_dir(raw), str(raw.get("run-name") or ""), raw, str(exc))
        log(ERROR, "fedvox: run failed before round 1: %s (summary in %s)", exc, where)
        raise
    cfg = opened.cfg  # with every "auto" key resolved for the holdout's dataset.json
    run, plan = opened.run, opened.plan
    rounds = plan.total_rounds - plan.round_offset if opened.resumed else cfg.num_server_rounds
    rounds = min(rounds, cfg.num_server_rounds)
    loop = _round_loop(cfg, opened, ResponsiveGrid(grid, min_nodes=cfg.min_nodes))
    outputs = RunOutputs(run, opened.holdout, run.last_round + rounds)
    loop.recorder.outputs = outputs
    arrays = ArrayRecord(opened.model.state_dict())
    with outputs:  # one line per round, server.log; report.html + model card after each round
        try:
            if not opened.resumed:  # round 0 = the initial model (a resumed run has it already)
                loop.recorder.record(0, opened.model.state_dict())
            arrays = loop.run(arrays, rounds)
            if cfg.finetune_epochs and run.last_round >= plan.total_rounds:
                loop.recorder.add_finetuned(loop.finetune(arrays))
            loop.settle(run.last_round)
        except (KeyboardInterrupt, SystemExit) as exc:  # flwr stop, SIGTERM, Ctrl-C
            run.end(STOPPED, f"stopped after round {run.last_round} ({type(exc).__name__})")
            raise
        except BaseException as exc:
            run.end(FAILED, f"{exc}" if str(exc) else type(exc).__name__)
            raise
        done = run.last_round - plan.round_offset
        run.end(FINISHED, f"{done} round(s) trained; the run is at round {run.last_round}")
    log(INFO, "fedvox: outputs in %s (summary.json, checkpoints/best.pt, roc/)", run.path)


def _round_loop(cfg: RunConfig, opened: OpenedRun, grid: ResponsiveGrid) -> RoundLoop:
    run, plan = opened.run, opened.plan
    recorder = RoundRecorder(
        run,
        # next to the holdout's decoded cases (open_run's cache_dir)
        HoldoutEvaluator(opened.task, opened.holdout, run.path.parent / ".cache" / FEATURES_FILE),
        opened.model,
        plan.round_offset,
        cfg.test_time_flips,
        cfg.holdout_every,
    )
    # fedbn: each site keeps its own norm layers, so they are not bounded by one round's DP
    skip = tuple(norm_parameter_names(opened.model)) if cfg.fedbn else ()
    strategy = build_strategy(cfg)
    return RoundLoop(
        grid=grid,
        strategy=strategy,
        plan=plan,
        timeout=cfg.round_timeout,
        recorder=recorder,
        checker=UpdateChecker(cfg, plan.total_rounds, skip),
        evaluate_after=lambda r: cfg.evaluates_in(r, plan.total_rounds),
        used=_used_releases(run.summary),
        names=node_names(grid.inner),  # registered names, until a reply names its site
        secure=secure_training(grid, strategy, cfg),  # None unless SecAgg+
    )


def _used_releases(summary: dict[str, Any]) -> list[str]:
    """The releases an earlier invocation of this run used (resume)."""
    used = []
    for entry in summary.get("rounds", []):
        for h in entry.get("hospitals", {}).values():
            for part in (h, h.get("eval") or {}):
                if part.get("used") and part.get("release"):
                    used.append(part["release"])
    return used


def _output_dir(raw: dict[str, Any]) -> Path:
    """Where a run that failed early writes its summary: output-dir if it is usable."""
    value = raw.get("output-dir")
    if isinstance(value, str) and value and Path(value).expanduser().is_absolute():
        return Path(value).expanduser()
    return default_output_dir()


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
        check_resume_config(run, cfg.as_dict(), resume)
        model = build_task_model(spec)
        load_checkpoint_weights(model, checkpoint["state_dict"], resume)
        run.summary.setdefault("resumed", []).append(
            {
                "at_round": run.last_round,
                "time": time.time(),
                "previous": run.summary.pop("previous", None),  # how the last attempt ended
                "config": cfg.as_dict(),
                "initial_weights_sha256": fingerprint(model.state_dict()),
            }
        )
        log(INFO, "fedvox: resuming %s after round %d", run.path, run.last_round)
    else:
        run = RunDir.create(cfg, output_dir, spec.as_dict(), _data_entry(data_dir, holdout))
        torch.manual_seed(cfg.seed)
        model = build_task_model(spec)
    run.write_summary()  # the run exists (status "running") before round 1
    plan = RoundPlan(
        run_name=run.path.name,
        run_uid=run.run_uid,  # a resumed run keeps its uid: nodes continue its privacy plan
        # The privacy plan: nodes calibrate their noise once for this many rounds. A resumed
        # run keeps its plan (RunDir.resume refuses one with no planned round left).
        total_rounds=int(run.summary["planned_rounds"]) if resume else cfg.planned_rounds,
        image_size=spec.image_size,
        round_offset=run.last_round,
        recipe=cfg.recipe_values(),
    )
    return OpenedRun(cfg, run, plan, task, holdout, model, resumed=bool(resume))


def _data_entry(data_dir: Path | None, holdout: SiteData) -> dict[str, Any]:
    """summary.json "data": where the data came from, and every holdout file left out."""
    bad = [{"file": r.file, "reason": r.reason} for r in holdout.report.bad]
    if bad:
        log(ERROR, "fedvox: %d holdout file(s) left out of evaluation (summary.json)", len(bad))
    return {
        "data_dir": str(data_dir) if data_dir else None,
        "holdout_dir": str(holdout.report.site),
        "holdout_cases": len(holdout),
        "holdout_bad_files": bad,
    }


def resolve_data(cfg: RunConfig) -> tuple[Path | None, Path]:
    """(hospital data dir or None, holdout dir). Empty data-dir + holdout-dir = the demo."""
    data_dir, holdout = cfg.path("data-dir"), cfg.path("holdout-dir")
    if holdout is None and data_dir is None:
        from common.datasets import ensure_demo_data  # the vendored PneumoniaMNIST

        hospitals, alpha, seed = cfg.demo_hospitals, cfg.demo_alpha, cfg.seed
        data_dir = ensure_demo_data(
            demo_data_dir(hospitals, alpha, seed), hospitals=hospitals, alpha=alpha, seed=seed
        )
    if data_dir is not None and not data_dir.is_dir():
        raise FileNotFoundError(f"data-dir {data_dir} does not exist")
    if holdout is None:
        holdout = data_dir / "holdout"
        if not holdout.is_dir():
            raise FileNotFoundError(
                f"data-dir {data_dir} has no holdout/ folder; set holdout-dir to the server's "
                "held-out cases"
            )
    if not holdout.is_dir():
        raise FileNotFoundError(f"holdout-dir {holdout} does not exist")
    return data_dir, holdout
