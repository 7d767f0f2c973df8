"""The fused fast paths of ``gdrq_lightning.quant`` equal the plain composition they replace.

The reference below is the straightforward code (``clamp`` / ``minimum`` with autograd,
then ATen's ``fake_quantize_*``), as the quantizers computed it before the speed work.
Forward values are compared bit for bit (``-0.0`` vs ``+0.0`` included), gradients too.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gdrq_lightning import QuantConfig
from gdrq_lightning.quant import ActQuantizer, WeightQuantizer
from gdrq_lightning.quant import primitives as P
from gdrq_lightning.quant.methods import hwgq as hwgq_m


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    same = a.view(torch.int32) == b.view(torch.int32)
    assert bool(same.all()), f"{int((~same).sum())} of {a.numel()} differ, e.g. {a[~same][:4]} vs {b[~same][:4]}"


def per_channel(v: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[axis] = -1
    return v.repeat_interleave(x.shape[axis] // v.numel()).reshape(shape)


def ref_signed(x: torch.Tensor, alpha: torch.Tensor, bits: int, axis: int | None) -> torch.Tensor:
    n = 2 ** (bits - 1) - 1
    scale = (alpha / n).clamp_min(1e-8)
    if axis is None:
        a = alpha.reshape(())
        return torch.fake_quantize_per_tensor_affine(torch.clamp(x, -a, a), scale.reshape(1), torch.zeros(1, dtype=torch.int32), -n, n)
    a = per_channel(alpha, x, axis)
    s = scale.repeat_interleave(x.shape[axis] // scale.numel())
    zero = torch.zeros(x.shape[axis], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(torch.clamp(x, -a, a), s, zero, axis, -n, n)


def ref_unsigned(x: torch.Tensor, alpha: torch.Tensor, bits: int, axis: int | None) -> torch.Tensor:
    n = 2**bits - 1
    scale = (alpha / n).clamp_min(1e-8)
    if axis is None:
        xc = torch.minimum(torch.clamp_min(x, 0.0), alpha.reshape(()))
        return torch.fake_quantize_per_tensor_affine(xc, scale.reshape(1), torch.zeros(1, dtype=torch.int32), 0, n)
    xc = torch.minimum(torch.clamp_min(x, 0.0), per_channel(alpha, x, axis))
    s = scale.repeat_interleave(x.shape[axis] // scale.numel())
    return torch.fake_quantize_per_channel_affine(xc, s, torch.zeros(x.shape[axis], dtype=torch.int32), axis, 0, n)


def hard_inputs(shape: tuple[int, ...], alpha: torch.Tensor, axis: int | None, bits: int, signed: bool) -> torch.Tensor:
    """Gaussian values plus exact ties: +-alpha, half steps, zeros of both signs."""
    g = torch.Generator().manual_seed(sum(shape) + bits)
    x = torch.randn(shape, generator=g) * 2
    a = alpha.reshape(()) if axis is None else per_channel(alpha, x, axis)
    n = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    s = (a / n).clamp_min(1e-8)
    flat = x.view(-1)
    pick = torch.randperm(flat.numel(), generator=g)[:40]
    a_full, s_full = a.expand_as(x).reshape(-1), s.expand_as(x).reshape(-1)
    flat[pick[:8]] = a_full[pick[:8]]
    flat[pick[8:12]] = -a_full[pick[8:12]]
    flat[pick[12:24]] = s_full[pick[12:24]] * (torch.arange(12, dtype=torch.float32) + 0.5)
    flat[pick[24:30]] = 0.0
    flat[pick[30:36]] = -0.0
    flat[pick[36:40]] = -s_full[pick[36:40]] * 0.25  # rounds to -0.0 before the kernel's int cast
    return x


ALPHAS = {
    "per-tensor": (None, lambda: torch.tensor(1.37)),
    "groups": (0, lambda: torch.tensor([0.3, 1.0, 2.5, 7e-9])),  # a tiny group hits the 1e-8 step floor
    "channels": (0, lambda: torch.linspace(0.05, 3.0, 8)),
    "act-groups": (1, lambda: torch.tensor([0.8, 0.0])),  # a dead group: alpha 0
}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("case", list(ALPHAS))
@pytest.mark.parametrize("signed", [True, False])
def test_fake_quant_bit_exact_values_and_gradients(bits: int, case: str, signed: bool) -> None:
    axis, make_alpha = ALPHAS[case]
    alpha = make_alpha()
    shape = (8, 6, 3, 3) if axis == 0 else (5, 8, 4, 4)
    x = hard_inputs(shape, alpha, axis, bits, signed)
    up = torch.randn(shape)
    fast_fn, ref_fn = (P.fake_quant_signed, ref_signed) if signed else (P.fake_quant_unsigned, ref_unsigned)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast, ref = fast_fn(xa, alpha, bits, axis), ref_fn(xb, alpha, bits, axis)
    bits_equal(fast, ref)
    bits_equal(fast_fn(x, alpha, bits, axis), ref.detach())  # the no-grad path
    (fast * up).sum().backward()
    (ref * up).sum().backward()
    bits_equal(xa.grad, xb.grad)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("groups", [1, 4, 16])
def test_scale_clip_weight_path_equals_clip_then_quantize(bits: int, groups: int) -> None:
    w = nn.Parameter(torch.randn(16, 8, 3, 3))
    with torch.no_grad():
        if groups == 4:  # group 0: T = 2 * mean|w| = 0.5 exactly, every nonzero weight on the bound
            w[:4] = torch.tensor([0.5, -0.5, 0.0, 0.0]).repeat(72).reshape(4, 8, 3, 3)
            w[4:8] = 0.0  # group 1: T = 0, clamp(0, -0, 0)
        w[13, 0, 0, 0] = 0.0
        w[14, 1, 0, 0] = -0.0
    q = WeightQuantizer(QuantConfig(method="gdrq", weight_bits=bits, groups=groups, k_w=2.0), 16)
    up = torch.randn_like(w)
    out = q(w)
    (out * up).sum().backward()
    wr = w.detach().clone().requires_grad_()
    t = 2.0 * wr.detach().abs().reshape(groups, -1).mean(dim=1)
    ref = ref_signed(torch.clamp(wr, -per_channel(t, wr, 0), per_channel(t, wr, 0)), t, bits, 0)
    (ref * up).sum().backward()
    bits_equal(out, ref)
    bits_equal(w.grad, wr.grad)


@pytest.mark.parametrize("act_groups", [1, 2])
def test_relu_fused_activation_path_equals_relu_then_quantize(act_groups: int) -> None:
    cfg = QuantConfig(method="gdrq", act_bits=4, act_groups=act_groups)
    axis = 1 if act_groups > 1 else None
    q = ActQuantizer(cfg).train()
    q(torch.randn(4, 6, 5, 5))  # initialise the EMA
    ref_q = ActQuantizer(cfg).train()
    ref_q.load_state_dict(q.state_dict())
    for training in (True, False):
        q.train(training)
        x = torch.randn(4, 6, 5, 5) * 3
        if training:  # the reference statistics: the same EMA update, then the threshold
            with torch.no_grad():
                ref_q._observe(torch.relu(x))
        else:  # frozen threshold: put exact ties on alpha (torch.minimum gives them half)
            a = q.threshold()
            x[0, 0, 0, :5] = a[0]
            x[0, 3, 0, :5] = a[-1]  # channel 3 is in the second group when act_groups=2
        alpha = ref_q.threshold()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        up = torch.randn_like(x)
        if not training:
            with torch.no_grad():
                bits_equal(q(x), ref_unsigned(torch.relu(x), alpha, 4, axis))
        out = q(xa)
        bits_equal(q.threshold(), alpha)
        ref = ref_unsigned(torch.relu(xb), alpha, 4, axis)
        bits_equal(out, ref)
        (out * up).sum().backward()
        (ref * up).sum().backward()
        bits_equal(xa.grad, xb.grad)
    assert float(xa.grad[0, 0, 0, 0]) == 0.5 * float(up[0, 0, 0, 0])


def test_binary_weights_and_clip_only_paths() -> None:
    w = nn.Parameter(torch.randn(8, 4, 3, 3))
    up = torch.randn_like(w)
    out = P.binarize(w, 8)
    (out * up).sum().backward()
    alpha = w.detach().abs().reshape(8, -1).mean(dim=1)[:, None, None, None]
    bits_equal(out, alpha * torch.where(w.detach() >= 0, 1.0, -1.0))
    bits_equal(w.grad, up * alpha)
    w.grad = None
    t = torch.tensor([0.5, 1.0])
    with torch.no_grad():
        w[0, 0, 0, :2] = torch.tensor([0.5, -0.5])  # on the bound: half the gradient, as torch.clamp
    P.clip_symmetric(w, t).mul(up).sum().backward()
    wr = w.detach().clone().requires_grad_()
    tc = t.repeat_interleave(4)[:, None, None, None]
    torch.clamp(wr, -tc, tc).mul(up).sum().backward()
    bits_equal(w.grad, wr.grad)
    assert float(w.grad[0, 0, 0, 0]) == 0.5 * float(up[0, 0, 0, 0])


def test_half_precision_inputs_take_the_reference_path() -> None:
    x = torch.randn(64).half()
    out = P.fake_quant_unsigned(x, torch.tensor(1.0), 4)
    assert out.dtype == torch.float16


@pytest.mark.parametrize("mode", ["relu", "clipped", "log_tailed"])
def test_hwgq_fast_path_equals_reference_rule(mode: str) -> None:
    step, bits = hwgq_m.hwgq_optimal_step(2), 2
    q_max = 3 * step
    x = torch.randn(4, 8, 5, 5) * 2
    x.view(-1)[:6] = torch.tensor([0.0, -0.0, q_max, step / 2, 1e-30, -1e-30])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    up = torch.randn_like(x)
    out = hwgq_m.hwgq(xa, step, bits, mode)
    bits_equal(out, hwgq_m.hwgq_forward(x, step, bits))
    (out * up).sum().backward()
    pos = xb.detach() > 0
    if mode == "relu":
        ref = up * pos
    elif mode == "clipped":
        ref = up * (pos & (xb.detach() <= q_max))
    else:
        tail = 1.0 / (xb.detach() - q_max + 1.0).clamp_min(1.0)
        ref = up * torch.where(xb.detach() <= q_max, pos.float(), tail)
    bits_equal(xa.grad, ref)


def test_double_precision_weights_take_the_reference_path() -> None:
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    q = WeightQuantizer(QuantConfig(method="gdrq", weight_bits=4, groups=2), 8)
    t = 2.0 * w.abs().reshape(2, -1).mean(dim=1)
    tc = t.repeat_interleave(4)[:, None, None, None]
    ref = ref_signed(torch.clamp(w, -tc, tc), t.float(), 4, 0)
    assert q(w).dtype == ref.dtype and torch.equal(q(w), ref)
