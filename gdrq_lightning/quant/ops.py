"""The fused kernels as operators: one ``torch.library`` custom op per quantizer forward and one
backward op (``masked_grad``), and the calls the quantizers make.

* **Traced** (``torch.compile``, ``torch.export``, ``jit.trace``, fake and ``meta`` tensors): the
  custom ops, with fake (meta) implementations and registered autograd, so a quantized model
  compiles in one graph with dynamic shapes and counts one op per quantizer each way.
* **Eager**, on plain tensors: the same Python bodies called directly, with the same autograd
  (a :class:`torch.autograd.Function` saving the one-byte mask). The dispatcher's custom-op
  path costs ~100 us a call on a CPU (schema checks, the autograd wrapper, a dynamo-disabled
  frame), about as much as a kernel on a small layer, twice per quantizer per step.

Both run the kernels of :mod:`.kernels`, so they are bit for bit the same computation.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from .kernels import (
    MIN_SCALE, abs_mean_rows, QUARTER, _channels_last, _clip_body, _empty_like, _flat, _grad_body, _grouped, _hwgq_body,
    _learned_clip_body, _learned_clip_grad_body, _relu_sum_body, _run, _shaped, _sign_body, _signed_body,
    _unflat, _unsigned_body, needs_grad,
)

def _grid(a: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Step ``max(a / n, 1e-8)`` and its reciprocal per group, by ATen as its kernels compute them:
    quotients outside the kernels (a compiler may turn a division into an inexact product, and
    would repeat a per-group division for every vector of elements)."""
    scale = (a / n).clamp_min_(MIN_SCALE)
    return scale, torch.reciprocal(scale)


@functools.lru_cache(maxsize=None)
def _scalar(value: float, device: torch.device) -> Tensor:
    """A float32 scalar tensor on ``device``, made once (not copied to the device on every call)."""
    return torch.tensor(value, dtype=torch.float32, device=device)


def _no_mask(x: Tensor) -> Tensor:
    return x.new_empty(0, dtype=torch.uint8)


def _fake_quant(x: Tensor, alpha: Tensor, n: int, signed: bool, axis: Optional[int], tie: int, with_mask: bool) -> tuple[Tensor, Tensor]:
    """Clip to ``[-alpha, alpha]`` (signed) or ``[0, alpha]`` after a ReLU, fake-quantize on ``n``
    levels (``n == 0``: clip only, signed), and the backward mask (``tie``: its code on a bound).

    ``alpha``: 0-dim (per tensor) or ``[G]`` along ``axis``, float32. Returns ``(out, mask)``;
    ``mask`` is empty without ``with_mask``.
    """
    xv, a = _grouped(x, alpha, axis)
    if n == 0:
        res = _run(_clip_body, xv, a, with_mask=with_mask)
    else:
        body = _signed_body if signed else _unsigned_body
        res = _run(body, xv, a, *_grid(a, n), _scalar(n, x.device), _scalar(tie, x.device), with_mask=with_mask)
    grouped = xv.dim() > 1
    return _shaped(res[0], x, grouped), (_shaped(res[1], x, grouped) if with_mask else _no_mask(x))


_fake_quant_op = torch.library.custom_op("gdrq::fake_quant", _fake_quant, mutates_args=())


@_fake_quant_op.register_fake
def _(x, alpha, n, signed, axis, tie, with_mask):
    grouped = axis is not None and alpha.numel() != 1
    out = x.new_empty(x.shape) if grouped else _empty_like(x)
    mask = (x.new_empty(x.shape, dtype=torch.uint8) if grouped else _empty_like(x, torch.uint8)) if with_mask else _no_mask(x)
    return out, mask


def _scale_clip_fake_quant(w: Tensor, k: Tensor, groups: int, n: int, with_mask: bool) -> tuple[Tensor, Tensor]:
    """GDRQ weights in one op: ``T_g = k * mean|W_g|`` (ATen's reduction, so thresholds equal
    :func:`~.primitives.scale_clip_threshold` bit for bit), clip to ``[-T_g, T_g]`` and
    fake-quantize there; a weight on ``T_g > 0`` gets 1/4 of its gradient (two clamps)."""
    wv = w.reshape(groups, -1)
    t = (k * abs_mean_rows(wv)).float().reshape(-1, 1)
    if groups == 1:  # flat with a 0-dim threshold, as every per-tensor kernel runs
        wv, t = wv.reshape(-1), t.reshape(())
    res = _run(_signed_body, wv, t, *_grid(t, n), _scalar(n, w.device), _scalar(QUARTER, w.device), with_mask=with_mask)
    return res[0].reshape(w.shape), (res[1].reshape(w.shape) if with_mask else _no_mask(w))


_scale_clip_fake_quant_op = torch.library.custom_op("gdrq::scale_clip_fake_quant", _scale_clip_fake_quant, mutates_args=())


@_scale_clip_fake_quant_op.register_fake
def _(w, k, groups, n, with_mask):
    return w.new_empty(w.shape), w.new_empty(w.shape, dtype=torch.uint8) if with_mask else _no_mask(w)


def _hwgq(x: Tensor, step: float, n: int, clipped: bool, with_mask: bool) -> tuple[Tensor, Tensor]:
    """HWGQ forward (docs/methods.md#hwgq) and the mask of its ``relu`` / ``clipped`` backward."""
    scalars = (_scalar(v, x.device) for v in (step, n, n * step))
    res = _run(_hwgq_body, _flat(x), *scalars, clipped=clipped, with_mask=with_mask)
    return _unflat(res[0], x), (_unflat(res[1], x) if with_mask else _no_mask(x))


_hwgq_op = torch.library.custom_op("gdrq::hwgq", _hwgq, mutates_args=())


@_hwgq_op.register_fake
def _(x, step, n, clipped, with_mask):
    return _empty_like(x), _empty_like(x, torch.uint8) if with_mask else _no_mask(x)


def _scaled_rows(w: Tensor, alpha: Tensor, sign: bool) -> Tensor:
    """``alpha_g * sign(w)`` (binary weights, ``sign(0) = +1``) or ``alpha_g * w`` (their
    gradient) for ``G = alpha.numel()`` contiguous row groups of ``w``."""
    g = alpha.numel()
    wv, a = (w.reshape(-1), alpha.float().reshape(())) if g == 1 else (w.reshape(g, -1), alpha.float().reshape(-1, 1))
    return _run(_sign_body, wv, a, sign=sign)[0].reshape(w.shape)


_scaled_rows_op = torch.library.custom_op("gdrq::scaled_rows", _scaled_rows, mutates_args=())


@_scaled_rows_op.register_fake
def _(w, alpha, sign):
    return w.new_empty(w.shape)


def _relu_sum(x: Tensor) -> Tensor:
    """``relu(x).sum()`` as a float64 0-dim tensor, in one pass over ``x`` (an activation
    statistic: ATen would write the ReLU's output to memory and read it back)."""
    return _run(_relu_sum_body, _flat(x))[0]


_relu_sum_op = torch.library.custom_op("gdrq::relu_sum", _relu_sum, mutates_args=())


@_relu_sum_op.register_fake
def _(x):
    return x.new_empty((), dtype=torch.float64)


def _masked_grad(grad: Tensor, mask: Tensor, product: bool) -> Tensor:
    """The backward of every masked op: ``grad`` times the mask's factor, laid out as ``mask``
    (``product``: masked-out zeros keep ``grad``'s sign)."""
    if mask.shape != grad.shape:
        raise RuntimeError("gdrq kernels: backward without a mask (the forward ran without one)")
    if _channels_last(mask) != _channels_last(grad) or not grad.is_contiguous(memory_format=_format(mask)):
        grad = grad.contiguous(memory_format=_format(mask))
    return _unflat(_run(_grad_body, _flat(grad), _flat(mask), product=product)[0], mask)


def _format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if _channels_last(t) else torch.contiguous_format


_masked_grad_op = torch.library.custom_op("gdrq::masked_grad", _masked_grad, mutates_args=())


@_masked_grad_op.register_fake
def _(grad, mask, product):
    return _empty_like(mask, grad.dtype)


def _learned_clip_fake_quant(x: Tensor, alpha: Tensor, n: int, with_mask: bool) -> tuple[Tensor, Tensor]:
    """A learned clip ``alpha`` (a ``[1]`` or 0-dim tensor in ``x``'s dtype) after a ReLU, quantized
    on ``n`` levels with a straight-through estimator; ``alpha`` gets the gradient of the clipped
    elements, as ``torch.where(x >= alpha, alpha, relu(x))`` gives it."""
    s = (alpha.detach() / n).clamp_min(MIN_SCALE)
    res = _run(_learned_clip_body, _flat(x), alpha.reshape(()), s.reshape(()), with_mask=with_mask)
    return _unflat(res[0], x), (_unflat(res[1], x) if with_mask else _no_mask(x))


_learned_clip_fake_quant_op = torch.library.custom_op("gdrq::learned_clip_fake_quant", _learned_clip_fake_quant, mutates_args=())


@_learned_clip_fake_quant_op.register_fake
def _(x, alpha, n, with_mask):
    return _empty_like(x), _empty_like(x, torch.uint8) if with_mask else _no_mask(x)


def _learned_clip_grad(grad: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of :func:`learned_clip_fake_quant`: for ``x``, and for ``alpha`` element-wise
    (the caller sums it to ``alpha``'s shape as autograd sums a broadcast)."""
    grad = grad.contiguous(memory_format=_format(mask))
    gx, ga = _run(_learned_clip_grad_body, _flat(grad), _flat(mask))
    return _unflat(gx, mask), _unflat(ga, mask)


_learned_clip_grad_op = torch.library.custom_op("gdrq::learned_clip_grad", _learned_clip_grad, mutates_args=())


@_learned_clip_grad_op.register_fake
def _(grad, mask):
    return _empty_like(mask, grad.dtype), _empty_like(mask, grad.dtype)


def _learned_clip_backward(ctx, grad: Tensor | None, _grad_mask: Tensor | None):
    if grad is None:
        return None, None, None, None
    (mask,) = ctx.saved_tensors
    gx, ga = _learned_clip_grad_op(grad, mask)
    return gx, ga.sum_to_size(ctx.alpha_shape), None, None


def _save_learned_clip(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    ctx.alpha_shape = inputs[1].shape
    ctx.set_materialize_grads(False)


_learned_clip_fake_quant_op.register_autograd(_learned_clip_backward, setup_context=_save_learned_clip)


def _mask_backward(ctx, grad: Tensor | None, _grad_mask: Tensor | None):
    (mask,) = ctx.saved_tensors
    return (None if grad is None else _masked_grad_op(grad, mask, ctx.product),) + (None,) * (ctx.num_inputs - 1)


def _saving_mask(product: bool) -> Callable:
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output[1])
        ctx.num_inputs, ctx.product = len(inputs), product
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the mask output

    return setup_context


_fake_quant_op.register_autograd(_mask_backward, setup_context=_saving_mask(False))
_scale_clip_fake_quant_op.register_autograd(_mask_backward, setup_context=_saving_mask(False))
_hwgq_op.register_autograd(_mask_backward, setup_context=_saving_mask(True))


def _save_alpha(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _rows_backward(ctx, grad: Tensor):
    (alpha,) = ctx.saved_tensors
    return scaled_rows(grad, alpha, False), None, None


_scaled_rows_op.register_autograd(_rows_backward, setup_context=_save_alpha)


# --- the calls the quantizers make: ops when traced, the bodies themselves in eager mode -----

_PLAIN = (Tensor, torch.nn.Parameter)


def _direct(x: Tensor) -> bool:
    """Whether to call a body directly: a plain tensor, on a real device, not being traced."""
    return type(x) in _PLAIN and x.device.type != "meta" and not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def _own(t: Tensor) -> Tensor:
    """``t`` as a tensor of its own on the same memory: a custom Function may not return a view
    (autograd forbids in-place ops on one, e.g. a residual ``+=`` on a quantizer's output)."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride()) if t._is_view() else t


class _Masked(torch.autograd.Function):
    """Eager autograd of a masked op, as registered for the op: the mask saved, one kernel back."""

    @staticmethod
    def forward(ctx, body: Callable, product: bool, x: Tensor, *args):  # type: ignore[override]
        out, mask = body(x, *args)
        ctx.save_for_backward(mask)
        ctx.product, ctx.num_args = product, len(args)
        ctx.mark_non_differentiable(mask)
        ctx.set_materialize_grads(False)
        return _own(out), _own(mask)

    @staticmethod
    def backward(ctx, grad: Tensor | None, _grad_mask: Tensor | None):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        grad_x = None if grad is None else _masked_grad(grad, mask, ctx.product)
        return (None, None, grad_x) + (None,) * ctx.num_args


def _masked_call(body: Callable, op: Callable, product: bool, x: Tensor, *args) -> tuple[Tensor, Tensor]:
    if not _direct(x):
        return op(x, *args)
    if not args[-1]:  # no mask asked for: no backward
        return body(x, *args)
    return _Masked.apply(body, product, x, *args)


def fake_quant(x: Tensor, alpha: Tensor, n: int, signed: bool, axis: Optional[int], tie: int, with_mask: bool) -> tuple[Tensor, Tensor]:
    """See ``_fake_quant``: clip and fake-quantize ``x`` (``n == 0``: clip only); ``(out, mask)``."""
    return _masked_call(_fake_quant, _fake_quant_op, False, x, alpha, n, signed, axis, tie, with_mask)


def scale_clip_fake_quant(w: Tensor, k: Tensor, groups: int, n: int, with_mask: bool) -> tuple[Tensor, Tensor]:
    """See ``_scale_clip_fake_quant``: GDRQ weights in one op; ``(out, mask)``."""
    return _masked_call(_scale_clip_fake_quant, _scale_clip_fake_quant_op, False, w, k, groups, n, with_mask)


def hwgq(x: Tensor, step: float, n: int, clipped: bool, with_mask: bool) -> tuple[Tensor, Tensor]:
    """See ``_hwgq``: HWGQ's forward and the mask of its backward; ``(out, mask)``."""
    return _masked_call(_hwgq, _hwgq_op, True, x, step, n, clipped, with_mask)


def scaled_rows(w: Tensor, alpha: Tensor, sign: bool) -> Tensor:
    """See ``_scaled_rows``: ``alpha_g * sign(w)`` or ``alpha_g * w`` per row group."""
    return _scaled_rows(w, alpha, sign) if _direct(w) and not needs_grad(w) else _scaled_rows_op(w, alpha, sign)


def relu_sum(x: Tensor) -> Tensor:
    """See ``_relu_sum``: ``relu(x).sum()`` in float64, one pass (no gradient)."""
    return _relu_sum(x) if _direct(x) else _relu_sum_op(x)


def learned_clip_fake_quant(x: Tensor, alpha: Tensor, n: int, with_mask: bool) -> tuple[Tensor, Tensor]:
    """See ``_learned_clip_fake_quant`` (a learned clip): the op whenever a gradient is asked for."""
    return _learned_clip_fake_quant(x, alpha, n, with_mask) if _direct(x) and not with_mask else _learned_clip_fake_quant_op(x, alpha, n, with_mask)
