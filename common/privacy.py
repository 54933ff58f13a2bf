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

import contextlib
import functools
import math
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as privacy_analysis
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader

from common import fast_dp
from common.config import NodePolicy, RunConfig
from common.feature_cache import collate_rows

# (noise_multiplier, sample_rate, steps): the unit Opacus' accountants compose.
HistoryEntry = tuple[float, float, int]

DEFAULT_ACCOUNTANT = "rdp"  # conservative, fast, and exact to recompute from a ledger
# RDP says this while a calibration search probes tiny noise levels; the bound stays valid.
_RDP_ORDER_WARNING = ".*Optimal order is the (largest|smallest) alpha.*"


class PrivacyRefusal(Exception):
    """Training would break the hospital's privacy policy; the message says which rule."""


@dataclass(frozen=True)
class Budget:
    """What a node spends under in one run: the server's proposal within the node's policy."""

    epsilon_run: float  # this run's target
    epsilon_lifetime: float  # the dataset's lifetime limit at this node (inf: none set)
    delta: float
    accountant: str  # rdp | prv
    max_releases: int  # validation releases allowed in this run


def resolve_budget(
    cfg: RunConfig, policy: NodePolicy, num_examples: int, total_rounds: int
) -> Budget:
    """The run's budget at a node, or PrivacyRefusal naming the rule the proposal breaks.

    The node's policy wins: a deployed node without a complete policy refuses every run; a
    proposal looser than the policy (a higher epsilon, a larger delta) is refused, not
    trimmed, so the operator sees what the hospital allows. Simulated hospitals without a
    policy file take the run's values, no lifetime limit, and an evaluation allowance of
    every planned release (documented in docs/privacy.md).
    """
    if not policy.simulated and policy.missing():
        raise PrivacyRefusal(
            "this hospital's node config does not state its privacy policy (missing: "
            f"{', '.join(policy.missing())}); it refuses every run until it does"
        )
    if policy.max_epsilon is not None and cfg.target_epsilon > policy.max_epsilon:
        raise PrivacyRefusal(
            f"target-epsilon {cfg.target_epsilon:g} is above this hospital's max-epsilon "
            f"{policy.max_epsilon:g}"
        )
    if policy.delta is not None and cfg.target_delta > policy.delta:
        raise PrivacyRefusal(
            f"target-delta {cfg.target_delta:g} is looser than this hospital's delta "
            f"{policy.delta:g}"
        )
    if num_examples < 1:
        raise PrivacyRefusal("no training examples at this node")
    if cfg.target_delta >= 1.0 / num_examples:
        # delta is the probability of a total privacy failure; at >= 1/N one record may leak.
        # (No N in the message: the exact count of cases stays at the node.)
        raise PrivacyRefusal(
            f"target-delta {cfg.target_delta:g} is not below 1/N for this hospital's data; "
            "use a smaller target-delta (docs/privacy.md: the delta rule)"
        )
    releases = cfg.planned_releases(total_rounds)
    allowance = releases if policy.max_evaluations is None else policy.max_evaluations
    if releases > allowance:
        raise PrivacyRefusal(
            f"the run plans {releases} validation releases; this hospital allows "
            f"{allowance} per run (node config max-evaluations)"
        )
    lifetime = policy.max_epsilon if policy.max_epsilon is not None else math.inf
    accountant = policy.accountant or cfg.accountant
    return Budget(cfg.target_epsilon, lifetime, cfg.target_delta, accountant, allowance)


@functools.lru_cache(maxsize=256)  # a pure function; a simulation asks the same many times
def calibrate_noise_multiplier(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = DEFAULT_ACCOUNTANT,
    fixed: tuple[HistoryEntry, ...] = (),
) -> float:
    """The noise multiplier that spends exactly `epsilon` over `steps` DP-SGD steps, after
    the `fixed` releases (e.g. the run's planned validation releases) are accounted."""
    if fixed:
        return _calibrate_with(epsilon, delta, sample_rate, steps, accountant, list(fixed))
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


def _calibrate_with(
    epsilon: float,
    delta: float,
    q: float,
    steps: int,
    accountant: str,
    fixed: list[HistoryEntry],
    tolerance: float = 0.005,
) -> float:
    """Bisection for sigma: epsilon(steps at sigma + fixed) in [epsilon - tolerance, epsilon]."""

    def eps(sigma: float) -> float:
        return compute_epsilon([(sigma, q, steps), *fixed], delta, accountant)

    if compute_epsilon(fixed, delta, accountant) >= epsilon:
        raise PrivacyRefusal(
            f"the run's planned validation releases alone would spend epsilon {epsilon:g}"
        )
    # Bracket the answer by doubling or halving from 1, then secant steps on (log sigma, log
    # epsilon), nearly a straight line, always kept inside the bracket: ~6 evaluations where
    # Opacus' bisection (the earlier start) took ~20, each ~40 ms (a node's first message).
    # An epsilon that is not a number counts as too much: only a sigma shown to spend at most
    # `epsilon` is ever returned.
    low = high = e_low = e_high = None
    sigma = 1.0
    while low is None or high is None:
        e = eps(sigma)
        if not e <= epsilon:
            low, e_low, sigma = sigma, e, sigma * 2.0
        else:
            high, e_high, sigma = sigma, e, sigma / 2.0
        if sigma > 1e6:
            raise PrivacyRefusal(f"no noise level reaches epsilon {epsilon:g} for this run")
        if sigma < 1e-6:  # next to no noise already fits: keep the noise found
            return high
    for _ in range(60):
        if epsilon - tolerance <= e_high <= epsilon or high - low < 1e-6 * high:
            return high
        if math.isfinite(e_low) and e_low > 0 and e_high > 0:
            t = (math.log(e_low) - math.log(epsilon)) / (math.log(e_low) - math.log(e_high))
            guess = math.exp(math.log(low) + t * (math.log(high) - math.log(low)))
        else:
            guess = math.sqrt(low * high)
        mid = min(max(guess, low + 0.05 * (high - low)), high - 0.05 * (high - low))
        e_mid = eps(mid)
        if not e_mid <= epsilon:
            low, e_low = mid, e_mid
        else:
            high, e_high = mid, e_mid
    return high


# A model's data statistic (filterbank-3d's feature mean, client/statistics.py) is released once
# per run by the Gaussian mechanism: noise std = noise multiplier x the sum's sensitivity, the
# multiplier STATISTICS_BASE at epsilon 8 and growing as 1/epsilon like the validation releases.
# At 3, pooled over 3 hospitals of 340 cases, the mean's noise is ~0.16 per feature (the features'
# std across cases ~0.2), where the organ phantom's centred FL-DP AUC is 0.80 against 0.75
# uncentred (docs/benchmarks.md); planned into the run it costs the DP-SGD noise 1.4-2 % more at
# epsilon 1-20 (2 would cost 3.6-4.7 %, 4 about 1 %).
STATISTICS_BASE = 3.0


def statistics_noise(epsilon: float) -> float:
    """The noise multiplier of a run's one statistics release at this epsilon."""
    return STATISTICS_BASE * 8.0 / epsilon


def statistics_entry(epsilon: float) -> HistoryEntry:
    """The one statistics release of a run, in the accountant's terms."""
    return (statistics_noise(epsilon), 1.0, 1)


def gaussian_release(
    total: torch.Tensor, sensitivity: float, noise_multiplier: float, rng: np.random.Generator
) -> torch.Tensor:
    """`total` (a sum of vectors, each of norm <= `sensitivity`) + Gaussian noise of std
    noise_multiplier x sensitivity per coordinate: the Gaussian mechanism (add/remove a case)."""
    noise = rng.normal(0.0, noise_multiplier * sensitivity, size=tuple(total.shape))
    return total + torch.as_tensor(noise, dtype=total.dtype)


RELEASE_BASE = 4.0  # a validation release's noise std per count at epsilon 8 (one release)


def release_noise(epsilon: float, releases: int) -> float:
    """The Gaussian noise (std per count, sensitivity 1) of each of a run's validation releases.

    4 at epsilon 8 for one release, growing as 1/epsilon and with the square root of the
    number of releases: all of them together then behave like one release at noise
    4 x 8 / epsilon, and a curious server's best membership attack on them reaches AUC
    Phi(epsilon / (32 sqrt 2)) at most (0.570 at epsilon 8). Planned into the run with the
    training-set count (released once at 3x this noise), they add a little to the DP-SGD noise.
    The base is 4, not 8, because at 8 the decision threshold chosen from the pooled release
    swung with the noise (docs/benchmarks.md: "Threshold and calibration" has the measurements,
    "Figures behind code comments" the cost in DP-SGD noise).
    """
    return max(1.0, RELEASE_BASE * (8.0 / epsilon) * math.sqrt(max(1, releases)))


def compute_epsilon(
    history: list[HistoryEntry], delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Epsilon of the composition of `history` at `delta` (0 when nothing was spent)."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_RDP_ORDER_WARNING)
        if accountant == "rdp":
            # Opacus' RDPAccountant.get_privacy_spent, with each (sigma, q)'s per-step RDP
            # curve computed once: composition is a sum, linear in the steps. A node asks
            # several times per message for histories that differ only in their step counts.
            rdp = sum(n * _rdp_per_step(s, q) for s, q, n in _merge(history))
            eps, _ = privacy_analysis.get_privacy_spent(
                orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
            )
            return float(eps)
        return _epsilon_of(tuple(_merge(history)), delta, accountant)


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    return privacy_analysis.compute_rdp(
        q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )


@functools.lru_cache(maxsize=256)
def _epsilon_of(history: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def _merge(history: list[HistoryEntry]) -> list[HistoryEntry]:
    # Same (sigma, q) entries compose by adding steps; merging keeps PRV/RDP fast.
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        merged[(s, q)] = merged.get((s, q), 0) + n
    return [(s, q, n) for (s, q), n in merged.items()]


def fresh_generator() -> torch.Generator:
    """A torch generator seeded now with 64 bits of the OS's entropy (os.urandom).

    Every DP draw of a node (Poisson masks, Gaussian noise) comes from one of these, made at
    that release: never torch's global generator, whose state a forked ClientApp inherits from
    its warm parent (torch 2.13 seeds it from the OS in each new process, older releases at one
    fixed seed), and never a seed from the run config. Opacus' `secure_mode` would use
    torchcsprng instead, which has no torch 2.x release; docs/privacy.md states what remains
    (floating-point noise attacks).
    """
    generator = torch.Generator()
    if _PINNED:  # a benchmark's or test's `pinned_generators` block, never a node's path
        _PINNED[0] += 1
        return generator.manual_seed(_PINNED[0])
    generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return generator


_PINNED: list[int] = []  # the next seed inside `pinned_generators`


@contextlib.contextmanager
def pinned_generators(seed: int) -> Iterator[None]:
    """Benchmarks and tests only: inside this block `fresh_generator` hands out generators
    seeded seed + 1, seed + 2, ... so two computations can draw the same noise on purpose
    (e.g. a paired comparison). No node code enters it and no message or run config can."""
    _PINNED[:] = [seed]
    try:
        yield
    finally:
        _PINNED.clear()


def reseed_global_generators() -> None:
    """Fresh OS entropy for torch's, numpy's and Python's global generators.

    A backstop, run in every forked child (`os.register_at_fork` below, and the warm
    SuperExec's children): no DP draw uses these generators, but nothing drawn after a fork
    should repeat the parent's or a sibling's sequence either."""
    torch.manual_seed(int.from_bytes(os.urandom(8), "little"))
    np.random.seed(int.from_bytes(os.urandom(4), "little"))
    random.seed(os.urandom(16))


os.register_at_fork(after_in_child=reseed_global_generators)


class PoissonLoader(DPDataLoader):
    """Opacus' Poisson-sampling loader with a fixed number of steps per epoch and a fresh
    generator: each case joins each batch independently with probability 1 / steps.

    The steps (so the sample rate) and `expected_batch_size` (what the summed clipped
    gradients are divided by) are the caller's, not functions of len(dataset): a node takes
    them from its DP-released case count and the batch size, so neither the accountant's
    numbers nor the update's noise scale reveal its exact number of cases.
    """

    def __init__(
        self, dataset: torch.utils.data.Dataset, steps: int, expected_batch_size: float
    ) -> None:
        generator = fresh_generator()
        # collate_rows: one gather per batch (and a fixed front end finds its rows) for a
        # CaseRows dataset; torch's default collate for any other
        super().__init__(
            dataset, sample_rate=1.0 / steps, generator=generator, collate_fn=collate_rows
        )
        self.batch_sampler.steps = steps  # not int(1 / (1 / steps)), which may round down
        self.expected_batch_size = float(expected_batch_size)

    @classmethod
    def like(cls, loader: torch.utils.data.DataLoader) -> PoissonLoader:
        """The Poisson loader Opacus would make of a plain `loader` (q = 1 / len(loader))."""
        if isinstance(loader, PoissonLoader):
            return loader
        steps = len(loader)
        return cls(loader.dataset, steps, len(loader.dataset) / steps)


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader, PrivacyEngine]:
    """Opacus DP-SGD: Poisson sampling, per-sample clipping at `max_grad_norm`, Gaussian noise.

    `data_loader` is a `PoissonLoader` (a plain loader is turned into one); its masks and the
    optimizer's noise come from fresh OS-entropy generators (`fresh_generator`).
    Per-sample gradients come from `common.fast_dp` (grouped-conv per-sample gradients
    registered into Opacus, no wasted batch gradient) where every layer is supported,
    else from Opacus' own hooks; both give the same clipped, noised update.
    A fresh engine per call is fine here because fedvox never asks it for epsilon:
    epsilon always comes from `compute_epsilon` over the node's ledger.
    """
    loader = PoissonLoader.like(data_loader)
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
            "data_loader": loader,
            "noise_multiplier": noise_multiplier,
            "max_grad_norm": max_grad_norm,
            "poisson_sampling": False,  # the loader samples already, from its own generator
            "noise_generator": fresh_generator(),
        }
        try:
            model, optimizer, data_loader = fast_dp.make_private(engine, **kwargs)
        except NotImplementedError:  # a layer fast_dp has no per-sample gradient for
            model, optimizer, data_loader = engine.make_private(grad_sample_mode="hooks", **kwargs)
            model.forbid_grad_accumulation()  # what poisson_sampling=True would have done
    optimizer.expected_batch_size = loader.expected_batch_size
    return model, optimizer, data_loader, engine


def steps_taken(engine: PrivacyEngine) -> list[HistoryEntry]:
    """The (sigma, q, steps) the engine's accountant recorded: what goes into the ledger."""
    return [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]
