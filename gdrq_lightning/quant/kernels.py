"""Fused fake-quant kernels: each quantizer is one ``torch.library`` custom op forward and one
op backward (:func:`masked_grad`), on every device, bit-exact with the plain composition in
:mod:`.primitives` (``clamp`` / ``minimum``, then ATen's ``fake_quantize_*``).

Why they exist:

* one memory pass per op: a kernel body below is a few element-wise expressions that
  inductor compiles into one loop (C++ on CPU, Triton on CUDA) writing the output and the
  backward mask together, instead of a chain of ATen ops, each a kernel launch and a pass;
* the backward keeps one byte per element, 4 x the gradient factor, instead of the inputs or
  float masks: 4 inside the clip range, 2 on a clip bound (torch gives ``clamp`` with tensor
  bounds and ``minimum`` 1/2 there, 1 when both bounds coincide), 1 for Scale-Clip's two
  clamps at the same bound (1/4), 0 outside and at a ReLU's 0. Ties need no extra pass, mask,
  host synchronisation or branch on data;
* custom ops carry fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces a
  quantized model in one graph with dynamic shapes, and the meta device counts one op each.

Exactness: bodies use only comparisons, ``min`` / ``max``, products, sums of small integers,
``round`` and (HWGQ's) element-wise quotient, which every backend computes exactly (Triton's
division is asked to round correctly); the per-group grid steps are taken by ATen in the op
before the kernel. ``-0.0`` from ``round`` becomes ATen's ``+0.0`` in the kernels (see
:func:`_grid_values`).
``bfloat16`` / ``float16`` inputs are computed in float32, with the clip bound rounded to the
input's dtype as ``torch.clamp`` rounds it, and return their own dtype.

Backends (``GDRQ_KERNELS`` or :func:`use_backend`): ``auto`` (default) compiles each body with
inductor on first use per device, dtype and pattern of size-1 dims (seconds, cached on disk by
inductor) and, where compiling fails, warns once and runs it as ATen ops; ``eager`` never
compiles (the same bodies as ATen ops: correct, several times slower on CPU).
"""
from __future__ import annotations

import functools
import os
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

MIN_SCALE = 1e-8  # guards all-zero weight groups / dead activations against a zero step
FULL, HALF, QUARTER = 4, 2, 1  # mask codes: 4 x the gradient factor
BACKENDS = ("auto", "eager")
_OPTIONS = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True}  # eager numerics on Triton
_backend = os.environ.get("GDRQ_KERNELS", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"GDRQ_KERNELS={_backend!r} is not one of: {', '.join(BACKENDS)}")
_kernels: dict[tuple, Callable] = {}
_broken: set[str] = set()  # device types where compiling failed once


def fast_ok(x: Tensor) -> bool:
    """Dtypes the kernels reproduce the reference composition for; others take the reference."""
    return x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def needs_grad(x: Tensor) -> bool:
    """Without a backward (eval, ``no_grad``) no mask is written."""
    return torch.is_grad_enabled() and x.requires_grad


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the kernels with backend ``name`` (``auto`` / ``eager``) inside the block."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not one of: {', '.join(BACKENDS)}")
    before, _backend = _backend, name
    try:
        yield
    finally:
        _backend = before


def _example(t: Tensor) -> Tensor:
    """A stand-in for ``t`` to trace with: sizes 1 stay 1 (broadcast dims), the others get distinct
    sizes per position from the right (5, 3, 2, 7), so related dims of different tensors share a
    symbol and unrelated ones do not."""
    sizes = (5, 3, 2, 7)
    shape = [1 if d == 1 else sizes[t.dim() - 1 - i] for i, d in enumerate(t.shape)]
    return torch.zeros(shape, dtype=t.dtype, device=t.device)


def _build(body: Callable, tensors: tuple[Tensor, ...], static: dict) -> Callable:
    """Inductor's kernel for ``body`` over any sizes with the same dtypes, devices and size-1 dims.

    Traced with symbolic shapes and compiled once (``standalone_compile``: no dynamo guards on
    each call, a few microseconds instead of tens); ``static`` values are baked in.
    """
    from torch._inductor import standalone_compile
    from torch.fx.experimental.proxy_tensor import make_fx

    examples = [_example(t) for t in tensors]
    gm = make_fx(functools.partial(body, **static), tracing_mode="symbolic")(*examples)
    return standalone_compile(gm, examples, dynamic_shapes="from_graph", options={"config_patches": _OPTIONS})


def _run(body: Callable, *tensors: Tensor, **static):
    """``body(*tensors, **static)`` (a tuple), compiled by inductor on first use unless disabled."""
    device = tensors[0].device.type
    if _backend == "eager" or device in _broken or tensors[0].numel() == 0:
        return body(*tensors, **static)
    tensors = tuple(t.contiguous() for t in tensors)  # the kernels index densely
    key = (body, tuple(static.items()), tuple((t.dtype, t.device, tuple(d == 1 for d in t.shape)) for t in tensors))
    kernel = _kernels.get(key)
    if kernel is None:
        try:
            kernel = _kernels[key] = _build(body, tensors, static)
        except Exception as err:  # no C++ compiler / Triton: the same math as ATen ops from now on
            _broken.add(device)
            warnings.warn(f"gdrq kernels: compiling for {device} failed ({type(err).__name__}: {err}); running them as ATen ops")
            return body(*tensors, **static)
    return tuple(kernel(*tensors))


# --- layouts: kernels see a flat (or [G, L]) view in memory order ---------------------------

def _channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _flat(x: Tensor) -> Tensor:
    """``x`` as 1-D in memory order (a view for contiguous and channels-last tensors)."""
    if x.is_contiguous():
        return x.view(-1)
    return x.permute(0, 2, 3, 1).reshape(-1) if _channels_last(x) else x.reshape(-1)


def _unflat(flat: Tensor, like: Tensor) -> Tensor:
    """Undo :func:`_flat`: the result has ``like``'s shape and (dense) layout."""
    if _channels_last(like):
        n, c, h, w = like.shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(like.shape)


def _empty_like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An output laid out as :func:`_unflat` lays it out (what the fake implementations return)."""
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def _grouped(x: Tensor, v: Tensor, axis: int | None) -> tuple[Tensor, Tensor]:
    """``x`` as ``[..., G, L]`` with the per-group ``[G]`` vector as ``[G, 1]`` along ``axis``
    (contiguous channel groups), or flat with a 0-dim ``v`` when there is one value."""
    if axis is None or v.numel() == 1:
        return _flat(x), v.reshape(())
    axis %= x.dim()
    if x.shape[axis] % v.numel():
        raise ValueError(f"{v.numel()} groups do not divide the {x.shape[axis]} channels of axis {axis}")
    return x.reshape(x.shape[:axis] + (v.numel(), -1)), v.reshape(-1, 1)


def _shaped(res: Tensor, x: Tensor, grouped: bool) -> Tensor:
    return res.reshape(x.shape) if grouped else _unflat(res, x)


# --- kernel bodies: pure element-wise math, compiled or run as they are ----------------------

def _grid_values(xc: Tensor, scale: Tensor, inv: Tensor, n: Tensor, signed: bool) -> Tensor:
    """ATen's fake-quant of clamped float32 ``xc``: ``scale * clamp(round(xc * inv), -n or 0, n)``.

    ``n`` is a tensor, so one kernel serves every bit width. ``(q + n) - n`` is exact for these
    small integers and turns ``round``'s ``-0.0`` into the ``+0.0`` ATen's integer cast gives
    (compilers may fold ``+ 0.0``, not this).
    """
    q = torch.round(xc * inv)
    q = torch.minimum(torch.maximum(q, -n) if signed else q.clamp_min(0.0), n)
    return ((q + n) - n) * scale


def _code(factor: Tensor) -> Tensor:
    """A mask from float codes (vectorised as floats, stored as bytes)."""
    return factor.to(torch.uint8)


def _symmetric_mask(xf: Tensor, ab: Tensor, tie: Tensor) -> Tensor:
    """The mask of ``clamp(x, -a, a)``: ``tie`` on ``|x| == a > 0``, full when both bounds are 0."""
    mag = xf.abs()
    on_bound = torch.where(ab > 0, tie, float(FULL))
    return _code(torch.where(mag < ab, float(FULL), torch.where(mag == ab, on_bound, 0.0)))


def _signed_body(x: Tensor, a: Tensor, scale: Tensor, inv: Tensor, n: Tensor, tie: Tensor, *, with_mask: bool) -> tuple[Tensor, ...]:
    """``fake-quant(clamp(x, -a, a))`` on ``[-n, n]`` (and its mask, ``tie`` on a bound)."""
    xf, ab = x.float(), a.to(x.dtype).float()
    out = _grid_values(torch.minimum(torch.maximum(xf, -ab), ab), scale, inv, n, True).to(x.dtype)
    return (out, _symmetric_mask(xf, ab, tie)) if with_mask else (out,)


def _clip_body(x: Tensor, a: Tensor, *, with_mask: bool) -> tuple[Tensor, ...]:
    """``clamp(x, -a, a)`` alone (Scale-Clip without quantization) (and its mask)."""
    ab = a.to(x.dtype)
    out = torch.minimum(torch.maximum(x, -ab), ab)
    return (out, _symmetric_mask(x.float(), ab.float(), torch.full_like(ab, HALF, dtype=torch.float32))) if with_mask else (out,)


def _unsigned_body(x: Tensor, a: Tensor, scale: Tensor, inv: Tensor, n: Tensor, tie: Tensor, *, with_mask: bool) -> tuple[Tensor, ...]:
    """``fake-quant(minimum(relu(x), a))`` on ``[0, n]`` (and its mask: nothing at ``x == 0``)."""
    xf, ab = x.float(), a.to(x.dtype).float()
    out = _grid_values(torch.minimum(xf.clamp_min(0.0), ab), scale, inv, n, False).to(x.dtype)
    if not with_mask:
        return (out,)
    on_bound = (xf == ab) & (ab > 0)
    return out, _code(torch.where((xf > 0) & (xf < ab), float(FULL), torch.where(on_bound, tie, 0.0)))


def _hwgq_body(x: Tensor, step: Tensor, n: Tensor, q_max: Tensor, *, clipped: bool, with_mask: bool) -> tuple[Tensor, ...]:
    """HWGQ ``where(x > 0, step * clamp(round(x / step), 1, n), 0)``, rounded to ``x``'s dtype
    after each op as ATen rounds it (and its mask: ``x > 0``, and ``x <= q_max`` when clipped)."""
    xf, dt = x.float(), x.dtype
    q = (torch.minimum(torch.round((xf / step).to(dt).float()).clamp_min(1.0), n) * step).to(dt)
    pos = xf > 0
    out = torch.where(pos, q, torch.zeros_like(q))
    if not with_mask:
        return (out,)
    keep = pos & (xf <= q_max) if clipped else pos
    return out, _code(torch.where(keep, float(FULL), 0.0))


def _learned_clip_body(x: Tensor, a: Tensor, s: Tensor, *, with_mask: bool) -> tuple[Tensor, ...]:
    """``y = where(x >= a, a, relu(x))`` quantized with a straight-through ``y + (round(y / s) * s - y)``
    (``s = max(a / n, 1e-8)`` from ATen), each op rounded to ``x``'s dtype as ATen rounds it; mask 4
    where ``x`` gets the gradient (``0 < x < a``), 1 where ``a`` does (``x >= a``)."""
    dt, xf, af, sf = x.dtype, x.float(), a.float(), s.float()
    y = torch.where(xf >= af, af, xf.clamp_min(0.0))
    q = (torch.round((y / sf).to(dt).float()) * sf).to(dt).float()
    out = (y + (q - y).to(dt).float()).to(dt)
    if not with_mask:
        return (out,)
    return out, _code(torch.where(xf >= af, 1.0, torch.where(xf > 0, float(FULL), 0.0)))


def _learned_clip_grad_body(g: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The gradient for ``x`` (``+0.0`` where it has none) and, element-wise, for ``a``."""
    gf, code = g.float(), mask.float()  # compared as floats: byte comparisons vectorise poorly
    return torch.where(code == FULL, gf, 0.0).to(g.dtype), torch.where(code == 1, gf, 0.0).to(g.dtype)


def _sign_body(w: Tensor, a: Tensor, *, sign: bool) -> tuple[Tensor]:
    """``a * sign(w)`` (``sign(0) = +1``) or ``a * w``, per row ``[G, L]`` (or flat, one ``a``)."""
    wf = w.float()
    return ((torch.where(wf >= 0, a, -a) if sign else wf * a).to(w.dtype),)


def _grad_body(g: Tensor, mask: Tensor, *, product: bool) -> tuple[Tensor]:
    """``g`` times the mask's factor; where the mask is 0, ``+0.0`` as torch's ``where`` (clamp's
    derivative) gives it, or with ``product`` the signed zero of ``g * 0`` (HWGQ's mask product)."""
    factor = mask.float() * 0.25  # compared as floats: byte comparisons vectorise poorly
    scaled = g.float() * factor
    return ((scaled if product else torch.where(factor > 0, scaled, 0.0)).to(g.dtype),)


# --- ops --------------------------------------------------------------------------------------

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


@torch.library.custom_op("gdrq::fake_quant", mutates_args=())
def fake_quant(x: Tensor, alpha: Tensor, n: int, signed: bool, axis: Optional[int], tie: int, with_mask: bool) -> tuple[Tensor, Tensor]:
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


@fake_quant.register_fake
def _(x, alpha, n, signed, axis, tie, with_mask):
    grouped = axis is not None and alpha.numel() != 1
    out = x.new_empty(x.shape) if grouped else _empty_like(x)
    mask = (x.new_empty(x.shape, dtype=torch.uint8) if grouped else _empty_like(x, torch.uint8)) if with_mask else _no_mask(x)
    return out, mask


@torch.library.custom_op("gdrq::scale_clip_fake_quant", mutates_args=())
def scale_clip_fake_quant(w: Tensor, k: Tensor, groups: int, n: int, with_mask: bool) -> tuple[Tensor, Tensor]:
    """GDRQ weights in one op: ``T_g = k * mean|W_g|`` (ATen's reduction, so thresholds equal
    :func:`~.primitives.scale_clip_threshold` bit for bit), clip to ``[-T_g, T_g]`` and
    fake-quantize there; a weight on ``T_g > 0`` gets 1/4 of its gradient (two clamps)."""
    wv = w.reshape(groups, -1)
    t = (k * wv.abs().mean(dim=1)).float().reshape(-1, 1)
    if groups == 1:  # flat with a 0-dim threshold, as every per-tensor kernel runs
        wv, t = wv.reshape(-1), t.reshape(())
    res = _run(_signed_body, wv, t, *_grid(t, n), _scalar(n, w.device), _scalar(QUARTER, w.device), with_mask=with_mask)
    return res[0].reshape(w.shape), (res[1].reshape(w.shape) if with_mask else _no_mask(w))


@scale_clip_fake_quant.register_fake
def _(w, k, groups, n, with_mask):
    return w.new_empty(w.shape), w.new_empty(w.shape, dtype=torch.uint8) if with_mask else _no_mask(w)


@torch.library.custom_op("gdrq::hwgq", mutates_args=())
def hwgq(x: Tensor, step: float, n: int, clipped: bool, with_mask: bool) -> tuple[Tensor, Tensor]:
    """HWGQ forward (SPEC §4) and the mask of its ``relu`` / ``clipped`` backward."""
    scalars = (_scalar(v, x.device) for v in (step, n, n * step))
    res = _run(_hwgq_body, _flat(x), *scalars, clipped=clipped, with_mask=with_mask)
    return _unflat(res[0], x), (_unflat(res[1], x) if with_mask else _no_mask(x))


@hwgq.register_fake
def _(x, step, n, clipped, with_mask):
    return _empty_like(x), _empty_like(x, torch.uint8) if with_mask else _no_mask(x)


@torch.library.custom_op("gdrq::scaled_rows", mutates_args=())
def scaled_rows(w: Tensor, alpha: Tensor, sign: bool) -> Tensor:
    """``alpha_g * sign(w)`` (binary weights, ``sign(0) = +1``) or ``alpha_g * w`` (their
    gradient) for ``G = alpha.numel()`` contiguous row groups of ``w``."""
    g = alpha.numel()
    wv, a = (w.reshape(-1), alpha.float().reshape(())) if g == 1 else (w.reshape(g, -1), alpha.float().reshape(-1, 1))
    return _run(_sign_body, wv, a, sign=sign)[0].reshape(w.shape)


@scaled_rows.register_fake
def _(w, alpha, sign):
    return w.new_empty(w.shape)


@torch.library.custom_op("gdrq::masked_grad", mutates_args=())
def masked_grad(grad: Tensor, mask: Tensor, product: bool) -> Tensor:
    """The backward of every masked op: ``grad`` times the mask's factor, laid out as ``mask``
    (``product``: masked-out zeros keep ``grad``'s sign)."""
    if mask.shape != grad.shape:
        raise RuntimeError("gdrq kernels: backward without a mask (the forward ran without one)")
    if _channels_last(mask) != _channels_last(grad) or not grad.is_contiguous(memory_format=_format(mask)):
        grad = grad.contiguous(memory_format=_format(mask))
    return _unflat(_run(_grad_body, _flat(grad), _flat(mask), product=product)[0], mask)


def _format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if _channels_last(t) else torch.contiguous_format


@masked_grad.register_fake
def _(grad, mask, product):
    return _empty_like(mask, grad.dtype)


@torch.library.custom_op("gdrq::learned_clip_fake_quant", mutates_args=())
def learned_clip_fake_quant(x: Tensor, alpha: Tensor, n: int, with_mask: bool) -> tuple[Tensor, Tensor]:
    """A learned clip ``alpha`` (a ``[1]`` or 0-dim tensor in ``x``'s dtype) after a ReLU, quantized
    on ``n`` levels with a straight-through estimator; ``alpha`` gets the gradient of the clipped
    elements, as ``torch.where(x >= alpha, alpha, relu(x))`` gives it."""
    s = (alpha.detach() / n).clamp_min(MIN_SCALE)
    res = _run(_learned_clip_body, _flat(x), alpha.reshape(()), s.reshape(()), with_mask=with_mask)
    return _unflat(res[0], x), (_unflat(res[1], x) if with_mask else _no_mask(x))


@learned_clip_fake_quant.register_fake
def _(x, alpha, n, with_mask):
    return _empty_like(x), _empty_like(x, torch.uint8) if with_mask else _no_mask(x)


@torch.library.custom_op("gdrq::learned_clip_grad", mutates_args=())
def learned_clip_grad(grad: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of :func:`learned_clip_fake_quant`: for ``x``, and for ``alpha`` element-wise
    (the caller sums it to ``alpha``'s shape as autograd sums a broadcast)."""
    grad = grad.contiguous(memory_format=_format(mask))
    gx, ga = _run(_learned_clip_grad_body, _flat(grad), _flat(mask))
    return _unflat(gx, mask), _unflat(ga, mask)


@learned_clip_grad.register_fake
def _(grad, mask):
    return _empty_like(mask, grad.dtype), _empty_like(mask, grad.dtype)


def _learned_clip_backward(ctx, grad: Tensor | None, _grad_mask: Tensor | None):
    if grad is None:
        return None, None, None, None
    (mask,) = ctx.saved_tensors
    gx, ga = learned_clip_grad(grad, mask)
    return gx, ga.sum_to_size(ctx.alpha_shape), None, None


def _save_learned_clip(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    ctx.alpha_shape = inputs[1].shape
    ctx.set_materialize_grads(False)


learned_clip_fake_quant.register_autograd(_learned_clip_backward, setup_context=_save_learned_clip)


def _mask_backward(ctx, grad: Tensor | None, _grad_mask: Tensor | None):
    (mask,) = ctx.saved_tensors
    return (None if grad is None else masked_grad(grad, mask, ctx.product),) + (None,) * (ctx.num_inputs - 1)


def _saving_mask(product: bool) -> Callable:
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output[1])
        ctx.num_inputs, ctx.product = len(inputs), product
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the mask output

    return setup_context


fake_quant.register_autograd(_mask_backward, setup_context=_saving_mask(False))
scale_clip_fake_quant.register_autograd(_mask_backward, setup_context=_saving_mask(False))
hwgq.register_autograd(_mask_backward, setup_context=_saving_mask(True))


def _save_alpha(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _rows_backward(ctx, grad: Tensor):
    (alpha,) = ctx.saved_tensors
    return scaled_rows(grad, alpha, False), None, None


scaled_rows.register_autograd(_rows_backward, setup_context=_save_alpha)
