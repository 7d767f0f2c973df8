"""The pure math in ``gdrq_lightning.quant.primitives`` against plain references (docs/methods.md)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from gdrq_lightning.quant import primitives as P
from gdrq_lightning.quant.methods import dorefa as dorefa_m
from gdrq_lightning.quant.methods import hwgq as hwgq_m
from gdrq_lightning.quant.methods import lsq as lsq_m
from gdrq_lightning.quant.methods import pact as pact_m


def exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert_close(actual, expected, atol=0, rtol=0)


def off_tie_points(step: float, lo: int, hi: int, per_code: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``step * (k + u)``, ``|u| <= 0.4``, for every code ``k`` in ``[lo, hi]``; returns ``(x, k)``."""
    k = torch.arange(lo, hi + 1, dtype=torch.float32).repeat_interleave(per_code)
    u = torch.linspace(-0.4, 0.4, per_code).repeat(hi - lo + 1)
    return torch.tensor(step) * (k + u), k


# --- uniform quantizers: forward ------------------------------------------------------------


def test_signed_8bit_equals_torch_fake_quantize() -> None:
    x = torch.randn(4096) * 2
    alpha = torch.tensor(1.5)
    s = float(alpha / 127)
    exact(P.fake_quant_signed(x, alpha, 8), torch.fake_quantize_per_tensor_affine(x, s, 0, -127, 127))


def test_signed_8bit_per_group_equals_torch_fake_quantize_per_channel() -> None:
    x = torch.randn(8, 3, 3, 3) * 2
    alpha = torch.tensor([0.5, 1.0, 1.5, 3.0])  # 4 groups of 2 channels
    scale = (alpha / 127).repeat_interleave(2)
    ref = torch.fake_quantize_per_channel_affine(x, scale, torch.zeros(8, dtype=torch.int32), 0, -127, 127)
    exact(P.fake_quant_signed(x, alpha, 8, axis=0), ref)


def test_unsigned_8bit_equals_torch_fake_quantize() -> None:
    x = torch.randn(4096) * 2
    alpha = torch.tensor(1.7)
    s = float(alpha / 255)
    exact(P.fake_quant_unsigned(x, alpha, 8), torch.fake_quantize_per_tensor_affine(x, s, 0, 0, 255))


@pytest.mark.parametrize("bits", range(2, 9))
def test_signed_matches_plain_reference(bits: int) -> None:
    n = 2 ** (bits - 1) - 1
    alpha = torch.tensor(1.3)
    s = alpha / n
    # away from rounding ties the result is exactly s * k
    x, k = off_tie_points(float(s), -n, n)
    x = torch.cat([x, torch.tensor([-5.0, -1.31 - float(s), 1.31 + float(s), 7.0])])
    k = torch.cat([k, torch.tensor([-n, -n, n, n], dtype=torch.float32)])
    out = P.fake_quant_signed(x, alpha, bits)
    exact(out, s * k)
    exact(out, s * torch.round(torch.clamp(x, -alpha, alpha) / s))
    # random inputs (ties possible in principle): at most one step away from the plain reference
    x = torch.randn(10_000)
    ref = s * torch.round(torch.clamp(x, -alpha, alpha) / s)
    assert (P.fake_quant_signed(x, alpha, bits) - ref).abs().max() <= s * (1 + 1e-6)


@pytest.mark.parametrize("bits", range(1, 9))
def test_unsigned_matches_plain_reference(bits: int) -> None:
    n = 2**bits - 1
    alpha = torch.tensor(2.1)
    s = alpha / n
    x, k = off_tie_points(float(s), 0, n)
    x = torch.cat([x.clamp_min(0), torch.tensor([-3.0, -0.01, 2.2 + float(s), 9.0])])
    k = torch.cat([k, torch.tensor([0, 0, n, n], dtype=torch.float32)])
    out = P.fake_quant_unsigned(x, alpha, bits)
    exact(out, s * k)
    exact(out, s * torch.round(torch.clamp(x, 0, alpha) / s))
    x = torch.randn(10_000) * 2
    ref = s * torch.round(torch.clamp(x, 0, alpha) / s)
    assert (P.fake_quant_unsigned(x, alpha, bits) - ref).abs().max() <= s * (1 + 1e-6)


def test_docstring_example() -> None:
    x = torch.tensor([-1.0, -0.26, 0.1, 0.9])
    exact(P.fake_quant_signed(x, torch.tensor(0.5), bits=2), torch.tensor([-0.5, -0.5, 0.0, 0.5]))


# --- integer codes -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
def test_integer_codes_signed_in_range(bits: int) -> None:
    n = 2 ** (bits - 1) - 1
    x = torch.randn(8, 16) * 3
    alpha = torch.tensor([0.5, 1.0, 2.0, 4.0])  # per group of 2 rows
    codes, step = P.integer_codes_signed(x, alpha, bits, axis=0)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert int(codes.min()) == -n and int(codes.max()) == n  # both ends reached, nothing beyond
    exact(step, (alpha / n).repeat_interleave(2))
    exact(codes.float() * step[:, None], P.fake_quant_signed(x, alpha, bits, axis=0))


@pytest.mark.parametrize("bits", range(1, 9))
def test_unsigned_output_on_grid(bits: int) -> None:
    n = 2**bits - 1
    alpha = torch.tensor(1.0)
    out = P.fake_quant_unsigned(torch.randn(10_000) * 3, alpha, bits)
    codes = out / (alpha / n)
    assert codes.min() == 0 and torch.round(codes).max() == n
    assert_close(codes, torch.round(codes), atol=1e-4, rtol=0)


def test_binarize_values_and_sign_of_zero() -> None:
    w = torch.tensor([[0.0, -1.0, 2.0, 0.5], [0.0, 0.0, -3.0, 1.0]])
    out = P.binarize(w, groups=2)
    alpha = torch.tensor([3.5 / 4, 4.0 / 4])
    exact(out, alpha[:, None] * torch.tensor([[1.0, -1.0, 1.0, 1.0], [1.0, 1.0, -1.0, 1.0]]))
    # one group: alpha = mean|w| over the whole tensor
    exact(P.binarize(w, groups=1), (7.5 / 8) * torch.tensor([[1.0, -1.0, 1.0, 1.0], [1.0, 1.0, -1.0, 1.0]]))


# --- straight-through gradients --------------------------------------------------------------


def test_signed_ste_gradient() -> None:
    x = torch.tensor([-3.0, -0.7, -0.2, 0.3, 0.9, 2.5], requires_grad=True)
    alpha = torch.tensor(1.0, requires_grad=True)
    up = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    (P.fake_quant_signed(x, alpha, 4) * up).sum().backward()
    exact(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 0.0]))
    assert alpha.grad is None  # alpha is detached (Scale-Clip / max based)


def test_unsigned_ste_gradient() -> None:
    x = torch.tensor([-1.0, 0.2, 0.9, 1.6, 3.0], requires_grad=True)
    (P.fake_quant_unsigned(x, torch.tensor(1.5), 3) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])).sum().backward()
    exact(x.grad, torch.tensor([0.0, 2.0, 3.0, 0.0, 0.0]))


def test_per_group_ste_gradient() -> None:
    x = torch.tensor([[0.5, 1.5], [0.5, 1.5]], requires_grad=True)
    P.fake_quant_signed(x, torch.tensor([1.0, 2.0]), 4, axis=0).sum().backward()
    exact(x.grad, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))


def test_round_ste_is_identity_backward() -> None:
    x = torch.tensor([0.2, 0.5, 1.5, 2.7], requires_grad=True)
    y = P.round_ste(x)
    exact(y, torch.tensor([0.0, 0.0, 2.0, 3.0]))  # round half to even
    y.sum().backward()
    exact(x.grad, torch.ones(4))


def test_clip_symmetric_zero_gradient_where_clipped() -> None:
    w = torch.tensor([[-2.0, -0.5, 0.5, 2.0], [-2.0, -0.5, 0.5, 2.0]], requires_grad=True)
    t = torch.tensor([1.0, 3.0])
    out = P.clip_symmetric(w, t)
    exact(out, torch.tensor([[-1.0, -0.5, 0.5, 1.0], [-2.0, -0.5, 0.5, 2.0]]))
    out.sum().backward()
    exact(w.grad, torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))


def test_scale_clip_threshold_per_group() -> None:
    w = torch.randn(6, 4, 3, 3)
    exact(P.scale_clip_threshold(w, 3, 2.0), 2.0 * w.abs().reshape(3, -1).mean(dim=1))
    exact(P.scale_clip_threshold(w, 1, 2.5), 2.5 * w.abs().mean().reshape(1))
    assert not P.scale_clip_threshold(w.requires_grad_(), 3, 2.0).requires_grad  # detached


def test_binarize_gradient_is_straight_through() -> None:
    w = torch.tensor([[0.0, -1.0, 2.0, 0.5]], requires_grad=True)
    P.binarize(w, groups=1).sum().backward()
    exact(w.grad, torch.full((1, 4), 3.5 / 4))  # d(alpha * sign(w))/dw = alpha (alpha detached)


def test_pact_gradients() -> None:
    alpha = torch.nn.Parameter(torch.tensor([2.0]))
    x = torch.tensor([-1.0, 0.5, 0.9, 2.0, 3.0, 5.0], requires_grad=True)
    y = pact_m.pact_act(x, alpha, bits=2)
    s = 2.0 / 3
    assert_close(y, s * torch.round(torch.clamp(x.detach(), 0, 2.0) / s))
    y.sum().backward()
    # dy/dalpha = 1 where x >= alpha (three points, one of them exactly alpha); dy/dx = 1 on (0, alpha)
    exact(alpha.grad, torch.tensor([3.0]))
    exact(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 0.0]))


def test_pact_l2_decay_on_alpha() -> None:
    alpha = torch.nn.Parameter(torch.tensor([2.0]))
    x = torch.tensor([-1.0, 0.5, 2.5, 3.0])
    pact_m.pact_act(x, alpha, bits=4, decay=0.1).sum().backward()
    assert_close(alpha.grad, torch.tensor([2.0 + 0.1 * 2.0]), atol=1e-7, rtol=0)


def test_grad_scale() -> None:
    x = (torch.rand(1000) * 3).requires_grad_()
    y = lsq_m.grad_scale(x, 0.0123)
    exact(y, x.detach())  # identity forward, bit for bit
    y.sum().backward()
    assert_close(x.grad, torch.full((1000,), 0.0123))


def test_lsq_gradients_match_paper() -> None:
    # 3-bit signed: Q_n = Q_p = 3
    x = torch.tensor([-2.0, -0.37, 0.05, 0.62, 1.9, 4.0], requires_grad=True)
    step = torch.nn.Parameter(torch.tensor(0.5))
    g = lsq_m.lsq_grad_scale(x.numel(), 3)
    assert g == 1 / math.sqrt(6 * 3)
    y = lsq_m.lsq_fake_quant(x, step, -3, 3, g)
    exact(y, torch.tensor([-1.5, -0.5, 0.0, 0.5, 1.5, 1.5]))
    y.sum().backward()
    # d/ds: Q_n below, Q_p above, -x/s + round(x/s) inside (LSQ eq. 3), times g
    per_elem = [-3.0, 0.74 - 1.0, -0.1, -1.24 + 1.0, 3.0, 3.0]
    assert_close(step.grad, torch.tensor(sum(per_elem) * g), atol=1e-6, rtol=0)
    exact(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))


def test_lsq_init_step() -> None:
    x = torch.randn(100)
    exact(lsq_m.lsq_init_step(x, 7), 2 * x.abs().mean() / math.sqrt(7))


# --- DoReFa ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dorefa_weight_levels(bits: int) -> None:
    n = 2**bits - 1
    w = torch.randn(64, 9)
    out = dorefa_m.dorefa_weight(w, bits)
    k = (out + 1) * n / 2
    assert_close(k, torch.round(k), atol=1e-4, rtol=0)
    assert out.min() == -1 and out.max() == 1  # the largest |tanh w| lands on +-1 ... one of them
    t = torch.tanh(w)
    ref = 2 * torch.round((t / (2 * t.abs().max()) + 0.5) * n) / n - 1
    assert_close(out, ref, atol=1e-6, rtol=0)


def test_dorefa_act_values_and_gradient() -> None:
    x = torch.tensor([-0.5, 0.1, 0.4, 0.95, 1.5], requires_grad=True)
    y = dorefa_m.dorefa_act(x, 2)
    exact(y, torch.tensor([0.0, 0.0, 1 / 3, 1.0, 1.0]))
    y.sum().backward()
    exact(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


# --- HWGQ ------------------------------------------------------------------------------------

PAPER_STEPS = {1: 0.799, 2: 0.538, 3: 0.3217, 4: 0.185}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_hwgq_optimal_step_matches_paper(bits: int) -> None:
    assert abs(hwgq_m.hwgq_optimal_step(bits) - PAPER_STEPS[bits]) <= 0.003


def test_hwgq_optimal_step_minimises_monte_carlo_mse() -> None:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(200_000, generator=gen, dtype=torch.float64)
    x = x[x > 0]

    def argmin(grid: torch.Tensor, bits: int) -> float:
        mses = []
        for d in grid.split(8):
            q = d[:, None] * torch.clamp(torch.round(x[None, :] / d[:, None]), 1, 2**bits - 1)
            mses.append(((x[None, :] - q) ** 2).mean(dim=1))
        return float(grid[torch.cat(mses).argmin()])

    for bits in (1, 2, 3, 4):
        coarse = argmin(torch.arange(0.05, 1.2, 0.01, dtype=torch.float64), bits)
        fine = argmin(torch.arange(coarse - 0.01, coarse + 0.01, 0.0005, dtype=torch.float64), bits)
        assert abs(hwgq_m.hwgq_optimal_step(bits) - fine) <= 0.01, (bits, fine)


def test_hwgq_forward_two_bit_levels() -> None:
    d = hwgq_m.hwgq_optimal_step(2)
    x = torch.cat([torch.randn(10_000), torch.tensor([1e-6, 1e-3, 0.0, -1e-6])])
    out = hwgq_m.hwgq_forward(x, d, 2)
    levels = torch.tensor([0.0, d, 2 * d, 3 * d], dtype=torch.float32)
    exact(torch.unique(out), levels)
    assert (out[x > 0] > 0).all()  # a positive input never maps to 0
    assert (out[x <= 0] == 0).all()


def test_hwgq_forward_hand_values() -> None:
    x = torch.tensor([-1.0, 0.0, 0.01, 0.24, 0.26, 0.74, 0.76, 1.2, 1.3, 10.0])
    expected = torch.tensor([0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5])
    exact(hwgq_m.hwgq_forward(x, 0.5, 2), expected)
    exact(hwgq_m.hwgq(x, 0.5, 2, "clipped"), expected)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("relu", [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("clipped", [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]),
        ("log_tailed", [0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.25]),
    ],
)
def test_hwgq_backward_modes(mode: str, expected: list[float]) -> None:
    # D = 0.5, 2 bits: q_max = 1.5; log tail 1 / (x - q_max + 1) at 2.5 and 4.5
    x = torch.tensor([-1.0, 0.0, 0.1, 0.7, 1.5, 2.5, 4.5], requires_grad=True)
    hwgq_m.hwgq(x, 0.5, 2, mode).sum().backward()
    exact(x.grad, torch.tensor(expected))
