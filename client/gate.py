"""The privacy gate: every use of a hospital's data that leaves the node goes through here.

Training, evaluation and fine-tuning all ask the gate, and the gate alone writes the ledger:

1. `PrivacyGate.open` resolves the run's budget: the server's proposal within the node's
   policy (`common.privacy.resolve_budget`; the node wins, a looser proposal is refused);
2. `plan` calibrates the training noise ONCE per run, for every DP-SGD step the run may take
   (rounds x local epochs, plus fine-tuning) and every validation release it plans, and writes
   that plan to the ledger: the run ends at its epsilon whatever order things happen in;
3. `spend(phase, planned, compute)` is one release: under the ledger's lock it projects the
   run's and the dataset's epsilon with `planned` added, refuses (PrivacyRefusal) if either
   passes its limit, writes a reservation, releases the lock, runs `compute` (the DP
   computation), and records the release (its hash, the accountant's own history) before
   anything leaves. A crash in between leaves a reservation that is given back later: nothing
   was released.
4. A repeated request for the same round and phase gets the same release back (`released`),
   at no new privacy cost: it was already paid for and already public.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.ledger import PrivacyLedger
from common.config import NodePolicy, RunConfig
from common.privacy import (
    Budget,
    HistoryEntry,
    PrivacyRefusal,
    calibrate_noise_multiplier,
    release_noise,
    resolve_budget,
    statistics_entry,
)

SLACK = 1 + 1e-6  # the calibration search lands within tolerance of the target
EVALUATE, FINETUNE, FINETUNE_EVALUATE, TRAIN = "evaluate", "finetune", "finetune-evaluate", "train"
STATISTICS = "statistics"  # a model's data statistic, released once per run (client/statistics.py)
# A validation release is the Gaussian mechanism on counts of sensitivity 1: (noise, q=1, 1 step)
# in the accountant's terms. Its noise comes from the run's plan (`release_noise`), as does the
# training-set size the node reports (the FedAvg weight): the count plus Gaussian noise of
# COUNT_FACTOR times that, drawn once per run.
COUNT_FACTOR = 3.0


@dataclass(frozen=True)
class Release:
    """What one spend produced: the result to send and the epsilons after it."""

    result: dict[str, Any]
    digest: str  # sha256 of what left the node (weights or the release itself)
    epsilon_run: float
    epsilon_lifetime: float
    repeated: bool = False  # an earlier release of the same request, sent again


def release_entry(plan: dict[str, Any]) -> HistoryEntry:
    """One validation release of the run, in the accountant's terms."""
    return (float(plan["release_noise"]), 1.0, 1)


def _noisy_count(n: int, noise: float) -> int:
    """The training-set count plus Gaussian noise (fresh OS entropy), rounded to 10s: what
    the node releases, and what its sampling plan is made from."""
    noisy = n + np.random.default_rng().normal(0.0, noise)
    return max(10, 10 * int(round(noisy / 10)))


def _check_history(history: list[HistoryEntry], planned: HistoryEntry) -> None:
    """What the computation spent must be what was reserved: the same noise and sample rate,
    no more steps. Otherwise its result never leaves (the reservation is given back)."""
    sigma, q, steps = planned
    same = all(math.isclose(s, sigma) and math.isclose(r, q) for s, r, _ in history)
    if not same or sum(n for _, _, n in history) > steps:
        raise PrivacyRefusal("the computation spent more than its reservation; nothing released")


def _check_terms(planned: dict[str, Any] | None, asked: dict[str, Any]) -> None:
    """Refuse a message whose settings differ from those the run's epsilon was planned for."""
    if planned is None:
        raise PrivacyRefusal(
            "this run was planned by an older fedvox that did not record its settings; "
            "start a new run"
        )
    changed = [
        f"{key} {asked.get(key)!r} (planned {planned.get(key)!r})"
        for key in sorted(set(planned) | set(asked))
        if planned.get(key) != asked.get(key)
    ]
    if changed:
        raise PrivacyRefusal(
            "this message's settings differ from the run's privacy plan: " + ", ".join(changed)
        )


class PrivacyGate:
    def __init__(self, ledger: PrivacyLedger, budget: Budget, run_uid: str) -> None:
        self.ledger = ledger
        self.budget = budget
        self.run_uid = run_uid

    @classmethod
    def open(
        cls,
        state_dir: Path,
        run_uid: str,
        cfg: RunConfig,
        policy: NodePolicy,
        num_examples: int,
        total_rounds: int,
    ) -> PrivacyGate:
        """The gate for one run at one node; PrivacyRefusal if the proposal is not allowed."""
        budget = resolve_budget(cfg, policy, num_examples, total_rounds)
        return cls(PrivacyLedger.open(state_dir, budget.accountant), budget, run_uid)

    # -- the run's plan -------------------------------------------------------------------
    def plan(
        self,
        num_examples: int,
        terms: dict[str, Any],
        steps_for: Callable[[int], tuple[float, int]],
        statistics: bool = False,
    ) -> dict[str, Any]:
        """The run's calibration: made once, reused by every later message of the run.

        `terms` are the settings the run's epsilon depends on, as this message asks for them
        (batch size, epochs, rounds, releases, ...): recorded with the plan at the first
        message, and any later message whose own terms differ is refused before its data is
        touched. `steps_for(count)` -> (sample rate, planned DP-SGD steps) for a case count:
        the plan uses the DP-released count, so no number derived from it (sigma, steps,
        every epsilon) depends on the exact one. `statistics`: the model needs one release
        of a data statistic (planned in too).
        """
        terms = {**terms, "accountant": self.budget.accountant}
        with self.ledger.transaction():
            plan = self.ledger.runs.get(self.run_uid)
            if plan is None:
                plan = self._new_plan(num_examples, terms, steps_for, statistics)
        if int(plan["num_examples"]) != num_examples:
            raise PrivacyRefusal(
                "the training set changed during the run; its privacy calibration no longer holds"
            )
        _check_terms(plan.get("terms"), terms)
        return plan

    def _new_plan(
        self,
        num_examples: int,
        terms: dict[str, Any],
        steps_for: Callable[[int], tuple[float, int]],
        statistics: bool,
    ) -> dict[str, Any]:
        """Calibrate and record the run's plan (inside the ledger's transaction)."""
        b = self.budget
        noise = release_noise(b.epsilon_run, b.max_releases)
        released = _noisy_count(num_examples, COUNT_FACTOR * noise)
        sample_rate, planned_steps = steps_for(released)
        releases = ((noise, 1.0, b.max_releases), (COUNT_FACTOR * noise, 1.0, 1))
        if statistics:
            releases += (statistics_entry(b.epsilon_run),)
        sigma = calibrate_noise_multiplier(
            b.epsilon_run, b.delta, sample_rate, planned_steps, b.accountant, fixed=releases
        )
        plan = self.ledger.plan_run(
            self.run_uid,
            noise_multiplier=sigma,
            sample_rate=sample_rate,
            planned_steps=planned_steps,
            planned_releases=b.max_releases + 1 + int(statistics),
            statistics=statistics,
            release_noise=noise,
            num_examples=num_examples,
            num_examples_released=released,
            epsilon=b.epsilon_run,
            delta=b.delta,
            terms=terms,
        )
        # Released once, with the run's first message: on the ledger from the start.
        count = (COUNT_FACTOR * noise, 1.0, 1)
        entry = self.ledger.reserve(self.run_uid, 0, "count", count)
        self.ledger.release(entry["id"], [count], "", None)
        return plan

    # -- spending -------------------------------------------------------------------------
    def spend(
        self,
        round_: int,
        phase: str,
        planned: HistoryEntry,
        compute: Callable[[], tuple[dict[str, Any], list[HistoryEntry], str]],
    ) -> Release:
        """Reserve `planned`; run `compute` -> (result, history, hash of what leaves); record.

        `result` is small and JSON (metrics): the ledger keeps it, so a request already
        released for (run, round, phase) gets that very release again, at no new cost.
        """
        with self.ledger.transaction() as ledger:
            done = ledger.find(self.run_uid, round_, phase)
            if done is not None:
                return Release(
                    done.get("result", {}), done["update_sha256"], *self.spent(), repeated=True
                )
            self._check(planned, phase)
            entry = ledger.reserve(self.run_uid, round_, phase, planned)
        try:
            result, history, digest = compute()
            _check_history(history or [planned], planned)
        except BaseException:
            with self.ledger.transaction() as ledger:
                ledger.abandon(entry["id"])  # nothing left the node
            raise
        with self.ledger.transaction() as ledger:
            ledger.release(entry["id"], history or [planned], digest, result)
        return Release(result, digest, *self.spent())

    def _check(self, planned: HistoryEntry, phase: str) -> None:
        if phase in (EVALUATE, FINETUNE_EVALUATE):
            used = self.ledger.count(self.run_uid, (EVALUATE, FINETUNE_EVALUATE))
            if used >= self.budget.max_releases:
                raise PrivacyRefusal(
                    f"this run's validation releases ({self.budget.max_releases}) are spent"
                )
        delta = self.budget.delta
        run = self.ledger.epsilon(delta, self.run_uid, extra=[planned])
        life = self.ledger.epsilon(delta, extra=[planned])
        if life > self.budget.epsilon_lifetime * SLACK:
            raise PrivacyRefusal(
                f"this would raise the dataset's lifetime epsilon to {life:.2f}, past the "
                f"hospital's limit {self.budget.epsilon_lifetime:g}"
            )
        if run > self.budget.epsilon_run * SLACK:
            raise PrivacyRefusal(
                f"this would raise the run's epsilon to {run:.2f}, past its target "
                f"{self.budget.epsilon_run:g}"
            )

    def spent(self) -> tuple[float, float]:
        """(run epsilon, lifetime epsilon) the ledger holds now."""
        delta = self.budget.delta
        return self.ledger.epsilon(delta, self.run_uid), self.ledger.epsilon(delta)
