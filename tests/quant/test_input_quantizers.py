"""Input quantizers (``QuantConfig.quant_inputs``): a signed grid on a quantized layer's float
input, provided by each method (``MethodSpec.input``), switched with the activations, and what
makes an FPN-like neck export as integer kernels."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gdrq_lightning import QuantConfig, quantize_model, set_quant_state
from gdrq_lightning.quant import Method, named_quantizers
from gdrq_lightning.quant.inputs import InputQuantizer
from gdrq_lightning.quant.methods import method_spec


class Neck(nn.Module):
    """Two branches summed (no ReLU: the sum is signed), then a 3x3 conv: an FPN output block."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.lateral = nn.Conv2d(8, 8, 1)
        self.top = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.out(self.lateral(y) + self.top(y))


def _built(method: str = "gdrq", **cfg) -> Neck:
    torch.manual_seed(0)
    cfg = dict(method=method, weight_bits=1 if method == "hwgq" else 4, act_bits=4, skip=["a.0"], quant_inputs=["out"]) | cfg
    model = quantize_model(Neck(), QuantConfig(**cfg))
    model.train()(torch.randn(4, 3, 8, 8))
    return model.eval()


@pytest.mark.parametrize("method", [m.value for m in Method if m != Method.none])
def test_every_method_quantizes_signed_inputs_on_a_symmetric_grid(method):
    model = _built(method)
    q = model.out.input_quantizer
    assert isinstance(q, InputQuantizer) and q.is_on() and method_spec(Method(method)).input is not None
    grid = q.export_grid(None)
    assert (grid.qmin, grid.qmax) == (-7, 7) and grid.scale.dim() == 0  # 4 bits, signed: 2**3 - 1 levels a side
    x = torch.randn(2, 8, 8, 8) * 3
    with torch.no_grad():
        y = q(x)
    expected = grid.scale * torch.clamp(torch.round(x / grid.scale), -7, 7)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6 * float(grid.scale))
    torch.testing.assert_close(q(-x), -y)  # symmetric


def test_gradient_passes_inside_the_clip_only():
    q = _built("pact").out.input_quantizer
    alpha = float(q.magnitude.alpha.detach())
    x = torch.tensor([-2 * alpha, -0.5 * alpha, 0.3 * alpha, 2 * alpha], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert q.magnitude.alpha.grad is not None and float(q.magnitude.alpha.grad) != 0  # PACT learns the clip from both sides


def test_switches_follow_the_activation_phase_and_keys_are_stable():
    model = _built()
    keys = set(model.state_dict())
    assert {"out.input_quantizer.magnitude.quant_on", "out.input_quantizer.magnitude.running_abs_mean"} <= keys
    assert "out.input_quantizer.magnitude" in dict(named_quantizers(model))
    set_quant_state(model, quant_acts=False, scale_clip=False)
    x = torch.randn(2, 8, 8, 8)
    assert not model.out.input_quantizer.is_on()
    torch.testing.assert_close(model.out.input_quantizer(x), x)  # off: the input passes unchanged
    set_quant_state(model, quant_acts=True)
    assert model.out.input_quantizer.is_on() and set(model.state_dict()) == keys


def test_bad_patterns_and_bits_fail_naming_the_problem():
    with pytest.raises(ValueError, match=r"QuantConfig.quant_inputs pattern 'fpn\.\*' matches no conv/linear layer"):
        quantize_model(Neck(), QuantConfig(quant_inputs=["fpn.*"]))
    with pytest.raises(ValueError, match=r"layer 'out'.*act_bits=1 is too few for a signed input grid"):
        quantize_model(Neck(), QuantConfig(act_bits=1, skip=[], quant_inputs=["out"]))
    assert QuantConfig(quant_inputs="out").quant_inputs == ["out"]
    with pytest.raises(ValueError, match=r"QuantConfig.quant_inputs=5 must be a module-name pattern or a list of them"):
        QuantConfig(quant_inputs=5)


def test_a_neck_with_input_quantizers_exports_as_integer_kernels(tmp_path):
    pytest.importorskip("onnxruntime")
    from gdrq_lightning.export import kernel_summary, optimized_op_counts, run_onnxruntime, to_onnx
    from gdrq_lightning.export.build import build_qdq_model
    from gdrq_lightning.export.fold import fold_groups_into_bn

    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    counts = {}
    for inputs in ([], ["out"]):
        model = _built(quant_inputs=inputs)
        path = to_onnx(model, x[:1], tmp_path / f"neck{len(inputs)}.onnx", calibration=[x])
        counts[len(inputs)] = kernel_summary(optimized_op_counts(path))
        form = build_qdq_model(fold_groups_into_bn(copy.deepcopy(model).double()), x[:1].double(),
                               dtype=torch.float64, calibration=[x.double()])
        with torch.no_grad():
            ref, expected = model.double()(x.double()), form(x.double())
        got = run_onnxruntime(path, x).double()
        assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-2  # ORT runs the export form
        # against the fake-quant model: the branches' 8-bit output grids (step ~1/6 of the 4-bit input
        # grid's here) move sums across an input level, each flip moving some outputs by a level's worth
        assert float((got - ref).abs().median() / ref.abs().max()) <= 1e-2
    # lateral + top read the quantized ReLU; `out` reads their float sum: integer only with its input quantizer
    assert counts == {0: {"integer": 2, "float": 2}, 1: {"integer": 3, "float": 1}}


def test_tasks_name_their_necks():
    from gdrq_lightning.task import resolve_config
    from tasks.classification import ClassificationModule
    from tasks.detection import DetectionModule
    from tasks.segmentation import SegmentationModule

    det = DetectionModule(arch="fasterrcnn_resnet18_fpn", num_classes=3, min_size=32, max_size=32,
                          anchor_sizes=[8, 16, 32, 64, 128], fpn_channels=16, representation_size=16)
    assert resolve_config(QuantConfig(), det).quant_inputs == ["backbone.fpn.layer_blocks", "rpn.head.conv", "roi_heads.box_head.fc6"]
    assert resolve_config(QuantConfig(quant_inputs=[]), det).quant_inputs == []  # explicit wins
    psp = SegmentationModule(arch="pspnet_resnet18", num_classes=3)
    quantize_model(psp.model, resolve_config(QuantConfig(), psp))
    with_inputs = sorted(n for n, m in psp.model.named_modules() if getattr(m, "input_quantizer", None) is not None)
    assert with_inputs == ["classifier.conv"] + [f"classifier.ppm.stages.{i}.1" for i in range(4)]
    assert resolve_config(QuantConfig(), SegmentationModule(arch="fcn_resnet18", num_classes=3)).quant_inputs == []
    assert resolve_config(QuantConfig(), ClassificationModule("resnet18", num_classes=4)).quant_inputs is None
