"""`fedvox bench speed`'s "recipes" section: the DP step of each default recipe's own model.

Each model is built exactly as a run with the default recipe builds it (the recipe's values at
epsilon 8 through `common.recipes` and the model registry), trained on the step a hospital takes
from round 2 on: a fixed front end (scattering, the 3D filter bank) is memoised by then, so
the warm-up step fills the feature cache and the timed steps hit it. Modes, interleaved on
the same batch in one process: non-private, fedvox's DP step (`common.privacy.make_private`,
the path `client/train.py`'s `local_sgd` takes) and Opacus' `hooks`, `ew` and `ghost`.

A run's wall and time to a useful model need a full default run: `--runs DIR` reads them
from finished run directories (`fedvox run ... --out DIR`).
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODES = ("nonprivate", "fast", "hooks", "ew", "ghost")
OPACUS = ("hooks", "ew", "ghost")
EPSILON = 8.0  # the recipes' tuned epsilon (the demo's)
TARGETS = {"auc": 0.95, "dice-lung": 0.9}  # time_to_target_s: first round at or above

# recipe -> (task, spatial dims, input shape without batch, classes, data it is tuned for)
WORKLOADS = {
    "2d-classification": ("classification", 2, (1, 28, 28), 2, "PneumoniaMNIST demo 28^2"),
    "3d-classification": ("classification", 3, (1, 64, 64, 64), 2, "organ-3d phantom 64^3"),
    "3d-segmentation": ("segmentation", 3, (1, 64, 64, 64), 3, "lung-ct phantom 64^3"),
}
QUICK_SHAPES = {"3d-classification": (1, 16, 16, 16), "3d-segmentation": (1, 16, 16, 16)}
QUICK_BATCH = 8
RUNS_NOTE = (
    "run_wall_s / time_to_target_s come from a full default run: "
    "fedvox bench speed --runs RUN_DIR (a finished `fedvox run` output directory)"
)


def recipe_setup(name: str, quick: bool) -> dict[str, Any]:
    """The model spec, loss, batch and data of recipe `name` as a default run resolves them."""
    from common.recipes import recipe_for
    from common.tasks import ModelSpec, task_for

    task, dims, shape, classes, data = WORKLOADS[name]
    shape = QUICK_SHAPES.get(name, shape) if quick else shape
    recipe = recipe_for(task, dims)

    def value(key: str) -> Any:
        return recipe.value(key, EPSILON, dp=True)

    spec = ModelSpec(task, dims, shape[0], classes, shape[1:], value("model"),
                     value("model-width") or None)  # fmt: skip
    batch = value("max-physical-batch") or value("batch-size")  # one physical step
    return {
        "spec": spec,
        "loss": lambda: task_for(task).loss_fn(value("structure-weight"), progress=0.0),
        "batch": QUICK_BATCH if quick else batch,
        "shape": shape,
        "data": data,
        "model": value("model"),
    }


def _batch(setup: dict[str, Any]) -> tuple[Any, Any]:
    """One fixed batch: random images, labels (class ids, or label maps for segmentation)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    n, shape, spec = setup["batch"], setup["shape"], setup["spec"]
    x = torch.randn(n, *shape, generator=gen)
    if spec.task == "segmentation":
        y = torch.randint(0, spec.num_classes, (n, 1, *shape[1:]), generator=gen)
    else:
        y = torch.randint(0, spec.num_classes, (n,), generator=gen)
    return x, y


def _make_mode(mode: str, setup: dict[str, Any]) -> tuple[Any, Any, Callable]:
    """(model, optimizer, criterion) for `mode`, from the same initial weights."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from common import privacy
    from common.tasks import build_task_model

    torch.manual_seed(0)
    model = build_task_model(setup["spec"])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = setup["loss"]()
    if mode == "nonprivate":
        return model, opt, loss
    # make_private reads only the loader's length (sample rate) and dataset.
    b = setup["batch"]
    loader = DataLoader(TensorDataset(torch.zeros(b * 10, 1)), batch_size=b)
    if mode == "fast":
        model, opt, _, _ = privacy.make_private(model, opt, loader, 1.0, 1.0)
        return model, opt, loss
    args = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0)
    engine = PrivacyEngine(accountant="rdp")
    if mode == "ghost":
        model, opt, loss, _ = engine.make_private(
            max_grad_norm=1.0, grad_sample_mode="ghost", criterion=loss, **args
        )
        return model, opt, loss
    model, opt, _ = engine.make_private(max_grad_norm=1.0, grad_sample_mode=mode, **args)
    return model, opt, loss


def interleaved(
    runs: dict[str, tuple[Any, Any, Callable]], x: Any, y: Any, repeats: int
) -> dict[str, list[float]]:
    """Wall seconds of `repeats` SGD steps per mode, one step of every mode per round (order
    rotated), after one warm-up step each (allocations, kernel choice, feature cache)."""
    modes = list(runs)

    def step(model, opt, loss_fn) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    for m in modes:
        step(*runs[m])
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(repeats):
        for m in modes[r % len(modes) :] + modes[: r % len(modes)]:
            times[m].append(step(*runs[m]))
    return times


def measure_recipe(name: str, quick: bool, threads: int, repeats: int) -> dict[str, Any]:
    """Step times and ratios of recipe `name`; a mode Opacus cannot run is null, with why."""
    import torch

    from common import feature_cache

    torch.set_num_threads(threads)
    setup = recipe_setup(name, quick)
    x, y = _batch(setup)
    view = getattr(build_model_once(setup), "training_view", None)
    if view is not None:  # slice-unet trains on one slice stack per case: the same for all
        torch.manual_seed(0)
        x, y = view(x, y, 0.0)
    # The batch stands for the node's dataset tensor, registered as `local_sgd` registers it
    # (its rows' features are found without hashing them each step).
    feature_cache.known(x)
    runs, failed = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' secure-RNG and backward-hook notices
        for m in MODES:
            try:
                runs[m] = _make_mode(m, setup)
                interleaved({m: runs[m]}, x, y, 0)  # fails here, not mid-measurement
            except Exception as e:  # an Opacus mode that does not support this model
                runs.pop(m, None)
                failed[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        times = interleaved(runs, x, y, repeats)
    med = {m: statistics.median(v) for m, v in times.items()}
    ratio = {m: round(v / med["nonprivate"], 3) for m, v in med.items()}
    opacus = {m: ratio.get(m) for m in OPACUS}
    best = min((v for v in opacus.values() if v is not None), default=None)
    return {
        "model": setup["model"],
        "data": setup["data"],
        "input": [setup["batch"], *x.shape[1:]],
        "threads": threads,
        "repeats": repeats,
        "step_ms": {m: round(v * 1e3, 2) for m, v in med.items()},
        "dp_step_ratio": ratio["fast"],
        "opacus_step_ratio": opacus,
        "opacus_best_ratio": best,
        "failed": failed,
        "run_wall_s": None,
        "time_to_target_s": None,
        "note": RUNS_NOTE,
    }


def build_model_once(setup: dict[str, Any]) -> Any:
    from common.tasks import build_task_model

    return build_task_model(setup["spec"])


def recipes_section(quick: bool, threads: int, repeats: int | None) -> dict[str, Any]:
    from common.progress import track

    out = {}
    for name in track(list(WORKLOADS), f"default recipes' DP steps, {threads} thread(s)"):
        reps = repeats or (3 if quick else (15 if name.startswith("2d") else 7))
        out[name] = measure_recipe(name, quick, threads, reps)
    return out


def run_numbers(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """(recipe, {run_wall_s, time_to_target_s, target}) of a finished run in `run_dir`."""
    summary_path = run_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--runs: cannot read {summary_path}: {e}") from None
    return runs_from_summary(summary, summary_path)


def runs_from_summary(summary: dict[str, Any], where: Path) -> tuple[str, dict[str, Any]]:
    """The run's wall from its ServerApp's start (Flower's start-up before it not counted) to
    its end, and the wall until the held-out target (`TARGETS`) was first reached: the rounds'
    own walls summed up to that round (None if never)."""
    from common.recipes import recipe_for

    try:
        model, rounds = summary["model"], summary["rounds"]
        name = recipe_for(model["task"], int(model["spatial_dims"])).name
        wall = float(summary["ended_at"]) - float(summary["started_at"])
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"--runs: {where} is not a finished run's summary ({e})") from None
    metric = "auc" if model["task"] == "classification" else "dice-lung"
    elapsed, reached = 0.0, None
    for r in rounds:
        elapsed += float(r.get("wall_s") or 0) + float(r.get("central_eval_s") or 0)
        value = (r.get("central") or {}).get(metric)
        if value is not None and value >= TARGETS[metric]:
            reached = elapsed
            break
    best = max(((r.get("central") or {}).get(metric) or 0.0 for r in rounds), default=None)
    return name, {
        "run_wall_s": round(wall, 1),
        "time_to_target_s": None if reached is None else round(reached, 1),
        "target": {metric: TARGETS[metric]},
        "rounds": len(rounds),
        f"final_{metric}": (rounds[-1].get("central") or {}).get(metric) if rounds else None,
        f"best_{metric}": best,
        "run": str(where.parent),
    }


def apply_runs(recipes: dict[str, Any], run_dirs: list[Path]) -> None:
    """Fill run_wall_s / time_to_target_s of `recipes` from finished runs (the last run of a
    recipe wins; all are kept under "runs")."""
    for run_dir in run_dirs:
        name, numbers = run_numbers(run_dir)
        entry = recipes.setdefault(name, {})
        entry.setdefault("runs", []).append(numbers)
        entry["run_wall_s"] = numbers["run_wall_s"]
        entry["time_to_target_s"] = numbers["time_to_target_s"]
        entry.pop("note", None)


def format_recipes(recipes: dict[str, Any]) -> str:
    """One line per default recipe: step ratios, run wall, time to target."""
    lines = [f"{'default recipe':<20}{'model':<15}{'non-DP ms':>10}{'DP':>8}"
             f"{'hooks':>8}{'ew':>8}{'ghost':>8}{'run s':>8}{'target s':>10}"]  # fmt: skip
    for name, r in recipes.items():
        o = r.get("opacus_step_ratio", {})
        cells = [r.get("dp_step_ratio"), o.get("hooks"), o.get("ew"), o.get("ghost")]
        ratios = "".join(f"{v:>7.2f}x" if v is not None else f"{'-':>8}" for v in cells)
        runs = "".join(
            f"{v:>8.0f}" if v is not None else f"{'-':>8}"
            for v in (r.get("run_wall_s"), r.get("time_to_target_s"))
        )
        ms = (r.get("step_ms") or {}).get("nonprivate")
        lines.append(f"{name:<20}{r.get('model', ''):<15}{ms or 0:>10.1f}{ratios}{runs}")
    return "\n".join(lines)
