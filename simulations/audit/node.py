"""`fedvox audit node`: a red team a hospital runs against its own node config before joining.

    fedvox audit node [--node-config node.toml] [--data SITE] --out audit-node.json

It builds the default deployment on 127.0.0.1 (simulations/harness/deploy.py): a real SuperLink and
ONE real SuperNode through the project's node entry point (client/supernode.py: its warm
SuperExec forks every ClientApp from one parent), with the node config's policy keys
(`accountant`, `max-epsilon`, `delta`, `max-evaluations`, `allow-non-dp`, `site-name`) and
its data-dir / state-dir replaced: the data is `--data` (read only) or a small 2D phantom site,
the state dir a scratch one, so the audit never spends the hospital's real ledger. Then a
hostile ServerApp (simulations/audit/node_app.py, attacks in audit_node_attacks.py) drives the
node with crafted messages in three `fedvox run`s: the main one, one whose run config says
dp=false, and one after the node was restarted with its policy keys removed.

Result: JSON `{"machine", "date", "wall_s", "rows": [{"attack", "outcome", "leaked",
"detail"}]}` and a table; exit 0 when nothing leaked, 1 when something did, 2 on bad
arguments. `leaked` is false only when the node refused or gave away nothing beyond DP.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[2]
DEFAULT_NODE_CONFIG = PROJECT_DIR / "deploy" / "hospital" / "node.toml"
PLAN_ENV = "FEDVOX_AUDIT_NODE_PLAN"  # simulations/audit/node_app.py reads its plan from it
POLICY_KEYS = ("accountant", "max-epsilon", "delta", "max-evaluations")
NODE_KEYS = (*POLICY_KEYS, "allow-non-dp", "site-name")  # what the audit takes from the file
RUN_TIMEOUT_S = 600.0
# A tiny model and few cases: the audit tests the node's rules, not its model.
BASE_RUN = {
    "model-width": 4,
    "model-depth": 1,
    "batch-size": 8,
    "local-epochs": 1,
    "num-server-rounds": 2,
    "augmentation": False,
    "learning-rate-schedule": "constant",
    "target-epsilon": 1.0,
    "local-evaluation": "last",
}
NODE = "audit"  # the hospital's name at the scratch SuperLink


class AuditArgumentError(ValueError):
    """A bad --node-config / --data / --out: one line, exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--node-config",
        type=Path,
        default=DEFAULT_NODE_CONFIG,
        help="the hospital's node config (TOML; default deploy/hospital/node.toml); only its "
        "policy keys are used: data-dir and state-dir are replaced by scratch ones",
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="a hospital folder, read only (default: phantom)"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON result")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the scratch folder (logs, scratch ledger) here instead of deleting it",
    )


def read_node_config(path: Path) -> dict[str, Any]:
    """The node config's keys the audit uses; AuditArgumentError naming the file otherwise."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise AuditArgumentError(f"--node-config {path}: cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise AuditArgumentError(f"--node-config {path}: not valid TOML ({exc})") from None
    from common.config import ConfigError, NodePolicy

    try:
        NodePolicy.parse(raw)
    except ConfigError as exc:
        raise AuditArgumentError(f"--node-config {path}: {exc}") from None
    return {k: raw[k] for k in NODE_KEYS if k in raw}


def _check_arguments(args: argparse.Namespace) -> dict[str, Any]:
    node = read_node_config(args.node_config)
    if args.data is not None and not (args.data / "images").is_dir():
        if not args.data.is_dir():
            raise AuditArgumentError(f"--data {args.data}: no such folder")
        raise AuditArgumentError(f"--data {args.data}: not a hospital folder (no images/)")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        raise AuditArgumentError(f"--workdir {args.workdir}: not empty")
    if not args.out.parent.is_dir():
        raise AuditArgumentError(f"--out {args.out}: its folder {args.out.parent} does not exist")
    return node


def run(args: argparse.Namespace) -> int:
    try:
        node = _check_arguments(args)
    except AuditArgumentError as exc:
        print(f"fedvox audit node: error: {exc}", file=sys.stderr)
        return 2
    from common.files import atomic_write_text
    from simulations.audit.privacy import provenance

    started = time.monotonic()
    data = args.data.resolve() if args.data else None
    if args.workdir is not None:
        rows = audit_node(node, data, args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="fedvox-audit-node-") as tmp:
            rows = audit_node(node, data, Path(tmp))
    result = {**provenance(), "wall_s": round(time.monotonic() - started, 1), "rows": rows}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(table(rows))
    leaked = [r["attack"] for r in rows if r["leaked"]]
    verdict = f"LEAKED: {', '.join(leaked)}" if leaked else "nothing leaked"
    print(f"[audit node] {len(rows)} attacks, {result['wall_s']:.0f} s: {verdict} -> {args.out}")
    return 1 if leaked else 0


def table(rows: list[dict[str, Any]]) -> str:
    width = max(len(r["attack"]) for r in rows)
    lines = [f"{'attack':<{width}}  leaked  outcome / detail"]
    for r in rows:
        flag = "YES" if r["leaked"] else "no"
        lines.append(f"{r['attack']:<{width}}  {flag:<6}  {r['outcome']}: {r['detail'][:160]}")
    return "\n".join(lines)


# -- the audit -------------------------------------------------------------------------------


def audit_node(node: dict[str, Any], data: Path | None, tmp: Path) -> list[dict[str, Any]]:
    """Every attack against one node with `node`'s policy on `data` (or a phantom site)."""
    from simulations.harness.deploy import LocalDeployment

    site = data or _phantom_site(tmp / "data")
    state = tmp / "state"
    config = {**node, "data-dir": str(site), "state-dir": str(state)}
    plan_file = tmp / "plan.json"
    plan = _plan(node, site, state, tmp)
    # Fine-tuning planned (one more validation release) where the policy allows two.
    finetune = int(node.get("max-evaluations", 0)) >= 2
    run_config = {**BASE_RUN, **_model_for(site), "finetune-epochs": int(finetune)}
    app = _app_dir(tmp / "app")
    dep = LocalDeployment(tmp / "deploy", nginx=False)
    dep.env.update({PLAN_ENV: str(plan_file), "FEDVOX_HOME": str(tmp / "fedvox-home")})
    found: list[dict[str, Any]] = []
    with dep:
        dep.add_hospitals({NODE: site})
        dep.node_configs[NODE] = {k: str(v) for k, v in config.items()}
        dep.start_nodes()
        for phase, extra in (("main", {}), ("dp-false", {"dp": False})):
            found.append(_phase(dep, app, plan_file, {**plan, "phase": phase}, run_config | extra))
        _restart_without_policy(dep)
        found.append(_phase(dep, app, plan_file, {**plan, "phase": "no-policy"}, run_config))
    return _judge_all(found, plan["secrets"])


def _restart_without_policy(dep: Any) -> None:
    """The same node (key, state dir) again, its node config without the policy keys."""
    from simulations.harness.procs import wait_for

    old = dep.nodes[NODE]
    seen = old.log().count("SuperNode ID")  # the new process appends to the same log
    dep.procs.stop(old)
    config = dep.node_configs[NODE]
    dep.node_configs[NODE] = {k: v for k, v in config.items() if k not in POLICY_KEYS}
    new = dep.start_node(NODE)
    wait_for(
        lambda: new.log().count("SuperNode ID") > seen or new.poll() is not None,
        180,
        "the restarted SuperNode",
        dep.logs,
    )
    if new.poll() is not None:
        raise RuntimeError(f"the restarted SuperNode exited:\n{new.log()[-3000:]}")


def _phantom_site(root: Path) -> Path:
    from simulations.phantoms.sites import make_phantom_sites

    make_phantom_sites("blobs-2d", root, hospitals=1, cases_per_site=40, holdout_cases=4, seed=0)
    return root / "hospital-1"


def _plan(node: dict[str, Any], site: Path, state: Path, tmp: Path) -> dict[str, Any]:
    """What the hostile ServerApp is told: the policy, the scratch state dir (to read the
    node's ledger), the true training count and the strings no reply may carry."""
    from common.site import load_site

    train = load_site(site, "train", cache_dir=tmp / "harness-cache", log=lambda _m: None)
    names = [
        p.name
        for sub in ("images", "masks")
        if (site / sub).is_dir()
        for p in (site / sub).iterdir()
    ]
    ids = [c.case_id for c in train.cases if len(c.case_id) >= 5]  # short ids match anything
    folder = [site.name] if site.name != node.get("site-name") else []
    return {
        "site": str(site),
        "state_dir": str(state),
        "server_cache": str(tmp / "server-cache"),
        "rows_out": str(tmp / "rows.json"),
        "policy": {k: node[k] for k in POLICY_KEYS if k in node},
        "true_n": len(train),
        "secrets": sorted({str(site), str(state), str(tmp), *folder, *names, *ids}),
    }


def _model_for(site: Path) -> dict[str, Any]:
    """The plain CNN for a 2D classification site (fast); otherwise the task's recipe."""
    from common.site import read_spec

    spec = read_spec(site)
    return {"model": "cnn"} if spec.task == "classification" and spec.spatial_dims == 2 else {}


def _app_dir(app: Path) -> Path:
    """fedvox's pyproject with the hostile ServerApp (the ClientApp is the node's own)."""
    app.mkdir(parents=True)
    text = (PROJECT_DIR / "pyproject.toml").read_text()
    text, n = re.subn(r'serverapp = "[^"]*"', 'serverapp = "simulations.audit.node_app:app"', text)
    if n != 1:
        raise RuntimeError("pyproject.toml no longer names one serverapp")
    (app / "pyproject.toml").write_text(text)
    return app


def _phase(dep: Any, app: Path, plan_file: Path, plan: dict, run_config: dict) -> dict[str, Any]:
    """One `fedvox run` of the hostile app: its rows, texts and metric keys."""
    out = Path(plan["rows_out"])
    out.unlink(missing_ok=True)
    plan_file.write_text(json.dumps(plan))
    outcome = dep.run(run_config, timeout=RUN_TIMEOUT_S, name=plan["phase"], app_dir=app)
    if out.is_file():  # `fedvox run` says "stopped": this app writes no summary.json
        return json.loads(out.read_text())
    tail = outcome.output.strip().splitlines()[-3:]
    detail = f"the hostile run failed (exit {outcome.returncode}): {' | '.join(tail)[:400]}"
    from simulations.audit.node_attacks import row

    return {
        "rows": [row(f"phase:{plan['phase']}", "failed", True, detail)],
        "texts": [],
        "metric_keys": [],
    }


def _judge_all(phases: list[dict[str, Any]], secrets: list[str]) -> list[dict[str, Any]]:
    """The phases' rows, and two judged over every reply of every phase."""
    from common.protocol import MANIFEST
    from simulations.audit.node_attacks import row, secrets_in

    rows = [r for p in phases for r in p["rows"]]
    texts = [t for p in phases for t in p["texts"]]
    found = secrets_in(texts, secrets)
    detail = f"{len(texts)} strings from every reply: " + (
        f"carried {', '.join(found)[:300]}" if found else "no path, file name or case id"
    )
    rows.append(row("paths-in-any-reply", "checked", bool(found), detail))
    keys = sorted({k for p in phases for k in p["metric_keys"]})
    bad = [k for k in keys if k not in MANIFEST or "loss" in k]
    detail = f"metric keys {', '.join(keys)}: " + (
        f"{', '.join(bad)} not in the outbound manifest" if bad else "all in the manifest, no loss"
    )
    rows.append(row("raw-loss-in-metrics", "checked", bool(bad), detail))
    return rows
