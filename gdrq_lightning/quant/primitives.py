"""Pure quantization math: fake-quantizers, thresholds and STE autograd functions.

Everything here is a function of tensors (SPEC §1–§5); no ``nn.Module``, no config.
Shapes: ``alpha``/``step`` tensors broadcast against ``x`` or are per-channel
vectors with an explicit ``axis``.

Example:
    >>> import torch
    >>> x = torch.tensor([-1.0, -0.26, 0.1, 0.9])
    >>> fake_quant_signed(x, torch.tensor(0.5), bits=2)
    tensor([-0.5000, -0.5000,  0.0000,  0.5000])
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

_MIN_SCALE = 1e-8  # guards all-zero weight groups / dead activations against a zero step


def signed_levels(bits: int) -> int:
    """Positive levels ``n = 2**(b-1) - 1`` of the symmetric signed grid ``[-n, n]``."""
    return 2 ** (bits - 1) - 1


def unsigned_levels(bits: int) -> int:
    """Top code ``n = 2**b - 1`` of the unsigned grid ``[0, n]``."""
    return 2**bits - 1


class RoundSTE(torch.autograd.Function):
    """``torch.round`` forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def round_ste(x: Tensor) -> Tensor:
    """Round half to even with a straight-through gradient."""
    return RoundSTE.apply(x)


def _expand_channels(v: Tensor, channels: int) -> Tensor:
    """Repeat a per-group vector ``[G]`` to per-channel ``[C]`` (contiguous groups)."""
    if v.numel() == channels:
        return v
    return v.repeat_interleave(channels // v.numel())


def fake_quant_signed(x: Tensor, alpha: Tensor, bits: int, axis: int | None = None) -> Tensor:
    """Symmetric signed fake-quant ``s * round(clamp(x, -alpha, alpha) / s)``, ``s = alpha / n``.

    Args:
        x: input tensor.
        alpha: clip value, a scalar tensor (per tensor) or a ``[G]`` vector of
            per-group values along ``axis`` (groups are contiguous channel blocks).
        bits: 2..8 (1 bit is :func:`binarize`).
        axis: channel axis for a vector ``alpha``.

    Gradient: identity inside ``[-alpha, alpha]``, zero outside (``alpha`` detached).
    Uses the fused ATen fake-quant kernels, so 8 bits equals
    ``torch.fake_quantize_per_tensor_affine(x, alpha/127, 0, -127, 127)`` exactly.
    """
    n = signed_levels(bits)
    alpha = alpha.detach().float()
    a = expand_bshape(alpha, x, axis)
    return _fused_fake_quant(torch.clamp(x, -a, a), (alpha / n).clamp_min(_MIN_SCALE), -n, n, axis)


def fake_quant_unsigned(x: Tensor, alpha: Tensor, bits: int, axis: int | None = None) -> Tensor:
    """Unsigned fake-quant ``s * round(clamp(x, 0, alpha) / s)``, ``s = alpha / (2**b - 1)``.

    Gradient: identity inside ``[0, alpha]``, zero outside (``alpha`` detached).
    """
    n = unsigned_levels(bits)
    alpha = alpha.detach().float()
    x_c = torch.minimum(torch.clamp_min(x, 0.0), expand_bshape(alpha, x, axis))
    return _fused_fake_quant(x_c, (alpha / n).clamp_min(_MIN_SCALE), 0, n, axis)


def _bshape(x: Tensor, axis: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against ``x`` along ``axis``."""
    shape = [1] * x.dim()
    shape[axis] = -1
    return tuple(shape)


def expand_bshape(v: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """A scalar/``[1]`` value as a 0-dim tensor, or a per-group ``[G]`` vector expanded to
    per-channel (contiguous groups) and shaped to broadcast against ``x`` along ``axis``."""
    if axis is None or v.numel() == 1:
        return v.reshape(())
    return _expand_channels(v, x.shape[axis]).reshape(_bshape(x, axis))


def _fused_fake_quant(x: Tensor, scale: Tensor, qmin: int, qmax: int, axis: int | None) -> Tensor:
    """Dispatch to the fused per-tensor or per-channel ATen fake-quant kernel."""
    if axis is None or scale.numel() == 1:
        zero = torch.zeros(1, dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), zero, qmin, qmax)
    channels = x.shape[axis]
    scale = _expand_channels(scale, channels).contiguous()
    zero = torch.zeros(channels, dtype=torch.int32, device=x.device)
    return torch.fake_quantize_per_channel_affine(x, scale, zero, axis, qmin, qmax)


def integer_codes_signed(x: Tensor, alpha: Tensor, bits: int, axis: int = 0) -> tuple[Tensor, Tensor]:
    """Integer codes in ``[-n, n]`` and per-channel steps of :func:`fake_quant_signed`.

    Returns ``(codes, step)``: ``codes`` int8 shaped like ``x``, ``step`` float ``[C]``
    along ``axis``, with ``codes * step`` equal to the fake-quantized ``x`` bit for bit
    (the fused kernel returns ``k * s``, so ``round(k * s / s) == k``).
    """
    n = signed_levels(bits)
    step = _expand_channels((alpha.detach().float() / n).clamp_min(_MIN_SCALE).reshape(-1), x.shape[axis])
    xq = fake_quant_signed(x.detach(), alpha, bits, axis)
    codes = torch.round(xq / step.reshape(_bshape(x, axis)))
    return codes.to(torch.int8), step


def group_abs_mean(w: Tensor, groups: int) -> Tensor:
    """``mean(|W_g|)`` for ``G`` contiguous groups along dim 0; returns ``[G]``."""
    return w.detach().abs().reshape(groups, -1).mean(dim=1)


def group_abs_max(w: Tensor, groups: int) -> Tensor:
    """``max(|W_g|)`` for ``G`` contiguous groups along dim 0; returns ``[G]``."""
    return w.detach().abs().reshape(groups, -1).amax(dim=1)


def scale_clip_threshold(w: Tensor, groups: int, k: float) -> Tensor:
    """Scale-Clip weight threshold ``T_g = k * mean(|W_g|)`` (detached), shape ``[G]``."""
    return k * group_abs_mean(w, groups)


def clip_symmetric(w: Tensor, threshold: Tensor, axis: int = 0) -> Tensor:
    """``clamp(w, -T_g, T_g)`` with a per-group ``T``; zero gradient where clipped."""
    t = expand_bshape(threshold, w, axis)
    return torch.clamp(w, -t, t)


class BinarizeSTE(torch.autograd.Function):
    """``sign`` with ``sign(0) = +1`` forward, identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def binarize(w: Tensor, groups: int) -> Tensor:
    """Binary weights ``alpha_g * sign(w)``, ``alpha_g = mean(|w_g|)`` over each group (BWN)."""
    alpha = expand_bshape(group_abs_mean(w, groups), w, 0)
    return alpha * BinarizeSTE.apply(w)


def dorefa_weight(w: Tensor, bits: int) -> Tensor:
    """DoReFa weights ``2 * q_u(tanh(w) / (2 max|tanh w|) + 1/2) - 1`` (``bits >= 2``).

    The gradient flows through ``tanh`` and the max normalisation, as in the paper;
    ``q_u`` rounds with an STE. Output levels are ``(2k - n) / n``, ``k = 0..n``.
    """
    n = unsigned_levels(bits)
    t = torch.tanh(w)
    t = t / (2 * t.abs().max().clamp_min(_MIN_SCALE)) + 0.5
    return 2 * (round_ste(t * n) / n) - 1


def dorefa_act(x: Tensor, bits: int) -> Tensor:
    """DoReFa activations ``q_u(clamp(x, 0, 1))``."""
    n = unsigned_levels(bits)
    return round_ste(torch.clamp(x, 0.0, 1.0) * n) / n


class _L2Grad(torch.autograd.Function):
    """Identity forward; backward adds ``decay * alpha`` (L2 decay on PACT's alpha)."""

    @staticmethod
    def forward(ctx, alpha: Tensor, decay: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(alpha)
        ctx.decay = decay
        return alpha.view_as(alpha)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (alpha,) = ctx.saved_tensors
        return grad + ctx.decay * alpha, None


def pact_act(x: Tensor, alpha: Tensor, bits: int, decay: float = 0.0) -> Tensor:
    """PACT: ``y = clamp(x, 0, alpha)`` quantized to ``bits`` with a learnable ``alpha``.

    Gradients follow the PACT paper: ``dy/dx = 1`` on ``[0, alpha)``, ``dy/dalpha = 1``
    where ``x >= alpha``; the rounding is straight-through. ``decay`` adds the L2
    term ``decay * alpha`` to alpha's gradient once per call.
    """
    if decay:
        alpha = _L2Grad.apply(alpha, decay)
    # ``where`` rather than ``minimum``: at ``x == alpha`` the gradient goes to alpha, not half/half
    y = torch.where(x >= alpha, alpha, torch.relu(x))
    n = unsigned_levels(bits)
    s = (alpha.detach() / n).clamp_min(_MIN_SCALE)
    return y + (torch.round(y.detach() / s) * s - y.detach())


class GradScale(torch.autograd.Function):
    """Identity forward (bit for bit), gradient multiplied by a constant."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Identity forward, gradient multiplied by ``scale`` (LSQ's step-size gradient scale).

    A custom function rather than ``(x - x*scale).detach() + x*scale``, whose forward
    differs from ``x`` by an ulp and so moves LSQ's step off the stored parameter.
    """
    return GradScale.apply(x, scale)


def lsq_fake_quant(x: Tensor, step: Tensor, qmin: int, qmax: int, g: float) -> Tensor:
    """LSQ ``s * round(clamp(x / s, qmin, qmax))`` with learnable ``step`` (broadcastable).

    Autograd through this expression yields the LSQ gradient for ``s``:
    ``-x/s + round(x/s)`` inside the range, ``qmin``/``qmax`` outside, scaled by ``g``.
    """
    s = grad_scale(step, g)
    return round_ste(torch.clamp(x / s, qmin, qmax)) * s


def lsq_grad_scale(n_elements: int, qmax: int) -> float:
    """LSQ gradient scale ``1 / sqrt(N * Q_p)``."""
    return 1.0 / math.sqrt(max(n_elements * qmax, 1))


def lsq_init_step(x: Tensor, qmax: int) -> Tensor:
    """LSQ step initialisation ``2 * mean(|x|) / sqrt(Q_p)``."""
    return 2 * x.detach().abs().mean() / math.sqrt(qmax)


# --- HWGQ ------------------------------------------------------------------------------

HWGQ_BACKWARDS = ("relu", "clipped", "log_tailed")


def hwgq_forward(x: Tensor, step: float, bits: int) -> Tensor:
    """HWGQ forward: ``0`` for ``x <= 0``, else ``D * clamp(round(x / D), 1, 2**b - 1)``."""
    q = step * torch.clamp(torch.round(x / step), 1, unsigned_levels(bits))
    return torch.where(x > 0, q, torch.zeros_like(x))


class HWGQFunction(torch.autograd.Function):
    """Half-wave Gaussian quantizer with a selectable backward approximator (SPEC §4)."""

    @staticmethod
    def forward(ctx, x: Tensor, step: float, bits: int, backward: str) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.q_max = unsigned_levels(bits) * step
        ctx.mode = backward
        return hwgq_forward(x, step, bits)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        pos = x > 0
        if ctx.mode == "relu":
            g = grad * pos
        elif ctx.mode == "clipped":
            g = grad * (pos & (x <= ctx.q_max))
        else:  # log_tailed
            tail = 1.0 / (x - ctx.q_max + 1.0).clamp_min(1.0)
            g = grad * torch.where(x <= ctx.q_max, pos.to(grad.dtype), tail)
        return g, None, None, None


def hwgq(x: Tensor, step: float, bits: int, backward: str = "clipped") -> Tensor:
    """Apply HWGQ with step ``D`` (see :func:`hwgq_optimal_step`)."""
    return HWGQFunction.apply(x, step, bits, backward)


def hwgq_mse(step: float, bits: int, points: int = 200_001, x_max: float = 12.0) -> float:
    """Mean squared error of the HWGQ rule for ``x ~ N(0, 1)`` restricted to ``x > 0``.

    Negative inputs map to 0 exactly, so the error on ``x > 0`` is what ``D`` controls.
    """
    xs = torch.linspace(0.0, x_max, points, dtype=torch.float64)
    pdf = torch.exp(-0.5 * xs**2) * math.sqrt(2.0 / math.pi)  # half-normal density
    q = step * torch.clamp(torch.round(xs / step), 1, unsigned_levels(bits))
    return float(torch.trapezoid((xs - q) ** 2 * pdf, xs))


@functools.lru_cache(maxsize=None)
def hwgq_optimal_step(bits: int) -> float:
    """The MSE-optimal HWGQ step ``D_b`` for a unit Gaussian, found by golden-section search.

    Computed once per ``bits`` and cached; agrees with the HWGQ paper's
    ``D_1..D_4 = 0.799, 0.538, 0.3217, 0.185`` to within 0.003.
    """
    lo, hi = 1e-3, 3.0
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = hwgq_mse(a, bits), hwgq_mse(b, bits)
    while hi - lo > 1e-6:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = hwgq_mse(a, bits)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = hwgq_mse(b, bits)
    return (lo + hi) / 2
