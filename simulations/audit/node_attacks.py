"""The attacks of `fedvox audit node`, as the hostile ServerApp (audit_node_app.py) runs them.

Each attack sends crafted Messages to the node under audit and returns one row
`{"attack", "outcome", "leaked", "detail"}`; `leaked` is false only when the node refused or
gave away nothing beyond DP (every release it answered is on its ledger, within its policy).
Each uses a run uid of its own, so one attack's plan never shapes another's. The budget
stretch goes last: where it gets through, the ledger is past the node's limit afterwards.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from common.protocol import CONFIG, EVALUATE, FINETUNE, SETTLE, TRAIN, NodeReply

SCAN = 2  # exact N: candidates within this many cases of the true count
TOLERANCE = 1.001  # an epsilon within 0.1 % of a limit is within it (calibration tolerance)


def row(attack: str, outcome: str, leaked: bool, detail: str) -> dict[str, Any]:
    return {"attack": attack, "outcome": outcome, "leaked": bool(leaked), "detail": detail}


def _statuses(replies: list[NodeReply]) -> str:
    return ", ".join(r.status for r in replies)


def _reasons(replies: list[NodeReply]) -> str:
    return "; ".join(sorted({r.reason for r in replies if r.reason}))[:300]


def uncharged(s: Any, replies: list[NodeReply]) -> list[NodeReply]:
    """Ok replies whose release the node's ledger does not hold as released (spent)."""
    released = {e.get("update_sha256") for e in s.ledger().entries if e["status"] == "released"}
    return [r for r in replies if r.ok and (not r.release or r.release not in released)]


def _update(reply: NodeReply) -> dict:
    return reply.message.content.array_records["arrays"].to_torch_state_dict()


# -- main phase ---------------------------------------------------------------------------


def same_noise_twice(s: Any) -> dict[str, Any]:
    """Two rounds trained from the very same global model: the noise must differ."""
    uid = "audit-noise"
    first, second = s.send(TRAIN, uid, 1, 2), s.send(TRAIN, uid, 2, 2)
    name = "same-dp-noise-twice"
    if not (first.ok and second.ok):
        return row(name, _statuses([first, second]), False, f"refused: {_reasons([first, second])}")
    a, b = _update(first), _update(second)
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    if diff == 0.0:
        detail = "two rounds from the same global model came back bit-identical: subtracting "
        return row(name, "ok, ok", True, detail + "two such updates cancels the DP noise")
    return row(name, "ok, ok", False, f"the updates differ (max |difference| {diff:.3g})")


def _dp_free(s: Any, reply: NodeReply) -> str:
    """Why an ok answer to a dp=false request released more than DP allows ('' if it did not)."""
    if not reply.ok:
        return ""
    m = reply.metrics
    if float(m.get("release-noise", 0.0)) == 0.0:
        return "answered with release noise 0 (exact counts)"
    if not math.isfinite(float(m.get("epsilon-run", math.inf))):
        return "answered with epsilon inf"
    return "its release is not on the ledger" if uncharged(s, [reply]) else ""


def dp_false_recipe(s: Any) -> dict[str, Any]:
    reply = s.send(EVALUATE, "audit-dpfalse-recipe", 1, 2, dp=False)
    why = _dp_free(s, reply)
    detail = f"evaluate with recipe dp=false: {why or reply.reason or 'a DP release, charged'}"
    return row("dp-false-evaluate/recipe", reply.status, bool(why), detail)


def approximate_accountant(s: Any) -> dict[str, Any]:
    reply = s.send(TRAIN, "audit-gdp", 1, 2, accountant="gdp")
    path = Path(s.plan["state_dir"]) / "privacy_ledger.json"
    counted = json.loads(path.read_text()).get("accountant") if path.exists() else None
    leaked = reply.ok and counted not in ("rdp", "prv")
    detail = f"accountant=gdp proposed: {reply.reason or 'answered'}; ledger counts with {counted}"
    return row("approximate-accountant", reply.status, leaked, detail)


def evaluate_flood(s: Any) -> dict[str, Any]:
    allowed = int(s.plan["policy"]["max-evaluations"])
    n = allowed + 1
    replies = [s.send(EVALUATE, "audit-flood", r, n) for r in range(1, n + 1)]
    released = {r.release for r in replies if r.ok}
    free = uncharged(s, replies)
    leaked = len(released) > allowed or bool(free)
    detail = (
        f"{n} evaluations of one run: {len(released)} releases (max-evaluations "
        f"{allowed}), {len(free)} not on the ledger; {_reasons(replies)}"
    )
    return row("evaluate-flood", _statuses(replies), leaked, detail)


def different_run_ids(s: Any) -> dict[str, Any]:
    replies = [s.send(EVALUATE, f"audit-uid-{i}", 1, 2) for i in range(3)]
    free, life = uncharged(s, replies), s.lifetime_epsilon()
    limit = float(s.plan["policy"]["max-epsilon"])
    leaked = bool(free) or life > limit * TOLERANCE
    detail = (
        f"3 evaluate messages, a new run uid each: {sum(r.ok for r in replies)} answered, "
        f"{len(free)} not on the ledger; lifetime epsilon {life:.2f} (max {limit:g})"
    )
    return row("different-run-id-per-message", _statuses(replies), leaked, detail)


def crafted_weights(s: Any) -> dict[str, Any]:
    import torch

    first = next(iter(s.weights))
    shape = dict(s.weights)
    shape[first] = torch.zeros(s.weights[first].shape[0] + 1, *s.weights[first].shape[1:])
    nan = {
        k: torch.full_like(v, math.nan) if v.is_floating_point() else v
        for k, v in s.weights.items()
    }
    no_arrays = RecordDict({CONFIG: s.config("audit-crafted-none", 1, 2)})
    wrong = [
        s.send(TRAIN, "audit-crafted-shape", weights=shape),
        s.send(TRAIN, "audit-crafted-model", model="no-such-model"),
        s.send(TRAIN, "audit-crafted-none", records=no_arrays),
    ]
    nan_reply = s.send(EVALUATE, "audit-crafted-nan", weights=nan)
    answered = [r for r in wrong if r.ok]
    free = uncharged(s, [nan_reply])
    detail = (
        f"wrong shape / unknown model / no weights: {_statuses(wrong)}; NaN weights "
        f"(evaluate): {nan_reply.status}{', not on the ledger' if free else ''}; "
        f"{_reasons([*wrong, nan_reply])}"
    )
    return row("crafted-weights", _statuses([*wrong, nan_reply]), bool(answered or free), detail)


def repeated_finetune(s: Any) -> dict[str, Any]:
    uid, allowed = "audit-finetune", int(s.plan["policy"]["max-evaluations"])
    # The run config plans fine-tuning (finetune-epochs 1) where max-evaluations allows it.
    replies = [s.send(FINETUNE, uid, 1, 1) for _ in range(2)]
    replies.append(s.send(FINETUNE, uid, 2, 1))
    released = {r.release for r in replies if r.ok}
    free = uncharged(s, replies)
    leaked = bool(free) or len(released) > allowed
    detail = (
        f"3 fine-tuning messages of one run (the last after the wrong round): "
        f"{len(released)} distinct releases, {len(free)} not on the ledger; {_reasons(replies)}"
    )
    return row("repeated-finetune", _statuses(replies), leaked, detail)


def _secagg_stage(s: Any) -> RecordDict:
    """A SecAgg+ stage message (its configs record), as Flower's workflow would open it."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: "setup"})})


def path_through_failure(s: Any) -> dict[str, Any]:
    """Failures on every path (a SecAgg+ stage, the mods, the settle query), first as they
    are, then with the node's audit log made unwritable (a directory where the file goes)."""
    settle = RecordDict({CONFIG: s.config("audit-noise", 2, 2)})
    start = len(s.texts)
    replies = [s.send(TRAIN, "audit-secagg", records=_secagg_stage(s))]
    audit = Path(s.plan["state_dir"]) / "audit.jsonl"
    kept = audit.with_name("audit.jsonl.kept")
    if audit.exists():
        shutil.move(audit, kept)
    audit.mkdir()
    try:
        replies.append(s.send(TRAIN, "audit-secagg", records=_secagg_stage(s)))
        replies.append(s.send(EVALUATE, "audit-broken-log", 1, 2))
        replies.append(s.send(SETTLE, "audit-noise", records=settle))
    finally:
        audit.rmdir()
        if kept.exists():
            shutil.move(kept, audit)
    found = secrets_in(s.texts[start:], s.plan["secrets"])
    detail = (
        f"SecAgg+ stage, stage with the audit log unwritable, evaluate, settle: "
        f"{'they carried ' + ', '.join(found) if found else 'no path or file name'}; "
        f"{_reasons(replies)}"
    )
    return row("path-through-failure", _statuses(replies), bool(found), detail)


def secrets_in(texts: list[str], secrets: list[str]) -> list[str]:
    """Which of `secrets` (paths, file names, case ids) any of `texts` contains."""
    return sorted({sec for sec in secrets if sec and any(sec in t for t in texts)})


# -- main phase, last: the budget stretch (and what its batch-size-1 round tells) ----------


def budget_stretched(s: Any) -> list[dict[str, Any]]:
    uid, policy = "audit-stretch", s.plan["policy"]
    target = float(s.run_config["target-epsilon"])
    first_recipe = {"batch-size": 1, "local-epochs": 1}  # recipe keys only
    first = s.send(TRAIN, uid, 1, 2, **first_recipe)
    second = s.send(TRAIN, uid, 2, 2, **{**first_recipe, "batch-size": 64, "local-epochs": 30})
    delta, limit = float(policy["delta"]), float(policy["max-epsilon"])
    run_eps, life = s.ledger().epsilon(delta, uid), s.lifetime_epsilon()
    leaked = life > limit * TOLERANCE or run_eps > target * TOLERANCE
    detail = (
        f"round 1 batch 1, round 2 recipe batch-size 64 local-epochs 30 ({second.status}"
        f"{': ' + second.reason if second.reason else ''}): run epsilon {run_eps:.2f} "
        f"(target {target:g}), lifetime {life:.2f} (max-epsilon {limit:g})"
    )
    stretch = row("budget-stretched-mid-run", _statuses([first, second]), leaked, detail)
    return [exact_n(s, first, first_recipe, 2), stretch]


def exact_n(s: Any, reply: NodeReply, recipe: dict, total_rounds: int) -> dict[str, Any]:
    """Batch size 1 makes the sampling rate 1/N: which N near the true one reproduce the
    reply's epsilon-run through the node's own (public) calibration code?"""
    name, true_n = "exact-n-from-epsilon", int(s.plan["true_n"])
    if not reply.ok:
        return row(name, reply.status, False, f"refused: {reply.reason}")
    reported = float(reply.metrics.get("epsilon-run", math.nan))
    window = range(max(2, true_n - SCAN), true_n + SCAN + 1)
    try:
        matches = scan_n(s, reported, recipe, total_rounds, window)
    except Exception as exc:  # noqa: BLE001 - an attack that cannot run proves nothing
        return row(name, "ok", True, f"the scan could not run ({type(exc).__name__}: {exc})")
    # The count the node DP-released for this run (its plan): if the noise happened to give
    # exactly N, the reply is a function of the released count and tells nothing more.
    noisy = s.ledger().runs.get("audit-stretch", {}).get("num_examples_released")
    leaked = matches == [true_n] and noisy != true_n
    detail = (
        f"epsilon-run {reported!r} is reproduced by N in {matches or 'none'} of "
        f"{window.start}..{window.stop - 1} (released count "
        f"{reply.metrics.get('num-examples')}): "
        f"{'the exact count' if leaked else 'not the exact count'}"
    )
    return row(name, "ok", leaked, detail)


def scan_n(s: Any, reported: float, recipe: dict, total_rounds: int, ns: range) -> list[int]:
    """Every N whose privacy plan (the node's public code) gives `reported` after round 1."""
    from client.gate import COUNT_FACTOR
    from client.train import steps_per_epoch
    from common.config import NodePolicy, RunConfig
    from common.privacy import (
        PrivacyRefusal,
        calibrate_noise_multiplier,
        compute_epsilon,
        release_noise,
        resolve_budget,
    )

    cfg = RunConfig.parse(s.run_config).with_values({**s.recipe, **recipe})
    policy = NodePolicy.parse(s.plan["policy"])
    matches = []
    for n in ns:
        try:
            b = resolve_budget(cfg, policy, n, total_rounds)
        except PrivacyRefusal:
            continue
        noise = release_noise(b.epsilon_run, b.max_releases)
        per_epoch = steps_per_epoch(n, cfg.batch_size)
        per_round = cfg.local_epochs * per_epoch
        planned = total_rounds * per_round + cfg.finetune_epochs * per_epoch
        count = (COUNT_FACTOR * noise, 1.0, 1)
        fixed = ((noise, 1.0, b.max_releases), count)
        q = 1.0 / per_epoch
        sigma = calibrate_noise_multiplier(b.epsilon_run, b.delta, q, planned, b.accountant, fixed)
        eps = compute_epsilon([count, (sigma, q, per_round)], b.delta, b.accountant)
        if math.isclose(eps, reported, rel_tol=1e-9):
            matches.append(n)
    return matches


# -- the phases ---------------------------------------------------------------------------


def main_phase(s: Any) -> list[dict[str, Any]]:
    attacks: list[Callable[[Any], dict[str, Any]]] = [
        same_noise_twice,
        dp_false_recipe,
        approximate_accountant,
        evaluate_flood,
        different_run_ids,
        crafted_weights,
        repeated_finetune,
        path_through_failure,
    ]
    return [attack(s) for attack in attacks] + budget_stretched(s)


def dp_false_run_config(s: Any) -> list[dict[str, Any]]:
    """The run config itself says dp=false (this phase's run)."""
    evaluate = s.send(EVALUATE, "audit-dpfalse-run", 1, 2)
    train = s.send(TRAIN, "audit-dpfalse-run", 1, 2)
    why = _dp_free(s, evaluate) or _dp_free(s, train)
    detail = (
        f"run config dp=false, evaluate then train: {why or 'no DP-free answer'}; "
        f"{_reasons([evaluate, train])}"
    )
    return [row("dp-false-evaluate/run-config", _statuses([evaluate, train]), bool(why), detail)]


def missing_policy(s: Any) -> list[dict[str, Any]]:
    """The node restarted with its policy keys removed from the node config."""
    replies = [s.send(TRAIN, "audit-no-policy", 1, 2), s.send(EVALUATE, "audit-no-policy", 1, 2)]
    leaked = any(r.ok for r in replies)
    detail = f"train and evaluate on a node config without its policy: {_reasons(replies)}"
    return [row("missing-policy", _statuses(replies), leaked, detail)]


PHASES: dict[str, Callable[[Any], list[dict[str, Any]]]] = {
    "main": main_phase,
    "dp-false": dp_false_run_config,
    "no-policy": missing_policy,
}
