"""`fedvox bench utility`: what privacy costs in clinical utility, as a table and JSON.

Settings (issue 6):
  - "centralised": the pooled, non-private reference — every hospital's training part in
    one place, trained in-process with the same model and optimiser settings for the same
    number of epochs as the federation sees (rounds x local epochs);
  - "fl": the federation without DP (epsilon = inf), a real Flower simulation;
  - "fl-dp": the federation with DP-SGD at every hospital at each epsilon, a real Flower
    simulation (`simulations.local.LocalFederation`).

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
import statistics
import tempfile
import time
from pathlib import Path

from simulations.bench import machine_info

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PROJECT_DIR = Path(__file__).resolve().parent.parent
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
        help="which of centralised,fl to run (fl covers fl and fl-dp; default both)",
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


def _finite(values: list[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = _finite(values)
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


# ------------------------------------------------------------------------------- one run


def final_round(summary: dict) -> dict:
    """The numbers of the LAST round of a federation's summary.json."""
    if summary.get("status") != "finished" or not summary.get("rounds"):
        raise RuntimeError(f"run {summary.get('run_name')} did not finish: {summary.get('error')}")
    last = summary["rounds"][-1]
    central = last["central"]
    site_auc = {
        site: h["eval"].get("auc")
        for site, h in last["hospitals"].items()
        if isinstance(h.get("eval"), dict) and h["eval"].get("auc") is not None
    }
    # finetune-epochs > 0: each hospital's own fine-tuned copy on its validation part, and the
    # run's epsilon at the hospital including the fine-tuning.
    site_auc_finetuned = {
        site: h["eval"].get("finetuned-auc")
        for site, h in last["hospitals"].items()
        if isinstance(h.get("eval"), dict) and h["eval"].get("finetuned-auc") is not None
    }
    eps = [h.get("epsilon_run") for h in last["hospitals"].values()]
    eps += [
        h["eval"].get("finetuned-epsilon-run")
        for h in last["hospitals"].values()
        if isinstance(h.get("eval"), dict)
    ]
    return {
        "round": last["round"],
        "auc": central.get("auc"),
        "acc": central.get("accuracy"),
        "sensitivity": central.get("sensitivity"),
        "specificity": central.get("specificity"),
        "threshold": central.get("threshold"),
        "ece": central.get("ece"),
        "ece_raw": central.get("ece-raw"),
        "site_auc": site_auc,
        "site_auc_finetuned": site_auc_finetuned,
        "dice": _dice(central),
        "site_dice": {
            site: h["eval"].get("dice-mean")
            for site, h in last["hospitals"].items()
            if isinstance(h.get("eval"), dict) and h["eval"].get("dice-mean") is not None
        },
        "max_epsilon_spent": max(_finite(eps), default=None),
    }


def _dice(metrics: dict) -> dict[str, float]:
    """Per-class Dice of a segmentation evaluation ({} for classification)."""
    return {k[len("dice-") :]: float(v) for k, v in metrics.items() if k.startswith("dice-")}


def run_federation(fed, base: dict, epsilon: float, seed: int, hospitals: int, name: str) -> dict:
    cfg = {**base, "seed": seed, "run-name": name}
    if math.isinf(epsilon):
        cfg["dp"] = False
    else:
        cfg["dp"] = True
        cfg["target-epsilon"] = float(epsilon)
    from simulations.bench_federation import PeakMemory

    with PeakMemory(fed.superlink.pid) as mem:  # SuperLink + simulation + Ray workers
        result = fed.run(cfg, num_supernodes=hospitals, timeout=3600, name=name)
    summary_path = Path(base["output-dir"]) / name / "summary.json"
    if result.returncode != 0 or not summary_path.is_file():
        raise RuntimeError(
            f"flwr run {name} failed (rc {result.returncode}):\n{result.output[-4000:]}"
        )
    out = final_round(json.loads(summary_path.read_text()))
    out["wall_s"] = result.wall_s
    out["peak_rss_mb"] = mem.peak_mb
    return out


def run_centralised(data_dir: Path, cfg: dict, seed: int, cache_dir: Path) -> dict:
    """Pooled non-DP training in-process: the reference a single big hospital could reach."""
    import torch

    from client.train import scheduled_learning_rate, train_dp
    from common.calibration import calibrated_metrics, choose_calibration, validation_summary
    from common.metrics import evaluate_model
    from common.paths import list_sites
    from common.site import default_image_size, load_site
    from common.tasks import model_options, task_for

    t0 = time.monotonic()

    size = default_image_size(data_dir / "holdout")  # what the server would choose

    def load(site: Path, split: str):
        return load_site(
            site, split=split, image_size=size, cache_dir=cache_dir, log=lambda m: None
        )

    sites = list_sites(data_dir)
    train = [load(s, "train") for s in sites]
    val = [load(s, "val") for s in sites]
    holdout = load(data_dir / "holdout", "all")
    task = task_for(holdout.spec)
    torch.manual_seed(seed)
    model = task.build_model(
        holdout.spatial_dims,
        holdout.in_channels,
        holdout.num_classes,
        image_size=tuple(holdout.images.shape[2:]),
        **model_options(cfg),
    )
    rounds, local_epochs = int(cfg["num-server-rounds"]), int(cfg["local-epochs"])
    epochs = rounds * local_epochs
    images = torch.cat([d.images for d in train])
    labels = torch.cat([d.labels for d in train])
    schedule = str(cfg.get("learning-rate-schedule", "constant"))
    base_lr = float(cfg["learning-rate"])
    # A constant rate trains in one go; a schedule trains as many "rounds" as the federation,
    # each with a fresh optimiser at that round's rate, like a hospital's local training.
    chunks = (
        [(epochs, base_lr)]
        if schedule == "constant"
        else [
            (local_epochs, scheduled_learning_rate(base_lr, schedule, r, rounds))
            for r in range(1, rounds + 1)
        ]
    )
    for chunk_epochs, lr in chunks:
        train_dp(
            model,
            images,
            labels,
            epochs=chunk_epochs,
            batch_size=int(cfg["batch-size"]),
            learning_rate=lr,
            noise_multiplier=None,  # non-private reference
            max_grad_norm=float(cfg["max-grad-norm"]),
            accountant=str(cfg.get("accountant", "rdp")),
            momentum=float(cfg.get("momentum", 0.9)),
            loss_fn=task.loss_fn(),
            augmentation=str(cfg.get("augmentation", False)).lower() in ("true", "1"),
        )
    if holdout.spec.is_segmentation:
        return {
            "round": epochs,
            "auc": None,
            "acc": None,
            "dice": _dice(task.evaluate(model, holdout.images, holdout.labels).metrics),
            "site_dice": {
                s.name: task.evaluate(model, d.images, d.labels).metrics.get("dice-mean")
                for s, d in zip(sites, val, strict=True)
                if len(d)
            },
            "site_auc": {},
            "max_epsilon_spent": None,
            "wall_s": time.monotonic() - t0,
        }
    calib = choose_calibration(
        [validation_summary(model, d.images, d.labels) for d in val if len(d)]
    )
    threshold = calib.threshold if calib and calib.threshold is not None else 0.5
    metrics, probs = evaluate_model(model, holdout.images, holdout.labels, threshold)
    extra = calibrated_metrics(probs, holdout.labels.numpy(), calib) if calib else {}
    site_auc = {}
    for s, d in zip(sites, val, strict=True):
        if len(d):
            site_auc[s.name] = task.evaluate(model, d.images, d.labels).metrics.get("auc")
    return {
        "round": epochs,
        "auc": metrics["auc"],
        "acc": metrics["accuracy"],
        "sensitivity": metrics.get("sensitivity"),
        "specificity": metrics.get("specificity"),
        "threshold": extra.get("threshold"),
        "ece": extra.get("ece"),
        "ece_raw": extra.get("ece-raw"),
        "site_auc": site_auc,
        "dice": {},
        "max_epsilon_spent": None,
        "wall_s": time.monotonic() - t0,
    }


# ------------------------------------------------------------------------------- table


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (setting, epsilon): mean and sd over seeds."""
    rows = []
    keys: list[tuple[str, float | None]] = []
    for r in runs:
        if (r["setting"], r["epsilon"]) not in keys:
            keys.append((r["setting"], r["epsilon"]))
    order = {"centralised": 0, "fl": 1, "fl-dp": 2}
    keys.sort(key=lambda k: (order.get(k[0], 3), -(k[1] or 0.0)))
    for setting, epsilon in keys:
        group = [r for r in runs if r["setting"] == setting and r["epsilon"] == epsilon]
        auc_mean, auc_sd = _mean_sd([r["auc"] for r in group])
        acc_mean, acc_sd = _mean_sd([r["acc"] for r in group])
        ece_mean, _ = _mean_sd([r.get("ece") for r in group])
        worst = [min(_finite(list(r["site_auc"].values())), default=None) for r in group]
        worst_tuned = [
            min(_finite(list((r.get("site_auc_finetuned") or {}).values())), default=None)
            for r in group
        ]
        best = [max(_finite(list(r["site_auc"].values())), default=None) for r in group]
        gaps = [b - w for b, w in zip(best, worst, strict=True) if b is not None and w is not None]
        classes = sorted({c for r in group for c in r.get("dice") or {}})
        dice = {c: _mean_sd([(r.get("dice") or {}).get(c) for r in group]) for c in classes}
        worst_dice = [
            min(_finite(list((r.get("site_dice") or {}).values())), default=None) for r in group
        ]
        rows.append(
            {
                "setting": setting,
                "epsilon": epsilon,
                "seeds": [r["seed"] for r in group],
                "auc_mean": auc_mean,
                "auc_sd": auc_sd,
                "acc_mean": acc_mean,
                "acc_sd": acc_sd,
                "worst_site_auc": _mean_sd(worst)[0],
                "site_auc_gap": _mean_sd(gaps)[0],
                "worst_site_auc_finetuned": _mean_sd(worst_tuned)[0],
                "ece_mean": ece_mean,
                "wall_s_mean": _mean_sd([r.get("wall_s") for r in group])[0],
                "peak_rss_mb_max": max(
                    _finite([r.get("peak_rss_mb") for r in group]), default=None
                ),
                **(
                    {
                        "dice_mean": {c: m for c, (m, _) in dice.items()},
                        "dice_sd": {c: sd for c, (_, sd) in dice.items()},
                        "worst_site_dice": _mean_sd(worst_dice)[0],
                    }
                    if classes
                    else {}
                ),
            }
        )
    return rows


def _fmt(mean: float | None, sd: float | None = None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def format_table(result: dict) -> str:
    """Markdown table: AUC/ACC columns for classification, per-class Dice for segmentation."""
    rows = result["rows"]
    if any("dice_mean" in r for r in rows):
        classes = sorted({c for r in rows for c in r.get("dice_mean", {}) if c != "mean"})
        classes.append("mean")
        head = [f"Dice {c}" for c in classes] + ["worst-site Dice"]

        def cells(r: dict) -> list[str]:
            dice = [
                _fmt(r.get("dice_mean", {}).get(c), r.get("dice_sd", {}).get(c)) for c in classes
            ]
            return [*dice, _fmt(r.get("worst_site_dice"))]
    else:
        tuned = any(r.get("worst_site_auc_finetuned") is not None for r in rows)
        head = ["AUC", "ACC", "worst-site AUC", "best–worst gap", "ECE"]
        head += ["worst-site AUC fine-tuned"] if tuned else []

        def cells(r: dict) -> list[str]:
            out = [
                _fmt(r["auc_mean"], r["auc_sd"]),
                _fmt(r["acc_mean"], r["acc_sd"]),
                _fmt(r["worst_site_auc"]),
                _fmt(r["site_auc_gap"]),
                _fmt(r["ece_mean"]),
            ]
            return out + ([_fmt(r.get("worst_site_auc_finetuned"))] if tuned else [])

    lines = [
        "| setting | ε | seeds | " + " | ".join(head) + " | wall s |",
        "|---|---|---|" + "---|" * (len(head) + 1),
    ]
    for r in rows:
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:g}"
        lines.append(
            f"| {r['setting']} | {eps} | {len(r['seeds'])} | "
            + " | ".join(cells(r))
            + f" | {r['wall_s_mean']:.0f} |"
        )
    lines.append("")
    lines.append(_footer(result))
    return "\n".join(lines)


def _footer(result: dict) -> str:
    return (
        f"Measured {result['date']} on {result['machine']['cpu']} "
        f"({result['machine']['cores']} cores); data: {result['data']}; "
        f"config: {json.dumps(result['run_config_overrides'])}"
    )


# ------------------------------------------------------------------------------- main


def _merged_runs(path: Path | None, data_desc: str, overrides: dict) -> list[dict]:
    """Runs of an earlier result to add to this table; refused if data or config differ."""
    if path is None:
        return []
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--merge {path}: cannot read it ({e})") from None
    if earlier.get("data") != data_desc:
        raise SystemExit(f"--merge {path}: other data ({earlier.get('data')!r}, not {data_desc!r})")
    if earlier.get("run_config_overrides") != overrides:
        raise SystemExit(
            f"--merge {path}: other run config ({earlier.get('run_config_overrides')} "
            f"vs {overrides})"
        )
    return [dict(r, merged_from=str(path)) for r in earlier.get("runs", [])]


def run(args: argparse.Namespace) -> int:
    from simulations.local import LocalFederation

    quick = bool(args.quick)
    first = 0 if quick else int(getattr(args, "first_seed", 0))
    seeds = list(range(first, first + (1 if quick else max(1, args.seeds))))
    epsilons = parse_epsilons(
        "8,inf" if quick and args.epsilons == DEFAULT_EPSILONS else args.epsilons
    )
    settings = {s.strip() for s in args.settings.split(",") if s.strip()}
    unknown = settings - {"centralised", "fl"}
    if unknown:
        raise SystemExit(f"--settings: unknown {sorted(unknown)}; choose from centralised,fl")
    overrides = parse_overrides(args.run_config)
    if quick:
        overrides = {"num-server-rounds": 2, "batch-size": 16, **overrides}

    with tempfile.TemporaryDirectory(prefix="fedvox-bench-utility-") as tmp:
        work = Path(args.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        if args.data is not None:
            from common.paths import list_sites

            data_dir = Path(args.data).resolve()
            if not (data_dir / "holdout").is_dir():
                raise SystemExit(f"--data {data_dir}: no holdout/ folder (see fedvox prepare)")
            hospitals = len(list_sites(data_dir))
            data_desc = f"{data_dir.name}, {hospitals} hospitals"
            params = data_dir / "prepare.json"
            if params.is_file():
                prepared = json.loads(params.read_text()).get("params", {})
                data_desc += f" (fedvox prepare {json.dumps(prepared)})"
        elif quick:
            from simulations.phantoms import make_phantom_sites

            data_dir, hospitals = work / "data", 2
            if not (data_dir / "holdout").is_dir():
                make_phantom_sites(
                    "blobs-2d", data_dir, hospitals=2, cases_per_site=48, holdout_cases=40, seed=1
                )
            data_desc = "phantom blobs-2d, 2 hospitals"
        else:
            from common.datasets import ensure_demo_data

            defaults = default_run_config()
            hospitals = int(overrides.get("demo-hospitals", defaults.get("demo-hospitals", 5)))
            alpha = float(overrides.get("demo-alpha", defaults.get("demo-alpha", 0.5)))
            # One fixed partition (the demo's, seed 0); seeds vary initialisation and training.
            data_dir = ensure_demo_data(work / "data", hospitals=hospitals, alpha=alpha, seed=0)
            data_desc = (
                f"PneumoniaMNIST, {hospitals} hospitals, Dirichlet({alpha:g}), partition seed 0"
            )
        cfg = {**default_run_config(), **overrides}
        base = {
            **overrides,
            "data-dir": str(data_dir),
            "output-dir": str(work / "runs"),
        }
        stamp = time.strftime("%Y%m%d-%H%M%S")
        runs: list[dict] = _merged_runs(getattr(args, "merge", None), data_desc, overrides)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)

        def result(complete: bool) -> dict:
            return {
                "benchmark": "utility",
                "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "machine": machine_info(),
                "complete": complete,
                "quick": quick,
                "data": data_desc,
                "run_config_overrides": overrides,
                "run_config": {k: v for k, v in cfg.items() if k not in ("data-dir", "output-dir")},
                "rows": summarise(runs),
                "runs": runs,
            }

        def record(setting: str, epsilon: float | None, seed: int, res: dict) -> None:
            runs.append({"setting": setting, "epsilon": epsilon, "seed": seed, **res})
            eps = "inf" if epsilon is None else f"{epsilon:g}"
            if res.get("dice"):
                shown = " ".join(f"Dice {c} {v:.4f}" for c, v in res["dice"].items())
            else:
                shown = f"AUC {res['auc']:.4f} ACC {res['acc']:.4f}"
            print(
                f"[bench utility] {setting} eps={eps} seed={seed}: {shown} ({res['wall_s']:.0f} s)",
                flush=True,
            )
            # Written after every run, so an interrupted benchmark still leaves its numbers.
            out.write_text(json.dumps(result(False), indent=2) + "\n")
            out.with_suffix(".md").write_text(format_table(result(False)) + "\n")

        if "fl" in settings:
            with LocalFederation(work / "sim") as fed:
                for epsilon in epsilons:
                    for seed in seeds:
                        name = f"{stamp}-eps{epsilon:g}-seed{seed}"
                        res = run_federation(fed, base, epsilon, seed, hospitals, name)
                        setting = "fl" if math.isinf(epsilon) else "fl-dp"
                        record(setting, None if math.isinf(epsilon) else epsilon, seed, res)

        if "centralised" in settings:
            for seed in seeds:
                res = run_centralised(data_dir, cfg, seed, work / "cache")
                record("centralised", None, seed, res)
        final = result(True)
    table = format_table(final)
    print(table)
    out.write_text(json.dumps(final, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    print(f"[bench utility] wrote {out} and {out.with_suffix('.md')}")
    return 0
