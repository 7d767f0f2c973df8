"""``WeightQuantizer`` / ``ActQuantizer``: thresholds, switches, EMA statistics, integer codes."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from gdrq_lightning import QuantConfig
from gdrq_lightning.quant import ActQuantizer, WeightQuantizer
from gdrq_lightning.quant import primitives as P
from gdrq_lightning.quant.methods import hwgq as hwgq_m


def exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert_close(actual, expected, atol=0, rtol=0)


def per_channel(v: torch.Tensor, channels: int) -> torch.Tensor:
    return v.repeat_interleave(channels // v.numel())


# --- weights ---------------------------------------------------------------------------------


def test_threshold_per_group_with_groups_on_and_off() -> None:
    w = torch.randn(8, 3, 3, 3)
    q = WeightQuantizer(QuantConfig(method="gdrq", groups=4, k_w=2.0), 8)
    exact(q.threshold(w), 2.0 * w.abs().reshape(4, -1).mean(dim=1))
    q.set_switches(groups_on=False)
    exact(q.threshold(w), 2.0 * w.abs().mean().reshape(1))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("groups_on", [True, False])
def test_gdrq_weight_forward_matches_reference(bits: int, groups_on: bool) -> None:
    n = 2 ** (bits - 1) - 1
    w = torch.randn(8, 4, 3, 3)
    q = WeightQuantizer(QuantConfig(method="gdrq", weight_bits=bits, groups=4, k_w=1.5), 8)
    q.set_switches(groups_on=groups_on)
    g = 4 if groups_on else 1
    t = per_channel(1.5 * w.abs().reshape(g, -1).mean(dim=1), 8)[:, None, None, None]
    clipped = torch.clamp(w, -t, t)
    s = t / n
    fused = torch.fake_quantize_per_channel_affine(
        clipped, s.flatten(), torch.zeros(8, dtype=torch.int32), 0, -n, n
    )
    out = q(w)
    exact(out, fused)
    assert ((out - s * torch.round(clipped / s)).abs() <= s * (1 + 1e-6)).all()  # plain reference, ties aside
    assert len(torch.unique(out[0])) <= 2 * n + 1


def test_group_method_8bit_per_tensor_equals_torch() -> None:
    w = torch.randn(16, 8)
    q = WeightQuantizer(QuantConfig(method="group", weight_bits=8, groups=4), 16)
    q.set_switches(groups_on=False)
    s = float(w.abs().max() / 127)
    exact(q(w), torch.fake_quantize_per_tensor_affine(w, s, 0, -127, 127))


@pytest.mark.parametrize("quant_on", [True, False])
def test_scale_clip_gives_clipped_weights_zero_gradient(quant_on: bool) -> None:
    w = nn.Parameter(torch.randn(8, 4, 3, 3))
    q = WeightQuantizer(QuantConfig(method="gdrq", groups=2, k_w=1.5), 8)
    q.set_switches(quant_on=quant_on)
    up = torch.randn_like(w)
    (q(w) * up).sum().backward()
    t = per_channel(1.5 * w.detach().abs().reshape(2, -1).mean(dim=1), 8)[:, None, None, None]
    inside = w.detach().abs() <= t
    assert 0 < int((~inside).sum()) < w.numel() // 4
    exact(w.grad, up * inside)  # no gradient through the (detached) threshold either
    if not quant_on:
        exact(q(w), torch.clamp(w.detach(), -t, t))


def test_scale_clip_switch_off_quant_uses_max() -> None:
    w = torch.randn(4, 10)
    q = WeightQuantizer(QuantConfig(method="gdrq", weight_bits=8), 4)
    q.set_switches(clip_on=False)
    s = float(w.abs().max() / 127)
    exact(q(w), torch.fake_quantize_per_tensor_affine(w, s, 0, -127, 127))
    q.set_switches(quant_on=False)
    assert q(w) is w


def test_project_writes_clamp_back() -> None:
    w = torch.randn(4, 10)
    q = WeightQuantizer(QuantConfig(method="scale_clip", project=True, k_w=1.0), 4)
    t = w.abs().mean()
    expected = torch.clamp(w, -t, t)
    q.project_(w)
    exact(w, expected)


def _weight_cases() -> list[tuple[str, int]]:
    cases = [(m, b) for m in ("gdrq", "scale_clip", "group", "hwgq", "dorefa") for b in range(1, 9)]
    return cases + [("lsq", b) for b in range(2, 9)]


@pytest.mark.parametrize("method, bits", _weight_cases())
def test_to_integer_codes_in_range_and_reproduce_forward(method: str, bits: int) -> None:
    w = torch.randn(8, 4, 3, 3) * 0.1
    w[0, 0, 0, 0] = 0.0  # sign(0) = +1 for binary weights
    q = WeightQuantizer(QuantConfig(method=method, weight_bits=bits, groups=2), 8)
    out = q(w)
    codes, step = q.to_integer(w)
    assert codes.dtype == torch.int32 and codes.shape == w.shape and step.shape == (8,)
    recon = codes * step[:, None, None, None]
    if bits == 1:
        assert set(codes.unique().tolist()) == {-1, 1}
        assert codes[0, 0, 0, 0] == 1
        if method == "hwgq":  # alpha per output filter
            exact(step, w.abs().reshape(8, -1).mean(dim=1))
    elif method == "dorefa":
        n = 2**bits - 1  # levels (2k - n) / n: odd/even codes in [-n, n]
        assert int(codes.min()) >= -n and int(codes.max()) <= n
        assert ((codes + n) % 2 == 0).all()
        exact(step, torch.full((8,), 1.0 / n))
    else:
        n = 2 ** (bits - 1) - 1
        assert int(codes.min()) >= -n and int(codes.max()) <= n
        if method != "lsq":  # LSQ's initial step leaves the top codes unused
            assert int(codes.abs().max()) == n  # the clip value is reached
    if method == "dorefa" and bits > 1:
        assert_close(recon, out, atol=1e-6, rtol=0)  # (2k - n)/n vs code * (1/n): an ulp apart
    else:
        exact(recon, out)


def test_lsq_weight_step_init_and_gradient() -> None:
    bits, groups = 3, 2
    n = 2 ** (bits - 1) - 1
    w = nn.Parameter(torch.randn(4, 6))
    q = WeightQuantizer(QuantConfig(method="lsq", weight_bits=bits, groups=groups), 4)
    out = q(w)
    init = 2 * w.detach().reshape(groups, -1).abs().mean(dim=1) / math.sqrt(n)
    exact(q.step.detach(), init)
    s = per_channel(init, 4)[:, None]
    v = w.detach() / s
    exact(out, torch.round(torch.clamp(v, -n, n)) * s)
    up = torch.randn(4, 6)
    (out * up).sum().backward()
    inside = (v > -n) & (v < n)
    d_s = torch.where(inside, -v + torch.round(v), torch.clamp(v, -n, n).round())
    g = 1 / math.sqrt(12 * n)  # N = 12 weights per group
    assert_close(q.step.grad, (d_s * up).reshape(groups, -1).sum(dim=1) * g, atol=1e-6, rtol=1e-5)
    assert_close(w.grad, up * inside, atol=1e-6, rtol=1e-6)  # (up / s) * s


def test_switches_are_buffers_and_reload() -> None:
    q = WeightQuantizer(QuantConfig(groups=2), 4)
    assert {"clip_on", "quant_on", "groups_on"} <= set(q.state_dict())
    q.set_switches(quant_on=False, groups_on=False)
    r = WeightQuantizer(QuantConfig(groups=2), 4)
    r.load_state_dict(q.state_dict())
    assert (r.is_on("clip_on"), r.is_on("quant_on"), r.is_on("groups_on")) == (True, False, False)
    assert r.n_groups == 1
    with pytest.raises(KeyError, match="no switch 'bogus'"):
        q.set_switches(bogus=True)


# --- activations -----------------------------------------------------------------------------


def test_activation_ema_initialised_updated_in_train_frozen_in_eval() -> None:
    q = ActQuantizer(QuantConfig(method="gdrq", act_bits=4, k_a=4.0, momentum=0.1))
    x0, x1, x2, x3 = (torch.randn(4, 3, 5, 5) for _ in range(4))
    q.eval()
    q(x0)  # eval before any training batch: nothing recorded
    assert not bool(q.initialized) and q.running_abs_mean.item() == 0.0
    q.train()
    q(x1)
    m1 = torch.relu(x1).double().mean().float()  # the batch mean, accumulated in float64
    assert bool(q.initialized)
    exact(q.running_abs_mean, m1.reshape(1))
    q(x2)
    m2 = 0.9 * m1 + 0.1 * torch.relu(x2).double().mean().float()
    assert_close(q.running_abs_mean, m2.reshape(1), atol=1e-7, rtol=1e-6)
    exact(q.threshold(), 4.0 * q.running_abs_mean)
    q.eval()
    before = q.running_abs_mean.clone()
    out = q(x3)
    exact(q.running_abs_mean, before)
    exact(out, P.fake_quant_unsigned(torch.relu(x3), 4.0 * before, 4))
    alpha = float(4.0 * before)
    assert float(out.max()) == pytest.approx(alpha) and len(out.unique()) <= 16


def test_activation_groups_keep_own_statistics() -> None:
    q = ActQuantizer(QuantConfig(method="gdrq", act_groups=2))
    x = torch.randn(2, 4, 3, 3)
    x[:, 2:] *= 10
    q.train()(x)
    y = torch.relu(x)
    assert_close(q.running_abs_mean, torch.stack([y[:, :2].mean(), y[:, 2:].mean()]), atol=0, rtol=1e-6)


def test_activation_clip_only_and_gradient() -> None:
    q = ActQuantizer(QuantConfig(method="scale_clip", k_a=2.0)).train()
    q.set_switches(quant_on=False)
    x = torch.tensor([[-1.0, 0.5, 1.0, 4.5]], requires_grad=True)
    out = q(x)  # first batch: m = mean(relu) = 1.5, T = 3
    exact(out, torch.tensor([[0.0, 0.5, 1.0, 3.0]]))
    out.sum().backward()
    exact(x.grad, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))


def test_relu6_threshold_never_above_six() -> None:
    q = ActQuantizer(QuantConfig(method="gdrq", k_a=4.0), upper=6.0).train()
    out = q(torch.randn(64) * 20)
    assert float(q.threshold()) == 6.0 and float(out.max()) <= 6.0


def test_pact_act_quantizer_alpha_gradient() -> None:
    q = ActQuantizer(QuantConfig(method="pact", act_bits=4, pact_alpha_init=2.0, pact_decay=0.01))
    x = torch.tensor([-1.0, 0.5, 2.0, 2.5, 7.0])
    q(x).sum().backward()
    assert_close(q.alpha.grad, torch.tensor([3.0 + 0.01 * 2.0]), atol=1e-7, rtol=0)


def test_hwgq_act_quantizer_uses_optimal_step_or_override() -> None:
    q = ActQuantizer(QuantConfig(method="hwgq", act_bits=2))
    assert q.hwgq_step == hwgq_m.hwgq_optimal_step(2)
    x = torch.randn(1000)
    exact(q(x), hwgq_m.hwgq_forward(x, q.hwgq_step, 2))
    q = ActQuantizer(QuantConfig(method="hwgq", act_bits=2, hwgq_step=0.5, hwgq_backward="relu"))
    exact(q(torch.tensor([0.01, 2.0])), torch.tensor([0.5, 1.5]))
    q.set_switches(quant_on=False)
    exact(q(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0]))
