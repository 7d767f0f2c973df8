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

    Gradient: identity inside ``(-alpha, alpha)``, zero outside, half on ``|x| == alpha``
    (the derivative torch gives ``clamp`` with tensor bounds); ``alpha`` is detached.
    Computes what the fused ATen kernel computes (``round(x * (1/s)) * s``), so 8 bits
    equals ``torch.fake_quantize_per_tensor_affine(x, alpha/127, 0, -127, 127)`` exactly.
    """
    alpha = alpha.detach().float()
    if not _fast_ok(x):
        return _reference_fake_quant(x, alpha, bits, axis, signed=True)
    if not _needs_grad(x):
        xv, a = _grouped(x, alpha, axis)
        return _quantize(xv, a, signed_levels(bits), signed=True).reshape(x.shape)
    return _ClipFakeQuant.apply(x, alpha, signed_levels(bits), axis, True)


def fake_quant_unsigned(x: Tensor, alpha: Tensor, bits: int, axis: int | None = None) -> Tensor:
    """Unsigned fake-quant ``s * round(clamp(x, 0, alpha) / s)``, ``s = alpha / (2**b - 1)``.

    Gradient: identity on ``(0, alpha)``, half at ``x == alpha`` and zero at ``x == 0``
    (the derivatives torch gives ``clamp_min`` and ``minimum``), zero outside (``alpha`` detached).
    """
    alpha = alpha.detach().float()
    if not _fast_ok(x):
        return _reference_fake_quant(x, alpha, bits, axis, signed=False)
    if not _needs_grad(x):
        xv, a = _grouped(x, alpha, axis)
        return _quantize(xv, a, unsigned_levels(bits), signed=False).reshape(x.shape)
    return _ClipFakeQuant.apply(x, alpha, unsigned_levels(bits), axis, False)


def relu_fake_quant(x: Tensor, alpha: Tensor, bits: int, axis: int | None = None, relu_out: Tensor | None = None) -> Tensor:
    """``fake_quant_unsigned(torch.relu(x), alpha, bits, axis)`` as one autograd node,
    with the gradient of that composition for ``x``.

    ``relu_out``: ``torch.relu(x)`` if the caller computed it already (for statistics);
    its memory is reused for the result, so the caller must not read it afterwards.
    """
    alpha = alpha.detach().float()
    if not _fast_ok(x):
        return _reference_fake_quant(torch.relu(x), alpha, bits, axis, signed=False)
    n = unsigned_levels(bits)
    if not _needs_grad(x):
        xv, a = _grouped(x, alpha, axis)
        out = None if relu_out is None else relu_out.detach().reshape(xv.shape)
        return _quantize(xv, a, n, signed=False, out=out).reshape(x.shape)
    return _ReluFakeQuant.apply(x, alpha, n, axis, [relu_out])  # in a list: not an autograd input


def scale_clip_fake_quant(w: Tensor, groups: int, k: float, bits: int) -> Tensor:
    """GDRQ weights: ``fake_quant_signed(clip_symmetric(w, T), T, bits, axis=0)`` with
    ``T = scale_clip_threshold(w, groups, k)``, as one node.

    Gradient: identity where ``|w| < T_g``, zero where clipped (see ``_ScaleClipFakeQuant``
    for ``|w| == T_g``).
    """
    if not _fast_ok(w):
        t = scale_clip_threshold(w, groups, k)
        return _reference_fake_quant(clip_symmetric(w, t), t.float(), bits, 0, signed=True)
    if not _needs_grad(w):
        wv = w.detach().reshape(groups, -1)
        t = (k * wv.abs().mean(dim=1)).reshape(-1, 1)  # == scale_clip_threshold(w, groups, k)
        return _quantize(wv, t, signed_levels(bits), signed=True).reshape(w.shape)
    return _ScaleClipFakeQuant.apply(w, groups, float(k), signed_levels(bits))


def _fast_ok(x: Tensor) -> bool:
    """The fused paths reproduce the ATen kernels' float32 arithmetic; other dtypes take the reference."""
    return x.dtype == torch.float32


def _needs_grad(x: Tensor) -> bool:
    """Without a backward (eval, ``no_grad``) no mask is computed."""
    return torch.is_grad_enabled() and x.requires_grad


def _grouped(x: Tensor, v: Tensor, axis: int | None) -> tuple[Tensor, Tensor]:
    """``x`` as ``[..., L]`` with a per-group ``[G]`` vector broadcasting as ``[G, 1]`` along ``axis``.

    Contiguous channel groups make ``x.reshape(*x.shape[:axis], G, -1)`` a grouping without
    expanding ``v`` to channels (no ``repeat_interleave``); a scalar ``v`` gives ``[1, numel]``.
    """
    if axis is None or v.numel() == 1:
        return x.reshape(1, -1), v.reshape(())
    axis %= x.dim()
    if x.shape[axis] % v.numel():
        raise ValueError(f"{v.numel()} groups do not divide the {x.shape[axis]} channels of axis {axis}")
    return x.reshape(x.shape[:axis] + (v.numel(), -1)), v.reshape(-1, 1)


# --- the fused fast paths ------------------------------------------------------------------
# They compute what the plain composition (clamp / minimum, then ATen's fake-quant kernel)
# computes, bit for bit, values and gradients (tests/benchmarks/test_fast_paths.py), but:
# * every op is vectorised and in place: ATen's fake-quant kernels, ``where`` and ``clamp``
#   with tensor bounds are scalar loops on CPU, and comparisons into ``bool`` are slower
#   than into ``float``;
# * one autograd node per quantizer, keeping one 0/1 float mask instead of its inputs, and
#   two full-size allocations per node (result, mask): fresh memory page-faults on CPU.
# torch's derivatives decide the gradient on a clip bound, and the masks reproduce them:
# ``clamp`` with tensor bounds passes 1/2 there (1 when both bounds coincide), ``minimum``
# 1/2 on a tie, ``relu`` / ``clamp_min(x, 0.)`` nothing at 0. Elements exactly on a bound
# are rare: a separate tie mask is built (and kept) only when there are some.

class _Grid:
    """The fake-quant grid ``s = alpha / n`` (``>= 1e-8``), ``inv = 1/s`` and ``hi = alpha * inv``."""

    def __init__(self, alpha: Tensor, n: int) -> None:
        self.scale = (alpha / n).clamp_min(_MIN_SCALE)
        self.inv = torch.reciprocal(self.scale)
        self.hi = alpha * self.inv
        self.neg_hi = -self.hi

    def apply(self, out: Tensor, x: Tensor, signed: bool) -> None:
        """``out = s * round(clamp(x, lo, alpha) * inv)`` as ATen's kernels compute it.

        ``inv`` in float32 like the kernels; clamping ``x * inv`` at ``alpha * inv`` equals
        multiplying the clamped ``x`` (rounding is monotonic); ``|round(alpha * inv)| <= n``
        makes the kernels' integer clamp a no-op; ``+ 0.0`` turns the ``-0.0`` that ``round``
        keeps into the kernels' ``+0.0``.
        """
        torch.mul(x, self.inv, out=out)
        if signed:
            torch.maximum(out, self.neg_hi, out=out)
        else:
            out.clamp_(min=0.0)
        torch.minimum(out, self.hi, out=out)
        out.round_().mul_(self.scale).add_(0.0)


def _quantize(xv: Tensor, a: Tensor, n: int, signed: bool, out: Tensor | None = None) -> Tensor:
    """Forward only (no masks), slice by slice."""
    out = torch.empty_like(xv) if out is None else out
    _Grid(a, n).apply(out, xv, signed)
    return out


def _ties(eq: Tensor) -> Tensor | None:
    """The 0/1 tie mask ``eq``, or ``None`` when it is all 0 (checked on CPU only, where this
    is a reduction and no synchronisation; accelerators always keep the mask)."""
    if eq.device.type == "cpu" and (eq.numel() == 0 or not bool(eq.amax() > 0)):
        return None
    return eq


def _symmetric_forward(xv: Tensor, a: Tensor, n: int | None, mag: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``fake-quant(clamp(x, -a, a))`` (or the clamp alone when ``n`` is None) and the masks of
    ``clamp``: 1 inside, 1/2 on ``|x| == a > 0``, 1 on ``x == a == 0``.

    ``mag``: ``|x|`` if already computed; it becomes the inside mask. Returns ``(out, inside, tie)``.
    """
    out = torch.empty_like(xv)
    mag = xv.abs() if mag is None else mag
    tie = _ties(torch.eq(mag, a, out=out if xv.device.type == "cpu" else torch.empty_like(xv)))
    if tie is not None and tie is out:
        tie = tie.clone()
    inside = torch.lt(mag, a, out=mag)
    if n is not None:
        _Grid(a, n).apply(out, xv, signed=True)
    else:
        torch.minimum(torch.maximum(xv, -a, out=out), a, out=out)
    return out, inside, tie


def _positive_forward(xv: Tensor, a: Tensor, n: int, out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Unsigned fake-quant of ``x`` and the masks of ``minimum(relu(x), a)``: 1 on ``0 < x < a``,
    1/2 on ``x == a > 0``. ``out`` (e.g. the ReLU output) is overwritten with the result."""
    out = torch.empty_like(xv) if out is None else out
    inside = torch.gt(xv, 0.0, out=torch.empty_like(xv)).mul_(torch.lt(xv, a, out=out))
    a_pos = torch.where(a > 0, a, float("nan"))  # a tie needs x > 0; nan equals nothing
    tie = _ties(torch.eq(xv, a_pos, out=out if xv.device.type == "cpu" else torch.empty_like(xv)))
    if tie is not None and tie is out:
        tie = tie.clone()
    _Grid(a, n).apply(out, xv, signed=False)
    return out, inside, tie


def _save_masks(ctx, inside: Tensor, tie: Tensor | None, tie_scale: Tensor | float, times: int = 1) -> None:
    ctx.save_for_backward(inside, tie)
    ctx.tie_scale, ctx.times = tie_scale, times


def _masked_backward(ctx, grad: Tensor) -> Tensor:
    """``grad`` times the saved mask; ``+ 0.0`` makes zeros positive, as torch's ``where`` does."""
    inside, tie = ctx.saved_tensors
    g = grad.reshape(inside.shape)
    out = torch.mul(g, inside).add_(0.0)
    if tie is not None:
        g_tie = g
        for _ in range(ctx.times):  # 1/2 per clamp, applied as torch applies them
            g_tie = g_tie * ctx.tie_scale
        out = torch.where(tie > 0, g_tie, out)
    return out.reshape(grad.shape)


class _ClipFakeQuant(torch.autograd.Function):
    """``clamp`` (or ``clamp_min`` + ``minimum``) + fake-quant as one node."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, n: int, axis: int | None, signed: bool) -> Tensor:  # type: ignore[override]
        xv, a = _grouped(x, alpha, axis)
        if signed:
            out, inside, tie = _symmetric_forward(xv, a, n)
            _save_masks(ctx, inside, tie, torch.where(a > 0, 0.5, 1.0))
        else:
            out, inside, tie = _positive_forward(xv, a, n)
            _save_masks(ctx, inside, tie, 0.5)
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _masked_backward(ctx, grad), None, None, None, None


class _ReluFakeQuant(torch.autograd.Function):
    """``relu`` + unsigned fake-quant as one node. Masks and values come from ``x``
    (``relu(x) == x`` where it matters), so a given ReLU output only serves as memory."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, n: int, axis: int | None, holder: list) -> Tensor:  # type: ignore[override]
        xv, a = _grouped(x, alpha, axis)
        buf = None if holder[0] is None else holder[0].detach().reshape(xv.shape)
        holder.clear()
        out, inside, tie = _positive_forward(xv, a, n, out=buf)
        _save_masks(ctx, inside, tie, 0.5)
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _masked_backward(ctx, grad), None, None, None, None


class _ScaleClipFakeQuant(torch.autograd.Function):
    """Scale-Clip threshold + clip + signed fake-quant of a weight as one node.

    The composition clamps twice (``clip_symmetric``, then the quantizer's own clamp at
    the same bound), so a weight exactly on ``T > 0`` gets ``1/2 * 1/2`` of its gradient.
    """

    @staticmethod
    def forward(ctx, w: Tensor, groups: int, k: float, n: int) -> Tensor:  # type: ignore[override]
        wv = w.reshape(groups, -1)
        mag = wv.abs()
        t = (k * mag.mean(dim=1)).reshape(-1, 1)  # == scale_clip_threshold(w, groups, k)
        out, inside, tie = _symmetric_forward(wv, t, n, mag=mag)
        _save_masks(ctx, inside, tie, torch.where(t > 0, 0.5, 1.0), times=2)
        return out.reshape(w.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _masked_backward(ctx, grad), None, None, None


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


def _reference_fake_quant(x: Tensor, alpha: Tensor, bits: int, axis: int | None, signed: bool) -> Tensor:
    """The plain composition (clamp / minimum, then the ATen kernel), for non-float32 inputs."""
    if signed:
        n = signed_levels(bits)
        a = expand_bshape(alpha, x, axis)
        return _fused_fake_quant(torch.clamp(x, -a, a), (alpha / n).clamp_min(_MIN_SCALE), -n, n, axis)
    n = unsigned_levels(bits)
    x_c = torch.minimum(torch.clamp_min(x, 0.0), expand_bshape(alpha, x, axis))
    return _fused_fake_quant(x_c, (alpha / n).clamp_min(_MIN_SCALE), 0, n, axis)


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
    t = threshold.detach()
    if not _fast_ok(w) or t.dtype != w.dtype:
        t = expand_bshape(t, w, axis)
        return torch.clamp(w, -t, t)
    return _SymmetricClip.apply(w, t, axis)


class _SymmetricClip(torch.autograd.Function):
    """``clamp(w, -T, T)`` as one node keeping a 0/1 mask rather than ``w`` and both bounds."""

    @staticmethod
    def forward(ctx, w: Tensor, t: Tensor, axis: int) -> Tensor:  # type: ignore[override]
        wv, tv = _grouped(w, t, axis)
        out, inside, tie = _symmetric_forward(wv, tv, None)
        _save_masks(ctx, inside, tie, torch.where(tv > 0, 0.5, 1.0))
        return out.reshape(w.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _masked_backward(ctx, grad), None, None


class BinarizeSTE(torch.autograd.Function):
    """``sign`` with ``sign(0) = +1`` forward, identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


class _ScaledSign(torch.autograd.Function):
    """``alpha_g * sign(w)`` (``alpha`` detached) as one node: gradient ``alpha_g * grad``."""

    @staticmethod
    def forward(ctx, w: Tensor, alpha: Tensor) -> Tensor:  # type: ignore[override]
        wv, a = _grouped(w, alpha, 0)
        ctx.save_for_backward(a)
        ctx.view_shape = wv.shape
        # (2 * [w >= 0] - 1) * alpha: in-place vectorised ops (``where`` is a scalar loop on CPU)
        return torch.ge(wv, 0.0, out=torch.empty_like(wv)).mul_(2.0).sub_(1.0).mul_(a).reshape(w.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (a,) = ctx.saved_tensors
        return (grad.reshape(ctx.view_shape) * a).reshape(grad.shape), None


def binarize(w: Tensor, groups: int) -> Tensor:
    """Binary weights ``alpha_g * sign(w)``, ``alpha_g = mean(|w_g|)`` over each group (BWN)."""
    alpha = group_abs_mean(w, groups)
    if _fast_ok(w):
        return _ScaledSign.apply(w, alpha)
    return expand_bshape(alpha, w, 0) * BinarizeSTE.apply(w)


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
        ctx.q_max = unsigned_levels(bits) * step
        ctx.mode = backward
        ctx.fast = backward != "log_tailed" and _fast_ok(x)
        if not ctx.fast:
            ctx.save_for_backward(x)
            return hwgq_forward(x, step, bits)
        # hwgq_forward's values, with ``* [x > 0]`` for its ``where`` (q >= D > 0, so the zeros
        # are +0), and the backward's 0/1 mask kept instead of ``x``
        pos = torch.gt(x, 0.0, out=torch.empty_like(x))
        out = torch.div(x, step).round_().clamp_(1, unsigned_levels(bits)).mul_(step).mul_(pos)
        if backward == "clipped":
            pos.mul_(torch.le(x, ctx.q_max, out=torch.empty_like(x)))
        ctx.save_for_backward(pos)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        if ctx.fast:  # the 0/1 mask
            return grad * saved, None, None, None
        return _hwgq_backward_reference(grad, saved, ctx.mode, ctx.q_max), None, None, None


def _hwgq_backward_reference(grad: Tensor, x: Tensor, mode: str, q_max: float) -> Tensor:
    pos = x > 0
    if mode == "relu":
        return grad * pos
    if mode == "clipped":
        return grad * (pos & (x <= q_max))
    tail = 1.0 / (x - q_max + 1.0).clamp_min(1.0)  # log_tailed
    return grad * torch.where(x <= q_max, pos.to(grad.dtype), tail)


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
