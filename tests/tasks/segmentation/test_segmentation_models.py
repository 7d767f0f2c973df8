"""FCN / PSPNet builders: output shapes, registry errors, quantization of the right layers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gdrq_lightning import QuantConfig, quantize_model, quantized_layers, set_quant_state
from tasks.segmentation.models import MODELS, PSPNet, build_model, quant_skip
from tasks.segmentation.models.backbone import dilated_resnet


@pytest.mark.parametrize(("arch", "size"), [("pspnet_resnet18", (65, 47)), ("pspnet_resnet18", (17, 23)),
                                             ("fcn_resnet18", (33, 31))])
def test_output_matches_odd_input_size(arch: str, size: tuple[int, int]) -> None:
    model = build_model(arch, num_classes=5)
    x = torch.randn(2, 3, *size)
    out = model.train()(x)
    assert out["out"].shape == (2, 5, *size) and out["aux"].shape == (2, 5, *size)
    model.eval()
    with torch.no_grad():
        assert model(x)["out"].shape == (2, 5, *size)


def test_pspnet_trains_with_batch_of_one() -> None:
    """The 1x1 bin has no BN, so a batch of one works in training mode."""
    model = build_model("pspnet_resnet18", num_classes=3).train()
    out = model(torch.randn(1, 3, 41, 41))
    assert out["out"].shape == (1, 3, 41, 41)
    bins = model.classifier.ppm.stages
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bins[0])
    assert all(any(isinstance(m, nn.BatchNorm2d) for m in stage) for stage in bins[1:])


def test_pspnet_eval_skips_aux_and_structure() -> None:
    model = build_model("pspnet_resnet18", num_classes=4).eval()
    assert isinstance(model, PSPNet)
    with torch.no_grad():
        assert set(model(torch.randn(1, 3, 32, 32))) == {"out"}
    assert [m.output_size for m in (s[0] for s in model.classifier.ppm.stages)] == [1, 2, 3, 6]
    # no functional ReLUs left for the quantizer to miss: every ReLU is a module
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) >= 10


def test_dilated_resnet18_has_output_stride_8() -> None:
    backbone, c3, c4 = dilated_resnet("resnet18")
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert feats["out"].shape == (1, c4, 8, 8) and feats["aux"].shape == (1, c3, 8, 8)


def test_unknown_arch_lists_known_names() -> None:
    with pytest.raises(ValueError, match="deeplab.*fcn_resnet18.*pspnet_resnet50"):
        build_model("deeplab", num_classes=3)


@pytest.mark.parametrize("arch", list(MODELS))
def test_quant_skip_patterns_name_real_layers(arch: str) -> None:
    model = build_model(arch, num_classes=3)
    convs = {n for n, m in model.named_modules() if type(m) is nn.Conv2d}
    skip = quant_skip(arch)
    assert len(skip) == 3 and set(skip) <= convs
    assert skip[0] == "backbone.conv1"
    for name in skip[1:]:
        assert model.get_submodule(name).kernel_size == (1, 1) and model.get_submodule(name).out_channels == 3


def test_quantized_layers_are_active() -> None:
    model = build_model("pspnet_resnet18", num_classes=4)
    skip = quant_skip("pspnet_resnet18")
    quantize_model(model, QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=4, skip=skip))
    names = {n for n, _ in quantized_layers(model)}
    assert "backbone.layer1.0.conv1" in names and "classifier.conv" in names and "classifier.ppm.stages.0.1" in names
    assert not names & set(skip)
    model.train()
    x = torch.randn(2, 3, 24, 24)
    model(x)  # initialise the activation statistics
    model.eval()
    with torch.no_grad():
        quant = model(x)["out"]
        set_quant_state(model, scale_clip=False, quant_weights=False, quant_acts=False, groups=False)
        full = model(x)["out"]
        set_quant_state(model, scale_clip=True, quant_weights=True, quant_acts=True, groups=True)
        again = model(x)["out"]
    assert not torch.allclose(quant, full, atol=1e-3)
    torch.testing.assert_close(again, quant, atol=0, rtol=0)
