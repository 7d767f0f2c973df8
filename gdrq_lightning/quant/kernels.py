"""Fused fake-quant kernels: one autograd node per quantizer, bit-exact with the plain
composition in :mod:`.primitives` (``clamp`` / ``minimum``, then ATen's ``fake_quantize_*``).

Why they exist:

* every op is vectorised and in place: ATen's fake-quant kernels, ``where`` and ``clamp``
  with tensor bounds are scalar loops on CPU, and comparisons into ``bool`` are slower
  than into ``float``;
* one autograd node per quantizer keeps one 0/1 float mask instead of its inputs, with two
  full-size allocations per node (result, mask): fresh memory page-faults on CPU.

torch's derivatives decide the gradient on a clip bound, and the masks reproduce them:
``clamp`` with tensor bounds passes 1/2 there (1 when both bounds coincide), ``minimum``
1/2 on a tie, ``relu`` / ``clamp_min(x, 0.)`` nothing at 0. Elements exactly on a bound
are rare: a separate tie mask is built (and kept) only when there are some.

The public entry points are the functions of :mod:`.primitives`; they call these kernels
for float32 inputs (:func:`fast_ok`) and the reference composition otherwise.
"""
from __future__ import annotations

import torch
from torch import Tensor

MIN_SCALE = 1e-8  # guards all-zero weight groups / dead activations against a zero step


def fast_ok(x: Tensor) -> bool:
    """The kernels reproduce the ATen kernels' float32 arithmetic; other dtypes take the reference."""
    return x.dtype == torch.float32


def needs_grad(x: Tensor) -> bool:
    """Without a backward (eval, ``no_grad``) no mask is computed."""
    return torch.is_grad_enabled() and x.requires_grad


def grouped(x: Tensor, v: Tensor, axis: int | None) -> tuple[Tensor, Tensor]:
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


class _Grid:
    """The fake-quant grid ``s = alpha / n`` (``>= 1e-8``), ``inv = 1/s`` and ``hi = alpha * inv``."""

    def __init__(self, alpha: Tensor, n: int) -> None:
        self.scale = (alpha / n).clamp_min(MIN_SCALE)
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


def quantize(xv: Tensor, a: Tensor, n: int, signed: bool, out: Tensor | None = None) -> Tensor:
    """Forward only (no masks) on a grouped view ``xv`` (see :func:`grouped`)."""
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


class ClipFakeQuant(torch.autograd.Function):
    """``clamp`` (or ``clamp_min`` + ``minimum``) + fake-quant as one node."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, n: int, axis: int | None, signed: bool) -> Tensor:  # type: ignore[override]
        xv, a = grouped(x, alpha, axis)
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


class ReluFakeQuant(torch.autograd.Function):
    """``relu`` + unsigned fake-quant as one node. Masks and values come from ``x``
    (``relu(x) == x`` where it matters), so a given ReLU output only serves as memory."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, n: int, axis: int | None, holder: list) -> Tensor:  # type: ignore[override]
        xv, a = grouped(x, alpha, axis)
        buf = None if holder[0] is None else holder[0].detach().reshape(xv.shape)
        holder.clear()
        out, inside, tie = _positive_forward(xv, a, n, out=buf)
        _save_masks(ctx, inside, tie, 0.5)
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _masked_backward(ctx, grad), None, None, None, None


class ScaleClipFakeQuant(torch.autograd.Function):
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


class SymmetricClip(torch.autograd.Function):
    """``clamp(w, -T, T)`` as one node keeping a 0/1 mask rather than ``w`` and both bounds."""

    @staticmethod
    def forward(ctx, w: Tensor, t: Tensor, axis: int) -> Tensor:  # type: ignore[override]
        wv, tv = grouped(w, t, axis)
        out, inside, tie = _symmetric_forward(wv, tv, None)
        _save_masks(ctx, inside, tie, torch.where(tv > 0, 0.5, 1.0))
        return out.reshape(w.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _masked_backward(ctx, grad), None, None


class ScaledSign(torch.autograd.Function):
    """``alpha_g * sign(w)`` (``alpha`` detached) as one node: gradient ``alpha_g * grad``."""

    @staticmethod
    def forward(ctx, w: Tensor, alpha: Tensor) -> Tensor:  # type: ignore[override]
        wv, a = grouped(w, alpha, 0)
        ctx.save_for_backward(a)
        ctx.view_shape = wv.shape
        # (2 * [w >= 0] - 1) * alpha: in-place vectorised ops (``where`` is a scalar loop on CPU)
        return torch.ge(wv, 0.0, out=torch.empty_like(wv)).mul_(2.0).sub_(1.0).mul_(a).reshape(w.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (a,) = ctx.saved_tensors
        return (grad.reshape(ctx.view_shape) * a).reshape(grad.shape), None
