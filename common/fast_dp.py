"""Cheaper per-sample gradients for DP-SGD on CPU, plugged into Opacus.

Why this exists: with Opacus' `hooks` mode one DP step costs ~2x a non-private step on CPU. The
overhead is work DP-SGD does not need:
  1. autograd still computes the ordinary batch weight gradient `p.grad` in every conv/linear/norm
     backward, which the DPOptimizer then overwrites with the clipped sum (pure waste);
  2. per-sample conv weight gradients are built by unfolding activations (im2col), which for 3D
     volumes writes Cin*27 floats per voxel and runs ~10x slower than the fast conv kernels;
  3. GroupNorm per-sample gradients re-normalise the activations in a second pass;
  4. on small late 2D maps (7x7, 128x64x3x3 weights) the materialised per-sample gradients are
     larger than the activations, and writing/reading them dominates.

So each supported layer runs through a small autograd.Function whose backward returns only the
input gradient (never p.grad) and records per-sample gradients with the cheapest kernel for the
layer's shape: a grouped-convolution weight gradient with the batch folded into groups (or the
channels-as-batch convolution for the first layer, or im2col on tiny maps); GroupNorm's native
backward with the batch folded into channels, which yields input AND per-sample gradients in one
pass; and, for convs where 2 T^2 < #weights (T = output positions), only per-sample NORMS via T x T
Gram matrices ("mixed ghost clipping" / book-keeping), the clipped sum then being one batched weight
gradient with per-sample-scaled output gradients (FastDPOptimizer).

Everything else is stock Opacus: per-sample gradients land in `p.grad_sample` exactly where its
hooks put them; `PrivacyEngine.make_private(grad_sample_mode="no_op")` builds the wrapper, the
Poisson loader, the DPOptimizer (clipping, noise, scaling, skip-steps for BatchMemoryManager) and
the accountant hook. The samplers keep Opacus' grad-sampler signature
`(module, activations, backprops) -> {param: grad_sample}` (in `GRAD_SAMPLERS`).

Use `make_private(engine, module=..., optimizer=..., data_loader=..., noise_multiplier=...,
max_grad_norm=...)` instead of `engine.make_private(...)`; it returns the same triple.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample.gsm_base import AbstractGradSampleHooks
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed
from torch import nn

from common.per_sample_grads import FUNCTIONS, conv_backward, conv_grad_sampler

__all__ = ["FastDPOptimizer", "FastGradSampleHooks", "conv_grad_sampler", "make_private"]


def _check_layer(name: str, layer: nn.Module) -> None:
    where = f"layer '{name}' ({type(layer).__name__})"
    if isinstance(layer, nn.modules.conv._ConvNd):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise NotImplementedError(
                f"fast DP: {where} needs numeric zero padding, got padding={layer.padding!r}, "
                f"padding_mode={layer.padding_mode!r}; use grad_sample_mode='hooks' instead"
            )


class FastGradSampleHooks(AbstractGradSampleHooks):
    """Attach fast per-sample gradients to `m` in place (like Opacus' GradSampleHooks).

    Every trainable submodule must be a Conv1d/2d/3d, Linear or GroupNorm; anything else raises
    (use Opacus' `hooks` mode for such models). `remove_hooks()` restores the plain modules.
    """

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean"):
        if not batch_first:
            raise NotImplementedError("fast DP supports batch_first=True only")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if getattr(m, "_fast_dp_hooks", None) is not None:
            raise ValueError("fast DP is already attached to this model; attach once per model")
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction)
        self.hooks_enabled = True
        self.forbid_accumulation = False
        # Ghost norms need FastDPOptimizer to form the clipped sum; make_private turns them on.
        self.allow_ghost = False
        self._layers: list[nn.Module] = []
        for name, layer in m.named_modules():
            own = [p for p in layer.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if type(layer) not in FUNCTIONS:
                raise NotImplementedError(
                    f"fast DP has no per-sample gradient for layer '{name}' "
                    f"({type(layer).__name__}); supported: "
                    f"{', '.join(t.__name__ for t in FUNCTIONS)}. Use grad_sample_mode='hooks'."
                )
            _check_layer(name, layer)
        for layer in m.modules():
            if type(layer) in FUNCTIONS and any(p.requires_grad for p in layer.parameters()):
                # Instance attribute shadows the class forward; deleted again by remove_hooks.
                layer.forward = _make_forward(layer, self)
                self._layers.append(layer)
        m._fast_dp_hooks = self

    def store(self, p: nn.Parameter, gs: torch.Tensor) -> None:
        """Put per-sample gradients where Opacus' DPOptimizer reads them (`p.grad_sample`)."""
        if p.grad_sample is None:
            p.grad_sample = gs
            return
        if self.forbid_accumulation:
            # Same rule (and message) as Opacus: two Poisson batches before one step would be
            # accounted as one step.
            raise ValueError(
                "Poisson sampling is not compatible with grad accumulation. "
                "You need to call optimizer.step() after every forward/backward pass "
                "or consider using BatchMemoryManager"
            )
        if isinstance(p.grad_sample, list):
            p.grad_sample.append(gs)
        else:
            p.grad_sample = [p.grad_sample, gs]

    def disable_hooks(self) -> None:
        """Plain forward/backward (ordinary p.grad), as Opacus' GradSampleHooks.disable_hooks."""
        self.hooks_enabled = False

    def enable_hooks(self) -> None:
        self.hooks_enabled = True

    def forbid_grad_accumulation(self) -> None:
        self.forbid_accumulation = True

    def allow_grad_accumulation(self) -> None:
        self.forbid_accumulation = False

    def remove_hooks(self) -> None:
        for layer in self._layers:
            layer.__dict__.pop("forward", None)
            if hasattr(layer.weight, "_fast_dp_ghost"):
                del layer.weight._fast_dp_ghost
        self._layers = []
        if getattr(self._module, "_fast_dp_hooks", None) is self:
            del self._module._fast_dp_hooks


def _make_forward(layer: nn.Module, hooks: FastGradSampleHooks) -> Callable[..., torch.Tensor]:
    fn = FUNCTIONS[type(layer)]
    plain = type(layer).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not (hooks.hooks_enabled and layer.training and torch.is_grad_enabled()):
            return plain(layer, x)
        return fn.apply(x, layer.weight, layer.bias, layer, hooks)

    return forward


class FastDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer, plus clipped sums for ghost-normed conv weights (book-keeping).

    Norms, clip factors, noise, scaling, skip-steps (BatchMemoryManager) and the accountant hook
    are Opacus' own; only the clipped sum of a ghost-normed weight is formed differently: one
    batched weight-gradient convolution with the output gradients scaled per sample by the clip
    factor, instead of an einsum over materialised per-sample gradients.
    """

    @torch.no_grad()
    def clip_and_accumulate(self) -> None:
        ghost = [p for p in self.params if hasattr(p, "_fast_dp_ghost")]
        if not ghost:
            return super().clip_and_accumulate()
        grad_samples = self.grad_samples
        if len(grad_samples[0]) == 0:
            clip = torch.zeros((0,), device=grad_samples[0].device)
        else:
            norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples], 1)
            clip = (self.max_grad_norm / (norms.norm(2, dim=1) + 1e-6)).clamp(max=1.0)
        for p, gs in zip(self.params, grad_samples, strict=True):
            _check_processed_flag(p.grad_sample)
            if hasattr(p, "_fast_dp_ghost"):
                grad = torch.zeros_like(p)
                start = 0
                for layer, x, g, scale in p._fast_dp_ghost:
                    n = x.shape[0]
                    c = (clip[start : start + n] * scale).to(g.dtype)
                    start += n
                    scaled = g * c.view(-1, *([1] * (g.dim() - 1)))
                    grad += conv_backward(
                        layer, scaled, x, p.detach(), groups=layer.groups, wanted="weight"
                    )
                del p._fast_dp_ghost
            else:
                grad = torch.einsum("i,i...", clip.to(p.dtype), gs.to(p.dtype))
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)

    def zero_grad(self, set_to_none: bool = False) -> None:
        for p in self.params:
            if hasattr(p, "_fast_dp_ghost"):
                del p._fast_dp_ghost
        super().zero_grad(set_to_none)


def make_private(
    engine: PrivacyEngine,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    poisson_sampling: bool = True,
    loss_reduction: str = "mean",
    **kwargs: Any,
):
    """`engine.make_private(...)` with fast per-sample gradients -> (module, optimizer, loader).

    Opacus does everything except computing per-sample gradients: it wraps `module` (keys gain
    the usual `_module.` prefix), builds the Poisson loader, the DPOptimizer and the accountant
    hook, exactly as in `hooks` mode. With flat clipping (the default) the DPOptimizer is
    re-created as FastDPOptimizer with the same settings and accountant hook.
    """
    if "grad_sample_mode" in kwargs:
        raise ValueError("fast_dp.make_private chooses grad_sample_mode itself; do not pass it")
    hooks = FastGradSampleHooks(module, loss_reduction=loss_reduction)
    if poisson_sampling or isinstance(data_loader, DPDataLoader):  # Poisson batches either way
        hooks.forbid_grad_accumulation()
    try:
        module, optimizer, data_loader = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=poisson_sampling,
            loss_reduction=loss_reduction,
            # Opacus computes no per-sample gradients itself in this mode; ours fill grad_sample.
            grad_sample_mode="no_op",
            **kwargs,
        )
    except Exception:
        hooks.remove_hooks()
        raise
    # Opacus' no_op wrapper has nothing to remove; make its cleanup (`_close()`,
    # `to_standard_module()`) take our layers off too, so the model can be made private again.
    module.remove_hooks = hooks.remove_hooks
    if type(optimizer) is DPOptimizer:
        fast = FastDPOptimizer(
            optimizer.original_optimizer,
            noise_multiplier=optimizer.noise_multiplier,
            max_grad_norm=optimizer.max_grad_norm,
            expected_batch_size=optimizer.expected_batch_size,
            loss_reduction=optimizer.loss_reduction,
            generator=optimizer.generator,
            secure_mode=optimizer.secure_mode,
        )
        fast.attach_step_hook(optimizer.step_hook)
        optimizer = fast
        hooks.allow_ghost = True
    return module, optimizer, data_loader
