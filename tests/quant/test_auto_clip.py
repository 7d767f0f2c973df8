"""``k_w`` / ``k_a: auto``: the calibrated Scale-Clip factor is (near) the least-MSE one."""
from __future__ import annotations

import pytest
import torch

from gdrq_lightning import QuantConfig, quantize_model
from gdrq_lightning.quant import ActQuantizer, WeightQuantizer
from gdrq_lightning.quant import primitives as P


def fine_grid_best(mse, lo: float, hi: float, points: int = 600) -> tuple[float, float]:
    """The least MSE on a fine linear grid of k, and the k that reaches it."""
    ks = torch.linspace(lo, hi, points).tolist()
    errors = [mse(k) for k in ks]
    i = min(range(points), key=errors.__getitem__)
    return errors[i], ks[i]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_auto_weight_k_is_within_5_percent_of_the_best_mse(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 32, 3, 3, generator=g) * 0.05  # a 4-bit conv with Gaussian weights
    q = WeightQuantizer(QuantConfig(method="gdrq", weight_bits=bits, groups=4, k_w="auto"), 64)
    q(w)  # the first forward with weights in use calibrates k
    assert bool(q.k_calibrated)

    def mse(k: float) -> float:
        return float((P.scale_clip_fake_quant(w, 4, k, bits) - w).pow(2).mean())

    best, best_k = fine_grid_best(mse, 0.5, 8.0)
    assert mse(float(q.k)) <= 1.05 * best, (float(q.k), best_k)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_auto_activation_k_is_within_5_percent_of_the_best_mse(bits: int) -> None:
    g = torch.Generator().manual_seed(10 + bits)
    x = torch.randn(32, 16, 16, 16, generator=g)  # 4-bit ReLU(N(0, 1)) activations
    q = ActQuantizer(QuantConfig(method="gdrq", act_bits=bits)).train()  # k_a: auto is the default
    q(x)
    a = torch.relu(x)

    def mse(k: float) -> float:
        return float((P.fake_quant_unsigned(a, k * a.mean(), bits) - a).pow(2).mean())

    best, best_k = fine_grid_best(mse, 1.0, 20.0)
    assert mse(float(q.k)) <= 1.05 * best, (float(q.k), best_k)
    if bits == 4:
        assert 6.5 < float(q.k) < 8.0  # ~7.3 for 4-bit ReLU(N(0, 1))


def test_numeric_k_is_used_as_is_and_auto_k_is_a_checkpointed_buffer() -> None:
    fixed = ActQuantizer(QuantConfig(method="gdrq", k_a=4.0)).train()
    fixed(torch.randn(4, 8, 5, 5))
    assert float(fixed.k) == 4.0 and not fixed.k_auto
    auto = ActQuantizer(QuantConfig(method="gdrq")).train()
    auto(torch.randn(4, 8, 5, 5))
    state = auto.state_dict()
    assert {"k", "k_calibrated"} <= set(state) and bool(state["k_calibrated"])
    fresh = ActQuantizer(QuantConfig(method="gdrq")).train()
    fresh.load_state_dict(state)
    k = float(fresh.k)
    fresh(torch.randn(4, 8, 5, 5) * 10)  # restored: no new calibration
    assert float(fresh.k) == k == float(auto.k)


def test_explicit_calibration_sums_batches_and_eval_batches_count() -> None:
    q = ActQuantizer(QuantConfig(method="gdrq", act_bits=4)).eval()
    assert q.begin_calibration()
    batches = [torch.randn(8, 4, 6, 6) for _ in range(3)]
    for x in batches:
        q(x)
    errors = q.calibration_errors()
    expected = sum(q._k_errors(torch.relu(x)) for x in batches)
    torch.testing.assert_close(errors, expected)
    q.finish_calibration(errors)
    assert q.calibration_errors() is None and bool(q.k_calibrated)
    assert not ActQuantizer(QuantConfig(method="gdrq", k_a=4.0)).begin_calibration()  # numeric: nothing to do


def test_group_method_auto_clips_a_share_of_the_maximum() -> None:
    w = torch.randn(16, 8, 3, 3)
    q = WeightQuantizer(QuantConfig(method="group", weight_bits=2, groups=2, k_w="auto"), 16)
    out = q(w)
    assert 0.05 < float(q.k) < 1.0  # a 2-bit grid at the maximum wastes most levels
    assert float(out.abs().max()) <= float(q.k) * float(w.abs().max()) + 1e-6
    numeric = WeightQuantizer(QuantConfig(method="group", weight_bits=2, groups=2, k_w=3.0), 16)
    assert float(numeric.k) == 1.0  # group's clip is the maximum; a numeric k_w is Scale-Clip's


def test_relu6_auto_k_respects_the_cap() -> None:
    q = ActQuantizer(QuantConfig(method="gdrq", act_bits=4), upper=6.0).train()
    out = q(torch.randn(64, 8) * 20)
    assert float(q.threshold()) <= 6.0 and float(out.max()) <= 6.0


def test_quantize_model_auto_defaults_train_and_report_k() -> None:
    import torchvision

    model = quantize_model(torchvision.models.resnet18(num_classes=10), QuantConfig(method="gdrq", k_w="auto"))
    model.train()(torch.randn(4, 3, 32, 32)).sum().backward()
    ks = {n: float(m.k) for n, m in model.named_modules() if hasattr(m, "k_calibrated")}
    assert len(ks) == 36 and all(0.5 <= k <= 64 for k in ks.values())
    assert len(set(ks.values())) > 10  # per layer


def test_model_level_calibration_sets_every_auto_factor() -> None:
    import torchvision

    from gdrq_lightning.quant import calibrate_weights, calibrating_activations

    model = quantize_model(torchvision.models.resnet18(num_classes=10), QuantConfig(method="gdrq", k_w="auto")).eval()
    assert calibrate_weights(model) == 19
    with torch.no_grad(), calibrating_activations(model) as n:
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32))
    assert n == 17
    acts = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    assert all(bool(q.k_calibrated) and q.calibration_errors() is None for q in acts)
    assert not any(bool(q.initialized) for q in acts)  # eval passes leave the EMA statistics alone


def test_scale_clip_k_never_scales_the_maximum_when_scale_clip_is_off() -> None:
    """A schedule without the ``scale_clip`` phase quantizes gdrq weights on ``max|W_g|``: their ``k``
    multiplies ``mean|W_g|`` (k of 2-3 on a maximum would leave most levels unused)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, 3, 3, generator=g)
    q = WeightQuantizer(QuantConfig(method="gdrq", weight_bits=4, k_w="auto"), 8)
    q.set_switches(clip_on=False)
    out = q(w)
    assert bool(q.k_calibrated) and float(q.k) > 1.5
    torch.testing.assert_close(out, P.fake_quant_signed(w, P.group_abs_max(w, 1), 4, axis=0), rtol=0, atol=0)
    assert out.unique().numel() >= 12  # most levels of the 4-bit grid in use (5 of 15 with k * max)
