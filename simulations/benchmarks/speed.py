"""`fedvox bench speed`: what DP-SGD costs per step, ours vs Opacus, side by side.

Every mode (non-private, fedvox fast DP, Opacus `hooks`, Opacus `ew`) gets its own copy of the same
default model, the same fixed batch and the same thread count, and all of them run interleaved in
one process: round r runs one step of every mode (order rotated each round), so load from other
processes on a shared machine hits all modes alike. Ratios are median step time / median
non-private step time.

The federation numbers (`federation_overhead`, `startup_s`, `data_share`, `scale`) come
from real Flower simulation runs (`simulations.benchmarks.federation`); `--no-federation` skips them
(they are then null).

Top-level imports stay stdlib-only: the CLI imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
from pathlib import Path

from common.progress import track

MODES = ("nonprivate", "fast", "hooks", "ew")

# name -> (spatial dims, input shape without batch, batch); the reference workloads.
FULL = {"2d": (2, (1, 28, 28), 64), "3d": (3, (1, 64, 64, 64), 8)}
QUICK = {"2d": (2, (1, 28, 28), 16), "3d": (3, (1, 16, 16, 16), 2)}


SECAGG_DEFAULT = "5,20"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    parser.add_argument(
        "--quick", action="store_true", help="small inputs, few repeats, 1 thread (for tests)"
    )
    parser.add_argument(
        "--threads",
        default=None,
        help="comma-separated torch thread counts to measure; the first gives the top-level "
        "ratios (default: '1,2' full, '1' quick). 1 thread is what a fedvox client gets on a "
        "shared 2-core machine, where 2 threads per process collapse under contention",
    )
    parser.add_argument(
        "--no-federation",
        action="store_true",
        help="skip the simulation-based numbers (overhead, start-up, data share, scale)",
    )
    parser.add_argument(
        "--scale-hospitals", type=int, default=100, help="hospitals in the scale run (default 100)"
    )
    parser.add_argument(
        "--secagg-hospitals",
        default=SECAGG_DEFAULT,
        help="hospital counts at which to measure SecAgg+'s cost per round, each a run without "
        "and one with secure-aggregation=true (default 5,20; '' = skip)",
    )
    parser.add_argument(
        "--only-secagg",
        action="store_true",
        help="measure only the SecAgg+ pairs of --secagg-hospitals (no step costs, no scale run)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the simulations write (default: a temp dir)",
    )
    parser.add_argument(
        "--runs",
        type=Path,
        nargs="*",
        default=[],
        metavar="RUN_DIR",
        help="finished default runs (`fedvox run` output folders): their recipe's run_wall_s and "
        "time_to_target_s (held-out AUC 0.95, Dice lung 0.9) in the recipes section",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved rounds per workload (default: 2d 15, 3d 5; quick 3)",
    )


def _setup(mode: str, dims: int, batch: int):
    """A fresh default model + optimizer for `mode`, made private the way fedvox/Opacus do."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from common import fast_dp
    from common.models import build_model

    torch.manual_seed(0)  # every mode starts from the same weights
    model = build_model(dims, 1, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if mode == "nonprivate":
        return model, opt
    # make_private only reads the loader's length (sample rate = 1/len = batch/N).
    loader = DataLoader(TensorDataset(torch.zeros(batch * 10, 1)), batch_size=batch)
    args = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0)
    engine = PrivacyEngine(accountant="rdp")
    if mode == "fast":
        model, opt, _ = fast_dp.make_private(engine, max_grad_norm=1.0, **args)
    else:
        model, opt, _ = engine.make_private(max_grad_norm=1.0, grad_sample_mode=mode, **args)
    return model, opt


def measure_steps(
    dims: int, shape: tuple[int, ...], batch: int, threads: int, repeats: int
) -> dict[str, float]:
    """(median, min) wall seconds of one SGD step per mode, all modes interleaved in one process."""
    import warnings

    import torch
    from torch import nn

    from simulations.benchmarks.recipe_speed import interleaved

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen)
    y = torch.randint(0, 2, (batch,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' secure-RNG and backward-hook notices
        runs = {m: (*_setup(m, dims, batch), loss_fn) for m in MODES}
        times = interleaved(runs, x, y, repeats)
    return {m: (statistics.median(v), min(v)) for m, v in times.items()}


def dp_section(quick: bool, threads: list[int], repeats: int | None) -> dict:
    """Ours and Opacus' ratios at threads[0] (top level); all thread counts in `by_threads`."""
    workloads = QUICK if quick else FULL
    by_threads = {}
    for t in threads:
        per = {}
        steps = track(workloads.items(), f"DP steps, {t} thread(s)")
        for name, (dims, shape, batch) in steps:
            reps = repeats or (3 if quick else {"2d": 15, "3d": 5}[name])
            res = measure_steps(dims, shape, batch, t, reps)
            med = {m: v[0] for m, v in res.items()}
            low = {m: v[1] for m, v in res.items()}
            per[name] = {
                "input": [batch, *shape],
                "repeats": reps,
                "step_ms": {m: round(v * 1e3, 2) for m, v in med.items()},
                "ratio": {m: round(v / med["nonprivate"], 3) for m, v in med.items()},
                # Fastest step per mode: less sensitive to other processes on a shared machine.
                "ratio_of_min": {m: round(v / low["nonprivate"], 3) for m, v in low.items()},
            }
        by_threads[str(t)] = per
    top = by_threads[str(threads[0])]
    return {
        "threads": threads[0],
        "dp_step_ratio": {k: top[k]["ratio"]["fast"] for k in workloads},
        "opacus_step_ratio": {
            f"{mode}_{k}": top[k]["ratio"][mode] for k in workloads for mode in ("hooks", "ew")
        },
        "by_threads": by_threads,
    }


def federation_section(
    skip: bool,
    quick: bool,
    scale_hospitals: int,
    workdir: Path | None,
    secagg_hospitals: tuple[int, ...] = (),
) -> dict:
    """Simulation numbers: overhead + start-up + data share at 5 hospitals, then the scale run.

    Both run on the vendored PneumoniaMNIST (quick: small phantoms) prepared into `workdir`.
    """
    empty = {
        "federation_overhead": None,
        "startup_s": None,
        "data_share": None,
        "scale": None,
        "secagg": None,
    }
    if skip:
        return empty
    import tempfile

    from common.datasets import prepare_from_npz
    from simulations.benchmarks.federation import measure_federation, measure_scale
    from simulations.phantoms.sites import make_phantom_sites

    root = workdir or Path(tempfile.mkdtemp(prefix="fedvox-bench-"))
    hospitals, rounds = (2, 2) if quick else (5, 4)
    scale_n, scale_rounds = (3, 1) if quick else (scale_hospitals, 3)
    if quick:
        make_phantom_sites(
            "blobs-2d", root / "data-fed", hospitals, cases_per_site=24, holdout_cases=16
        )
        make_phantom_sites(
            "blobs-2d", root / "data-scale", scale_n, cases_per_site=16, holdout_cases=16
        )
    else:
        from common.datasets import DEFAULT_SOURCE

        prepare_from_npz(DEFAULT_SOURCE, root / "data-fed", hospitals, "dirichlet", 0.5, 0)
        prepare_from_npz(DEFAULT_SOURCE, root / "data-scale", scale_n, "iid", 0.5, 0)
    fed = measure_federation(root / "fed", root / "data-fed", hospitals, rounds)
    scale = measure_scale(root / "scale", root / "data-scale", scale_n, scale_rounds)
    return {**fed, "scale": scale, "secagg": secagg_section(root, quick, secagg_hospitals)}


def secagg_section(root: Path, quick: bool, counts: tuple[int, ...]) -> list[dict]:
    """SecAgg+'s overhead per round at each hospital count (demo data, IID)."""
    from common.datasets import DEFAULT_SOURCE, prepare_from_npz
    from simulations.benchmarks.federation import measure_secagg
    from simulations.phantoms.sites import make_phantom_sites

    out = []
    for n in counts:
        data = root / f"data-secagg-{n}"
        if quick:
            make_phantom_sites("blobs-2d", data, n, cases_per_site=16, holdout_cases=16)
        else:
            prepare_from_npz(DEFAULT_SOURCE, data, n, "iid", 0.5, 0)
        out.append(measure_secagg(root / f"secagg-{n}", data, n, 2 if quick else 3))
    return out


def format_table(result: dict) -> str:
    lines = [
        f"{'workload':<28}{'threads':>8}"
        + "".join(f"{m + ' ms':>16}" for m in MODES)
        + f"{'fast/non-DP':>13}{'(of min)':>10}"
    ]
    for t, per in result["by_threads"].items():
        for name, r in per.items():
            cells = "".join(
                f"{r['step_ms'][m]:>9.1f} ({r['ratio'][m]:.2f}x)"[-16:].rjust(16) for m in MODES
            )
            shape = "x".join(map(str, r["input"]))
            lines.append(
                f"{name + ' ' + shape:<28}{t:>8}{cells}{r['ratio']['fast']:>12.2f}x"
                f"{r['ratio_of_min']['fast']:>9.2f}x"
            )
    return "\n".join(lines)


def _secagg_counts(args: argparse.Namespace) -> tuple[int, ...]:
    """--secagg-hospitals as ints; --quick measures 3 phantom hospitals unless told."""
    text = str(args.secagg_hospitals)
    if args.quick and text == SECAGG_DEFAULT:
        text = "3"
    try:
        return tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        raise SystemExit(f"--secagg-hospitals: expected e.g. 5,20, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from server.report_data import environment
    from simulations.benchmarks.recipe_speed import apply_runs, format_recipes, recipes_section

    threads_arg = args.threads or ("1" if args.quick else "1,2")
    try:
        threads = [int(t) for t in threads_arg.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(
            f"--threads must be comma-separated integers, got {threads_arg!r}"
        ) from None
    if not threads or min(threads) < 1:
        raise SystemExit(f"--threads needs at least one count >= 1, got {threads_arg!r}")
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")

    if args.only_secagg:
        return _run_secagg_only(args)
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": environment(),
        "quick": bool(args.quick),
        **dp_section(args.quick, threads, args.repeats),
        "recipes": recipes_section(args.quick, threads[0], args.repeats),
        **federation_section(
            args.no_federation,
            args.quick,
            args.scale_hospitals,
            args.workdir,
            _secagg_counts(args),
        ),
    }
    apply_runs(result["recipes"], list(args.runs))
    print(format_table(result))
    print(format_recipes(result["recipes"]))
    print(
        f"dp_step_ratio (threads={result['threads']}): "
        + ", ".join(f"{k} {v:.2f}x" for k, v in result["dp_step_ratio"].items())
    )
    if result["federation_overhead"] is not None:
        sc = result["scale"]
        print(
            f"federation_overhead {result['federation_overhead']:.2f}x  "
            f"startup {result['startup_s']:.1f}s  data_share {result['data_share']:.1%}  "
            f"scale {sc['hospitals']} hospitals x {sc['rounds']} rounds: {sc['wall_s']:.0f}s, "
            f"peak RSS {sc['peak_rss_mb']:.0f} MB"
        )
    _print_secagg_and_write(result, args.out)
    return 0


def _run_secagg_only(args: argparse.Namespace) -> int:
    import tempfile

    from server.report_data import environment

    counts = _secagg_counts(args)
    if not counts:
        raise SystemExit("--only-secagg needs --secagg-hospitals, e.g. 5,20")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="fedvox-bench-"))
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": environment(),
        "quick": bool(args.quick),
        "secagg": secagg_section(root, args.quick, counts),
    }
    _print_secagg_and_write(result, args.out)
    return 0


def _print_secagg_and_write(result: dict, out: Path | None) -> None:
    for sa in result.get("secagg") or []:
        print(
            f"secagg {sa['hospitals']} hospitals: {sa['secagg_round_wall_s']:.1f} s per round vs "
            f"{sa['round_wall_s']:.1f} s without ({sa['overhead']:.2f}x)"
        )
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
