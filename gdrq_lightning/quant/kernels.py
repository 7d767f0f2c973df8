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

Exactness: bodies use only comparisons, ``min`` / ``max``, products, ``round`` and integer
casts, which every backend computes exactly; quotients (grid steps) are taken by ATen in the
op before the kernel. The int32 round trip turns the ``-0.0`` that ``round`` keeps into the
``+0.0`` ATen's kernels return (an ``+ 0.0`` would be folded away by a compiler).
``bfloat16`` / ``float16`` inputs are computed in float32, with the clip bound rounded to the
input's dtype as ``torch.clamp`` rounds it, and return their own dtype.

Backends (``GDRQ_KERNELS`` or :func:`use_backend`): ``auto`` (default) compiles each body with
inductor on first use per device, dtype and rank (seconds, cached on disk by inductor) and runs
it as is where compiling fails; ``eager`` never compiles (the same bodies as ATen ops).
"""
from __future__ import annotations

import os
import types
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
_compiled: dict[tuple, Callable] = {}
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


def _fresh(fn: Callable) -> Callable:
    """A copy of ``fn`` with its own code object: dynamo counts recompiles per code object, so each
    (device, dtype, rank) gets its own budget instead of sharing one."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _run(body: Callable, x: Tensor, *args):
    """``body(x, *args)``, compiled by inductor for ``x``'s device, dtype and rank unless disabled."""
    device = x.device.type
    if _backend == "eager" or device in _broken:
        return body(x, *args)
    key = (body, device, x.dtype, x.dim())
    if key not in _compiled:
        _compiled[key] = torch.compile(_fresh(body), dynamic=True, fullgraph=True, options=_OPTIONS)
    try:  # detached: views would make dynamo guard on (and recompile for) their bases
        with torch.no_grad():
            return _compiled[key](x.detach(), *(a.detach() if isinstance(a, Tensor) else a for a in args))
    except Exception as err:  # no C++ compiler / Triton: the same math as ATen ops from now on
        _broken.add(device)
        warnings.warn(f"gdrq kernels: compiling for {device} failed ({type(err).__name__}: {err}); running them as ATen ops")
        return body(x, *args)


# --- layouts: kernels see a flat (or [G, L]) view in memory order ---------------------------

def _channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _flat(x: Tensor) -> Tensor:
    """``x`` as 1-D in memory order (a view for contiguous and channels-last tensors)."""
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

def _grid_values(xc: Tensor, scale: Tensor, inv: Tensor, qmin: int, qmax: int) -> Tensor:
    """ATen's fake-quant of clamped float32 ``xc``: ``scale * clamp(round(xc * inv), qmin, qmax)``."""
    return torch.round(xc * inv).to(torch.int32).clamp(qmin, qmax).float() * scale


def _symmetric_mask(xf: Tensor, ab: Tensor, tie: int) -> Tensor:
    """The mask of ``clamp(x, -a, a)``: ``tie`` on ``|x| == a > 0``, full when both bounds are 0."""
    mag = xf.abs()
    on_bound = torch.where(ab > 0, tie, FULL)
    return torch.where(mag < ab, FULL, torch.where(mag == ab, on_bound, 0)).to(torch.uint8)


def _signed_body(x: Tensor, a: Tensor, scale: Tensor, inv: Tensor, n: int, tie: int, with_mask: bool):
    """``fake-quant(clamp(x, -a, a))`` on ``[-n, n]`` and its mask."""
    xf, ab = x.float(), a.to(x.dtype).float()
    out = _grid_values(torch.minimum(torch.maximum(xf, -ab), ab), scale, inv, -n, n).to(x.dtype)
    return out, (_symmetric_mask(xf, ab, tie) if with_mask else None)


def _clip_body(x: Tensor, a: Tensor, with_mask: bool):
    """``clamp(x, -a, a)`` alone (Scale-Clip without quantization) and its mask."""
    ab = a.to(x.dtype)
    out = torch.minimum(torch.maximum(x, -ab), ab)
    return out, (_symmetric_mask(x.float(), ab.float(), HALF) if with_mask else None)


def _unsigned_body(x: Tensor, a: Tensor, scale: Tensor, inv: Tensor, n: int, tie: int, with_mask: bool):
    """``fake-quant(minimum(relu(x), a))`` on ``[0, n]`` and its mask (nothing at ``x == 0``)."""
    xf, ab = x.float(), a.to(x.dtype).float()
    out = _grid_values(torch.minimum(xf.clamp_min(0.0), ab), scale, inv, 0, n).to(x.dtype)
    if not with_mask:
        return out, None
    on_bound = (xf == ab) & (ab > 0)
    return out, torch.where((xf > 0) & (xf < ab), FULL, torch.where(on_bound, tie, 0)).to(torch.uint8)


def _hwgq_body(x: Tensor, step: Tensor, q_max: Tensor, n: int, clipped: bool, with_mask: bool):
    """HWGQ ``where(x > 0, step * clamp(round(x / step), 1, n), 0)``, rounded to ``x``'s dtype
    after each op as ATen rounds it; mask 1 on ``x > 0`` (and ``x <= q_max`` when clipped)."""
    xf, dt = x.float(), x.dtype
    q = (torch.round((xf / step).to(dt).float()).clamp(1, n) * step).to(dt)
    pos = xf > 0
    out = torch.where(pos, q, torch.zeros_like(q))
    if not with_mask:
        return out, None
    keep = pos & (xf <= q_max) if clipped else pos
    return out, torch.where(keep, FULL, 0).to(torch.uint8)


def _sign_body(w: Tensor, a: Tensor, sign: bool) -> Tensor:
    """``a * sign(w)`` (``sign(0) = +1``) or ``a * w``, per row ``[G, L]`` (or flat, one ``a``)."""
    wf = w.float()
    return (torch.where(wf >= 0, a, -a) if sign else wf * a).to(w.dtype)


def _grad_body(g: Tensor, mask: Tensor, product: bool) -> Tensor:
    """``g`` times the mask's factor; where the mask is 0, ``+0.0`` as torch's ``where`` (clamp's
    derivative) gives it, or with ``product`` the signed zero of ``g * 0`` (HWGQ's mask product)."""
    scaled = g.float() * (mask.float() * 0.25)
    return (scaled if product else torch.where(mask == 0, 0.0, scaled)).to(g.dtype)


# --- ops --------------------------------------------------------------------------------------

def _grid(a: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Step ``max(a / n, 1e-8)`` and its float32 reciprocal, as ATen's kernels compute them."""
    scale = (a / n).clamp_min_(MIN_SCALE)
    return scale, torch.reciprocal(scale)


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
        out, mask = _run(_clip_body, xv, a, with_mask)
    else:
        scale, inv = _grid(a, n)
        out, mask = _run(_signed_body if signed else _unsigned_body, xv, a, scale, inv, n, tie, with_mask)
    grouped = xv.dim() > 1
    return _shaped(out, x, grouped), (_no_mask(x) if mask is None else _shaped(mask, x, grouped))


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
    scale, inv = _grid(t, n)
    out, mask = _run(_signed_body, wv, t, scale, inv, n, QUARTER, with_mask)
    return out.reshape(w.shape), (_no_mask(w) if mask is None else mask.reshape(w.shape))


@scale_clip_fake_quant.register_fake
def _(w, k, groups, n, with_mask):
    return w.new_empty(w.shape), w.new_empty(w.shape, dtype=torch.uint8) if with_mask else _no_mask(w)


@torch.library.custom_op("gdrq::hwgq", mutates_args=())
def hwgq(x: Tensor, step: float, n: int, clipped: bool, with_mask: bool) -> tuple[Tensor, Tensor]:
    """HWGQ forward (SPEC §4) and the mask of its ``relu`` / ``clipped`` backward."""
    step_t = torch.tensor(step, dtype=torch.float32)  # CPU scalars: no copy to the device
    q_max = torch.tensor(n * step, dtype=torch.float32)  # compared in float32, as ATen does
    out, mask = _run(_hwgq_body, _flat(x), step_t, q_max, n, clipped, with_mask)
    return _unflat(out, x), (_no_mask(x) if mask is None else _unflat(mask, x))


@hwgq.register_fake
def _(x, step, n, clipped, with_mask):
    return _empty_like(x), _empty_like(x, torch.uint8) if with_mask else _no_mask(x)


@torch.library.custom_op("gdrq::scaled_rows", mutates_args=())
def scaled_rows(w: Tensor, alpha: Tensor, sign: bool) -> Tensor:
    """``alpha_g * sign(w)`` (binary weights, ``sign(0) = +1``) or ``alpha_g * w`` (their
    gradient) for ``G = alpha.numel()`` contiguous row groups of ``w``."""
    g = alpha.numel()
    wv, a = (w.reshape(-1), alpha.float().reshape(())) if g == 1 else (w.reshape(g, -1), alpha.float().reshape(-1, 1))
    return _run(_sign_body, wv, a, sign).reshape(w.shape)


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
    return _unflat(_run(_grad_body, _flat(grad), _flat(mask), product), mask)


def _format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if _channels_last(t) else torch.contiguous_format


@masked_grad.register_fake
def _(grad, mask, product):
    return _empty_like(mask, grad.dtype)


def _mask_backward(ctx, grad: Tensor, _grad_mask: Tensor | None):
    (mask,) = ctx.saved_tensors
    return (masked_grad(grad, mask, ctx.product),) + (None,) * (ctx.num_inputs - 1)


def _saving_mask(product: bool) -> Callable:
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output[1])
        ctx.num_inputs, ctx.product = len(inputs), product

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
