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

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.grad_sample.gsm_base import AbstractGradSampleHooks
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed
from opacus.utils.tensor_utils import unfold2d
from torch import nn

_conv_backward = torch.ops.aten.convolution_backward

# --------------------------------------------------------------------------------------------
# Per-sample gradient samplers (Opacus signature). `backprops` are dL/d(output) for the summed
# per-sample losses, i.e. already multiplied by the batch size when the loss is a mean.
# --------------------------------------------------------------------------------------------


def _conv_weight_per_sample(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(n, *weight.shape) per-sample weight gradients of a conv layer."""
    n, cin = x.shape[:2]
    cout = g.shape[1]
    d = x.dim() - 2
    w_shape = layer.weight.shape
    if layer.groups == 1 and cin <= 4:
        # Few input channels (the first layer): one convolution of the input, channels as batch,
        # with the output gradients as n-grouped filters (PyTorch's ExpandedWeights trick). As
        # fast as the batch weight gradient for 1 -> 16 channels on 64^3 at 1 thread, 2.7x
        # faster at 2 threads; the grouped kernel below is 1.3x slower there.
        conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
        r = conv(
            x.transpose(0, 1),
            g.reshape(n * cout, 1, *g.shape[2:]),
            None,
            stride=layer.dilation,
            padding=layer.padding,
            dilation=layer.stride,
            groups=n,
        )
        # The result can be larger than the kernel when stride does not divide evenly.
        for i in range(d):
            r = r.narrow(2 + i, 0, w_shape[2 + i])
        return r.reshape(cin, n, cout, *w_shape[2:]).permute(1, 2, 0, *range(3, 3 + d))
    if d == 2 and layer.groups == 1 and g[0, 0].numel() <= 64:
        # Tiny 2D maps (<= 8x8): im2col + one batched matmul beats the grouped kernel (measured
        # 8.6 vs 10.1 ms for 64 -> 128 channels on 7x7, batch 64). With make_private such layers
        # usually take the ghost-norm path instead (see _use_ghost).
        a = unfold2d(
            x,
            kernel_size=layer.kernel_size,
            padding=layer.padding,
            stride=layer.stride,
            dilation=layer.dilation,
        )
        return torch.bmm(g.reshape(n, cout, -1), a.transpose(1, 2)).view(n, *w_shape)
    # General case: the weight gradient of a grouped convolution whose groups are the samples
    # runs the same fast conv kernel as the batch weight gradient, without any im2col buffer.
    gw = _conv_backward(
        g.reshape(1, n * cout, *g.shape[2:]),
        x.reshape(1, n * cin, *x.shape[2:]),
        # Only the weight's shape matters for the weight gradient (a small copy).
        layer.weight.detach().repeat(n, *([1] * (d + 1))),
        None,
        layer.stride,
        layer.padding,
        layer.dilation,
        False,
        [0] * d,
        n * layer.groups,
        [False, True, False],
    )[1]
    return gw.view(n, *w_shape)


def conv_grad_sampler(
    layer: nn.Module,
    activations: list[torch.Tensor],
    backprops: torch.Tensor,
    skip_weight: bool = False,
) -> dict[nn.Parameter, torch.Tensor]:
    x = activations[0]
    ret = {}
    if layer.weight.requires_grad and not skip_weight:
        ret[layer.weight] = _conv_weight_per_sample(layer, x, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.flatten(2).sum(2)
    return ret


def _use_ghost(layer: nn.Module, out_shape: torch.Size) -> bool:
    """Book-keeping ("mixed ghost") rule: norms via T x T Gram matrices when that is smaller than a
    per-sample weight gradient (2 T^2 < Cout * Cin/groups * k^d, T = output positions).
    Holds for the last 2D block (7x7 maps, 74k weights) whose materialised per-sample gradients
    cost more than everything else in the DP overhead; never for 3D maps (T^2 is huge)."""
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1:
        return False
    t = math.prod(out_shape[2:])
    return 2 * t * t < layer.weight.numel()


def _unfolded_gram(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A_i A_i^T (n, T, T) for the unfolded input A_i (T x Cin k^2), without unfolding.

    A_i A_i^T [t, t'] = sum over kernel taps k of <x(t + k), x(t' + k)>: one Gram matrix S of all
    padded positions (a small batched matmul over channels), then k^2 shifted windows of S added
    up. Measured 2x faster than im2col + matmul on 64 channels at 7x7 (the im2col copy dominates).
    """
    n, c = x.shape[:2]
    (ph, pw), (sh, sw), (dh, dw) = layer.padding, layer.stride, layer.dilation
    kh, kw = layer.kernel_size
    xp = F.pad(x, (pw, pw, ph, ph))
    hp, wp = xp.shape[2:]
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    flat = xp.reshape(n, c, hp * wp)
    gram = torch.bmm(flat.transpose(1, 2), flat).view(n, hp, wp, hp, wp)
    out = torch.zeros(n, ho, wo, ho, wo, dtype=x.dtype, device=x.device)
    for i in range(kh):
        ys = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
        for j in range(kw):
            xs = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            out += gram[:, ys, xs, ys, xs]
    return out.view(n, ho * wo, ho * wo)


def conv_weight_norm_sample(layer: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample Frobenius norms of the conv weight gradient without materialising it:
    ||G_i^T A_i||^2 = <A_i A_i^T, G_i G_i^T> with A_i the unfolded input (T x Cin k^2) and G_i the
    output gradient (T x Cout)."""
    n = x.shape[0]
    gg = g.reshape(n, g.shape[1], -1)  # (n, Cout, T)
    ggt = torch.bmm(gg.transpose(1, 2), gg)
    return torch.einsum("nij,nij->n", _unfolded_gram(layer, x), ggt).clamp_(min=0).sqrt_()


def linear_grad_sampler(
    layer: nn.Linear,
    activations: list[torch.Tensor],
    backprops: torch.Tensor,
    skip_weight: bool = False,
) -> dict[nn.Parameter, torch.Tensor]:
    x = activations[0]
    ret = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.einsum("n...i,n...j->nij", backprops, x)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = torch.einsum("n...k->nk", backprops)
    return ret


GRAD_SAMPLERS: dict[type, Callable[..., dict[nn.Parameter, torch.Tensor]]] = {
    nn.Conv1d: conv_grad_sampler,
    nn.Conv2d: conv_grad_sampler,
    nn.Conv3d: conv_grad_sampler,
    nn.Linear: linear_grad_sampler,
}

# --------------------------------------------------------------------------------------------
# autograd.Functions: forward as usual; backward returns the input gradient only (None for the
# parameters, so autograd never computes or accumulates p.grad) and records per-sample gradients.
# --------------------------------------------------------------------------------------------


_SHAPE_CHANGED = (
    "fast DP: input size changed between accumulated batches; call optimizer.step() "
    "between batches of different shapes"
)


def _record(
    hooks: FastGradSampleHooks,
    layer: nn.Module,
    activations: list[torch.Tensor] | None,
    g: torch.Tensor,
    grads: dict[nn.Parameter, torch.Tensor] | None = None,
) -> None:
    """Store the layer's per-sample gradients (computed here from `activations` and the output
    gradient `g`, or passed in as `grads`) on its parameters, scaled to Opacus' convention."""
    n = g.shape[0]
    scale = n if hooks.loss_reduction == "mean" else 1
    ghost_weight = hooks.allow_ghost and _use_ghost(layer, g.shape) and layer.weight.requires_grad
    if n == 0:
        grads = {p: p.new_zeros((0, *p.shape)) for p in layer.parameters() if p.requires_grad}
    elif grads is not None:
        grads = {p: gs for p, gs in grads.items() if p is not None and p.requires_grad}
    else:
        grads = GRAD_SAMPLERS[type(layer)](layer, activations, g, skip_weight=ghost_weight)
    w = layer.weight
    if getattr(w, "grad_sample", None) is None and hasattr(w, "_fast_dp_ghost"):
        del w._fast_dp_ghost  # left over from a batch that was zeroed without a step
    if ghost_weight:
        # Stand-in for the per-sample gradient: a (n, 1) tensor holding its norm, so Opacus'
        # DPOptimizer bookkeeping (norms, accumulation count, empty batches) works unchanged;
        # FastDPOptimizer forms the clipped sum from the kept (input, output-grad) pair.
        if not hasattr(w, "_fast_dp_ghost"):
            if w.grad_sample is not None:
                raise RuntimeError(_SHAPE_CHANGED)
            w._fast_dp_ghost = []
        norms = conv_weight_norm_sample(layer, activations[0], g) if n else w.new_zeros(0)
        grads[w] = norms.view(n, 1)
        if n:
            w._fast_dp_ghost.append((layer, activations[0], g, scale))
    elif hasattr(w, "_fast_dp_ghost"):
        raise RuntimeError(_SHAPE_CHANGED)
    for p, gs in grads.items():
        if scale != 1:
            # Opacus convention: per-sample gradients of each sample's own loss. Scaling the
            # (small) per-sample gradients instead of the (large) backprops saves a full pass.
            gs = gs.mul_(scale)
        hooks.store(p, gs)


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, hooks):
        ctx.layer, ctx.hooks = layer, hooks
        ctx.save_for_backward(x, weight)
        conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
        return conv(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        gx = None
        if ctx.needs_input_grad[0] and x.shape[0] > 0:
            d = x.dim() - 2
            gx = _conv_backward(
                g,
                x,
                weight,
                None,
                layer.stride,
                layer.padding,
                layer.dilation,
                False,
                [0] * d,
                layer.groups,
                [True, False, False],
            )[0]
        elif ctx.needs_input_grad[0]:
            gx = torch.zeros_like(x)
        _record(ctx.hooks, layer, [x], g)
        return gx, None, None, None, None


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, hooks):
        ctx.layer, ctx.hooks = layer, hooks
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        gx = g @ weight if ctx.needs_input_grad[0] else None
        _record(ctx.hooks, ctx.layer, [x], g)
        return gx, None, None, None, None


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, hooks):
        ctx.layer, ctx.hooks = layer, hooks
        x = x.contiguous()
        n, c = x.shape[:2]
        hw = math.prod(x.shape[2:])
        y, mean, rstd = torch.native_group_norm(
            x, weight, bias, n, c, hw, layer.num_groups, layer.eps
        )
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.dims = (n, c, hw)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, mean, rstd = ctx.saved_tensors
        layer = ctx.layer
        n, c, hw = ctx.dims
        # Fold the batch into channels: GroupNorm of one "sample" with n*c channels and n*groups
        # groups is exactly the per-sample GroupNorm, and the native backward's gamma/beta
        # gradients of that problem are the per-sample gradients (n*c values each). So one call
        # yields the input gradient and the per-sample gradients from the same pass over x and g
        # (a separate x*g reduction cost up to +70% of the backward on 3D maps).
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            g.contiguous(), x, mean, rstd, weight.repeat(n), 1, n * c, hw,
            n * layer.num_groups, [ctx.needs_input_grad[0], True, True],
        )  # fmt: skip
        grads = {layer.weight: gw.view(n, c), layer.bias: gb.view(n, c)}
        _record(ctx.hooks, layer, None, g, grads=grads)
        return gx, None, None, None, None


_FUNCTIONS: dict[type, type[torch.autograd.Function]] = {
    nn.Conv1d: _Conv,
    nn.Conv2d: _Conv,
    nn.Conv3d: _Conv,
    nn.Linear: _Linear,
    nn.GroupNorm: _GroupNorm,
}


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
            if type(layer) not in _FUNCTIONS:
                raise NotImplementedError(
                    f"fast DP has no per-sample gradient for layer '{name}' "
                    f"({type(layer).__name__}); supported: "
                    f"{', '.join(t.__name__ for t in _FUNCTIONS)}. Use grad_sample_mode='hooks'."
                )
            _check_layer(name, layer)
        for layer in m.modules():
            if type(layer) in _FUNCTIONS and any(p.requires_grad for p in layer.parameters()):
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
    fn = _FUNCTIONS[type(layer)]
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
                    grad += _conv_backward(
                        g * c.view(-1, *([1] * (g.dim() - 1))),
                        x,
                        p.detach(),
                        None,
                        layer.stride,
                        layer.padding,
                        layer.dilation,
                        False,
                        [0] * (x.dim() - 2),
                        layer.groups,
                        [False, True, False],
                    )[1]
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
    if poisson_sampling:
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
