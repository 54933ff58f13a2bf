"""`fedvox audit attacks`: the membership attacks a curious server can run on a node's replies.

The server knows the target case and every other case of the hospital, and chooses the weights
it sends (threat model, docs/privacy.md). Each trial is one independent run of one message
through the real ClientApp handlers (`client.app.train` / `client.app.evaluate`, in-process, a
fresh run and ledger entry each time) on the hospital's data with the target in (even trials) or
out (odd trials). The attacks, each scored over every trial:

- `weights/loss-threshold`: the target's loss under the returned weights (lower: member);
- `weights/gradient-alignment`: the cosine between the returned update and the target's own
  descent direction under the server's weights (the target's first step, if it was sampled);
- `training-reply/<key>`: every other number of a training reply (timing aside: the server
  sees when a reply arrives whatever it says), in whichever direction separates best;
- `validation-release/target-bin`: the count of the target's class in the margin bin the target
  falls in under the server's weights (+1 when it is there), from the DP validation release.

The train target is the training case whose gradient under the server's weights is least
aligned with the others' (the most exposed); the validation target is the first validation
case of class 1 (binary classification sites). Each attack is reported as attack AUC and TPR
at 1 % FPR, with the most the node's reported (epsilon, delta) allows (TPR <= e^eps FPR +
delta) and a Clopper-Pearson lower bound on epsilon from the trials.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from common.config import RunConfig
from common.files import atomic_write_text
from simulations.audit.privacy import (
    add_common_arguments,
    audit_config,
    demo_site,
    for_site,
    provenance,
)

THREAT_MODEL = (
    "curious server: knows the target and every other case, chooses the weights it sends, reads "
    "everything a node returns (weights and every metric); one independent run per trial"
)
TIMING = ("data-s", "compute-s")  # documented as not protected (docs/privacy.md)


def attack_trials(
    site: Path,
    cfg: RunConfig,
    overrides: dict,
    trials: int,
    workdir: Path,
    seed: int = 0,
    workers: int = 1,
) -> dict:
    """Run `trials` train and `trials` evaluate messages (target in/out alternating) in
    `workers` processes; `cfg` is the run config those `overrides` of the project's defaults
    make."""
    import numpy as np
    import torch

    from common.site import load_site

    started, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
    torch.manual_seed(seed)
    cfg = for_site(cfg, site)
    train_part = load_site(site, "train", cache_dir=workdir / "cache", log=lambda _m: None)
    val_part = load_site(site, "val", cache_dir=workdir / "cache", log=lambda _m: None)
    if train_part.spec.is_segmentation or train_part.num_classes != 2:
        raise ValueError("fedvox audit attacks supports binary classification sites")
    weights = _server_weights(train_part, cfg)
    t_train = _exposed_case(train_part, cfg, weights)
    t_val = next((i for i, label in enumerate(val_part.labels.tolist()) if label == 1), 0)
    folders = _trial_sites(site, workdir, [train_part.cases[t_train], val_part.cases[t_val]])
    members = np.arange(trials) % 2 == 0
    replies = _run_all(members, folders, overrides, weights, workdir, workers)
    train_replies, val_replies = replies["train"], replies["evaluate"]
    scores = _weight_scores(train_replies, train_part, t_train, cfg, weights)
    scores.update(_reply_scores([m for m, _ in train_replies]))
    val_score = _bin_scores(val_replies, val_part, t_val, cfg, weights)
    attacks = {name: _evaluate_attack(s, members, train_replies) for name, s in scores.items()}
    attacks["validation-release/target-bin"] = _evaluate_attack(val_score, members, val_replies)
    return {
        "trials": trials,
        "threat_model": THREAT_MODEL,
        "site": site.name,
        "attacks": attacks,
        "workers": workers,
        "wall_s": round(time.perf_counter() - started, 1),
        # the machine is shared: CPU time too (this process and its finished workers)
        "cpu_s": round(time.process_time() - cpu + _children_cpu() - children, 1),
    }


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _server_weights(data, cfg) -> dict:
    """The weights the server chooses to send: a fresh model of the run (round 1)."""
    from common.tasks import ModelSpec, build_task_model

    model = build_task_model(ModelSpec.of(data, cfg.model_options))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _model(data, cfg, state: dict):
    from common.tasks import ModelSpec, build_task_model

    model = build_task_model(ModelSpec.of(data, cfg.model_options))
    model.load_state_dict(state)
    return model.eval()


def _loss_grad(model, x, y, with_grad: bool = True):
    """(loss, flat gradient or None) of one case under `model`."""
    import torch
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x[None]), y[None])
    if not with_grad:
        return float(loss.detach()), None
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return float(loss.detach()), grad


def _exposed_case(data, cfg, weights: dict) -> int:
    """The training case whose gradient under the server's weights is least aligned with the
    mean of the others': the one whose presence moves the update in its own direction."""
    import numpy as np
    import torch

    model = _model(data, cfg, weights)

    def unit(i: int) -> torch.Tensor:
        grad = _loss_grad(model, data.images[i], data.labels[i])[1]
        return grad / grad.norm().clamp_min(1e-12)

    # Two passes instead of an (N x weights) matrix: the mean direction, then each cosine.
    mean = sum(unit(i) for i in range(len(data))) / len(data)
    return int(np.argmin([abs(float(unit(i) @ mean)) for i in range(len(data))]))


def _trial_sites(site: Path, workdir: Path, targets: list) -> dict[bool, Path]:
    """Two data dirs: `True` holds the hospital as it is, `False` without the target cases."""
    name = site.name if site.name.startswith("hospital-") else "hospital-1"
    inside, outside = workdir / "in", workdir / "out"
    for root in (inside, outside):
        shutil.copytree(site, root / name, ignore=shutil.ignore_patterns(".fedvox*"))
    labels = outside / name / "labels.csv"
    lines = labels.read_text().splitlines()
    for case in targets:
        (outside / name / "images" / case.image.name).unlink()
        lines = [ln for ln in lines if not ln.startswith(case.case_id + ",")]
    labels.write_text("\n".join(lines) + "\n")
    return {True: inside, False: outside}


def _run_all(members, folders, overrides: dict, weights: dict, workdir: Path, workers: int):
    """Every train and evaluate trial, split over `workers` processes: {kind: replies}.

    Trials are independent runs, so they split freely; each worker is a fresh (spawned)
    Python that imports the node's code once and decodes the site once (the disk cache)."""
    kinds = ("train", "evaluate")
    if workers <= 1:
        trials = range(len(members))
        return {
            k: _as_torch(_run_trials(k, trials, members, folders, overrides, weights, workdir))
            for k in kinds
        }
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(k, list(range(w, len(members), workers))) for k in kinds for w in range(workers)]
    context = multiprocessing.get_context("spawn")  # no fork of a process with torch threads
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread) as pool:
        futures = [
            pool.submit(_run_trials, k, idx, members, folders, overrides, weights, workdir)
            for k, idx in jobs
        ]
        done = {k: {} for k in kinds}
        for (kind, idx), future in zip(jobs, futures, strict=True):
            done[kind].update(zip(idx, future.result(), strict=True))
    return {k: _as_torch([done[k][i] for i in range(len(members))]) for k in kinds}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker: `workers` of them share the machine


def _run_trials(
    kind: str, indices, members, folders, overrides: dict, weights: dict, workdir: Path
) -> list:
    """One message per trial through the real handler; (metrics, returned weights) each."""
    from client.app import evaluate, train
    from common.progress import track

    handler = train if kind == "train" else evaluate
    replies = []
    for i in track(list(indices), f"audit attacks: {kind} trials"):
        # A fresh state dir (ledger) per trial: independent runs; decoded images stay cached
        # in this process's memory, so a trial does not decode its data again.
        state_dir = workdir / f"state-{kind}-{i}"
        run = {**overrides, "data-dir": str(folders[bool(members[i])]), "state-dir": str(state_dir)}
        reply = handler(_message(weights, kind, f"audit-{kind}-{i}"), _context(run))
        shutil.rmtree(state_dir, ignore_errors=True)
        status = str(reply.content.config_records["node"]["status"])
        if status != "ok":
            reason = reply.content.config_records["node"]["reason"]
            raise RuntimeError(f"trial {i}: the node answered {status}: {reason}")
        arrays = reply.content.array_records.get("arrays")
        # numpy, not torch: a worker's tensors would cross to the parent as shared-memory
        # handles, one per tensor (file descriptors run out over hundreds of trials)
        state = {k: v.numpy() for k, v in arrays.items()} if arrays is not None else None
        replies.append((dict(reply.content.metric_records["metrics"]), state))
    return replies


def _as_torch(replies: list) -> list:
    import torch

    return [(m, None if s is None else {k: torch.from_numpy(v) for k, v in s.items()})
            for m, s in replies]  # fmt: skip


def _context(run: dict):
    from flwr.app import Context, RecordDict

    from simulations.benchmarks.utility import default_run_config

    node = {"partition-id": 0, "num-partitions": 1}  # a simulated hospital
    run_config = {**default_run_config(), **run}
    return Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config=run_config)


def _message(state: dict, kind: str, run_uid: str):
    """What a SuperNode hands the ClientApp: round 1 of a fresh run, the server's weights."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, RecordDict

    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "config": ConfigRecord({"server-round": 1, "run-uid": run_uid, "run-name": "audit"}),
        }
    )
    metadata = Metadata(
        run_id=7,
        message_id=f"{run_uid}-{kind}",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content, metadata=metadata)


def _weight_scores(replies, data, target: int, cfg, weights: dict) -> dict:
    import numpy as np
    import torch

    x, y = data.images[target], data.labels[target]
    _, grad = _loss_grad(_model(data, cfg, weights), x, y)
    descent = -grad / grad.norm().clamp_min(1e-12)
    start = torch.cat([v.reshape(-1) for v in weights.values()])
    loss, align = [], []
    for _, state in replies:
        loss.append(-_loss_grad(_model(data, cfg, state), x, y, with_grad=False)[0])
        update = torch.cat([state[k].reshape(-1) for k in weights]) - start
        align.append(float(descent @ update / update.norm().clamp_min(1e-12)))
    return {
        "weights/loss-threshold": np.array(loss),
        "weights/gradient-alignment": np.array(align),
    }


def _reply_scores(metrics: list[dict]) -> dict:
    import numpy as np

    keys = sorted(set(metrics[0]) - set(TIMING))
    return {f"training-reply/{k}": np.array([float(m[k]) for m in metrics]) for k in keys}


def _bin_scores(replies, data, target: int, cfg, weights: dict):
    """The target's class count in the target's margin bin (the server computes the bin)."""
    import numpy as np

    from common.eval_release import HIST_NEG, HIST_POS, MARGIN_EDGES
    from common.metrics import predict_logits

    logits = predict_logits(_model(data, cfg, weights), data.images[target : target + 1])[0]
    margin = float(logits[1] - logits[0])
    bin_ = int(np.clip(np.searchsorted(MARGIN_EDGES, margin, side="right") - 1, 0, 23))
    key = HIST_POS if int(data.labels[target]) == 1 else HIST_NEG
    return np.array([m[key][bin_] for m, _ in replies])


def _evaluate_attack(scores, members, replies) -> dict:
    """AUC, TPR at 1 % FPR and the epsilon lower bound of one attack; the node's DP limit."""
    import numpy as np

    from simulations.audit.stats import (
        attack_metrics,
        clopper_pearson_epsilon,
        dp_auc_bound,
        dp_tpr_bound,
        oriented,
    )

    inside, outside = oriented(scores[members], scores[~members])
    epsilon = float(np.max([m["epsilon-run"] for m, _ in replies]))
    delta = float(replies[0][0]["delta"])
    return {
        **attack_metrics(inside, outside),
        "epsilon_lower_bound": clopper_pearson_epsilon(inside, outside, delta),
        "trials": int(len(scores)),
        "dp_bound": {
            "epsilon": epsilon,
            "delta": delta,
            "attack_auc": dp_auc_bound(epsilon, delta),
            "tpr_at_1pct_fpr": dp_tpr_bound(epsilon, delta),
        },
    }


# ------------------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--trials", type=int, default=200, help="independent runs per message")
    parser.add_argument("--seed", type=int, default=0, help="the server's weights")
    parser.add_argument(
        "--workers",
        type=int,
        default=_usable_cores(),
        help="processes the trials are split over, one torch thread each (default: the usable "
        "cores; 1 = in this process with --threads)",
    )


def _usable_cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(max(1, args.threads))
    if args.trials < 4:
        raise SystemExit("--trials: at least 4 (half with the target, half without)")
    if args.workers < 1:
        raise SystemExit(f"--workers: at least 1, got {args.workers}")
    cfg, overrides = audit_config(args.run_config)
    site = args.data.resolve() if args.data else demo_site(cfg)
    with tempfile.TemporaryDirectory(prefix="fedvox-attacks-") as tmp:
        result = attack_trials(
            site, cfg, overrides, args.trials, Path(tmp), args.seed, min(args.workers, args.trials)
        )
    result.update(run_config=overrides, **provenance())
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    for name, a in result["attacks"].items():
        bound = a["dp_bound"]
        print(
            f"[audit attacks] {name}: AUC {a['attack_auc']:.3f} (DP limit "
            f"{bound['attack_auc']:.3f}), TPR@1%FPR {a['tpr_at_1pct_fpr']:.3f} (limit "
            f"{bound['tpr_at_1pct_fpr']:.3f})"
        )
    print(f"[audit attacks] {result['trials']} trials each, {result['wall_s']:.0f} s -> {args.out}")
    return 0
