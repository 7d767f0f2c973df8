"""ONNX export in ONNX Runtime's *default* session: integer kernels, per method family, and how
close to the PyTorch fake-quant model they come.

What is compared, and why these tolerances:

* ORT (default session) vs the export form in float64: the same integer math (int8 codes,
  int32 bias, the same output grids), so they differ only where ORT's float32 requantization
  and PyTorch's float64 round a value that sits within float rounding of a level boundary
  apart; such a flip moves one activation by one level and everything after it a little. The
  bound (1e-2 of the output scale, measured <= 8e-3 on these nets) is what one flip can do;
  a wrong bias lattice, scale or zero point moves outputs by whole levels (tens of per cent).
* Export form vs fake-quant, both float64, layer by layer (teacher-forced): the int32 bias is
  rounded to its lattice ``s_x · s_w`` and a float output made integer to its 8-bit grid, so
  each layer differs by at most half a lattice step plus half an output step.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from gdrq_lightning import QuantConfig, quantize_model
from gdrq_lightning.export import export_model, kernel_summary, optimized_op_counts, run_onnxruntime, to_onnx
from gdrq_lightning.export.build import build_qdq_model
from gdrq_lightning.export.fold import fold_groups_into_bn
from gdrq_lightning.export.qdq import QDQAct
from gdrq_lightning.export.report import layer_report
from gdrq_lightning.quant import ActGrid
from gdrq_lightning.quant.methods import hwgq as hwgq_m

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# method family -> config, and how many of TinyNet's convs become integer kernels: its first conv
# reads the image (float) and its linear a pooled map, so 2 of 3 convs at most
CASES = {
    "gdrq_w4a4_g1": (dict(method="gdrq", weight_bits=4, act_bits=4, groups=1), 2),
    "gdrq_w4a4_g4": (dict(method="gdrq", weight_bits=4, act_bits=4, groups=4), 2),
    "scale_clip_w2a4": (dict(method="scale_clip", weight_bits=2, act_bits=4), 2),
    "group_w4a8": (dict(method="group", weight_bits=4, act_bits=8, groups=2), 2),
    "lsq_w4a4": (dict(method="lsq", weight_bits=4, act_bits=4, groups=2), 2),
    "pact_w3a3": (dict(method="pact", weight_bits=3, act_bits=3), 2),
    "dorefa_w4a4": (dict(method="dorefa", weight_bits=4, act_bits=4), 2),
    "dorefa_w8a4": (dict(method="dorefa", weight_bits=8, act_bits=4), 0),  # odd codes 2k - 255 need 9 bits
    "hwgq_w1a2": (dict(method="hwgq", weight_bits=1, act_bits=2), 0),  # x > 0 -> level >= 1: no integer form
}


def export_form64(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor], **kw) -> nn.Module:
    """The export form in float64 (free of float rounding), calibrated like the ONNX file."""
    ref64 = copy.deepcopy(model).double()
    return build_qdq_model(fold_groups_into_bn(ref64), example.double(), dtype=torch.float64,
                           calibration=[c.double() for c in calibration], **kw)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_default_session_runs_the_export_form_with_integer_kernels(models, case, tmp_path):
    cfg, integer = CASES[case]
    model = models.tiny(**cfg)
    x = _randn(32, 3, 16, 16, seed=1)
    path = to_onnx(model, x[:2], tmp_path / "t.onnx", calibration=[x])
    counts = optimized_op_counts(path)
    assert kernel_summary(counts) == {"integer": integer, "float": 4 - integer}
    assert counts.get("QLinearConv", 0) == integer
    got = run_onnxruntime(path, x)  # ORT's default SessionOptions
    form = export_form64(model, x[:2], [x])
    with torch.no_grad():
        assert relative(got, form(x.double())) <= 1e-2
        ref = copy.deepcopy(model).double()(x.double())
    assert relative(got, ref) <= 2e-2  # bias rounding on top: measured <= 8.2e-3 over these cases
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.95


@pytest.mark.parametrize("case", ["gdrq_w4a4_g4", "lsq_w4a4", "pact_w3a3"])
def test_each_layer_differs_from_fakequant_by_its_documented_roundings_only(models, case):
    model = models.tiny(bias=True, **CASES[case][0])
    x = _randn(8, 3, 16, 16, seed=2)
    ref64 = copy.deepcopy(model).double()
    folded = fold_groups_into_bn(ref64)
    form = export_form64(model, x[:2], [x])
    rows = layer_report(ref64, folded, form, x.double())
    layers = [r for r in rows if r["kind"] != "act"]
    assert sum(r["integer"] for r in layers) == 2 and all(r["bias_lattice_max"] for r in layers if r["integer"])
    for r in layers:
        # + float32 rounding: the folded steps are float32 buffers
        bound = 0.5 * (r["bias_lattice_max"] or 0) + 0.5 * (r["output_step"] or 0) + 1e-6 * r["output_abs_max"]
        assert r["max_abs_diff_onnx_form"] <= bound, r
    acts = [r for r in rows if r["kind"] == "act"]
    assert len(acts) == 3 and all(r["level_flips"] == 0 for r in acts)  # teacher-forced, float64: no tie flips


def test_resnet18_is_integer_from_the_first_block_to_the_last(models, tmp_path):
    model = models.resnet18(method="gdrq", weight_bits=4, act_bits=4, groups=4)
    x = _randn(4, 3, 32, 32, seed=3)
    path = to_onnx(model, x[:1], tmp_path / "r.onnx", calibration=[x])
    counts = optimized_op_counts(path)
    # 19 quantized convs (16 in blocks, 3 downsample); float: the stem conv and the classifier
    assert counts["QLinearConv"] == 19 and counts["QLinearAdd"] == 8
    assert kernel_summary(counts) == {"integer": 19, "float": 2}
    graph = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    pool = next(n for n in graph.node if n.op_type == "MaxPool")
    assert producer[pool.input[0]] == "Conv"  # the stem's pool reads the float conv: its quantizer moved after it
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    codes = inits["layer1.0.conv1.codes"]
    assert str(codes.dtype) == "int8" and abs(codes).max() == 112 and (codes % 16 == 0).all()  # 4-bit codes x 16
    assert str(inits["layer1.0.conv1.bias_codes"].dtype) == "int32"
    got = run_onnxruntime(path, x)
    with torch.no_grad():
        assert relative(got, export_form64(model, x[:1], [x])(x.double())) <= 1e-2


def test_hwgq_small_positives_map_to_first_level(tmp_path):
    """HWGQ's (0, D/2) -> D rule survives export: Where(x > 0, DQ(Clip(Q(x), 1, n)), 0)."""
    step = hwgq_m.hwgq_optimal_step(2)
    act = QDQAct(ActGrid(torch.tensor(step), 1, 3, True), {})
    x = torch.tensor([[-1.0, 0.0, 1e-6, 0.2 * step, 0.49 * step, 0.51 * step, 1.5 * step, 2.5 * step, 10.0]])
    to_onnx(torch.nn.Sequential(act), x, tmp_path / "h.onnx")
    expected = hwgq_m.hwgq_forward(x, step, 2)
    assert expected[0, 2] == step  # the reference rule itself
    torch.testing.assert_close(run_onnxruntime(tmp_path / "h.onnx", x), expected, rtol=0, atol=0)
    torch.testing.assert_close(act(x), expected, rtol=0, atol=0)


def test_export_model_writes_files_and_report(models, tmp_path, capsys):
    model = models.tiny(bias=True, method="gdrq", weight_bits=4, act_bits=4, groups=4, act_groups=2)
    report = export_model(model, torch.zeros(1, 3, 16, 16), tmp_path / "out")  # as `gdrq export` calls it
    saved = json.loads((tmp_path / "out" / "model_report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"model_int.pt", "model.onnx", "model_report.json"}
    assert report["pairing"]["source"] == "fx" and len(report["pairing"]["pairs"]) == 3
    assert report["check_input_shape"] == [2, 3, 24, 24]  # another batch size and image size: both dynamic
    assert report["dynamic"] == {"batch": True, "size": True, "fixed_size_reason": ""}
    # act_groups=2: per-channel activation scales, which an integer conv cannot read: float layers, said so
    assert report["integer_layers"] == 0 and all("per-tensor" in why for why in report["float_layers"].values())
    convs = [r for r in report["layers"] if r["kind"] == "conv"]
    acts = [r for r in report["layers"] if r["kind"] == "act"]
    assert len(convs) == 3 and len(acts) == 3 and all(r["groups"] == 4 and r["bits"] == 4 for r in convs)
    for r in convs:  # teacher-forced: each exported conv + folded BN against fake-quant conv + BN
        assert r["max_abs_diff_onnx_form"] <= 1e-5 * r["output_abs_max"], r
    assert all(r["level_flips"] == r["flips_at_ties"] and r["qmax"] == 15 for r in acts)
    outputs = report["outputs"]
    assert outputs["onnxruntime_vs_onnx_form"]["output"] <= 1e-2 * outputs["output_abs_max"]
    assert report["sizes"]["onnx_bytes"] > 0 and report["onnx"]["kernels"] == {"integer": 0, "float": 4}
    with capsys.disabled():
        print(f"\ntiny W4A4: compression {report['sizes']['compression']:.2f}x, outputs {outputs}")


@pytest.mark.parametrize("method", ["lsq", "gdrq"])
def test_relu6_upper_bound_survives_export(method, tmp_path):
    """LSQ after ReLU6 with ``(2**b - 1) * step > 6``: the Clip's max becomes round(6 / step), not 15."""
    model = quantize_model(torch.nn.Sequential(torch.nn.ReLU6()), QuantConfig(method=method, act_bits=4, skip=[]))
    quantizer = model[0].act_quantizer
    model.train()(torch.linspace(0, 10, 64))  # initialises LSQ's step / Scale-Clip's statistics
    with torch.no_grad():
        if method == "lsq":
            quantizer.step.fill_(0.5)  # 15 * 0.5 = 7.5 > 6
    model.eval()
    x = torch.linspace(-2, 10, 97).reshape(1, 97)
    to_onnx(model, x, tmp_path / "r6.onnx")
    expected = model(x).detach()
    assert float(expected.max()) <= 6.0
    torch.testing.assert_close(run_onnxruntime(tmp_path / "r6.onnx", x), expected, rtol=0, atol=1e-6)


class _SegNet(nn.Module):
    """A torchvision-style segmentation model: ``{"out": main map, "aux": auxiliary map}``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.body.features(x)
        return {"out": y[:, :4], "aux": y[:, 4:]}


def test_export_model_takes_the_main_map_of_a_segmentation_model(models, tmp_path):
    from tasks.segmentation.models import (
        MainOutput,  # what SegmentationModule.export_network() returns
    )

    model = _SegNet(models.tiny(method="gdrq", weight_bits=4, act_bits=4, groups=4))
    with pytest.raises(TypeError, match="dict with keys"):
        export_model(model, torch.zeros(1, 3, 16, 16), tmp_path / "refused")
    report = export_model(MainOutput(model), torch.zeros(1, 3, 16, 16), tmp_path / "seg")
    assert report["outputs"]["onnxruntime_vs_onnx_form"]["output"] <= 1e-2 * report["outputs"]["output_abs_max"]
    x = _randn(2, 3, 20, 28)  # another image size: dynamic
    with torch.no_grad():
        expected = model.eval()(x)["out"]
    got = run_onnxruntime(tmp_path / "seg" / "model.onnx", x)
    assert got.shape == expected.shape == (2, 4, 10, 14)
    assert relative(got, expected) <= 0.05  # the same map, up to the documented roundings


def test_export_model_refuses_list_outputs_with_a_clear_error(tmp_path):
    class Boxes(nn.Module):
        def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
            return [{"boxes": x.new_zeros(0, 4)} for _ in x]

    with pytest.raises(TypeError, match="returns a list of dict"):
        export_model(Boxes(), torch.zeros(1, 3, 8, 8), tmp_path / "det")


def test_linear_layers_that_read_quantized_inputs_run_as_qgemm_and_as_their_export_form(tmp_path):
    """fc1 quantizes its (float, signed) input, fc2 reads fc1's ReLU codes: both integer; ORT fuses them
    into QGemm only when the weights' DequantizeLinear carries its zero point (the detector's box head)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))
    quantize_model(model, QuantConfig(method="gdrq", weight_bits=8, act_bits=8, groups=2, skip=["4"], quant_inputs=["0"]))
    x = torch.randn(64, 32)
    model.train()(x)  # activation statistics
    model.eval()
    path = to_onnx(model, x, tmp_path / "mlp.onnx")
    counts = optimized_op_counts(path)
    assert counts.get("QGemm") == 2 and kernel_summary(counts) == {"integer": 2, "float": 1}
    form = build_qdq_model(fold_groups_into_bn(model), x)
    with torch.no_grad():
        expected = form(x)
    assert float((run_onnxruntime(path, x) - expected).abs().max() / expected.abs().max()) < 1e-3
