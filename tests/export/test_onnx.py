"""ONNX export: QDQ/QCDQ graph structure, onnx.checker, ONNX Runtime vs the PyTorch fake-quant model.

What is compared, and why these tolerances:

* Export form vs fake-quant, both in float64: the same math, so they agree to 1e-6 of
  the output scale (measured: ~5e-8, from the fake-quant kernels' float32 scales).
  Float64 matters: in float32, rounding noise flips an activation that sits on a
  rounding tie to the next level for ~1-10% of resnet18 images, which then moves
  the logits by up to ~0.1 of their scale. That is not an export error.
* ONNX Runtime vs the export form, float32, layer by layer: every QCDQ input in ORT
  must equal PyTorch's to 1e-5 of its scale, and the outputs too, unless a level
  flipped at a rounding tie first (checked to be one: its input lies within 1e-3
  of a level boundary), after which downstream values legitimately differ.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from gdrq_lightning.export import export_model, run_onnxruntime, to_onnx
from gdrq_lightning.export.fold import fold_groups_into_bn
from gdrq_lightning.export.qdq import QDQAct, build_qdq_model
from gdrq_lightning.export.report import layer_report
from gdrq_lightning.quant import primitives as P
from gdrq_lightning.quant.methods import hwgq as hwgq_m

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


CASES = {
    "gdrq_w4a4_g1": dict(method="gdrq", weight_bits=4, act_bits=4, groups=1),
    "gdrq_w4a4_g4": dict(method="gdrq", weight_bits=4, act_bits=4, groups=4),
    "hwgq_w1a2": dict(method="hwgq", weight_bits=1, act_bits=2),
    "pact_w3a3": dict(method="pact", weight_bits=3, act_bits=3),
    "lsq_w4a4": dict(method="lsq", weight_bits=4, act_bits=4, groups=2),
    "dorefa_w8a4": dict(method="dorefa", weight_bits=8, act_bits=4),
}


def _ort_with_act_inputs(path, x):
    """ORT output plus the input of every QuantizeLinear (graph order = call order)."""
    model = onnx.load(str(path))
    names = [n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out, *acts = session.run(None, {"input": x.numpy()})
    return torch.from_numpy(out), [torch.from_numpy(a) for a in acts]


def _assert_ort_agrees(qdq, path, x):
    """Flip-aware ORT vs export-form comparison; returns the index of a tie flip, if any."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: calls.append((mod, a[0].clone())))
             for m in qdq.modules() if isinstance(m, QDQAct)]
    with torch.no_grad():
        form = qdq(x)
    for h in hooks:
        h.remove()
    out, ort_inputs = _ort_with_act_inputs(path, x)
    assert out.shape == form.shape and len(ort_inputs) == len(calls) > 0
    for i, ((act, x_pt), x_ort) in enumerate(zip(calls, ort_inputs)):
        assert (x_ort - x_pt).abs().max() <= 1e-5 * x_pt.abs().max() + 1e-7, f"QCDQ input {i} differs"
        with torch.no_grad():
            differ = act(x_pt) != act(x_ort)
        if differ.any():
            s = act.scale.reshape(1, -1, *[1] * (x_pt.dim() - 2)) if act.scale.dim() else act.scale
            u = (x_pt / s)[differ]
            assert ((u - u.floor() - 0.5).abs() < 1e-3).logical_or(u.abs() < 1e-3).all(), f"act {i}: not a tie flip"
            return i
    assert (out - form).abs().max() <= 1e-5 * form.abs().max()
    return None


def _check(model, x_export, x_run, path):
    folded = fold_groups_into_bn(model)
    to_onnx(folded, x_export, path)  # runs onnx.checker(full_check=True)
    qdq = build_qdq_model(folded, x_export)
    _assert_ort_agrees(qdq, path, x_run)  # another batch size: the batch axis is dynamic
    ref64 = copy.deepcopy(model).double()
    form64 = build_qdq_model(fold_groups_into_bn(ref64), x_export.double(), dtype=torch.float64)
    with torch.no_grad():
        ref, form = ref64(x_run.double()), form64(x_run.double())
    assert (form - ref).abs().max() <= 1e-6 * ref.abs().max()
    return onnx.load(str(path)), folded, qdq


@pytest.mark.parametrize("case", ["gdrq_w4a4_g1", "gdrq_w4a4_g4", "hwgq_w1a2", "pact_w3a3"])
def test_resnet18_onnxruntime_matches(models, case, tmp_path):
    model = models.resnet18(**CASES[case])
    x = _randn(2, 3, 32, 32)
    proto, folded, qdq = _check(model, x, _randn(3, 3, 32, 32, seed=1), tmp_path / "r.onnx")
    graph = proto.graph
    ops = [n.op_type for n in graph.node]
    assert "BatchNormalization" not in ops  # quantized convs: into the DQ scale; the float stem: by the exporter
    assert ops.count("QuantizeLinear") == ops.count("Clip") == 17  # one QCDQ per activation call (stem, 2 per block)
    assert ops.count("DequantizeLinear") == 17 + 19  # + one constant weight DQ per quantized conv
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for row in layer_report(model, folded, qdq, x):
        if row["kind"] == "act":
            assert row["level_flips"] == row["flips_at_ties"], row  # QCDQ vs fake-quant: ties only
            if row["level_flips"] == 0:
                assert row["max_abs_diff_onnx_form"] <= 1e-5 * row["scale_max"], row
        else:  # each exported conv/linear (+ folded BN) against the fake-quant layer (+ BN), same input
            assert row["max_abs_diff_onnx_form"] <= 1e-5 * row["output_abs_max"], row


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_onnxruntime_matches(models, case, tmp_path):
    cfg = CASES[case]
    model = models.tiny(**cfg)
    graph = _check(model, _randn(2, 3, 16, 16), _randn(5, 3, 16, 16, seed=1), tmp_path / "t.onnx")[0].graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    inits |= {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    codes = inits["features.3.codes"]
    if cfg["weight_bits"] < 8:
        n = 1 if cfg["weight_bits"] == 1 else 2 ** (cfg["weight_bits"] - 1) - 1
        n = 2 ** cfg["weight_bits"] - 1 if cfg["method"] in ("pact", "dorefa") else n
        assert str(codes.dtype) == "int8" and abs(codes).max() <= n  # the bit width is visible in the weights
    clips = [n for n in graph.node if n.op_type == "Clip"]  # QCDQ: the activation bit width is the Clip's max
    assert len(clips) == 3 and {int(inits[n.input[2]]) for n in clips} == {2 ** cfg["act_bits"] - 1}


def test_hwgq_small_positives_map_to_first_level(tmp_path):
    """HWGQ's (0, D/2) -> D rule survives export: Where(x > 0, DQ(Clip(Q(x), 1, n)), 0)."""
    step = hwgq_m.hwgq_optimal_step(2)
    act = QDQAct(torch.tensor(step), 1, 3, True, {})
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
    assert report["check_input_shape"] == [2, 3, 16, 16]  # checks ran on a random batch of another size
    assert len(report["outputs"]) == 6 and all(math.isfinite(v) for v in report["outputs"].values())
    convs = [r for r in report["layers"] if r["kind"] == "conv"]
    acts = [r for r in report["layers"] if r["kind"] == "act"]
    assert len(convs) == 3 and len(acts) == 3 and all(r["groups"] == 4 and r["bits"] == 4 for r in convs)
    assert all(0 < r["step_min"] <= r["step_max"] for r in convs)
    for r in convs:  # teacher-forced: each exported conv + folded BN against fake-quant conv + BN
        assert r["max_abs_diff_onnx_form"] <= 1e-5 * r["output_abs_max"], r
    assert all(r["level_flips"] == r["flips_at_ties"] and r["qmax"] == 15 for r in acts)
    with capsys.disabled():
        print(f"\ntiny W4A4: compression {report['sizes']['compression']:.2f}x, outputs {report['outputs']}")


@pytest.mark.parametrize("method", ["lsq", "gdrq"])
def test_relu6_upper_bound_survives_export(method, tmp_path):
    """LSQ after ReLU6 with ``(2**b - 1) * step > 6``: the Clip's max becomes round(6 / step), not 15."""
    from gdrq_lightning import QuantConfig, quantize_model

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
    from tasks.segmentation.models import MainOutput  # what SegmentationModule.export_network() returns

    model = _SegNet(models.tiny(method="gdrq", weight_bits=4, act_bits=4, groups=4))
    with pytest.raises(TypeError, match="dict with keys"):
        export_model(model, torch.zeros(1, 3, 16, 16), tmp_path / "refused")
    report = export_model(MainOutput(model), torch.zeros(1, 3, 16, 16), tmp_path / "seg")
    assert report["outputs"]["onnxruntime_vs_onnx_form"] <= 1e-5 * report["outputs"]["output_abs_max"]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x)["out"]
    ort = run_onnxruntime(tmp_path / "seg" / "model.onnx", x)
    assert ort.shape == expected.shape == (2, 4, 8, 8)
    assert (ort - expected).abs().max() <= 0.05 * expected.abs().max()  # same map, up to level flips at ties


def test_export_model_refuses_list_outputs_with_a_clear_error(tmp_path):
    class Boxes(nn.Module):
        def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
            return [{"boxes": x.new_zeros(0, 4)} for _ in x]

    with pytest.raises(TypeError, match="returns a list of dict"):
        export_model(Boxes(), torch.zeros(1, 3, 8, 8), tmp_path / "det")
