"""`fedvox bench utility`: what privacy costs in clinical utility, as a table and JSON.

Settings:
  - "centralised": the pooled, non-private reference — every hospital's training part in
    one place, trained in-process with the same model and optimiser settings for the same
    number of epochs as the federation sees (rounds x local epochs);
  - "fl": the federation without DP (epsilon = inf), a real Flower simulation;
  - "fl-dp": the federation with DP-SGD at every hospital at each epsilon, a real Flower
    simulation (`simulations.harness.local.LocalFederation`).

Every number is the model after the LAST round (never the best round: picking a round by
its test score would be choosing on the test split). Accuracy is at the decision threshold
the server chose on the hospitals' validation parts (common/calibration.py). Per-site AUC
is each hospital's evaluation of the final global model on its own validation part; the
table shows the worst site and the best-worst gap.

Top-level imports stay stdlib-only: the CLI imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import tempfile
import time
import tomllib
from pathlib import Path

from common.config import ConfigError, RunConfig
from common.files import atomic_write_text
from common.progress import track
from simulations.benchmarks.table import final_round, format_table, merged_runs, summarise

PROJECT_DIR = Path(__file__).resolve().parents[2]
DEFAULT_OUT = PROJECT_DIR / "simulations" / "results" / "utility.json"
DEFAULT_EPSILONS = "1,3,8,inf"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="JSON result (a .md table goes beside it)"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (model init, training)")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="start the seeds here instead (with --merge)"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="a previous result JSON of the same data and config whose runs join this table "
        "(e.g. seed 0 from earlier, seeds 1-2 now)",
    )
    parser.add_argument(
        "--epsilons",
        default=DEFAULT_EPSILONS,
        help=f"comma-separated target epsilons; 'inf' = the non-DP federation (default "
        f"{DEFAULT_EPSILONS})",
    )
    parser.add_argument(
        "--settings",
        default="centralised,fl",
        help="which of centralised,fl,secagg to run (fl covers fl and fl-dp; secagg: the same "
        "federations with secure-aggregation=true, rows fl-dp-secagg; default centralised,fl)",
    )
    parser.add_argument(
        "-c",
        "--run-config",
        default="",
        help='run-config overrides for every federation, e.g. "num-server-rounds=5"',
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="data, runs and logs (default: a temp dir)"
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a prepared folder (hospital-*/ + holdout/, e.g. from `fedvox prepare --phantom "
        "blobs-3d` or `--phantom lung-ct-2d`) instead of the vendored PneumoniaMNIST; its "
        "dataset.json decides the task (segmentation rows report per-class Dice)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="phantom data, 2 hospitals, 1 seed, 2 rounds, epsilon 8 and inf (for tests)",
    )


# ------------------------------------------------------------------------------- helpers


def default_run_config() -> dict:
    """`[tool.flwr.app.config]` of the project: the defaults `flwr run .` uses."""
    with open(PROJECT_DIR / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def parse_overrides(text: str) -> dict:
    """`key=value other="s"` (TOML values, as `flwr run -c` takes them) -> dict."""
    return dict(tomllib.loads("\n".join(_split_pairs(text)))) if text.strip() else {}


def _split_pairs(text: str) -> list[str]:
    import shlex

    return [f'"{k}" = {v}' for k, v in (p.split("=", 1) for p in shlex.split(text, posix=False))]


def parse_epsilons(text: str) -> list[float]:
    out = []
    for raw in text.split(","):
        raw = raw.strip().lower()
        if not raw:
            continue
        value = math.inf if raw in ("inf", "none", "off") else float(raw)
        if not value > 0:
            raise SystemExit(f"--epsilons: {raw!r} is not a positive number or 'inf'")
        out.append(value)
    return out


# ------------------------------------------------------------------------------- one run


def run_federation(
    fed, base: dict, epsilon: float, seed: int, hospitals: int, name: str, secure: bool = False
) -> dict:
    # Each run is a fresh dataset history (its own simulated ledgers), as a benchmark models.
    state = Path(base["output-dir"]).parent / "node-state" / name
    cfg = {**base, "seed": seed, "run-name": name, "state-dir": str(state)}
    if secure:  # SecAgg+ training rounds (server/secagg_round.py)
        cfg["secure-aggregation"] = True
    if math.isinf(epsilon):
        cfg["dp"] = False
    else:
        cfg["dp"] = True
        cfg["target-epsilon"] = float(epsilon)
    from simulations.benchmarks.federation import peak_memory

    with peak_memory(fed.superlink.pid) as mem:  # SuperLink + simulation + Ray workers
        result = fed.run(cfg, num_supernodes=hospitals, timeout=3600, name=name)
    summary_path = Path(base["output-dir"]) / name / "summary.json"
    if result.returncode != 0 or not summary_path.is_file():
        raise RuntimeError(
            f"flwr run {name} failed (rc {result.returncode}):\n{result.output[-4000:]}"
        )
    out = final_round(json.loads(summary_path.read_text()))
    out["wall_s"] = result.wall_s
    out["peak_rss_mb"] = mem.peak
    return out


# ------------------------------------------------------------------------------- table


# ------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    quick = bool(args.quick)
    first = 0 if quick else int(getattr(args, "first_seed", 0))
    seeds = list(range(first, first + (1 if quick else max(1, args.seeds))))
    epsilons = parse_epsilons(
        "8,inf" if quick and args.epsilons == DEFAULT_EPSILONS else args.epsilons
    )
    settings = {s.strip() for s in args.settings.split(",") if s.strip()}
    unknown = settings - {"centralised", "fl", "secagg"}
    if unknown:
        raise SystemExit(
            f"--settings: unknown {sorted(unknown)}; choose from centralised,fl,secagg"
        )
    overrides = parse_overrides(args.run_config)
    if quick:
        overrides = {"num-server-rounds": 2, "batch-size": 16, **overrides}
    cfg = _run_config(overrides)
    with tempfile.TemporaryDirectory(prefix="fedvox-bench-utility-") as tmp:
        work = Path(args.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        data_dir, hospitals, data_desc = _data(args, quick, cfg, work)
        bench = _Bench(Path(args.out), quick, data_desc, overrides, cfg)
        bench.runs += merged_runs(getattr(args, "merge", None), data_desc, overrides)
        for secure in [False] * ("fl" in settings) + [True] * ("secagg" in settings):
            _federations(bench, work, data_dir, hospitals, epsilons, seeds, secure)
        if "centralised" in settings:
            from simulations.benchmarks.centralised import run_centralised

            for seed in seeds:
                res = run_centralised(data_dir, cfg, seed, work / "cache")
                bench.record("centralised", None, seed, res)
        table = bench.write(complete=True)
    print(table)
    print(f"[bench utility] wrote {bench.out} and {bench.out.with_suffix('.md')}")
    return 0


def _run_config(overrides: dict) -> RunConfig:
    """The project's run config with the overrides, checked like the apps check it."""
    try:
        return RunConfig.parse({**default_run_config(), **overrides})
    except ConfigError as e:
        raise SystemExit(f"-c/--run-config: {e}") from None


def _data(args: argparse.Namespace, quick: bool, cfg: RunConfig, work: Path):
    """(data dir, hospitals, a description for the table) of --data, --quick or the demo."""
    if args.data is not None:
        from common.paths import list_sites

        data_dir = Path(args.data).resolve()
        if not (data_dir / "holdout").is_dir():
            raise SystemExit(f"--data {data_dir}: no holdout/ folder (see fedvox prepare)")
        hospitals = len(list_sites(data_dir))
        desc = f"{data_dir.name}, {hospitals} hospitals"
        params = data_dir / "prepare.json"
        if params.is_file():
            prepared = json.loads(params.read_text()).get("params", {})
            desc += f" (fedvox prepare {json.dumps(prepared)})"
        return data_dir, hospitals, desc
    if quick:
        from simulations.phantoms.sites import make_phantom_sites

        data_dir = work / "data"
        if not (data_dir / "holdout").is_dir():
            make_phantom_sites(
                "blobs-2d", data_dir, hospitals=2, cases_per_site=48, holdout_cases=40, seed=1
            )
        return data_dir, 2, "phantom blobs-2d, 2 hospitals"
    from common.datasets import ensure_demo_data

    hospitals, alpha = cfg.demo_hospitals, cfg.demo_alpha
    # One fixed partition (the demo's, seed 0); seeds vary initialisation and training.
    data_dir = ensure_demo_data(work / "data", hospitals=hospitals, alpha=alpha, seed=0)
    desc = f"PneumoniaMNIST, {hospitals} hospitals, Dirichlet({alpha:g}), partition seed 0"
    return data_dir, hospitals, desc


def _federations(
    bench, work: Path, data_dir: Path, hospitals: int, epsilons, seeds, secure: bool = False
) -> None:
    """One real Flower simulation per (epsilon, seed) on a private SuperLink; `secure`: under
    SecAgg+ (rows fl-dp-secagg)."""
    from simulations.harness.local import LocalFederation

    base = {**bench.overrides, "data-dir": str(data_dir), "output-dir": str(work / "runs")}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with LocalFederation(work / "sim") as fed:
        runs = [(epsilon, seed) for epsilon in epsilons for seed in seeds]
        for epsilon, seed in track(runs, "federations"):
            name = f"{stamp}-eps{epsilon:g}-seed{seed}" + ("-secagg" if secure else "")
            res = run_federation(fed, base, epsilon, seed, hospitals, name, secure)
            setting = ("fl" if math.isinf(epsilon) else "fl-dp") + ("-secagg" if secure else "")
            bench.record(setting, None if math.isinf(epsilon) else epsilon, seed, res)


class _Bench:
    """The runs so far; JSON + markdown rewritten after every run (an interrupted benchmark
    still leaves its numbers)."""

    def __init__(self, out: Path, quick: bool, data: str, overrides: dict, cfg: RunConfig):
        self.out, self.quick, self.data, self.overrides = out, quick, data, overrides
        self.run_config = {
            k: v for k, v in cfg.as_dict().items() if k not in ("data-dir", "output-dir")
        }
        self.runs: list[dict] = []
        out.parent.mkdir(parents=True, exist_ok=True)

    def result(self, complete: bool) -> dict:
        from server.report_data import environment

        return {
            "benchmark": "utility",
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": environment(),
            "complete": complete,
            "quick": self.quick,
            "data": self.data,
            "run_config_overrides": self.overrides,
            "run_config": self.run_config,
            "rows": summarise(self.runs),
            "runs": self.runs,
        }

    def record(self, setting: str, epsilon: float | None, seed: int, res: dict) -> None:
        self.runs.append({"setting": setting, "epsilon": epsilon, "seed": seed, **res})
        eps = "inf" if epsilon is None else f"{epsilon:g}"
        if res.get("dice"):
            shown = " ".join(f"Dice {c} {v:.4f}" for c, v in res["dice"].items())
        else:
            shown = f"AUC {res['auc']:.4f} ACC {res['acc']:.4f}"
        print(f"[bench utility] {setting} eps={eps} seed={seed}: {shown} ({res['wall_s']:.0f} s)")
        self.write(complete=False)

    def write(self, complete: bool) -> str:
        result = self.result(complete)
        table = format_table(result)
        atomic_write_text(self.out, json.dumps(result, indent=2) + "\n")
        atomic_write_text(self.out.with_suffix(".md"), table + "\n")
        return table
