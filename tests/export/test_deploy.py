"""``simulate_deploy``: the network in the form ``to_onnx`` writes, trainable, and what ONNX Runtime's
default session makes of its export; checkpoints (state dicts) before, in and from before the
deploy form; training in it.

Tolerances: ORT against ``model(x)`` differs by float rounding (the float layers: a first conv
reading the image, the classifier; measured <= 5e-7 of the largest logit) and, where a float
layer's output lands on a rounding tie of the activation grid after it, by one level there. Every
integer kernel writes the deploy form's codes (``test_deploy_kernels``).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gdrq_lightning import QuantConfig, quantize_model, set_quant_state
from gdrq_lightning.export import (
    clear_deploy, is_deployed, kernel_summary, optimized_op_counts, restore_deploy, run_onnxruntime, simulate_deploy,
    to_onnx,
)
from test_onnx import CASES as ONNX_CASES

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# test_onnx's method families (but G=1, the same code as G=4 here) and two forms of their own
CASES = {
    **{case: value for case, value in ONNX_CASES.items() if case != "gdrq_w4a4_g1"},
    "act_groups": (dict(method="gdrq", weight_bits=4, act_bits=4, groups=4, act_groups=2), 0),  # per-channel grids
    "quant_inputs": (dict(method="gdrq", weight_bits=4, act_bits=4, groups=4, quant_inputs=["features.0"]), 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_onnxruntime_runs_the_deploy_form_of_every_method(models, case, tmp_path) -> None:
    cfg, integer = CASES[case]
    model = simulate_deploy(copy.deepcopy(models.tiny(bias=True, **cfg)), [_randn(8, 3, 16, 16, seed=1)])
    x = _randn(32, 3, 16, 16, seed=2)
    path = to_onnx(model, x[:2], tmp_path / "d.onnx")
    assert kernel_summary(optimized_op_counts(path)) == {"integer": integer, "float": 4 - integer}
    with torch.no_grad():
        expected = model(x)
    got = run_onnxruntime(path, x)
    error = (got - expected).abs().amax(1) / expected.abs().amax(1)  # per image
    # float rounding only, except where the float first conv puts a value on a rounding tie of the
    # activation after it (measured: 1 image of 32, pact_w3a3); integer kernels: test_deploy_kernels
    assert float(error.median()) <= 1e-6 and (error <= 2e-6).float().mean() >= 0.9
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.95


class Block(nn.Module):
    """A residual block with a grouped conv (conv groups 2) and its own activation per call site."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(c, c, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(c), nn.ReLU()
        self.conv2, self.bn2, self.relu_out = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_out(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class SmallResNet(nn.Module):
    """Float stem (skipped) -> residual block -> strided conv -> pool -> linear with an input quantizer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.block = Block(8)
        self.down, self.bn_down, self.relu_down = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu_down(self.bn_down(self.down(self.block(self.relu(self.bn(self.stem(x)))))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def small(method: str = "gdrq", seed: int = 0) -> nn.Module:
    """A quantized :class:`SmallResNet` with random BatchNorm affine parameters and statistics (eval mode)."""
    torch.manual_seed(seed)
    cfg = QuantConfig(method=method, weight_bits=4, act_bits=4, groups=2, skip=["stem"], quant_inputs=["fc"])
    model = quantize_model(SmallResNet(), cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        model.train()(_randn(8, 3, 16, 16, seed=seed + 10))
    return model.eval()


def test_a_residual_net_with_grouped_convs_and_input_quantizers_runs_as_its_export(tmp_path) -> None:
    model = simulate_deploy(small(), [_randn(8, 3, 16, 16, seed=1)])
    modes = {n: m.deploy._mode for n, m in model.named_modules() if hasattr(m, "weight_quantizer")}
    # float stem is not quantized; DIRECT = 2 (the next activation's grid), OWN_GRID = 3 (an 8-bit grid: read by the add, the output)
    assert modes == {"block.conv1": 2, "block.conv2": 3, "down": 2, "fc": 3}
    assert isinstance(model.bn, nn.BatchNorm2d) and type(model.bn).__name__ == "FrozenBatchNorm2d"  # the stem's
    x = _randn(16, 3, 16, 16, seed=2)
    path = to_onnx(model, x[:1], tmp_path / "s.onnx")
    counts = optimized_op_counts(path)
    assert counts["QLinearConv"] == 3 and counts["QLinearAdd"] == 1
    with torch.no_grad():
        expected = model(x)
    assert relative(run_onnxruntime(path, x), expected) <= 1e-6
    # the grids are the model's: other calibration data changes nothing in the file
    again = to_onnx(model, x[:1], tmp_path / "t.onnx", calibration=[10 * x])
    assert torch.equal(run_onnxruntime(again, x), run_onnxruntime(path, x))


def test_a_deploy_form_state_dict_loads_strictly_into_a_fresh_network_and_restores_without_data(tmp_path) -> None:
    model = simulate_deploy(small(), [_randn(8, 3, 16, 16, seed=1)])
    state = copy.deepcopy(model.state_dict())
    fresh = small(seed=3)  # other weights and statistics, deploy state off
    assert not is_deployed(fresh) and set(fresh.state_dict()) == set(state)
    fresh.load_state_dict(state)  # strict
    x = _randn(4, 3, 16, 16, seed=4)
    with pytest.raises(RuntimeError, match="restore_deploy"):  # a folded BatchNorm is not linked yet
        fresh(x)
    assert simulate_deploy(fresh, None) is fresh  # = restore_deploy: nothing calibrated
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    path_a, path_b = to_onnx(model, x[:1], tmp_path / "a.onnx"), to_onnx(fresh, x[:1], tmp_path / "b.onnx")
    assert torch.equal(run_onnxruntime(path_a, x), run_onnxruntime(path_b, x))


def test_a_state_dict_from_before_the_deploy_form_loads_strictly_with_it_off() -> None:
    model = small()
    old = {k: v for k, v in model.state_dict().items() if ".deploy." not in k}  # what main wrote before
    assert len(old) < len(model.state_dict())
    fresh = small(seed=3)
    fresh.load_state_dict(old)  # strict
    x = _randn(4, 3, 16, 16, seed=4)
    with torch.no_grad():
        assert not is_deployed(fresh) and torch.equal(fresh(x), model(x))
    deployed = simulate_deploy(small(seed=3), [x])  # into a deploy-form network it switches the form off
    deployed.load_state_dict(old)
    assert not restore_deploy(deployed)
    with torch.no_grad():
        assert torch.equal(deployed(x), model(x))


def test_a_training_step_in_deploy_form_trains_weights_and_bn_affine_and_keeps_every_grid(tmp_path) -> None:
    model = simulate_deploy(small("lsq"), [_randn(8, 3, 16, 16, seed=1)]).train()
    grids = {k: v.clone() for k, v in model.state_dict().items() if ".deploy." in k or "running_" in k}
    act_steps = [m.act_quantizer.step for m in model.modules() if hasattr(m, "act_quantizer")]
    model(_randn(8, 3, 16, 16, seed=2)).square().mean().backward()
    for name in ("block.conv1.weight", "block.conv2.weight", "down.weight", "fc.weight",
                 "block.bn1.weight", "block.bn2.bias", "bn_down.weight",  # folded BatchNorms' affine
                 "block.conv1.weight_quantizer.step"):  # LSQ's learned weight steps: live in the deploy form
        grad = model.get_submodule(name.rpartition(".")[0]).get_parameter(name.rpartition(".")[2]).grad
        assert grad is not None and bool(grad.abs().sum() > 0), name
    assert all(s.grad is not None and not s.grad.any() for s in act_steps)  # fixed grids: attached at zero
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.SGD([p for n, p in model.named_parameters() if "act_quantizer" not in n], lr=0.05).step()
    assert not torch.equal(before["block.conv1.weight"], model.block.conv1.weight)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in grids.items())  # grids and BN statistics as they were
    x = _randn(8, 3, 16, 16, seed=3)
    with torch.no_grad():
        expected = model.eval()(x)
    assert relative(run_onnxruntime(to_onnx(model, x[:1], tmp_path / "t.onnx"), x), expected) <= 1e-6


def test_train_mode_keeps_every_batchnorm_frozen() -> None:
    model = simulate_deploy(small(), [_randn(8, 3, 16, 16, seed=1)])
    x = _randn(8, 3, 16, 16, seed=2)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    with torch.no_grad():
        evaluated = model.eval()(x)
        trained = model.train()(x)  # Lightning's model.train() each epoch
    assert torch.equal(trained, evaluated)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    clear_deploy(model)
    assert type(model.bn) is nn.BatchNorm2d and not is_deployed(model)
    model.train()(x)
    assert not torch.equal(stats["bn.running_mean"], model.bn.running_mean)  # the mutant: a BatchNorm in train mode


def test_the_deploy_form_runs_on_another_device_and_restores_there() -> None:
    model = simulate_deploy(small(), [_randn(8, 3, 16, 16, seed=1)])
    on_meta = copy.deepcopy(model).to("meta")
    y = on_meta.train()(torch.empty(2, 3, 16, 16, device="meta"))  # float64 accumulation: the non-CPU branch
    assert y.device.type == "meta" and y.shape == (2, 10)
    y.sum().backward()
    fresh = small(seed=3)
    fresh.load_state_dict(model.state_dict())
    fresh.to("meta")  # loaded, then moved: linked up again there
    assert restore_deploy(fresh) and fresh(torch.empty(1, 3, 16, 16, device="meta")).shape == (1, 10)


def test_a_bf16_model_trains_in_deploy_form_with_float32_arithmetic_inside() -> None:
    """Lightning's ``bf16-true``: the deploy layers compute in float32 and hand bf16 on; the state stays float32."""
    model = simulate_deploy(small(), [_randn(8, 3, 16, 16, seed=1)]).to(torch.bfloat16).train()
    y = model(_randn(4, 3, 16, 16, seed=2).to(torch.bfloat16))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y.float()).all())
    assert model.block.conv1.weight.grad is not None and model.block.conv2.deploy.out_scale.dtype == torch.float32


def test_the_float64_accumulation_other_devices_take_gives_the_same_codes(monkeypatch) -> None:
    """CUDA (cuDNN may pick inexact algorithms) and sums that can pass 2^24 accumulate in float64 and
    round; forced on the CPU, that path gives the float32 path's output bit for bit."""
    model = simulate_deploy(small(), [_randn(8, 3, 16, 16, seed=1)])
    x = _randn(8, 3, 16, 16, seed=2)
    with torch.no_grad():
        expected = model(x)
        monkeypatch.setattr("gdrq_lightning.quant.deploy.EXACT_FLOAT32", 0)
        assert torch.equal(model(x), expected)


def test_simulate_deploy_refuses_what_it_cannot_do_in_one_line(tmp_path) -> None:
    x = _randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"runtime='tensorrt' is not supported; supported runtimes: ort"):
        simulate_deploy(small(), [x], runtime="tensorrt")
    with pytest.raises(ValueError, match="batches is empty"):
        simulate_deploy(small(), [])
    with pytest.raises(ValueError, match="no deploy state to restore"):
        simulate_deploy(small(), None)
    off = small()
    set_quant_state(off, quant_acts=False)
    with pytest.raises(ValueError, match="layer 'relu': a quantizer is switched off"):
        simulate_deploy(off, [x])
    model = simulate_deploy(small(), [x])
    with pytest.raises(ValueError, match="in deploy form already"):
        simulate_deploy(model, [x])
    with pytest.raises(ValueError, match="weight_format='int4'"):
        to_onnx(model, x, tmp_path / "i.onnx", weight_format="int4")
