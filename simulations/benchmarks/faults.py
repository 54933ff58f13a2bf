"""`fedvox bench faults`: docs/reliability.md's fault table, run for real here (JSON + table).

Deployment rows use real processes on 127.0.0.1 (`simulations.harness.deploy.LocalDeployment`: a TLS
SuperLink with node authentication and `--database`, nginx if installed, one SuperNode per
hospital through fedvox's node wrapper, `fedvox run`), ended by PID:

- round-wall: a clean 3-round job; every round's wall time against the slowest hospital's
  compute (goal: wall <= 1.5 x slowest + 10 s);
- node-killed: `kill -9` a SuperNode mid-round, restarted at once;
- superlink-killed: `kill -9` the SuperLink mid-round, restarted on its database, the run
  resumed with `resume-from`;
- bad-config: four bad run configs through `fedvox run` (exit codes, summary.json);
- many-nodes: N SuperNodes (default 20) x 3 rounds on one SuperLink, TLS + node auth.

In-process rows run the real ServerApp, round loop, Flower strategies and ClientApp
(`simulations.harness.inprocess`): bad holdout files, and one hospital's poisoned update (NaN, x1e6,
wrong shape, inflated count; FedMedian with NaN).

Each row: `lost_replies` = releases a hospital made (its privacy ledger says "released") that
the server never used, other than updates it refused on purpose; `epsilon_charged_unused` =
the most epsilon any one hospital was charged for such releases; `ok` = the row's expected
outcome with nothing lost.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulations.benchmarks.fault_rows import measured, row_of, unused_releases

DEPLOYED = ("round-wall", "node-killed", "superlink-killed", "bad-config")
FAULTS = (
    *DEPLOYED,
    "bad-holdout",
    "poisoned",
    "many-nodes",
    "node-toml",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    parser.add_argument(
        "--only", default=",".join(FAULTS), help=f"comma-separated rows (of {', '.join(FAULTS)})"
    )
    parser.add_argument(
        "--hospitals", type=int, default=20, help="SuperNodes in the many-nodes row"
    )
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a tmp dir)")


def run(args: argparse.Namespace) -> int:
    from server.report_data import environment

    only = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = sorted(set(only) - set(FAULTS))
    if unknown:
        raise SystemExit(f"--only: unknown row(s) {', '.join(unknown)}; known: {FAULTS}")
    if args.hospitals < 2:
        raise SystemExit(f"--hospitals must be >= 2, got {args.hospitals}")
    with tempfile.TemporaryDirectory(prefix="fedvox-faults-") as tmp:
        root = Path(args.workdir or tmp)
        rows = run_rows(root, only, args.hospitals)
    result = {
        "machine": environment(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "rows": rows,
    }
    print(format_table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


def run_rows(root: Path, only: list[str], hospitals: int) -> list[dict[str, Any]]:
    """The selected rows (the deployment rows share one deployment of five hospitals)."""
    from simulations.benchmarks.faults_deploy import deployment_rows, many_nodes_row

    rows: list[dict[str, Any]] = []
    deployed = [f for f in DEPLOYED if f in only]
    if deployed:
        rows += deployment_rows(root / "deploy", deployed)
    if "many-nodes" in only:
        rows.append(measured("many-nodes", lambda: many_nodes_row(root / "many", hospitals)))
    if "node-toml" in only:
        rows.append(measured("node-toml", node_toml_row))
    if "bad-holdout" in only:
        rows.append(measured("bad-holdout", lambda: bad_holdout_row(root / "inprocess")))
    if "poisoned" in only:
        for k in POISONS:
            rows.append(measured(k, lambda k=k: poisoned_row(root / "inprocess", k)))
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The rows as a markdown table (docs/reliability.md carries it)."""
    lines = [
        "| fault | hospitals | outcome | ok | lost replies | ε charged, unused | wall s | "
        "peak RSS GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['fault']} | {r['hospitals']} | {r['outcome']} | "
            f"{'yes' if r['ok'] else 'NO'} | {r['lost_replies']} | "
            f"{r['epsilon_charged_unused']:g} | {r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} |"
        )
    return "\n".join(lines)


def _short(reason: str) -> str:
    return reason.removeprefix("update refused by the server: ")[:90]


def node_toml_budget() -> dict[str, float]:
    """The shipped deploy/hospital/node.toml's lifetime max-epsilon and the app's default
    per-run target-epsilon (pyproject.toml): how many default runs one hospital serves."""
    import tomllib

    from common.config import NodePolicy
    from simulations.harness.local import PROJECT_DIR

    node = tomllib.loads((PROJECT_DIR / "deploy" / "hospital" / "node.toml").read_text())
    app = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())
    target = float(app["tool"]["flwr"]["app"]["config"]["target-epsilon"])
    return {"max_epsilon": float(NodePolicy.parse(node).max_epsilon), "target_epsilon": target}


def node_toml_row() -> dict[str, Any]:
    b = node_toml_budget()
    runs = b["max_epsilon"] / b["target_epsilon"]
    outcome = (
        f"max-epsilon {b['max_epsilon']:g} (the dataset's lifetime limit) = {runs:g} runs at "
        f"the default target-epsilon {b['target_epsilon']:g}; the comment says so"
    )
    return row_of("the default deploy/hospital/node.toml", 1, outcome, runs >= 3)


# -- in process -------------------------------------------------------------------------------


def inprocess_config(root: Path, name: str, **extra: Any) -> dict[str, Any]:
    """A 1-round run config on 3 small blob hospitals under `root/data` (made if missing)."""
    from simulations.phantoms.sites import make_phantom_sites

    data = root / "data"
    if not (data / "holdout").is_dir():
        make_phantom_sites("blobs-2d", data, 3, cases_per_site=30, holdout_cases=20, seed=3)
    return {
        "data-dir": str(data),
        "output-dir": str(root / "runs"),
        "state-dir": str(root / "state" / name),
        "run-name": name,
        "num-server-rounds": 1,
        "batch-size": 16,
        "local-epochs": 1,
        "model-width": 4,
        "model-depth": 1,
        "augmentation": False,
        **extra,
    }


def bad_holdout_row(root: Path) -> dict[str, Any]:
    """Three broken NIfTI files in the server's holdout: listed in summary.json."""
    import shutil

    import nibabel as nib
    import numpy as np

    from simulations.harness import inprocess as ip

    config = inprocess_config(root, "bad-holdout")
    holdout = root / "bad-holdout-data"
    shutil.rmtree(holdout, ignore_errors=True)
    shutil.copytree(Path(config["data-dir"]) / "holdout", holdout)
    images = sorted((holdout / "images").iterdir())
    images[0].write_bytes(b"not a nifti file")
    images[1].write_bytes(images[1].read_bytes()[:60])  # truncated
    nib.save(nib.Nifti1Image(np.full((28, 28), np.nan, np.float32), np.eye(4)), images[2])
    run = ip.run_in_process({**config, "holdout-dir": str(holdout)}, 3)
    bad = run.summary.get("data", {}).get("holdout_bad_files", [])
    ok = run.summary["status"] == "finished" and len(bad) == 3
    outcome = (
        f"run {run.summary['status']}; summary.json lists {len(bad)} bad holdout file(s) "
        f"({run.summary['data']['holdout_cases']} of 20 cases evaluated)"
    )
    states = sorted(Path(config["state-dir"]).glob("*"))
    lost, eps = unused_releases(states, run.summary)
    return row_of("3 bad NIfTI files in the holdout", 3, outcome, ok, lost, eps)


def _poisons() -> dict[str, tuple[Callable, str, str]]:
    from simulations.harness import inprocess as ip

    return {
        "NaN": (ip.nan_arrays, "NaN", "fedavg"),
        "x1e6": (ip.scale_arrays(1e6), "above the DP-SGD bound", "fedavg"),
        "wrong shape": (ip.wrong_shape, "has shape", "fedavg"),
        "num-examples 1e9": (ip.claim_examples(1e9), "num-examples", "fedavg"),
        "NaN, fedmedian": (ip.nan_arrays, "NaN", "fedmedian"),
        "NaN, fedtrimmedavg": (ip.nan_arrays, "NaN", "fedtrimmedavg"),
    }


POISONS = (
    "NaN",
    "x1e6",
    "wrong shape",
    "num-examples 1e9",
    "NaN, fedmedian",
    "NaN, fedtrimmedavg",
)


def poisoned_row(root: Path, kind: str) -> dict[str, Any]:
    """hospital-3 of 3 sends a poisoned update: refused, named, the round goes on."""
    import math

    from simulations.harness import inprocess as ip

    tamper, needle, strategy = _poisons()[kind]
    name = "poison-" + "".join(c if c.isalnum() else "-" for c in kind)
    config = inprocess_config(root, name, strategy=strategy)
    run = ip.run_in_process(config, 3, {3: tamper})
    s = run.summary
    rejected = s["rounds"][1].get("rejected", []) if len(s.get("rounds", [])) > 1 else []
    named = [r["site"] for r in rejected] == ["hospital-3"] and needle in rejected[0]["reason"]
    loss = (s["rounds"][1].get("central") or {}).get("loss") if named else None
    finite = loss is not None and math.isfinite(loss)
    ok = s["status"] == "finished" and named and finite
    outcome = (
        f"{strategy}: run {s['status']}; refused: "
        + ("; ".join(f"{r['site']} ({_short(r['reason'])})" for r in rejected) or "none")
        + f"; held-out loss {'finite' if finite else 'NOT finite'}"
    )
    states = sorted(Path(config["state-dir"]).glob("*"))
    lost, eps = unused_releases(states, s)
    return row_of(f"one hospital's update: {kind}", 3, outcome, ok, lost, eps)
