"""The server's per-round outputs in process, with real parts: a phantom holdout loaded by
`load_site`, the real recorder and evaluator, a real run folder (no Flower simulation).

* a report that cannot be written is logged and the round is still recorded;
* the console filter keeps Flower's strategy chatter and the recorder's detail line off the
  console, and server.log gets them;
* the per-round report refresh reports its cost in server.log (printed, not asserted).
"""

from __future__ import annotations

import json
import logging

import torch
from flwr.common.logger import log

from common.config import RunConfig
from common.site import load_site
from common.tasks import ModelSpec, build_task_model, task_for
from server.console import ConsoleFilter
from server.outputs import RunOutputs
from server.recorder import HoldoutEvaluator, RoundRecorder
from server.run_dir import RunDir
from simulations.phantoms.sites import make_phantom_sites


def _recorder(
    tmp_path, name: str, rounds: int = 2, holdout_every: int = 1
) -> tuple[RoundRecorder, RunOutputs]:
    make_phantom_sites("blobs-2d", tmp_path / "data", 1, cases_per_site=8, holdout_cases=24)
    holdout = load_site(tmp_path / "data" / "holdout", split="all", log=lambda m: None)
    task = task_for(holdout.spec)
    spec = ModelSpec.of(holdout, {})
    cfg = RunConfig.parse({"run-name": name, "num-server-rounds": rounds})
    run = RunDir.create(cfg, tmp_path / "runs", spec.as_dict(), {"holdout_cases": len(holdout)})
    torch.manual_seed(0)
    model = build_task_model(spec)
    evaluator = HoldoutEvaluator(task, holdout)
    recorder = RoundRecorder(run, evaluator, model, 0, holdout_every=holdout_every)
    recorder.outputs = RunOutputs(run, holdout, rounds)
    return recorder, recorder.outputs


def test_holdout_every_scores_round_0_every_kth_and_the_last_round(tmp_path):
    """holdout-every=2 over 5 rounds: rounds 0, 2, 4 and 5 scored; the others keep their
    checkpoint and summary entry, with no held-out metric, record or best.pt candidacy."""
    recorder, outputs = _recorder(tmp_path, "sparse", rounds=5, holdout_every=2)
    run = recorder.run.path
    lines = []
    with outputs:
        for r in range(6):
            outputs.report._next_at = 0.0
            state = {k: v + 0.01 * r for k, v in recorder.model.state_dict().items()}
            recorder.record(r, state)
            lines.append(outputs.progress_line(r))
    summary = json.loads((run / "summary.json").read_text())
    scored = [r["holdout_scored"] for r in summary["rounds"]]
    assert scored == [True, False, True, False, True, True]
    for entry in summary["rounds"]:
        assert ("auc" in entry["central"]) is entry["holdout_scored"], entry
        assert (run / "checkpoints" / f"round-{entry['round']:03d}.pt").is_file()
    records = sorted(p.name for p in (run / "holdout").iterdir())
    assert records == ["round-000.json", "round-002.json", "round-004.json", "round-005.json"]
    assert summary["best"]["round"] in (0, 2, 4, 5)
    # a skipped round's line shows the last scored value and says which round it is from
    assert "held-out AUC" in lines[3] and "(round 2)" in lines[3], lines[3]
    assert "(round" not in lines[4]
    card = (run / "model-card.md").read_text()
    assert "| auc |" in card and (run / "report.html").is_file()
    assert "the last one the holdout was scored in" not in card  # the last round was scored


def test_a_run_stopped_between_scored_rounds_reports_its_last_scored_one(tmp_path):
    recorder, outputs = _recorder(tmp_path, "stopped", rounds=5, holdout_every=2)
    with outputs:  # stopped after round 3 of 5: round 2 was the last one scored
        for r in range(4):
            recorder.record(r, recorder.model.state_dict())
    card = (recorder.run.path / "model-card.md").read_text()
    assert "Of round 2, the last one the holdout was scored in" in card
    assert "stopped after round 3" in card and "| auc |" in card


def test_a_report_that_cannot_be_written_never_fails_the_round(tmp_path):
    recorder, outputs = _recorder(tmp_path, "blocked")
    run = recorder.run.path
    run.mkdir(parents=True, exist_ok=True)
    (run / "report").write_text("a file where the figures folder should be")
    with outputs:
        for r in range(3):
            outputs.report._next_at = 0.0  # no throttling: every round tries to write
            recorder.record(r, recorder.model.state_dict())
    summary = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert (run / "holdout" / "round-002.json").is_file()
    assert (run / "checkpoints" / "last.pt").is_file()
    log_text = (run / "server.log").read_text()
    assert "fedvox: report failed" in log_text and "the run goes on" in log_text
    assert "Traceback" in log_text  # the details are kept for whoever investigates


def test_report_and_log_after_each_round(tmp_path, capsys):
    recorder, outputs = _recorder(tmp_path, "ok")
    with outputs:
        for r in range(2):
            outputs.report._next_at = 0.0
            recorder.record(r, recorder.model.state_dict())
            log(logging.INFO, "configure_train: Sampled 2 nodes (out of 2)")
    run = recorder.run.path
    log_text = (run / "server.log").read_text()
    lines = log_text.splitlines()
    costs = [line.rsplit(" ", 2)[-2] for line in lines if "report refreshed" in line]
    print(f"report refresh costs (s): {costs}")
    assert len(costs) == 2
    assert "fedvox round 1/2 · held-out AUC" in log_text
    assert "fedvox round 1: held-out auc" in log_text  # the recorder's detail line
    assert (run / "report.html").is_file() and (run / "model-card.md").is_file()
    assert "| auc |" in (run / "model-card.md").read_text()


def test_console_filter_keeps_warnings_and_progress_drops_details():
    def record(level: int, path: str) -> logging.LogRecord:
        return logging.LogRecord("flwr", level, path, 1, "msg", None, None)

    keep = ConsoleFilter().filter
    assert keep(record(logging.INFO, "/x/server/outputs.py"))
    assert not keep(record(logging.INFO, "/x/server/recorder.py"))
    assert not keep(record(logging.INFO, "/v/site-packages/flwr/serverapp/strategy/fedavg.py"))
    assert keep(record(logging.WARNING, "/v/site-packages/flwr/serverapp/strategy/fedavg.py"))
