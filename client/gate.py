"""The privacy gate: every use of a hospital's training data asks here first.

One place decides whether a node may spend privacy on a run, and records what it spent:

1. `PrivacyGate.open` combines the server's proposal with the node's own policy into the
   run's budget (`common.privacy.resolve_budget`: the node can only tighten it) and opens the
   node's ledger;
2. `plan` calibrates the noise multiplier ONCE per run, for every step the run may take
   (rounds x local epochs, plus local fine-tuning), and writes it to the ledger: every later
   round trains with the same sigma, so the run ends at its epsilon;
3. `grant(steps)` projects the run's and the dataset's lifetime epsilon after those steps and
   raises `PrivacyRefusal` (with the rule that says no) when either would pass its limit;
4. `spend` records the steps the accountant really took, on disk before the update leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from client.ledger import PrivacyLedger
from common.privacy import (
    Budget,
    HistoryEntry,
    PrivacyRefusal,
    calibrate_noise_multiplier,
    resolve_budget,
)

SLACK = 1 + 1e-6  # the calibration search lands within tolerance of the target


@dataclass(frozen=True)
class Grant:
    """Permission to take `steps` DP-SGD steps at (noise_multiplier, sample_rate)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_run: float  # projected after the steps
    epsilon_lifetime: float


class PrivacyGate:
    def __init__(self, ledger: PrivacyLedger, budget: Budget, run_uid: str) -> None:
        self.ledger = ledger
        self.budget = budget
        self.run_uid = run_uid

    @classmethod
    def open(
        cls,
        state_dir: Any,
        run_uid: str,
        *,
        accountant: str,
        server_epsilon: float,
        server_delta: float,
        node_max_epsilon: float | None,
        node_delta: float | None,
        num_examples: int,
    ) -> PrivacyGate:
        """The gate for one run at one node; PrivacyRefusal if the budget itself is unusable."""
        budget = resolve_budget(
            server_epsilon, server_delta, node_max_epsilon, node_delta, num_examples
        )
        return cls(PrivacyLedger.open(state_dir, accountant), budget, run_uid)

    # -- the run's plan -------------------------------------------------------------------
    def plan(self, num_examples: int, sample_rate: float, planned_steps: int) -> dict[str, Any]:
        """The run's calibration: made once (first round), reused by every later message."""
        plan = self.ledger.runs.get(self.run_uid)
        if plan is None:
            sigma = calibrate_noise_multiplier(
                self.budget.epsilon_run,
                self.budget.delta,
                sample_rate,
                planned_steps,
                self.ledger.accountant,
            )
            plan = self.ledger.plan_run(
                self.run_uid,
                noise_multiplier=sigma,
                sample_rate=sample_rate,
                planned_steps=planned_steps,
                num_examples=num_examples,
                epsilon=self.budget.epsilon_run,
                delta=self.budget.delta,
            )
        if int(plan["num_examples"]) != num_examples:
            raise PrivacyRefusal(
                f"the training set changed during the run ({plan['num_examples']} -> "
                f"{num_examples} cases); its privacy calibration no longer holds"
            )
        return plan

    def existing_plan(self, num_examples: int) -> dict[str, Any]:
        """The plan an earlier round made (fine-tuning never starts a plan of its own)."""
        plan = self.ledger.runs.get(self.run_uid)
        if plan is None or int(plan["num_examples"]) != num_examples:
            raise PrivacyRefusal("this node has no privacy plan for this run's training set")
        return plan

    # -- spending -------------------------------------------------------------------------
    def grant(self, plan: dict[str, Any], steps: int) -> Grant:
        """Permission for `steps` more steps under `plan`, or PrivacyRefusal saying why not."""
        sigma, q = float(plan["noise_multiplier"]), float(plan["sample_rate"])
        extra = [(sigma, q, steps)]
        delta = self.budget.delta
        run = self.ledger.epsilon(delta, self.run_uid, extra=extra)
        life = self.ledger.epsilon(delta, extra=extra)
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
        return Grant(sigma, q, steps, run, life)

    def spend(
        self, grant: Grant, round_: int, history: list[HistoryEntry], phase: str | None = None
    ) -> tuple[float, float]:
        """Record what the accountant took; returns (run epsilon, lifetime epsilon) after it."""
        extra = {"phase": phase} if phase else {}
        self.ledger.record(self.run_uid, round_, history, **extra)
        if history == [(grant.noise_multiplier, grant.sample_rate, grant.steps)]:
            return grant.epsilon_run, grant.epsilon_lifetime  # what was projected
        return self.spent()

    def spent(self) -> tuple[float, float]:
        """(run epsilon, lifetime epsilon) the ledger holds now."""
        delta = self.budget.delta
        return self.ledger.epsilon(delta, self.run_uid), self.ledger.epsilon(delta)
