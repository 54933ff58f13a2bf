"""The statistics of `fedvox audit`: empirical epsilon lower bounds and attack metrics.

The tests behind each number come from a maintained library, jax-privacy's
`jax_privacy.auditing.CanaryScoreAuditor` (Google DeepMind; the `audit` extra):

- `one_run_epsilon`: Steinke, Nasr & Jagielski, "Privacy auditing with one (1) training run"
  (NeurIPS 2023). m canaries, each in the training set with probability 1/2; the auditor guesses
  "in" for the canaries scoring above a threshold. Under (epsilon, delta)-DP the number of right
  guesses is dominated by a binomial with success rate e^eps / (1 + e^eps) (plus a delta term);
  the bound is the largest epsilon that the observed count rejects at the confidence level,
  Bonferroni-corrected over every threshold the auditor could have picked;
- `clopper_pearson_epsilon`: the many-runs bound of Jagielski et al. / Nasr et al. (one trial per
  training run): ln((TPR_lower - delta) / FPR_upper) with Clopper-Pearson intervals, also
  Bonferroni-corrected over thresholds;

Attack AUC and TPR at 1 % FPR (`attack_metrics`) are scikit-learn's empirical ROC.

What fedvox adds here: the closed-form DP limits an attack is compared with (`dp_tpr_bound`,
`dp_auc_bound`) and the ceiling of a one-run audit (`one_run_ceiling`: the bound if every
guess were right, which no audit with that many canaries can pass).

The library's module imports JAX (~3 s, CPU only), so it is imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

INSTALL_HINT = "fedvox audit needs jax-privacy: pip install -e '.[audit]'"


def _auditor(member_scores: Sequence[float], nonmember_scores: Sequence[float]):
    try:
        from jax_privacy.auditing import CanaryScoreAuditor
    except ImportError as exc:  # an optional extra: say how to get it
        raise RuntimeError(INSTALL_HINT) from exc
    member = np.asarray(member_scores, dtype=float)
    nonmember = np.asarray(nonmember_scores, dtype=float)
    if member.size == 0 or nonmember.size == 0:
        raise ValueError("an audit needs at least one member and one non-member score")
    return CanaryScoreAuditor(member, nonmember)


def one_run_epsilon(
    member_scores: Sequence[float],
    nonmember_scores: Sequence[float],
    delta: float,
    confidence: float = 0.95,
) -> float:
    """Steinke et al.'s one-run lower bound on epsilon at `confidence` (higher score = "in")."""
    auditor = _auditor(member_scores, nonmember_scores)
    return float(auditor.epsilon_one_run(1.0 - confidence, delta))


def one_run_ceiling(members: int, nonmembers: int, delta: float, confidence: float = 0.95) -> float:
    """The largest bound a one-run audit with these canaries can give (every guess right)."""
    return one_run_epsilon(np.ones(members), np.zeros(nonmembers), delta, confidence)


def clopper_pearson_epsilon(
    member_scores: Sequence[float],
    nonmember_scores: Sequence[float],
    delta: float,
    confidence: float = 0.95,
) -> float:
    """The many-runs lower bound on epsilon (one independent trial per score)."""
    auditor = _auditor(member_scores, nonmember_scores)
    return float(auditor.epsilon_clopper_pearson(1.0 - confidence, delta))


def attack_metrics(
    member_scores: Sequence[float], nonmember_scores: Sequence[float], fpr: float = 0.01
) -> dict[str, float]:
    """Attack AUC (Mann-Whitney) and the highest TPR at a false-positive rate <= `fpr`, of the
    empirical ROC (scikit-learn). Not the library's convex-hull ROC: with a few hundred trials,
    thresholds mixed after seeing the scores flatter an attack."""
    from sklearn.metrics import roc_auc_score, roc_curve

    member = np.asarray(member_scores, dtype=float)
    nonmember = np.asarray(nonmember_scores, dtype=float)
    truth = np.r_[np.ones(member.size), np.zeros(nonmember.size)]
    scores = np.r_[member, nonmember]
    false_pos, true_pos, _ = roc_curve(truth, scores)
    return {
        "attack_auc": float(roc_auc_score(truth, scores)),
        "tpr_at_1pct_fpr": float(true_pos[false_pos <= fpr + 1e-12].max()),
    }


def oriented(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """Scores turned so that members score higher, when a number's direction is not known in
    advance (e.g. a metric in a reply): the attacker's best orientation, an optimistic choice
    for the attack and so a conservative one for privacy."""
    auc = attack_metrics(member_scores, nonmember_scores)["attack_auc"]
    return (member_scores, nonmember_scores) if auc >= 0.5 else (-member_scores, -nonmember_scores)


def dp_tpr_bound(epsilon: float, delta: float, fpr: float = 0.01) -> float:
    """The most any attack can reach at `fpr` against (epsilon, delta)-DP: e^eps FPR + delta."""
    if math.isinf(epsilon):
        return 1.0
    return min(1.0, math.exp(epsilon) * fpr + delta)


def dp_auc_bound(epsilon: float, delta: float) -> float:
    """The largest attack AUC (epsilon, delta)-DP allows: the area under its tightest ROC,
    TPR(f) = min(1, e^eps f + delta, 1 - e^-eps (1 - delta - f))."""
    if math.isinf(epsilon):
        return 1.0
    f = np.linspace(0.0, 1.0, 20001)
    tpr = np.minimum.reduce(
        [np.ones_like(f), math.exp(epsilon) * f + delta, 1 - math.exp(-epsilon) * (1 - delta - f)]
    )
    return float(np.trapezoid(np.clip(tpr, 0.0, 1.0), f))
