"""The tables of `fedvox bench utility`: one run's numbers, rows over seeds, markdown.

`final_round` reads the LAST round of a federation's summary.json (never the best round:
picking a round by its test score would be choosing on the test split); `summarise` makes one
row per (setting, epsilon) with mean and sd over seeds; `format_table` writes it as markdown.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from common import metric_registry

# the benchmark rows' score columns: the tasks' best metrics ("auc", "dice-mean")
AUC = metric_registry.best_key(metric_registry.CLASSIFICATION)
DICE = metric_registry.best_key(metric_registry.SEGMENTATION)


def _finite(values: list[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = _finite(values)
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def final_round(summary: dict) -> dict:
    """The numbers of the LAST round of a federation's summary.json."""
    if summary.get("status") != "finished" or not summary.get("rounds"):
        raise RuntimeError(f"run {summary.get('run_name')} did not finish: {summary.get('error')}")
    last = summary["rounds"][-1]
    central = last["central"]
    site_auc = {
        site: h["eval"].get(AUC)
        for site, h in last["hospitals"].items()
        if isinstance(h.get("eval"), dict) and h["eval"].get(AUC) is not None
    }
    # finetune-epochs > 0: each hospital's own fine-tuned copy on its validation part, and the
    # run's epsilon at the hospital including the fine-tuning.
    site_auc_finetuned = {
        site: h["eval"].get(f"finetuned-{AUC}")
        for site, h in last["hospitals"].items()
        if isinstance(h.get("eval"), dict) and h["eval"].get(f"finetuned-{AUC}") is not None
    }
    eps = [h.get("epsilon_run") for h in last["hospitals"].values()]
    eps += [
        h["eval"].get("finetuned-epsilon-run")
        for h in last["hospitals"].values()
        if isinstance(h.get("eval"), dict)
    ]
    return {
        "round": last["round"],
        **held_out_numbers(central),
        "site_auc": site_auc,
        "site_auc_finetuned": site_auc_finetuned,
        "dice": _dice(central),
        "site_dice": {
            site: h["eval"].get(DICE)
            for site, h in last["hospitals"].items()
            if isinstance(h.get("eval"), dict) and h["eval"].get(DICE) is not None
        },
        "max_epsilon_spent": max(_finite(eps), default=None),
    }


def held_out_numbers(central: dict) -> dict:
    """The held-out metrics a benchmark row keeps, from summary.json's "central"."""
    metrics = metric_registry.for_task(metric_registry.CLASSIFICATION)
    numbers = {m.name: central.get(m.name) for m in metrics}
    return {
        **numbers,
        "acc": numbers.get("accuracy"),  # the table's accuracy column
        "threshold": central.get("threshold"),
        "ece": central.get("ece"),
        "ece_raw": central.get("ece-raw"),
    }


def _dice(metrics: dict) -> dict[str, float]:
    """Per-class Dice of a segmentation evaluation ({} for classification)."""
    prefix = DICE[: -len("mean")]
    return {k[len(prefix) :]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


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


def merged_runs(path: Path | None, data_desc: str, overrides: dict) -> list[dict]:
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
