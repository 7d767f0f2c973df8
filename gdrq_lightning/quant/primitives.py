"""Pure quantization math shared by the methods: uniform fake-quantizers (docs/methods.md#uniform-quantizers),
Scale-Clip thresholds (#scale-clip), group statistics (#group-quantization), binary weights and STEs.

Everything here is a function of tensors; no ``nn.Module``, no config. A method's own math
lives in its own module under :mod:`.methods`. Float32, bfloat16 and float16 inputs run
the fused ops of :mod:`.kernels`; other dtypes the plain composition below, which the
kernels reproduce bit for bit. Shapes: ``alpha`` tensors are scalars or per-group ``[G]``
vectors along an explicit ``axis`` (groups are contiguous channel blocks).

Example:
    >>> import torch
    >>> x = torch.tensor([-1.0, -0.26, 0.1, 0.9])
    >>> fake_quant_signed(x, torch.tensor(0.5), bits=2)
    tensor([-0.5000, -0.5000,  0.0000,  0.5000])
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import kernels as K
from . import ops as O
from .kernels import MIN_SCALE


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


class _Attach(torch.autograd.Function):
    """``x`` unchanged (a view); ``params`` get a zero gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, *params: Tensor) -> Tensor:  # type: ignore[override]
        ctx.shapes = [(p.shape, p.dtype, p.device) for p in params]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return (grad, *(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.shapes))


def attach(x: Tensor, *params: Tensor) -> Tensor:
    """``x``, with ``params`` in its autograd graph at zero gradient: a learned clip or step
    whose quantizer is switched off still takes part in every backward pass, as DDP's reducer
    expects of every parameter (no ``find_unused_parameters``). Free: a view and a tiny zero."""
    if not torch.is_grad_enabled() or not any(p.requires_grad for p in params):
        return x
    return _Attach.apply(x, *params)


def fake_quant_signed(x: Tensor, alpha: Tensor, bits: int, axis: int | None = None) -> Tensor:
    """Symmetric signed fake-quant ``s * round(clamp(x, -alpha, alpha) / s)``, ``s = alpha / n``.

    Args:
        x: input tensor.
        alpha: clip value, a scalar tensor (per tensor) or a ``[G]`` vector of
            per-group values along ``axis`` (groups are contiguous channel blocks).
        bits: 2..8 (1 bit is :func:`binarize`).
        axis: channel axis for a vector ``alpha``.

    Gradient: identity inside ``(-alpha, alpha)``, zero outside, half on ``|x| == alpha``
    (the derivative torch gives ``clamp`` with tensor bounds); ``alpha`` is detached.
    Computes what the fused ATen kernel computes (``round(x * (1/s)) * s``), so 8 bits
    equals ``torch.fake_quantize_per_tensor_affine(x, alpha/127, 0, -127, 127)`` exactly.
    """
    if not K.fast_ok(x):
        return _reference_fake_quant(x, alpha.detach().float(), bits, axis, signed=True)
    return O.fake_quant(x, alpha.float(), signed_levels(bits), True, axis, K.HALF, K.needs_grad(x))[0]


def fake_quant_unsigned(x: Tensor, alpha: Tensor, bits: int, axis: int | None = None) -> Tensor:
    """Unsigned fake-quant ``s * round(clamp(x, 0, alpha) / s)``, ``s = alpha / (2**b - 1)``.

    Gradient: identity on ``(0, alpha)``, half at ``x == alpha`` and zero at ``x == 0``
    (the derivatives torch gives ``clamp_min`` and ``minimum``), zero outside (``alpha`` detached).
    """
    if not K.fast_ok(x):
        return _reference_fake_quant(x, alpha.detach().float(), bits, axis, signed=False)
    return O.fake_quant(x, alpha.float(), unsigned_levels(bits), False, axis, K.HALF, K.needs_grad(x))[0]


def relu_fake_quant(x: Tensor, alpha: Tensor, bits: int, axis: int | None = None) -> Tensor:
    """``fake_quant_unsigned(torch.relu(x), alpha, bits, axis)`` as one op, with the gradient of
    that composition for ``x`` (the ReLU's mask is the quantizer's: nothing at or below 0)."""
    if not K.fast_ok(x):
        return _reference_fake_quant(torch.relu(x), alpha.detach().float(), bits, axis, signed=False)
    return fake_quant_unsigned(x, alpha, bits, axis)


def relu_mean(x: Tensor) -> Tensor:
    """``mean(relu(x))`` (detached), accumulated in float64 and returned as float32 ``[1]``:
    one pass over ``x`` for the fused dtypes, without writing a ReLU tensor."""
    x = x.detach()
    total = O.relu_sum(x) if K.fast_ok(x) else torch.relu(x).sum(dtype=torch.float64)
    return (total / x.numel()).float().reshape(1)


def scale_clip_fake_quant(w: Tensor, groups: int, k: Tensor | float, bits: int) -> Tensor:
    """GDRQ weights: ``fake_quant_signed(clip_symmetric(w, T), T, bits, axis=0)`` with
    ``T = scale_clip_threshold(w, groups, k)``, as one op.

    Gradient: identity where ``|w| < T_g``, zero where clipped (a weight exactly on ``T_g``
    gets a quarter: two clamps at the same bound, as the composition gives).
    """
    if not K.fast_ok(w):
        t = scale_clip_threshold(w, groups, k)
        return _reference_fake_quant(clip_symmetric(w, t), t.float(), bits, 0, signed=True)
    k = k if isinstance(k, Tensor) else torch.tensor(float(k), device=w.device)
    return O.scale_clip_fake_quant(w, k, groups, signed_levels(bits), K.needs_grad(w))[0]


def _expand_channels(v: Tensor, channels: int) -> Tensor:
    """Repeat a per-group vector ``[G]`` to per-channel ``[C]`` (contiguous groups)."""
    if v.numel() == channels:
        return v
    return v.repeat_interleave(channels // v.numel())


def channel_shape(x: Tensor, axis: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against ``x`` along ``axis``."""
    shape = [1] * x.dim()
    shape[axis] = -1
    return tuple(shape)


def expand_bshape(v: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """A scalar/``[1]`` value as a 0-dim tensor, or a per-group ``[G]`` vector expanded to
    per-channel (contiguous groups) and shaped to broadcast against ``x`` along ``axis``."""
    if axis is None or v.numel() == 1:
        return v.reshape(())
    return _expand_channels(v, x.shape[axis]).reshape(channel_shape(x, axis))


def _reference_fake_quant(x: Tensor, alpha: Tensor, bits: int, axis: int | None, signed: bool) -> Tensor:
    """The plain composition (clamp / minimum, then the ATen kernel), for dtypes the kernels skip."""
    if signed:
        n = signed_levels(bits)
        a = expand_bshape(alpha, x, axis)
        return _aten_fake_quant(torch.clamp(x, -a, a), (alpha / n).clamp_min(MIN_SCALE), -n, n, axis)
    n = unsigned_levels(bits)
    x_c = torch.minimum(torch.clamp_min(x, 0.0), expand_bshape(alpha, x, axis))
    return _aten_fake_quant(x_c, (alpha / n).clamp_min(MIN_SCALE), 0, n, axis)


def _aten_fake_quant(x: Tensor, scale: Tensor, qmin: int, qmax: int, axis: int | None) -> Tensor:
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
    step = _expand_channels((alpha.detach().float() / n).clamp_min(MIN_SCALE).reshape(-1), x.shape[axis])
    xq = fake_quant_signed(x.detach(), alpha, bits, axis)
    codes = torch.round(xq / step.reshape(channel_shape(x, axis)))
    return codes.to(torch.int8), step


def group_abs_mean(w: Tensor, groups: int) -> Tensor:
    """``mean(|W_g|)`` for ``G`` contiguous groups along dim 0; returns ``[G]``."""
    return K.abs_mean_rows(w.detach().reshape(groups, -1))


def group_abs_max(w: Tensor, groups: int) -> Tensor:
    """``max(|W_g|)`` for ``G`` contiguous groups along dim 0; returns ``[G]``."""
    return w.detach().abs().reshape(groups, -1).amax(dim=1)


def scale_clip_threshold(w: Tensor, groups: int, k: Tensor | float) -> Tensor:
    """Scale-Clip weight threshold ``T_g = k * mean(|W_g|)`` (detached), shape ``[G]``."""
    return k * group_abs_mean(w, groups)


def clip_symmetric(w: Tensor, threshold: Tensor, axis: int = 0) -> Tensor:
    """``clamp(w, -T_g, T_g)`` with a per-group ``T``; zero gradient where clipped."""
    t = threshold.detach()
    if not K.fast_ok(w) or t.dtype != w.dtype:
        t = expand_bshape(t, w, axis)
        return torch.clamp(w, -t, t)
    return O.fake_quant(w, t, 0, True, axis, K.HALF, K.needs_grad(w))[0]


class BinarizeSTE(torch.autograd.Function):
    """``sign`` with ``sign(0) = +1`` forward, identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def binarize(w: Tensor, groups: int) -> Tensor:
    """Binary weights ``alpha_g * sign(w)``, ``alpha_g = mean(|w_g|)`` over each group (BWN)."""
    alpha = group_abs_mean(w, groups)
    if K.fast_ok(w):
        return O.scaled_rows(w, alpha, True)
    return expand_bshape(alpha, w, 0) * BinarizeSTE.apply(w)


def binary_codes(wq: Tensor) -> tuple[Tensor, Tensor]:
    """Codes ``±1`` (int32) and per-output-channel steps ``alpha`` of binarized weights ``wq``.

    A dead (all-zero) filter has step ~0 and code +1, so ``codes * step`` is still ``wq``.
    """
    step = wq.reshape(wq.shape[0], -1).abs().amax(dim=1).clamp_min(1e-12)
    return torch.where(wq >= 0, 1, -1).to(torch.int32), step


# --- calibrated clip factors (``k_w`` / ``k_a: auto``) ------------------------------------------

def clip_factor_grid(statistic: str, device: torch.device | str = "cpu") -> Tensor:
    """Candidate factors ``k`` of a clip ``alpha = k * stat``: 96 log-spaced values, 0.5..64 for
    ``stat = mean|x|`` (Scale-Clip) and 0.05..1 for ``stat = max|x|`` (a factor of the range)."""
    lo, hi = (0.5, 64.0) if statistic == "mean" else (0.05, 1.0)
    return torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), 96, device=device)


def clip_errors(xv: Tensor, stat: Tensor, grid: Tensor, bits: int, signed: bool, upper: float | None = None) -> Tensor:
    """Summed squared error of fake-quantizing ``xv`` with ``alpha = k * stat`` for each ``k``.

    Args:
        xv: samples as ``[G, L]`` (one row per quantization group).
        stat: the per-group statistic ``[G, 1]`` the clip is a multiple of.
        grid: candidate factors ``[K]`` (:func:`clip_factor_grid`).
        bits: bit width of the signed (weights) or unsigned (activations) grid.
        upper: a cap on ``alpha`` (ReLU6).

    Returns:
        ``[K]`` float64 sums, to be added over batches (and DDP ranks) before the ``argmin``.
    """
    n = signed_levels(bits) if signed else unsigned_levels(bits)
    x = xv.detach().float()
    alpha = grid.to(x).reshape(-1, 1, 1) * stat.detach().float().unsqueeze(0)  # [K, G, 1]
    if upper is not None:
        alpha = alpha.clamp(max=upper)
    s = (alpha / n).clamp_min(MIN_SCALE)
    lo = -alpha if signed else torch.zeros_like(alpha)
    q = torch.round(torch.minimum(torch.maximum(x, lo), alpha) / s) * s  # [K, G, L]
    return (q - x).pow(2).sum(dim=(1, 2), dtype=torch.float64)


def best_clip_factor(grid: Tensor, errors: Tensor) -> Tensor:
    """The factor with the least error, refined by a parabola through its neighbours in ``log k``.

    A 0-dim float32 tensor on ``errors``' device, chosen without reading a value on the host:
    no device synchronisation, and the choice traces into a compiled graph (first-batch
    calibration inside ``torch.compile``).
    """
    grid = grid.to(errors.device)
    last = len(grid) - 1
    i = torch.argmin(errors)
    near = i.clamp(1, last - 1) + torch.arange(-1, 2, device=errors.device)  # i and its neighbours
    x0, x1, x2 = torch.log(grid.index_select(0, near).double()).unbind()
    y0, y1, y2 = errors.index_select(0, near).unbind()
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    vertex = x1 - 0.5 * ((x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)) / den
    refined = torch.exp(torch.minimum(torch.maximum(vertex, x0), x2).float())
    return torch.where((i == 0) | (i == last) | (den == 0), grid.index_select(0, i.reshape(1))[0], refined)


def sample_columns(xv: Tensor, limit: int) -> Tensor:
    """Every ``ceil(L / limit)``-th column of ``[G, L]``: a deterministic subsample (no RNG state used)."""
    stride = max(1, -(-xv.shape[1] // limit))
    return xv[:, ::stride]
