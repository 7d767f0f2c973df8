"""What ``gdrq export`` prints: a short table of its report instead of the whole JSON.

Integer / float layers, file sizes against the FP32 weights, the output difference of ONNX
Runtime, PyTorch against ONNX Runtime on validation data when the export had some, and
the path of the full JSON report (at most 40 lines, whatever the network).
"""
from __future__ import annotations

import os
from typing import Any

from .validate import format_validation

MAX_FLOAT_NAMES = 6  # float layers named one per line; the rest are counted
_PERCENT_METRICS = ("top1", "pixel_acc", "matched_fraction", "images_all_matched")


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _ratio(fp32: float | None, n: float | None) -> str:
    return f"= FP32 / {fp32 / n:.1f}" if fp32 and n else ""


def _value(metric: str, v: Any) -> str:
    if not isinstance(v, (int, float)):
        return str(v)
    return f"{100 * v:.2f} %" if metric in _PERCENT_METRICS or 0.0 <= v <= 1.0 else f"{v:.4g}"


def _validation(report: dict[str, Any]) -> dict[str, Any] | None:
    """``{metric, pytorch, onnxruntime, agreement, samples}`` from the report's ``validation``
    entry or the older ``val_accuracy`` one (``<metric>_pytorch`` ..., ``prediction_agreement``)."""
    if isinstance(report.get("validation"), dict):
        return report["validation"]
    old = report.get("val_accuracy")
    if not isinstance(old, dict):
        return None
    metric = old.get("metric", "metric")
    if metric == "detection_match":
        return {"metric": "detections matched", "agreement": old.get("matched_fraction"), "samples": old.get("samples")}
    return {"metric": metric, "pytorch": old.get(f"{metric}_pytorch"), "onnxruntime": old.get(f"{metric}_onnxruntime"),
            "agreement": old.get("prediction_agreement"), "samples": old.get("samples")}


def format_export_summary(report: dict[str, Any]) -> str:
    """The table ``gdrq export`` prints from the report dict of
    :func:`gdrq_lightning.export.export_model` (plus the CLI's validation entry, if any).

    Example:
        >>> print(format_export_summary({"integer_layers": 2, "float_layers": {}, "files": {"report": "r.json"}}))
        gdrq export
          layers         2 integer, 0 float
          full report    r.json
    """
    files = report.get("files") or {}
    out_dir = os.path.dirname(files.get("report") or files.get("onnx") or "") or ""
    lines = [f"gdrq export{': ' + out_dir if out_dir else ''}"]
    floats = report.get("float_layers") or {}
    lines.append(f"  layers         {report.get('integer_layers', 0)} integer, {len(floats)} float")
    for name, why in list(floats.items())[:MAX_FLOAT_NAMES]:
        lines.append(f"    float: {name} ({why})")
    if len(floats) > MAX_FLOAT_NAMES:
        lines.append(f"    ... {len(floats) - MAX_FLOAT_NAMES} more float layers (see the report's 'layers')")
    kernels = (report.get("onnx") or {}).get("kernels")
    if kernels:
        lines.append(f"  ORT kernels    {kernels.get('integer', 0)} integer, {kernels.get('float', 0)} float")
    sizes = report.get("sizes") or {}
    fp32 = sizes.get("fp32_bytes")
    if sizes:
        lines.append("  files")
        if "file_bytes" in sizes:
            name = os.path.basename(files.get("integer", "integer file"))
            lines.append(f"    {name:<22} {_mb(sizes['file_bytes']):>10}   {_ratio(fp32, sizes['file_bytes'])}")
        if "onnx_bytes" in sizes:
            name = os.path.basename(files.get("onnx", "ONNX file"))
            lines.append(f"    {name:<22} {_mb(sizes['onnx_bytes']):>10}   {_ratio(fp32, sizes['onnx_bytes'])}")
        if fp32:
            lines.append(f"    {'FP32 weights':<22} {_mb(fp32):>10}")
    outputs = report.get("outputs") or {}
    diff = outputs.get("onnxruntime_vs_fakequant")
    if isinstance(diff, dict) and diff:
        worst = max((v for v in diff.values() if isinstance(v, (int, float))), default=None)
        if worst is not None:
            lines.append(f"  max |ORT - PyTorch| on a test batch: {worst:.3g} (outputs up to {outputs.get('output_abs_max', 0):.3g})")
    val = _validation(report)
    if val and isinstance(val.get("pytorch"), dict):  # gdrq export --validate: the task's metrics side by side
        lines += ["  " + row for row in format_validation(val).splitlines()]
    elif val:
        metric = val.get("metric", "metric")
        on = f" on {val['samples']} images" if val.get("samples") else ""
        parts = [f"PyTorch {_value(metric, val['pytorch'])}" if val.get("pytorch") is not None else "",
                 f"ONNX Runtime {_value(metric, val['onnxruntime'])}" if val.get("onnxruntime") is not None else "",
                 f"agreement {_value('top1', val['agreement'])}" if val.get("agreement") is not None else ""]
        lines.append(f"  {metric}{on}: " + ", ".join(p for p in parts if p))
    if files.get("report"):
        lines.append(f"  full report    {files['report']}")
    return "\n".join(lines)
