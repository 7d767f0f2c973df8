"""``measure_sensitivity``: each method against a plain reference computation, which layers count,
MACs, restored state, swapped networks; ``apply_plan``, ``with_plan``, ``plan_weights``, ``plan_bits``."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from gdrq_lightning import QuantConfig, quantize_model, quantized_layers, set_quant_state
from gdrq_lightning.mixed import (
    DEFAULT_METHOD, allocate, apply_plan, measure_sensitivity, plan_bits, plan_weights, task_loss, with_plan,
)
from gdrq_lightning.mixed.sensitivity import seeded, split_batch
from gdrq_lightning.quant import WeightQuantizer


class Net(nn.Module):
    """stem conv -> conv-bn-relu -> conv-bn-relu (+ dropout) -> pool -> fc; 8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Dropout(0.2))
        self.mid = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.mid(self.body(torch.relu(self.stem(x))).mean((2, 3)))))


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture
def setup():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # trained-looking BN statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen)) for _ in range(3)]
    return net, QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=2), batches


LAYERS = ["body.0", "body.3", "mid"]  # default skip: the first conv (stem) and the last linear (fc)


def quantized_weight(net: nn.Module, config: QuantConfig, name: str, bits: int) -> torch.Tensor:
    """The reference: ``quantize_model``'s own quantizer at ``bits``, everything on."""
    q = quantize_model(copy.deepcopy(net), dataclass_replace(config, weight_bits=bits))
    layer = q.get_submodule(name)
    with torch.no_grad():
        return layer.weight_quantizer(layer.weight)


def weight_error(net: nn.Module, config: QuantConfig, name: str, bits: int) -> torch.Tensor:
    """The scored error: ``Q_b(W)`` minus Scale-Clip's clip ``clamp(W, ±k_w·mean|W_g|)`` for a
    numeric ``k_w`` (the same at every width), minus ``W`` itself with ``k_w: auto``."""
    w = net.get_submodule(name).weight.detach()
    if config.k_w == "auto":
        return quantized_weight(net, config, name, bits) - w
    t = config.k_w * w.reshape(config.groups, -1).abs().mean(1)
    t = t.repeat_interleave(w.shape[0] // config.groups).reshape(-1, *[1] * (w.dim() - 1))
    return quantized_weight(net, config, name, bits) - torch.maximum(torch.minimum(w, t), -t)


def dataclass_replace(config: QuantConfig, **kw) -> QuantConfig:
    import dataclasses

    return dataclasses.replace(config, **kw)


@pytest.mark.parametrize("k_w", [2.0, "auto"])
def test_mse_is_the_relative_error_of_the_methods_own_quantizer(setup, k_w) -> None:
    net, config, batches = setup
    config = dataclass_replace(config, k_w=k_w)
    report = measure_sensitivity(net, config, batches, loss_fn, bits=(2, 4), method="mse")
    assert report.layers == LAYERS and report.bits == (2, 4) and report.method == "mse"
    for name in LAYERS:
        w = net.get_submodule(name).weight.detach().double()
        for b in (2, 4):
            err = weight_error(net, config, name, b).double()
            assert report.scores[name][b] == pytest.approx(float(err.pow(2).sum() / w.pow(2).sum()), rel=1e-6)
    assert report.params == {"body.0": 576, "body.3": 1152, "mid": 256}


def test_macs_per_image_from_forward_hooks(setup) -> None:
    net, config, batches = setup
    report = measure_sensitivity(net, config, batches[:1], loss_fn, bits=(4,), method="mse")
    # body.0: 8x8 output, 8 channels, 8*3*3 MACs each; body.3: 4x4 output, 16 channels, 72 each; mid: 16x16
    assert report.macs == {"body.0": 8 * 8 * 8 * 72, "body.3": 4 * 4 * 16 * 72, "mid": 256}
    assert report.act_bits == dict.fromkeys(LAYERS, 4)


def _reference_fisher(net, config, batches, bits):
    """Mean over 8-sample pieces of ``(g · ΔW)²``, BN in eval mode, dropout with the per-piece seed."""
    out = {n: {b: 0.0 for b in bits} for n in LAYERS}
    net.train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    batches = [(x[i:i + 8], y[i:i + 8]) for x, y in batches for i in range(0, len(y), 8)]
    for i, batch in enumerate(batches):
        with seeded(i):
            loss = loss_fn(net, batch)
        grads = torch.autograd.grad(loss, [net.get_submodule(n).weight for n in LAYERS])
        for n, g in zip(LAYERS, grads):
            for b in bits:
                err = weight_error(net, config, n, b)
                out[n][b] += float((g.double() * err.double()).sum()) ** 2 / len(batches)
    return out


@pytest.mark.parametrize("size", [6, 20])  # whole batches; batches split into 8 + 8 + 4 samples
def test_default_method_is_fisher_and_matches_the_reference(setup, size: int) -> None:
    net, config, _ = setup
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(size, 3, 8, 8, generator=gen), torch.randint(0, 4, (size,), generator=gen)) for _ in range(2)]
    assert DEFAULT_METHOD == "fisher"
    report = measure_sensitivity(net, config, batches, loss_fn, bits=(2, 3))
    assert report.method == "fisher" and report.batches == 2
    reference = _reference_fisher(copy.deepcopy(net), config, batches, (2, 3))
    for n in LAYERS:
        for b in (2, 3):
            assert report.scores[n][b] == pytest.approx(reference[n][b], rel=1e-9)


def test_measured_is_the_loss_increase_of_one_layer_at_a_time(setup) -> None:
    net, config, batches = setup
    report = measure_sensitivity(net, config, batches, loss_fn, bits=(2,), method="measured")
    ref = copy.deepcopy(net).train()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()

    def mean_loss(model):
        total = 0.0
        for i, batch in enumerate(batches):
            with seeded(i), torch.no_grad():
                total += float(loss_fn(model, batch))
        return total / len(batches)

    base = mean_loss(ref)
    for n in LAYERS:
        model = copy.deepcopy(ref)
        with torch.no_grad():
            model.get_submodule(n).weight.add_(weight_error(net, config, n, 2))
        assert report.scores[n][2] == pytest.approx(mean_loss(model) - base, abs=1e-6)


def test_state_is_restored_and_batches_may_be_a_generator(setup) -> None:
    net, config, batches = setup
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for method in ("fisher", "measured"):
        measure_sensitivity(net, config, (b for b in batches), loss_fn, bits=(2,), method=method)
    assert not net.training and all(not m.training for m in net.modules())
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(p.grad is None for p in net.parameters())


def test_skip_overrides_and_errors(setup) -> None:
    net, config, batches = setup
    every = dataclass_replace(config, skip=[])
    assert measure_sensitivity(net, every, batches[:1], loss_fn, bits=(4,), method="mse").layers == ["stem", *LAYERS, "fc"]
    some = dataclass_replace(config, skip=["stem", "fc"], overrides={"mid": {"method": "none"}})
    assert measure_sensitivity(net, some, batches[:1], loss_fn, bits=(4,), method="mse").layers == ["body.0", "body.3"]
    with pytest.raises(ValueError, match="not one of: fisher"):
        measure_sensitivity(net, config, batches, loss_fn, method="hessian")
    with pytest.raises(ValueError, match="integer weight bit widths in 1..8"):
        measure_sensitivity(net, config, batches, loss_fn, bits=(2, 9))
    with pytest.raises(ValueError, match="at least one batch"):
        measure_sensitivity(net, config, [], loss_fn)
    with pytest.raises(ValueError, match="method='none'"):
        measure_sensitivity(net, QuantConfig(method="none"), batches, loss_fn)
    lsq = QuantConfig(method="lsq")
    with pytest.raises(ValueError, match="layer 'body.0'.*weight_bits=1 is invalid for method 'lsq'"):
        measure_sensitivity(net, lsq, batches, loss_fn, bits=(1, 2), method="mse")


def test_swapped_network_scores_as_float_and_keeps_its_switches(setup) -> None:
    net, config, batches = setup
    float_report = measure_sensitivity(net, config, batches, loss_fn, bits=(2, 4))
    swapped = quantize_model(copy.deepcopy(net), config)
    set_quant_state(swapped, quant_acts=False)
    switches = {n: dict(q._on) for n, q in swapped.named_modules() if hasattr(q, "_on")}
    stats = {k: v.clone() for k, v in swapped.state_dict().items()}
    report = measure_sensitivity(swapped, config, batches, loss_fn, bits=(2, 4))
    assert report.layers == float_report.layers
    for n in LAYERS:
        for b in (2, 4):
            assert report.scores[n][b] == pytest.approx(float_report.scores[n][b], rel=1e-9)
    assert switches == {n: dict(q._on) for n, q in swapped.named_modules() if hasattr(q, "_on")}
    for k, v in swapped.state_dict().items():
        torch.testing.assert_close(v, stats[k], rtol=0, atol=0)


def test_split_batch_keeps_fields_together() -> None:
    x, y = torch.arange(10).reshape(5, 2), torch.arange(5)
    parts = split_batch((x, y), 2)
    assert [p[1].tolist() for p in parts] == [[0, 1], [2, 3], [4]] and isinstance(parts[0], tuple)
    images, targets = (torch.zeros(1), torch.ones(1), torch.ones(2)), ({"a": 0}, {"a": 1}, {"a": 2})
    parts = split_batch((images, targets), 1)
    assert len(parts) == 3 and parts[2][1] == ({"a": 2},)
    assert len(split_batch((x, torch.arange(3)), 2)) == 1  # fields of different lengths: whole
    assert split_batch({"x": x}, 4)[1]["x"].shape == (1, 2)
    assert len(split_batch("text", 1)) == 1


# -- plans on networks ------------------------------------------------------------------------
def _plan(net, config, batches):
    report = measure_sensitivity(net, config, batches, loss_fn, bits=(2, 4, 8))
    return allocate(report, avg_weight_bits=4.0, ties="none", pin={"mid": 8})


def test_with_plan_and_apply_plan_give_the_same_network(setup) -> None:
    net, config, batches = setup
    plan = _plan(net, config, batches)
    assert len(set(plan.weight_bits.values())) > 1
    built = quantize_model(copy.deepcopy(net), with_plan(config, plan)).eval()
    swapped = quantize_model(copy.deepcopy(net), config).eval()
    keys = list(swapped.state_dict())
    assert apply_plan(swapped, plan) == sum(b != 4 for b in plan.weight_bits.values())
    assert list(swapped.state_dict()) == keys
    assert {n: m.weight_quantizer.bits for n, m in quantized_layers(built) if hasattr(m, "weight_quantizer")} == plan.weight_bits
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), built(x), rtol=0, atol=0)
    assert with_plan(dataclass_replace(config, overrides={"mid": {"weight_bits": 8, "groups": 1}}), plan).overrides["mid"] == {
        "weight_bits": plan.weight_bits["mid"], "groups": 1}


def test_apply_plan_recalibrates_what_depends_on_bits() -> None:
    torch.manual_seed(0)
    net = quantize_model(Net(), QuantConfig(method="gdrq", k_w="auto", weight_bits=4, skip=[]))
    net(torch.randn(2, 3, 8, 8))  # calibrates k_w at 4 bits
    layer = net.get_submodule("body.0")
    fresh = WeightQuantizer(QuantConfig(method="gdrq", k_w="auto", weight_bits=2), 8, "x")
    fresh.calibrate(layer.weight)
    plan_bits_ = {"body.0": 2}
    from gdrq_lightning.mixed import BitPlan

    plan = BitPlan(weight_bits=plan_bits_, params={"body.0": 1}, macs={"body.0": 1}, act_bits={"body.0": 4})
    k4 = float(layer.weight_quantizer.k)
    apply_plan(net, plan, reinit=False)
    assert float(layer.weight_quantizer.k) == k4 and layer.weight_quantizer.bits == 2
    layer.weight_quantizer.bits = 4
    apply_plan(net, plan)
    assert float(layer.weight_quantizer.k) == float(fresh.k) != k4
    lsq = quantize_model(Net(), QuantConfig(method="lsq", skip=[]))
    lsq(torch.randn(2, 3, 8, 8))
    apply_plan(lsq, plan)
    q = lsq.get_submodule("body.0").weight_quantizer
    assert not bool(q.initialized)
    lsq(torch.randn(2, 3, 8, 8))
    w = lsq.get_submodule("body.0").weight.detach()
    expected = torch.stack([2 * g.abs().mean() / 1.0 for g in w.reshape(q.quant_groups, -1)])  # 2 bits: Q_p = 1
    torch.testing.assert_close(q.step.detach(), expected)
    with pytest.raises(ValueError, match="'body.0'.*lsq"):
        apply_plan(lsq, BitPlan(weight_bits={"body.0": 1}, params={"body.0": 1}, macs={"body.0": 1}, act_bits={"body.0": 4}))
    with pytest.raises(ValueError, match="'nope' is not in the network"):
        apply_plan(lsq, BitPlan(weight_bits={"nope": 2}, params={"nope": 1}, macs={"nope": 1}, act_bits={"nope": 4}))


def test_plan_weights_fake_quantizes_and_restores(setup) -> None:
    net, config, batches = setup
    plan = _plan(net, config, batches)
    before = {n: p.clone() for n, p in net.named_parameters()}
    with plan_weights(net, config, plan):
        for n, b in plan.weight_bits.items():
            torch.testing.assert_close(net.get_submodule(n).weight.detach(), quantized_weight_from(before, net, config, n, b),
                                       rtol=0, atol=0)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)


def quantized_weight_from(before, net, config, name, bits):
    model = copy.deepcopy(net)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    return quantized_weight(model, config, name, bits)


def test_plan_bits_on_a_swapped_network_equals_the_float_plan(setup) -> None:
    net, config, batches = setup
    expected = allocate(measure_sensitivity(net, config, batches, loss_fn), avg_weight_bits=3.0, pin={"mid": 8})
    swapped = quantize_model(copy.deepcopy(net), config)
    plan = plan_bits(swapped, config, batches, loss_fn, {"avg_weight_bits": 3.0}, pin={"mid": 8})
    assert plan.weight_bits == expected.weight_bits and plan.weight_bits["mid"] == 8
    assert plan.avg_weight_bits <= 3.0


def test_task_loss_runs_the_training_step_detached_from_its_trainer(setup, recwarn) -> None:
    import pytorch_lightning as pl

    net, config, batches = setup

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.seen = "never called"

        def training_step(self, batch, batch_idx):
            self.seen = self._trainer
            loss = loss_fn(self.net, batch)
            self.log("train/loss", loss)  # a no-op without a trainer
            return {"loss": loss}

    module = Module().eval()  # no dropout: the two losses compare exactly
    sentinel = object()
    module._trainer = sentinel
    loss = task_loss(module)(net, batches[0])
    assert module.seen is None and module._trainer is sentinel
    torch.testing.assert_close(loss, loss_fn(net, batches[0]))
    assert not [w for w in recwarn if "self.log" in str(w.message)]


@pytest.mark.parametrize("method", ["lsq", "gdrq"])
def test_a_resumed_network_gets_the_plan_back_from_plain_values(setup, method: str) -> None:
    """What a resumed run does: rebuild the network from the config (no plan), load the weights and
    quantizer state strictly, read the plan from checkpoint values, apply it without re-initialising."""
    import io

    net, _, batches = setup
    config = QuantConfig(method=method, weight_bits=4, act_bits=4, k_w="auto")
    plan = _plan(net, config, batches)
    trained = quantize_model(copy.deepcopy(net), config)
    apply_plan(trained, plan)
    trained.train()(batches[0][0])  # LSQ steps and auto factors settle at the planned widths
    with torch.no_grad():  # training moves the learned steps and the weights after that
        for name, p in trained.named_parameters():
            p.mul_(1.1) if name.endswith("step") else p.add_(0.05 * torch.randn_like(p))
    buf = io.BytesIO()
    torch.save({"state_dict": trained.state_dict(), "plan": plan.to_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = quantize_model(copy.deepcopy(net), config)
    resumed.load_state_dict(ckpt["state_dict"])  # strict: the plan changed no key
    from gdrq_lightning.mixed import BitPlan

    apply_plan(resumed, BitPlan.from_dict(ckpt["plan"]), reinit=False)
    x = batches[1][0]
    with torch.no_grad():
        torch.testing.assert_close(resumed.eval()(x), trained.eval()(x), rtol=0, atol=0)
