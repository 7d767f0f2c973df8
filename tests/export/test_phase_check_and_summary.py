"""``gdrq export``'s console: the one-line phase warning of a checkpoint whose activations are
not quantized yet, and the short table printed instead of the whole JSON report."""
from __future__ import annotations

import pytest

from gdrq_lightning.export.phase_check import EXPORT_PHASE, export_phase_warning
from gdrq_lightning.export.summary import format_export_summary

GDRQ = {"method": "gdrq", "weight_bits": 4, "act_bits": 4}


@pytest.mark.parametrize(("done", "phase"), [([], "fp"), (["scale_clip"], "scale_clip"),
                                             (["scale_clip", "quant_weights"], "quant_weights")])
def test_a_checkpoint_before_quant_acts_gets_one_line_naming_both_phases(done: list[str], phase: str) -> None:
    message = export_phase_warning({"version": 1, "done": done, "config": GDRQ})
    assert message == (f"gdrq export: warning: the checkpoint is in phase '{phase}' (activations not quantized yet); "
                       "integer kernels need a checkpoint from phase 'quant_acts' on, so its layers export in float")
    assert "\n" not in message and EXPORT_PHASE == "quant_acts"


@pytest.mark.parametrize("state", [
    {"done": ["scale_clip", "quant_weights", "quant_acts"], "config": GDRQ},
    {"done": ["scale_clip", "quant_weights", "quant_acts", "groups", "freeze_bn"], "config": GDRQ},
    {"done": [], "config": {"method": "none"}},  # the float reference of a comparison
    None,  # no GDRQCallback state: nothing to say
])
def test_no_warning_from_quant_acts_on_or_without_quantization(state: dict | None) -> None:
    assert export_phase_warning(state) is None


REPORT = {  # the fields of a real digits ResNet-18 report (format 2), its 36 layer rows left out
    "format": "gdrq-export-report", "version": 2, "input_shape": [1, 3, 32, 32],
    "sizes": {"payload_bytes": 5733012, "file_bytes": 5808715, "fp32_bytes": 44765180, "compression": 7.808,
              "onnx_bytes": 11317212},
    "outputs": {"output_abs_max": 7.83, "folded_vs_fakequant": {"output": 0.0},
                "onnxruntime_vs_fakequant": {"output": 0.0123}, "onnxruntime_vs_onnx_form": {"output": 1.9e-06}},
    "files": {"integer": "runs/classification/q/export/model_int.pt", "onnx": "runs/classification/q/export/model.onnx",
              "report": "runs/classification/q/export/model_report.json"},
    "integer_layers": 17, "float_layers": {"layer2.0.downsample.0": "float: its input is not a per-tensor quantized activation",
                                           "layer3.0.downsample.0": "float: its input is not a per-tensor quantized activation"},
    "layers": [{"name": f"l{i}"} for i in range(36)],
    "onnx": {"opset": 17, "kernels": {"integer": 17, "float": 4}},
    "val_accuracy": {"metric": "top1", "samples": 359, "counted": 359, "top1_pytorch": 0.9805,
                     "top1_onnxruntime": 0.9777, "prediction_agreement": 0.9944},
}


def test_summary_table_of_a_report() -> None:
    assert format_export_summary(REPORT).splitlines() == [
        "gdrq export: runs/classification/q/export",
        "  layers         17 integer, 2 float",
        "    float: layer2.0.downsample.0 (float: its input is not a per-tensor quantized activation)",
        "    float: layer3.0.downsample.0 (float: its input is not a per-tensor quantized activation)",
        "  ORT kernels    17 integer, 4 float",
        "  files",
        "    model_int.pt               5.8 MB   = FP32 / 7.7",
        "    model.onnx                11.3 MB   = FP32 / 4.0",
        "    FP32 weights              44.8 MB",
        "  max |ORT - PyTorch| on a test batch: 0.0123 (outputs up to 7.83)",
        "  top1 on 359 images: PyTorch 98.05 %, ONNX Runtime 97.77 %, agreement 99.44 %",
        "  full report    runs/classification/q/export/model_report.json",
    ]


def test_summary_takes_the_validation_entry_and_stays_short() -> None:
    report = dict(REPORT, float_layers={f"layer{i}": "float" for i in range(80)},
                  validation={"metric": "pixel_acc", "pytorch": 0.91, "onnxruntime": 0.905, "agreement": 0.97, "samples": 100})
    lines = format_export_summary(report).splitlines()
    assert len(lines) <= 40
    assert "    ... 74 more float layers (see the report's 'layers')" in lines
    assert "  pixel_acc on 100 images: PyTorch 91.00 %, ONNX Runtime 90.50 %, agreement 97.00 %" in lines
    bare = {k: v for k, v in REPORT.items() if k not in ("val_accuracy", "onnx")}
    text = format_export_summary(bare)
    assert "on 359 images" not in text and "ORT kernels" not in text and text.endswith("model_report.json")
