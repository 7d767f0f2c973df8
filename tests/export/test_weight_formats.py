"""The two ONNX weight formats: int8 containers (integer kernels) and INT4 (the smallest file).

Sizes are for torchvision's ResNet-18 with 1000 classes, W4A4, the stem conv and the classifier
in float as the default ``skip`` leaves them; the FP32 file is the same network exported as is.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision

from gdrq_lightning import QuantConfig, quantize_model
from gdrq_lightning.export import kernel_summary, optimized_op_counts, run_onnxruntime, to_onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def resnet18_1000():
    torch.manual_seed(0)
    model = quantize_model(torchvision.models.resnet18(num_classes=1000), QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=4))
    model.train()(torch.randn(4, 3, 64, 64))
    return model.eval()


@pytest.fixture(scope="module")
def fp32_bytes(resnet18_1000, tmp_path_factory) -> int:
    from gdrq_lightning.quant import dequantize_model

    path = tmp_path_factory.mktemp("fp32") / "fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(dequantize_model(copy.deepcopy(resnet18_1000)), (torch.zeros(1, 3, 32, 32),), str(path),
                          dynamo=False, opset_version=17)
    return path.stat().st_size


@pytest.mark.parametrize(("weight_format", "smaller"), [("int8", 3.5), ("int4", 6.0)])
def test_file_sizes_against_fp32(resnet18_1000, fp32_bytes, weight_format, smaller, tmp_path, capsys):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    path = to_onnx(resnet18_1000, x[:1], tmp_path / "m.onnx", weight_format=weight_format, calibration=[x])
    ratio = fp32_bytes / path.stat().st_size
    with capsys.disabled():
        print(f"\nResNet-18 W4A4 {weight_format}: {path.stat().st_size} B vs FP32 {fp32_bytes} B: {ratio:.2f}x smaller")
    assert ratio >= smaller


def test_int4_file_holds_int4_codes_and_runs_exactly_in_the_default_session(models, tmp_path):
    model = models.resnet18(method="gdrq", weight_bits=4, act_bits=4, groups=4)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    path = to_onnx(model, x[:1], tmp_path / "m4.onnx", weight_format="int4", calibration=[x])
    proto = onnx.load(str(path))
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) == 21
    int4 = [i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len([n for n in int4 if n.endswith(".codes")]) == 19  # every quantized conv
    onnx.checker.check_model(proto, full_check=True)
    counts = optimized_op_counts(path)
    assert kernel_summary(counts)["integer"] == 0  # ORT runs INT4 weights in float ...
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    got = run_onnxruntime(path, x)
    # ... and exactly: no int32 bias, no 8-bit output grids; float32 rounding flips a rare level
    assert float((got.double() - ref).abs().max() / ref.abs().max()) <= 1e-2
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_8bit_layers_stay_int8_in_the_int4_format(models, tmp_path):
    model = models.tiny(method="gdrq", weight_bits=4, act_bits=4, overrides={"features.3": {"weight_bits": 8}})
    path = to_onnx(model, torch.zeros(1, 3, 16, 16), tmp_path / "mixed.onnx", weight_format="int4")
    kinds = {i.name: i.data_type for i in onnx.load(str(path)).graph.initializer if i.name.endswith(".codes")}
    assert kinds == {"features.0.codes": onnx.TensorProto.INT4, "features.3.codes": onnx.TensorProto.INT8,
                     "features.6.codes": onnx.TensorProto.INT4}  # (fc: a float weight, see QDQWeightLayer.keep_float)


def test_unknown_weight_format_is_refused(models, tmp_path):
    with pytest.raises(ValueError, match=r"weight_format='int2' is not one of: int8, int4"):
        to_onnx(models.tiny(method="gdrq"), torch.zeros(1, 3, 16, 16), tmp_path / "x.onnx", weight_format="int2")
