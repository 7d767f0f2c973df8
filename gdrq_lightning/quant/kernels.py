"""Fused fake-quant kernels: the element-wise body of every quantizer forward and of its
backward, compiled by inductor, bit-exact with the plain composition in :mod:`.primitives`
(``clamp`` / ``minimum``, then ATen's ``fake_quantize_*``). :mod:`.ops` makes them operators.

Why they exist:

* one memory pass per op: a kernel body below is a few element-wise expressions that
  inductor compiles into one loop (C++ on CPU, Triton on CUDA) writing the output and the
  backward mask together, instead of a chain of ATen ops, each a kernel launch and a pass;
* the backward keeps one byte per element, 4 x the gradient factor, instead of the inputs or
  float masks: 4 inside the clip range, 2 on a clip bound (torch gives ``clamp`` with tensor
  bounds and ``minimum`` 1/2 there, 1 when both bounds coincide), 1 for Scale-Clip's two
  clamps at the same bound (1/4), 0 outside and at a ReLU's 0. Ties need no extra pass, mask,
  host synchronisation or branch on data.

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
from typing import Callable, Iterator

import torch
from torch import Tensor

_ROWS_BUFFER = 1 << 20  # elements (4 MiB of float32) of |w| that abs_mean_rows keeps in cache
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


def _relu_sum_body(x: Tensor) -> tuple[Tensor]:
    """``sum(relu(x))`` accumulated in float64 (one read of ``x``, no ReLU tensor written)."""
    return (x.float().clamp_min(0.0).sum(dtype=torch.float64),)


def _grad_body(g: Tensor, mask: Tensor, *, product: bool) -> tuple[Tensor]:
    """``g`` times the mask's factor; where the mask is 0, ``+0.0`` as torch's ``where`` (clamp's
    derivative) gives it, or with ``product`` the signed zero of ``g * 0`` (HWGQ's mask product)."""
    factor = mask.float() * 0.25  # compared as floats: byte comparisons vectorise poorly
    scaled = g.float() * factor
    return ((scaled if product else torch.where(factor > 0, scaled, 0.0)).to(g.dtype),)


def abs_mean_rows(wv: Tensor) -> Tensor:
    """``wv.abs().mean(dim=1)`` of a ``[G, L]`` tensor, bit for bit, without writing ``|wv|`` to
    memory whole on a CPU: two rows at a time through one cache-sized buffer. Two rows, because
    ATen reduces those as it reduces the rows of the whole tensor (each row in one thread, in
    the same order, at any thread count); a single row would be split across threads."""
    g, length = wv.shape
    if wv.device.type != "cpu" or g < 3 or 2 * length > _ROWS_BUFFER:
        return wv.abs().mean(dim=1)
    buf, out = wv.new_empty(2, length), wv.new_empty(g)
    for i in range(0, g, 2):
        j = min(i, g - 2)  # an odd last row goes with the one before it again
        torch.mean(torch.abs(wv[j : j + 2], out=buf), dim=1, out=out[j : j + 2])
    return out
