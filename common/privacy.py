"""Everything about differential privacy, behind one small surface.

fedvox's privacy contract: a hospital's (epsilon, delta) covers a WHOLE federated
run and, through the node's ledger, the dataset's lifetime. So the noise
multiplier is calibrated once for the planned rounds x local epochs, every round
trains with that same (sigma, q) and the accountant composes the recorded
history. (Re-creating an Opacus engine each round and reporting its epsilon
under-counts: round 20 would report round 1's epsilon.)

Callers use: `resolve_budget`, `calibrate_noise_multiplier`, `compute_epsilon`,
`make_private`, `steps_taken`. The per-step machinery (per-sample gradients,
clipping, noise, Poisson sampling) is Opacus'.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common import fast_dp

# (noise_multiplier, sample_rate, steps): the unit Opacus' accountants compose.
HistoryEntry = tuple[float, float, int]

DEFAULT_ACCOUNTANT = "rdp"  # conservative, fast, and exact to recompute from a ledger
# RDP says this while a calibration search probes tiny noise levels; the bound stays valid.
_RDP_ORDER_WARNING = ".*Optimal order is the (largest|smallest) alpha.*"


class PrivacyRefusal(Exception):
    """Training would break the hospital's privacy policy; the message says which rule."""


@dataclass(frozen=True)
class Budget:
    """The budget a node trains under in one run."""

    epsilon_run: float  # target for this run: min(server proposal, node's own limit)
    epsilon_lifetime: float  # the dataset's lifetime limit at this node
    delta: float


def resolve_budget(
    server_epsilon: float,
    server_delta: float,
    node_max_epsilon: float | None,
    node_delta: float | None,
    num_examples: int,
) -> Budget:
    """Combine the server's proposal with the hospital's own limits (which can only tighten it).

    Without a node `max-epsilon` the lifetime limit is the run's epsilon: by default a
    dataset serves one run's worth of privacy, and a hospital that wants several runs
    declares its lifetime budget explicitly.
    """
    if not server_epsilon > 0 or math.isinf(server_epsilon):
        raise PrivacyRefusal(
            f"target-epsilon must be a positive finite number, got {server_epsilon}"
        )
    if node_max_epsilon is not None and not node_max_epsilon > 0:
        raise PrivacyRefusal(f"node max-epsilon must be positive, got {node_max_epsilon}")
    epsilon_run = min(server_epsilon, node_max_epsilon or server_epsilon)
    delta = min(server_delta, node_delta) if node_delta else server_delta
    if not 0 < delta < 1:
        raise PrivacyRefusal(f"delta must be in (0, 1), got {delta}")
    if num_examples < 1:
        raise PrivacyRefusal("no training examples at this node")
    if delta >= 1.0 / num_examples:
        # delta is the probability of a total privacy failure; at >= 1/N one record may leak.
        raise PrivacyRefusal(
            f"delta={delta:g} is not below 1/N = 1/{num_examples} for this node's data; "
            f"use delta <= {1.0 / (10 * num_examples):.1e}"
        )
    return Budget(epsilon_run, node_max_epsilon or epsilon_run, delta)


def calibrate_noise_multiplier(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> float:
    """The noise multiplier that spends exactly `epsilon` over `steps` DP-SGD steps."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_RDP_ORDER_WARNING)
        sigma = get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.005,
        )
    return float(sigma)


def compute_epsilon(
    history: list[HistoryEntry], delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Epsilon of the composition of `history` at `delta` (0 when nothing was spent)."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = _merge(history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_RDP_ORDER_WARNING)
        return float(acc.get_epsilon(delta=delta))


def _merge(history: list[HistoryEntry]) -> list[HistoryEntry]:
    # Same (sigma, q) entries compose by adding steps; merging keeps PRV/RDP fast.
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        merged[(s, q)] = merged.get((s, q), 0) + n
    return [(s, q, n) for (s, q), n in merged.items()]


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader, PrivacyEngine]:
    """Opacus DP-SGD: Poisson sampling, per-sample clipping at `max_grad_norm`, Gaussian noise.

    Per-sample gradients come from `common.fast_dp` (grouped-conv per-sample gradients
    registered into Opacus, no wasted batch gradient) where every layer is supported,
    else from Opacus' own hooks; both give the same clipped, noised update.
    A fresh engine per call is fine here because fedvox never asks it for epsilon:
    epsilon always comes from `compute_epsilon` over the node's ledger.
    """
    with warnings.catch_warnings():
        # Opacus warns about its secure RNG on every engine (torchcsprng does not install for
        # torch 2.x); the README states it once. The full-backward-hook warning is expected:
        # image inputs do not require gradients.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*Full backward hook.*")
        engine = PrivacyEngine(accountant=accountant)
        kwargs = {
            "module": model,
            "optimizer": optimizer,
            "data_loader": data_loader,
            "noise_multiplier": noise_multiplier,
            "max_grad_norm": max_grad_norm,
            "poisson_sampling": True,
        }
        try:
            model, optimizer, data_loader = fast_dp.make_private(engine, **kwargs)
        except NotImplementedError:  # a layer fast_dp has no per-sample gradient for
            model, optimizer, data_loader = engine.make_private(grad_sample_mode="hooks", **kwargs)
    return model, optimizer, data_loader, engine


def steps_taken(engine: PrivacyEngine) -> list[HistoryEntry]:
    """The (sigma, q, steps) the engine's accountant recorded: what goes into the ledger."""
    return [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]
