"""Every hospital's update is checked before Flower aggregates it (docs/reliability.md).

A reply that says "ok" still goes through four checks; the first that fails refuses the update
(the round goes on with the rest, summary.json names the site and the reason):

1. **finite**: every value of every array (a NaN poisons FedAvg and FedMedian alike);
2. **keys and shapes**: exactly the global model's arrays, same shapes;
3. **claimed example count** (the FedAvg weight) inside what the outbound manifest allows:
   `num-examples` is the site's count plus Gaussian noise, released ONCE per run and rounded to
   10s, so a claim must be a multiple of 10, at least 10, the same every round of the run, and
   at most `COUNT_RATIO` times the median claim of the round's other hospitals (one site may be
   much larger than the rest, never so large that its weight alone decides the model); that
   median is taken as at least the count noise's standard deviation, because small sites'
   released counts are mostly noise (30 cases come out as 10 about a quarter of the time);
4. **update norm** ||w_site - w_global|| inside the bound the run's DP settings imply
   (`dp_update_bound`, derived in docs/reliability.md): an honest DP-SGD update can never
   exceed it, a scaled or forged one does.

A model's released data statistic (filterbank-3d's `feature_mean`, client/statistics.py) is
not a DP-SGD step and has its own rule: while the global model has none (all zeros), an update
may set it within the norm an honest noisy mean can have (`statistics_bound`); once set it is
fixed, and an update that changes it is refused.

The claimed noise multiplier enters the bound, so it is checked too: it can be no larger than
the run's calibration at sampling rate 1 (the largest any site can need, `max_noise_multiplier`).
Runs with dp = false have no clipping, hence no norm bound: checks 1-3 only.

fedvox never aggregates: this module only decides which replies Flower sees, and
`trim_fraction` picks how many FedTrimmedAvg trims.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord

from common.config import RunConfig
from common.filterbank3d import STATISTICS_KEY
from common.privacy import calibrate_noise_multiplier, release_noise, statistics_noise
from common.protocol import ARRAYS, NodeReply

STATISTICS_KEYS = {STATISTICS_KEY}  # released data statistics (set once per run, then fixed)
COUNT_RATIO = 20.0  # a site may claim up to 20x the median of the others (documented)
GAUSS_TAIL = 10.0  # ||N(0, I_d)|| <= sqrt(d) + 10 except with probability e^-50 per step
SIGMA_SLACK = 2.0  # see max_noise_multiplier
COUNT_STD_SLACK = 8.0  # the count's noise: 8 standard deviations...
ALLOWANCE_FACTOR = 4  # ...at up to 4x the planned validation releases (a node's allowance)


@dataclass(frozen=True)
class Rejection:
    site: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"site": self.site, "reason": self.reason}


def trim_fraction(replies: int, beta: float) -> float:
    """FedTrimmedAvg's cut fraction for `replies` updates: trims k = max(1, floor(beta n)) from
    each end once there are 3 or more (Flower's own rule, int(beta n), trims nothing at 3-4
    hospitals with beta 0.2), none at 1-2 (nothing would be left)."""
    if replies < 3:
        return 0.0
    k = max(1, math.floor(beta * replies))
    k = min(k, (replies - 1) // 2)  # keep at least one update
    return (k + 0.25) / replies  # Flower trims int(beta n) = k, and beta < 0.5


def max_noise_multiplier(cfg: RunConfig, total_rounds: int) -> float:
    """The largest noise multiplier an honest site can use in this run (a generous cap).

    A site calibrates sigma for q = 1/K (K = ceil(N / batch) steps per epoch), every step of
    the run and its planned releases (client/gate.py). Sigma falls with K once a run has a few
    steps; with very few, RDP's subsampling bound and the releases make K = 2-3 need more than
    K = 1: up to 1.2x at epsilon 8 and 1.7x at epsilon 50 for a 1-round, 1-epoch run
    (measured, docs/reliability.md). The cap is SIGMA_SLACK x the calibration at K = 1."""
    steps = max(1, total_rounds * cfg.local_epochs + cfg.finetune_epochs)
    sigma = calibrate_noise_multiplier(cfg.target_epsilon, cfg.target_delta, 1.0, steps, "rdp")
    return sigma * SIGMA_SLACK


def count_noise_std(cfg: RunConfig, total_rounds: int) -> float:
    """The largest standard deviation of the noise on a site's released count."""
    releases = ALLOWANCE_FACTOR * max(1, cfg.planned_releases(total_rounds))
    return 3.0 * release_noise(cfg.target_epsilon, releases)  # client/gate.py COUNT_FACTOR


def count_margin(cfg: RunConfig, total_rounds: int) -> float:
    """How far a site's released count may lie from its true count (noise + rounding)."""
    return COUNT_STD_SLACK * count_noise_std(cfg, total_rounds) + 5.0


def statistics_bound(dim: int, claim: float, margin: float, epsilon: float) -> float:
    """The largest norm of an honest released feature mean: (sum of <= N vectors of norm C +
    Gaussian noise of std z x C per coordinate) / the released count, C = sqrt(dim) (the
    per-case normalisation), z = the run's `statistics_noise`. The node divides by its noisy
    count before rounding to 10s (>= 1; within 5 of the claim above the floor of 10), and its
    true count is within `margin` of that."""
    c = math.sqrt(dim)
    noise = statistics_noise(epsilon) * c * (math.sqrt(dim) + GAUSS_TAIL)
    divisor = 1.0 if claim <= 10 else claim - 5
    return ((claim + 5 + margin) * c + noise) / divisor


def dp_update_bound(
    cfg: RunConfig, num_params: int, sigma: float, n_up: float, n_lo: float
) -> float:
    """The largest ||w_site - w_global|| one round of honest DP-SGD can produce.

    Each of the T = local_epochs x ceil(R / batch) steps (R: the released count the node's
    plan is made from) adds lr x (momentum buffer), and the buffer sums past noisy gradients
    with weights momentum^k, so ||update|| <= lr / (1 - mu) x sum_t ||g_t||. Opacus' g_t =
    (sum of <= |B_t| clipped gradients + N(0, sigma^2 C^2 I_d)) / B_exp with |B_t| <= N,
    ||N(0, I_d)|| <= sqrt(d) + 10 (Gaussian concentration) and B_exp = R / ceil(R / batch)
    >= min(R, batch / 2). The true N is known only as R +- `count_margin`, and n_up / n_lo
    bound both, so the worst case in that range is used. FedProx's proximal
    step only pulls weights back; the cosine schedule only lowers the learning rate.
    """
    steps = cfg.local_epochs * math.ceil(n_up / cfg.batch_size)
    b_exp = max(1.0, min(n_lo, cfg.batch_size // 2))
    per_step = cfg.max_grad_norm * (n_up + sigma * (math.sqrt(num_params) + GAUSS_TAIL)) / b_exp
    return cfg.learning_rate / (1.0 - cfg.momentum) * steps * per_step


class UpdateChecker:
    """Checks the training replies of a run, round by round (remembers each site's count)."""

    def __init__(self, cfg: RunConfig, total_rounds: int, skip_norm: tuple[str, ...] = ()) -> None:
        self.cfg = cfg
        self.total_rounds = total_rounds
        self.skip_norm = set(skip_norm)  # fedbn: sites keep their own norm layers
        self.counts: dict[str, float] = {}  # site -> the count it released for this run
        self.sigma_max = max_noise_multiplier(cfg, total_rounds) if cfg.dp else math.inf
        self.margin = count_margin(cfg, total_rounds)
        # Small sites' counts are mostly noise (a count of 30 is released as 10 as often as
        # not), so the ratio check never takes a median below one noise std as the others' size.
        self.count_floor = count_noise_std(cfg, total_rounds) if cfg.dp else 0.0

    def check(
        self, replies: list[NodeReply], global_arrays: ArrayRecord
    ) -> tuple[list[NodeReply], list[Rejection]]:
        """(replies Flower may aggregate, the refused ones with their reason)."""
        reference = {k: np.asarray(v.numpy()) for k, v in global_arrays.items()}
        claims = {r.site: _claimed(r) for r in replies}
        accepted, rejected = [], []
        for r in replies:
            others = [c for site, c in claims.items() if site != r.site and math.isfinite(c)]
            reason = self._reason(r, reference, others)
            if reason is None:
                accepted.append(r)
                self.counts.setdefault(r.site, claims[r.site])
            else:
                rejected.append(Rejection(r.site, reason))
        return accepted, rejected

    def _reason(
        self, reply: NodeReply, reference: dict[str, np.ndarray], others: list[float]
    ) -> str | None:
        if reply.message is None or ARRAYS not in reply.message.content.array_records:
            return "the reply carries no model update"
        arrays = reply.message.content.array_records[ARRAYS]
        update = {k: np.asarray(v.numpy()) for k, v in arrays.items()}
        return (
            _shape_problem(update, reference)
            or _finite_problem(update)
            or self._count_problem(reply.site, _claimed(reply), others)
            or self._statistics_problem(reply, update, reference)
            or self._norm_problem(reply, update, reference)
        )

    def _statistics_problem(
        self, reply: NodeReply, update: dict[str, np.ndarray], reference: dict[str, np.ndarray]
    ) -> str | None:
        for key in STATISTICS_KEYS & set(reference):
            ref, new = reference[key], update[key]
            if np.any(ref != 0):
                if not np.array_equal(new, ref):
                    return (
                        f"array {key} is the run's released statistic; an update may not change it"
                    )
                continue
            if not self.cfg.dp:
                continue  # the non-private reference: the exact mean, nothing to bound
            bound = statistics_bound(
                ref.size, _claimed(reply), self.margin, self.cfg.target_epsilon
            )
            norm = float(np.linalg.norm(new.astype(np.float64)))
            if norm > bound:
                return f"array {key} (a released mean) has norm {norm:.4g}, above {bound:.4g}"
        return None

    def _count_problem(self, site: str, claim: float, others: list[float]) -> str | None:
        if not math.isfinite(claim) or claim < 10 or claim % 10:
            return f"num-examples {claim:g} is not a released count (a multiple of 10, >= 10)"
        first = self.counts.get(site)
        if first is not None and claim != first:
            return f"num-examples {claim:g} differs from the {first:g} it released for this run"
        if others and claim > COUNT_RATIO * max(statistics.median(others), self.count_floor):
            floor = f", taken as at least {self.count_floor:.3g}" if self.count_floor else ""
            return (
                f"num-examples {claim:g} is over {COUNT_RATIO:g}x the median of the other "
                f"hospitals ({statistics.median(others):g}{floor})"
            )
        return None

    def _norm_problem(
        self, reply: NodeReply, update: dict[str, np.ndarray], reference: dict[str, np.ndarray]
    ) -> str | None:
        if not self.cfg.dp:
            return None  # no clipping, no bound: dp = false is the non-private reference
        sigma = float(reply.metrics.get("noise-multiplier", math.nan))
        if not (math.isfinite(sigma) and 0 < sigma <= self.sigma_max):
            return (
                f"noise-multiplier {sigma:g} is outside what this run's DP settings allow "
                f"(0, {self.sigma_max:.3g}]"
            )
        skip = self.skip_norm | STATISTICS_KEYS  # checked by _statistics_problem
        keys = [k for k in reference if k not in skip and _is_float(reference[k])]
        diff = math.sqrt(
            sum(float(np.sum((update[k].astype(np.float64) - reference[k]) ** 2)) for k in keys)
        )
        num_params = sum(reference[k].size for k in keys)
        claim = _claimed(reply)
        n_up, n_lo = claim + self.margin, max(1.0, claim - self.margin)
        bound = dp_update_bound(self.cfg, num_params, sigma, n_up, n_lo)
        if diff > bound:
            return f"update norm {diff:.4g} is above the DP-SGD bound {bound:.4g} of this run"
        return None


def _claimed(reply: NodeReply) -> float:
    try:
        return float(reply.metrics.get("num-examples", math.nan))
    except (TypeError, ValueError):
        return math.nan


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def _shape_problem(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> str | None:
    missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if missing or extra:
        names = ", ".join(missing[:3] + extra[:3])
        return (
            f"its arrays are not the global model's ({len(missing)} missing, "
            f"{len(extra)} extra: {names})"
        )
    for k, ref in reference.items():
        if update[k].shape != ref.shape:
            return f"array {k} has shape {update[k].shape}, the global model's is {ref.shape}"
    return None


def _finite_problem(update: dict[str, np.ndarray]) -> str | None:
    for k, a in update.items():
        if _is_float(a) and not np.isfinite(a).all():
            return f"array {k} holds NaN or infinite values"
    return None
