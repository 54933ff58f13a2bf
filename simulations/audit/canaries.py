"""Gradient canaries inside fedvox's own DP-SGD step, and the faults the audit must catch.

A canary is a training example like any other to the data loader: it is Poisson-sampled,
forwarded, back-propagated, clipped, summed, noised and accounted by the very code a node runs
(`client.train.local_sgd`, Opacus' DPOptimizer, `common.fast_dp`). Only its per-sample
gradient is the auditor's choice: a "Dirac" gradient, zero everywhere except one weight
(Nasr et al., "Tight auditing of differentially private machine learning", USENIX Security
2023). It is `GRADIENT_SCALE` x max-grad-norm long, so correct clipping shortens it to
max-grad-norm and a clipping bypass lets all of it through. Each canary has its own weight
and a random sign; the curious server that sees every round's update scores canary i by how far
its weight moved in its direction.

How it gets in: `local_sgd(..., private=canaries.private(fault))` (a keyword that no node
passes) calls the real `common.privacy.make_private`, then
- tags canary images: a canary's image is one constant value, SENTINEL + its index, which no
  preprocessed image comes near and which the random affine augmentation leaves unchanged;
  a forward pre-hook notes which rows of each batch are canaries;
- turns the DP optimizer into a subclass whose `clip_and_accumulate` first replaces the canary
  rows' per-sample gradients (materialised ones, and fast DP's ghost-norm inputs) by their Dirac
  gradient, then runs Opacus' / fast DP's own clipping.

Faults (test-only: harness parameters, no run-config key): "no-noise" (noise std 0 while the
accountant records sigma: a lost noise call), "no-clipping" (per-sample clipping bypassed, noise
still scaled by max-grad-norm). The third, "wrong-sample-rate", lives in the harness: the
accountant is told q = 1/N instead of B/N (simulations/audit/privacy.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from common.privacy import make_private
from simulations.audit.faults import FAULTS, NO_CLIPPING, NO_NOISE, NONE

SENTINEL = 10_000.0  # canary i's image is SENTINEL + i everywhere; float32 keeps it exact
GRADIENT_SCALE = 100.0  # a canary's gradient is this many times max-grad-norm before clipping


@dataclass
class Canaries:
    """m gradient canaries: which are in the training set, their weight and sign, their score."""

    count: int
    rounds: int
    seed: int = 0
    members: np.ndarray = field(init=False)  # (m,) bool: in the training set this run
    signs: np.ndarray = field(init=False)  # (m, rounds) +-1: the gradient's sign per round
    coords: list[tuple[str, int]] | None = field(default=None, init=False)  # (param, flat index)
    scores: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.count < 2:
            raise ValueError("an audit needs at least 2 canaries")
        rng = np.random.default_rng(self.seed)
        self.members = rng.random(self.count) < 0.5
        self.signs = np.where(rng.random((self.count, self.rounds)) < 0.5, -1.0, 1.0)
        self.scores = np.zeros(self.count)
        self._rng = rng
        self._injectors: list[_Injector] = []

    def close(self) -> None:
        """Take the canary hooks off the models of the rounds so far."""
        for injector in self._injectors:
            injector.close()
        self._injectors = []

    def examples(
        self, like: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of the canaries in the training set, shaped like one `like` image and
        one `label` (a class index or a label map); every label is 0 (its gradient is replaced
        anyway, so only its shape matters to the loss)."""
        ids = np.flatnonzero(self.members)
        values = torch.as_tensor(SENTINEL + ids, dtype=like.dtype)
        images = values.view(-1, *([1] * like.dim())).expand(len(ids), *like.shape).clone()
        return images, torch.zeros((len(ids), *label.shape), dtype=label.dtype)

    def private(self, round_: int, fault: str = NONE) -> Callable[..., tuple]:
        """A `make_private` for round `round_` (1-based) of `local_sgd`: the real one, with the
        canaries (and `fault`) in."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")

        def wrapped(model: nn.Module, optimizer, loader, noise_multiplier, max_grad_norm, acc):
            out = make_private(model, optimizer, loader, noise_multiplier, max_grad_norm, acc)
            dp_model, dp_optimizer = out[0], out[1]
            dp_optimizer.__class__ = _audited(type(dp_optimizer), fault)
            # The hook goes on the wrapper local_sgd calls: Opacus' no-op wrapper runs the
            # inner module's forward directly, past its hooks.
            injector = _Injector(self, model, dp_model, self.signs[:, round_ - 1])
            self._injectors.append(injector)
            dp_optimizer._fedvox_canaries = injector
            return out

        return wrapped

    def observe(
        self, round_: int, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
    ) -> None:
        """Add round `round_`'s update (what the server sees) to every canary's score."""
        if self.coords is None:
            return
        for i, (name, index) in enumerate(self.coords):
            moved = float(after[name].reshape(-1)[index] - before[name].reshape(-1)[index])
            # SGD moves a weight against its gradient: a present canary pulls its weight by
            # -sign in every round. The real data's drift on that weight changes slowly from
            # round to round, so the secret per-round signs average most of it away.
            self.scores[i] += -self.signs[i, round_ - 1] * moved

    def choose(self, eligible: list[tuple[str, int]]) -> None:
        """One distinct weight per canary, uniformly among the weights with per-sample
        gradients of their own (fast DP's ghost-normed layers have none to replace)."""
        sizes = np.array([n for _, n in eligible])
        if sizes.sum() < self.count:
            raise ValueError(
                f"{self.count} canaries need as many weights with per-sample gradients; this "
                f"model has {int(sizes.sum())}: use fewer canaries (--canaries)"
            )
        flat = np.sort(self._rng.choice(int(sizes.sum()), size=self.count, replace=False))
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        which = np.searchsorted(starts, flat, side="right") - 1
        picked = [(eligible[w][0], int(f - starts[w])) for w, f in zip(which, flat, strict=True)]
        order = self._rng.permutation(self.count)  # canary i's weight: no pattern by index
        self.coords = [picked[j] for j in order]


class _Injector:
    """Per round: sees which batch rows are canaries and writes their Dirac gradients."""

    def __init__(
        self, canaries: Canaries, model: nn.Module, called: nn.Module, signs: np.ndarray
    ) -> None:
        self.canaries = canaries
        self.signs = signs
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.rows: list[torch.Tensor] = []
        self.handle = called.register_forward_pre_hook(self._see)

    def _see(self, module: nn.Module, args: tuple) -> None:
        if module.training and torch.is_grad_enabled():
            x = args[0]
            first = x.reshape(len(x), -1)[:, 0] if len(x) else x.new_zeros(0)
            ids = torch.where(first > SENTINEL / 2, torch.round(first - SENTINEL), -1.0)
            self.rows.append(ids.long())

    def inject(self, optimizer) -> None:
        ids = torch.cat(self.rows) if self.rows else torch.zeros(0, dtype=torch.long)
        self.rows = []
        params = [p for p in optimizer.params if getattr(p, "grad_sample", None) is not None]
        if self.canaries.coords is None:
            self.canaries.choose(own_gradients(optimizer, self.names))
        rows = torch.nonzero(ids >= 0).flatten()
        if len(rows) == 0:
            return
        value = GRADIENT_SCALE * optimizer.max_grad_norm
        for p in params:
            gs = p.grad_sample
            gs = (torch.cat(gs) if isinstance(gs, list) else gs).clone()
            gs[rows] = 0.0  # the canary's own forward/backward is replaced entirely
            if hasattr(p, "_fast_dp_ghost"):
                _zero_ghost_rows(p, rows)
            else:
                name = self.names[id(p)]
                for row in rows.tolist():
                    canary = int(ids[row])
                    owner, index = self.canaries.coords[canary]
                    if owner == name:
                        gs[row].view(-1)[index] = value * float(self.signs[canary])
            p.grad_sample = gs

    def close(self) -> None:
        self.handle.remove()


def own_gradients(optimizer, names: dict[int, str]) -> list[tuple[str, int]]:
    """(name, size) of the weights whose per-sample gradients this step materialised: the ones
    a canary can own (fast DP's ghost-normed layers keep norms only)."""
    return [
        (names[id(p)], p.numel())
        for p in optimizer.params
        if getattr(p, "grad_sample", None) is not None and not hasattr(p, "_fast_dp_ghost")
    ]


class _Probed(Exception):
    """Ends a probe's training at its first clipping: the weights are known by then."""


def canary_weights(train: Callable[[Callable[..., tuple]], object]) -> list[tuple[str, int]]:
    """The weights a canary can own in the model `train` trains: `train(private)` must run
    `local_sgd(..., private=private)` on a copy; its first DP step is stopped at the clipping.
    Which layers fast DP ghost-norms depends on their output sizes, so one real step (the
    recipe's model, loss and training view) is the only sure way to know."""
    found: list[tuple[str, int]] = []

    def private(model: nn.Module, optimizer, loader, noise_multiplier, max_grad_norm, acc):
        out = make_private(model, optimizer, loader, noise_multiplier, max_grad_norm, acc)
        cls = type(out[1])

        class Probing(cls):  # type: ignore[misc, valid-type]
            def clip_and_accumulate(self) -> None:
                names = {id(p): name for name, p in model.named_parameters()}
                found.extend(own_gradients(self, names))
                raise _Probed

        out[1].__class__ = Probing
        return out

    try:
        train(private)
    except _Probed:
        return found
    raise RuntimeError("the probe's training ended before its first DP step")


def _zero_ghost_rows(p: torch.Tensor, rows: torch.Tensor) -> None:
    """Fast DP keeps (layer, input, output-grad, scale) per batch for a ghost-normed weight and
    forms its clipped sum from them: zero the canary rows' output gradients there."""
    start, kept = 0, []
    for layer, x, g, scale in p._fast_dp_ghost:
        n = x.shape[0]
        local = rows[(rows >= start) & (rows < start + n)] - start
        if len(local):
            g = g.clone()
            g[local] = 0.0
        kept.append((layer, x, g, scale))
        start += n
    p._fast_dp_ghost = kept


_CLASSES: dict[tuple[type, str], type] = {}


def _audited(cls: type, fault: str) -> type:
    """`cls` (Opacus' DPOptimizer or fast DP's) with the canaries written in, and `fault`."""
    key = (cls, fault)
    if key in _CLASSES:
        return _CLASSES[key]

    class Audited(cls):  # type: ignore[misc, valid-type]
        def clip_and_accumulate(self) -> None:
            self._fedvox_canaries.inject(self)
            if fault != NO_CLIPPING:
                return super().clip_and_accumulate()
            bound, self.max_grad_norm = self.max_grad_norm, math.inf  # every factor is 1
            try:
                return super().clip_and_accumulate()
            finally:
                self.max_grad_norm = bound  # the noise still scales with the real bound

        def add_noise(self) -> None:
            if fault != NO_NOISE:
                return super().add_noise()
            # The accountant's step hook runs after this and records the real sigma.
            sigma, self.noise_multiplier = self.noise_multiplier, 0.0
            try:
                return super().add_noise()
            finally:
                self.noise_multiplier = sigma

    Audited.__name__ = f"Audited{cls.__name__}"
    _CLASSES[key] = Audited
    return Audited
