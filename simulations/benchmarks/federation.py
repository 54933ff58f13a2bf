"""Federation-level speed numbers: overhead, start-up, data share, scale.

Everything is measured on a real Flower simulation (`simulations.harness.local.LocalFederation`)
from what the run itself records: the server's per-round wall clock (`wall_s`) and
every hospital's own time (`data-s` loading, `compute-s` training/evaluating) in
`summary.json`.

- federation_overhead: per-round wall time / (hospitals' train+eval time + the server's
  held-out evaluation), median over rounds after the first (whose data loading is a
  one-off). Clients run one at a time (one Ray actor with both cores), so the hospital
  times add up; what is left is Flower's messaging, polling and (de)serialisation.
- startup_s: from `flwr run` to the first round starting (SuperLink, Ray, app install,
  ServerApp start, holdout loading, round-0 evaluation).
- data_share: NIfTI decoding + preprocessing (cache hits after round 1) / round wall time.
- scale: 100 hospitals x 3 rounds; wall time and the peak resident memory of the whole
  process tree (SuperLink, ServerApp, Ray workers).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from simulations.harness.local import LocalFederation
from simulations.harness.procs import PeakSampler, descendants


def _tree_rss_mb(root_pid: int) -> float:
    total_kb = 0
    for pid in [root_pid, *descendants(root_pid)]:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def peak_memory(root_pid: int) -> PeakSampler:
    """Samples the RSS of a process tree twice a second while a run is going (`.peak`, MB)."""
    return PeakSampler(lambda: _tree_rss_mb(root_pid), 0.5)


def _round_costs(summary: dict[str, Any]) -> list[dict[str, float]]:
    """Per round: wall time, hospitals' data loading, everyone's compute (rounds >= 1)."""
    rows = []
    for r in summary["rounds"][1:]:
        data = compute = 0.0
        for h in r["hospitals"].values():
            ev = h.get("eval") or {}
            data += float(h.get("data_s") or 0.0) + float(ev.get("data-s") or 0.0)
            compute += float(h.get("compute_s") or 0.0) + float(ev.get("compute-s") or 0.0)
        compute += float(r.get("central_eval_s") or 0.0)
        rows.append(
            {"round": r["round"], "wall_s": r["wall_s"], "data_s": data, "compute_s": compute}
        )
    return rows


def run_federation(
    workdir: Path,
    data_dir: Path,
    hospitals: int,
    rounds: int,
    num_cpus: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One simulated run; returns its summary, timings and peak memory."""
    config = {
        "data-dir": str(data_dir),
        "output-dir": str(workdir / "runs"),
        "run-name": f"bench-{hospitals}h",
        "num-server-rounds": rounds,
        **(extra or {}),
    }
    with LocalFederation(workdir / f"sim-{hospitals}h") as fed:
        t_launch = time.time()
        with peak_memory(fed.superlink.pid) as mem:
            result = fed.run(config, num_supernodes=hospitals, num_cpus=num_cpus, timeout=3600)
    summary = json.loads((workdir / "runs" / config["run-name"] / "summary.json").read_text())
    if summary.get("status") != "finished":
        raise RuntimeError(f"benchmark run failed: {summary.get('error')}\n{result.output[-3000:]}")
    return {
        "summary": summary,
        "wall_s": result.wall_s,
        "t_launch": t_launch,
        "peak_rss_mb": mem.peak,
    }


def measure_federation(
    workdir: Path,
    data_dir: Path,
    hospitals: int = 5,
    rounds: int = 4,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """federation_overhead, startup_s and data_share at `hospitals` simulated hospitals."""
    out = run_federation(workdir, data_dir, hospitals, rounds, num_cpus=2, extra=extra)
    summary = out["summary"]
    costs = _round_costs(summary)
    later = costs[1:] or costs  # the first round pays the one-off data decoding
    overhead = statistics.median(
        c["wall_s"] / max(c["compute_s"] + c["data_s"], 1e-9) for c in later
    )
    data_share = statistics.median(c["data_s"] / c["wall_s"] for c in later)
    rounds_wall = sum(c["wall_s"] for c in costs)
    startup = out["wall_s"] - rounds_wall - summary["rounds"][0].get("central_eval_s", 0.0)
    return {
        "federation_overhead": overhead,
        "startup_s": startup,
        "data_share": data_share,
        "federation_rounds": costs,
        "federation_wall_s": out["wall_s"],
    }


def measure_scale(
    workdir: Path,
    data_dir: Path,
    hospitals: int = 100,
    rounds: int = 3,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out = run_federation(workdir, data_dir, hospitals, rounds, num_cpus=1, extra=extra)
    done = sum(
        1
        for r in out["summary"]["rounds"][1:]
        for h in r["hospitals"].values()
        if h.get("status") == "ok"
    )
    return {
        "hospitals": hospitals,
        "rounds": rounds,
        "wall_s": out["wall_s"],
        "peak_rss_mb": out["peak_rss_mb"],
        "hospital_rounds_ok": done,
    }


def measure_secagg(
    workdir: Path, data_dir: Path, hospitals: int, rounds: int = 3
) -> dict[str, Any]:
    """SecAgg+'s cost per round: the same run without and with secure aggregation,
    median wall time of rounds 2.. (round 1 pays the one-off data decoding)."""
    walls = {}
    for secure in (False, True):
        extra = {"secure-aggregation": secure}
        out = run_federation(
            workdir / ("secagg" if secure else "plain"), data_dir, hospitals, rounds, 2, extra
        )
        costs = _round_costs(out["summary"])
        walls[secure] = statistics.median(c["wall_s"] for c in (costs[1:] or costs))
    return {
        "hospitals": hospitals,
        "rounds": rounds,
        "round_wall_s": walls[False],
        "secagg_round_wall_s": walls[True],
        "overhead": walls[True] / walls[False],
    }
