"""Per-sample gradients of conv, linear and GroupNorm layers, for `common/fast_dp.py`.

Samplers in Opacus' grad-sampler signature `(module, activations, backprops) -> {param:
per-sample gradient}`, with the cheapest kernel for the layer's shape (fast_dp's docstring says
why), and the autograd Functions fast_dp runs those layers through: their backward returns the
input gradient only and records the per-sample gradients. `backprops` are dL/d(output) for
the summed per-sample losses, i.e. already multiplied by the batch size when the loss is a mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from opacus.utils.tensor_utils import unfold2d
from torch import nn

_conv_backward = torch.ops.aten.convolution_backward


def conv_backward(
    layer: nn.Module,
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    wanted: str,
) -> torch.Tensor:
    """One gradient ("input" or "weight") of `layer`'s convolution, by the native kernel."""
    mask = [wanted == "input", wanted == "weight", False]
    grads = _conv_backward(
        g, x, weight, None, layer.stride, layer.padding, layer.dilation, False,
        [0] * (x.dim() - 2), groups, mask,
    )  # fmt: skip
    return grads[0] if wanted == "input" else grads[1]


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
        # Tiny 2D maps (<= 8x8): im2col + one batched matmul beats the grouped kernel
        # (docs/benchmarks.md, "Figures behind code comments"). With make_private such layers
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
    gw = conv_backward(
        layer,
        g.reshape(1, n * cout, *g.shape[2:]),
        x.reshape(1, n * cin, *x.shape[2:]),
        # Only the weight's shape matters for the weight gradient (a small copy).
        layer.weight.detach().repeat(n, *([1] * (d + 1))),
        groups=n * layer.groups,
        wanted="weight",
    )
    return gw.view(n, *w_shape)


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
    h, w = x.shape[2:]
    hp, wp = h + 2 * ph, w + 2 * pw
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    # Padded positions are zero, so their rows of S are too: the Gram of the unpadded input,
    # zero-padded afterwards ((h w)^2 products instead of (hp wp)^2: 2.7x fewer on 7x7).
    flat = x.reshape(n, c, h * w)
    gram = torch.bmm(flat.transpose(1, 2), flat).view(n, h, w, h, w)
    gram = F.pad(gram, (pw, pw, ph, ph, pw, pw, ph, ph))  # (n, hp, wp, hp, wp)
    # The k^2 taps summed one axis at a time: kw windows along the columns, then kh along the
    # rows of that (kh + kw adds instead of kh * kw; 4x faster for 3x3 on 7x7 maps).
    cols = _window_sum(gram, 2, kw, dw, sw, wo)  # (n, hp, wo, hp, wo)
    out = _window_sum(cols, 1, kh, dh, sh, ho)  # (n, ho, wo, ho, wo)
    return out.reshape(n, ho * wo, ho * wo)


def _window_sum(s: torch.Tensor, dim: int, k: int, dilation: int, stride: int, size: int):
    """Sum over taps i < k of s's window starting at i * dilation, taken along `dim` and
    `dim + 2` together (a Gram matrix's two copies of one spatial axis)."""
    windows = []
    for i in range(k):
        idx = slice(i * dilation, i * dilation + stride * (size - 1) + 1, stride)
        index = [slice(None)] * s.dim()
        index[dim] = index[dim + 2] = idx
        windows.append(s[tuple(index)])
    total = windows[0].clone() if k == 1 else windows[0] + windows[1]
    for w in windows[2:]:
        total += w
    return total


def conv_weight_norm_sample(layer: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample Frobenius norms of the conv weight gradient without materialising it:
    ||G_i^T A_i||^2 = <A_i A_i^T, G_i G_i^T> with A_i the unfolded input (T x Cin k^2) and G_i the
    output gradient (T x Cout)."""
    n = x.shape[0]
    gg = g.reshape(n, g.shape[1], -1)  # (n, Cout, T)
    ggt = torch.bmm(gg.transpose(1, 2), gg)
    # An elementwise product and sum: einsum's batched-matmul route took 6x longer here.
    return (_unfolded_gram(layer, x) * ggt).flatten(1).sum(1).clamp_(min=0).sqrt_()


def _sampler(
    weight: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    bias: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[..., dict[nn.Parameter, torch.Tensor]]:
    """An Opacus-style grad sampler from per-sample weight and bias gradient functions."""

    def sampler(
        layer: nn.Module,
        activations: list[torch.Tensor],
        backprops: torch.Tensor,
        skip_weight: bool = False,  # the weight's norms come from the ghost path instead
    ) -> dict[nn.Parameter, torch.Tensor]:
        ret = {}
        if layer.weight.requires_grad and not skip_weight:
            ret[layer.weight] = weight(layer, activations[0], backprops)
        if layer.bias is not None and layer.bias.requires_grad:
            ret[layer.bias] = bias(backprops)
        return ret

    return sampler


conv_grad_sampler = _sampler(_conv_weight_per_sample, lambda g: g.flatten(2).sum(2))
linear_grad_sampler = _sampler(
    lambda layer, x, g: torch.einsum("n...i,n...j->nij", g, x),
    lambda g: torch.einsum("n...k->nk", g),
)

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
    hooks: Any,  # FastGradSampleHooks: loss_reduction, allow_ghost, store()
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
            # Out of place when a sampler returned (a view of) the output gradient itself, e.g. a
            # Linear bias on 2D input: scaling that in place would corrupt the input gradient
            # every earlier layer still needs.
            shared = gs.untyped_storage().data_ptr() == g.untyped_storage().data_ptr()
            gs = gs * scale if shared else gs.mul_(scale)
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
            gx = conv_backward(layer, g, x, weight, groups=layer.groups, wanted="input")
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


FUNCTIONS: dict[type, type[torch.autograd.Function]] = {
    nn.Conv1d: _Conv,
    nn.Conv2d: _Conv,
    nn.Conv3d: _Conv,
    nn.Linear: _Linear,
    nn.GroupNorm: _GroupNorm,
}
