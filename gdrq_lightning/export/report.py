"""Per-layer export report and the whole ``gdrq export`` job for an ``nn.Module``.

Layer differences are *teacher-forced*: each exported layer (plus its folded BN) gets
the input the fake-quant layer saw in the reference model, so a number isolates that
layer's export error from upstream ones. End-to-end output differences are reported
separately: in float32, rounding noise can flip an activation that sits on a rounding
tie to the next level, and that difference then propagates to the output (measured on
resnet18 W4A4: ~1-3% of images, up to ~0.1 of the logit scale). Such flips are float
rounding, not export errors; ``flips_at_ties`` counts the act-level ones.
"""
from __future__ import annotations

import copy
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .fold import fold_with_pairing
from .integer import fp32_bytes, save_integer
from .layers import INTEGER_LAYER_TYPES
from .qdq import QDQAct, QDQWeightLayer, build_qdq_model


Captured = dict[str, list[Tensor]]


def _capture(model: nn.Module, names: dict[str, str], x: Tensor) -> tuple[Captured, Captured]:
    """Inputs of modules ``names`` (keys) and outputs of modules ``names[key]``, per call.

    Clones, because later in-place ops (ResNet's ``out += identity``) would change them.
    """
    inputs: Captured = defaultdict(list)
    outputs: Captured = defaultdict(list)
    hooks = []
    for key, out_name in names.items():
        pre = model.get_submodule(key).register_forward_pre_hook(
            lambda _m, a, k=key: inputs[k].append(a[0].detach().clone())
        )
        post = model.get_submodule(out_name).register_forward_hook(
            lambda _m, _a, y, k=key: outputs[k].append(y.detach().clone())
        )
        hooks += [pre, post]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return inputs, outputs


def _max_diff(fn: Callable[[Tensor], Tensor], inputs: list[Tensor], refs: list[Tensor]) -> tuple[float, list[Tensor]]:
    with torch.no_grad():
        diffs = [(fn(x) - r).abs() for x, r in zip(inputs, refs)]
    return max((float(d.max()) for d in diffs), default=0.0), diffs


def _range(t: Tensor) -> tuple[float, float]:
    return float(t.min()), float(t.max())


def layer_report(reference: nn.Module, folded: nn.Module, qdq: nn.Module, x: Tensor) -> list[dict[str, Any]]:
    """One entry per exported weight layer and quantized activation (teacher-forced diffs).

    ``reference`` is the fake-quant model, ``folded`` its :func:`fold_groups_into_bn`
    result and ``qdq`` the export-form model; all three share module names.
    """
    weights = {n: m for n, m in folded.named_modules() if isinstance(m, INTEGER_LAYER_TYPES)}
    acts = [n for n, m in qdq.named_modules() if isinstance(m, QDQAct)]
    names = {n: (m.folded_into or n) for n, m in weights.items()} | {n: n for n in acts}
    inputs, outputs = _capture(reference, names, x)
    rows: list[dict[str, Any]] = []
    for name, layer in weights.items():
        bn_name = layer.folded_into

        def run(model: nn.Module, t: Tensor, name: str = name, bn_name: str | None = bn_name) -> Tensor:
            y = model.get_submodule(name)(t)
            return model.get_submodule(bn_name)(y) if bn_name else y

        exported: QDQWeightLayer = qdq.get_submodule(name)
        meta = layer.meta()
        row = {"name": name} | meta | {"kind": "conv" if meta["kind"] == "IntegerConv2d" else "linear"}
        row["step_min"], row["step_max"] = _range(layer.step)
        row["onnx_scale_min"], row["onnx_scale_max"] = _range(exported.scale)
        row["output_abs_max"] = max((float(r.abs().max()) for r in outputs[name]), default=0.0)
        row["max_abs_diff_folded"] = _max_diff(lambda t: run(folded, t), inputs[name], outputs[name])[0]
        row["max_abs_diff_onnx_form"] = _max_diff(lambda t: run(qdq, t), inputs[name], outputs[name])[0]
        rows.append(row)
    for name in acts:
        act: QDQAct = qdq.get_submodule(name)
        diff, diffs = _max_diff(act, inputs[name], outputs[name])
        lo, hi = _range(act.scale)
        flips = [d > 0.5 * lo for d in diffs]
        rows.append({"name": name, "kind": "act"} | act.meta | {
            "scale_min": lo, "scale_max": hi, "qmin": act.qmin, "qmax": act.qmax,
            "max_abs_diff_onnx_form": diff, "level_flips": sum(int(f.sum()) for f in flips),
            "flips_at_ties": sum(_at_ties(act, x, f) for x, f in zip(inputs[name], flips)),
        })
    return rows


def _at_ties(act: QDQAct, x: Tensor, flipped: Tensor) -> int:
    """How many flipped elements had an input within 1e-3 steps of a level boundary.

    There ``x * (1/s)`` (fake-quant kernels) and ``x / s`` (QuantizeLinear) may round
    apart; such a flip is float rounding, not an export error.
    """
    if not flipped.any():
        return 0
    s = act.scale.reshape(1, -1, *[1] * (x.dim() - 2)) if act.scale.dim() else act.scale
    u = (x / s)[flipped]
    return int(((u - u.floor() - 0.5).abs() < 1e-3).logical_or(u.abs() < 1e-3).sum())


def _check_one_tensor(model: nn.Module, example: Tensor) -> None:
    """Refuse a model that does not map an image batch to one tensor, naming what it returns."""
    with torch.no_grad():
        out = model(example)
    if isinstance(out, Tensor):
        return
    if isinstance(out, dict):
        kind = f"dict with keys {sorted(out)}"
    else:
        kind = type(out).__name__ + (f" of {type(out[0]).__name__}" if isinstance(out, (list, tuple)) and out else "")
    raise TypeError(
        f"export_model needs a model that maps an image batch to one tensor; this one returns a {kind} "
        f"(export a task's export_network(), e.g. a segmentation model's main map; detection is not exportable yet)"
    )


def _cpu_batch(example_input: Tensor) -> Tensor:
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a Tensor (one batch), got {type(example_input).__name__}")
    return example_input.detach().cpu().float()


def export_model(
    model: nn.Module,
    example_input: Tensor,
    out_dir: str | os.PathLike,
    *,
    opset: int = 17,
    onnx: bool = True,
    stem: str = "model",
    check_input: Tensor | None = None,
) -> dict[str, Any]:
    """The whole ``gdrq export`` job: integer file, ONNX file and a JSON report in ``out_dir``.

    Works on a CPU copy in eval mode; ``model`` itself is not changed. ``model(x)`` must
    return one tensor (classifier logits, a segmentation map): pass a task's
    :meth:`~gdrq_lightning.task.QuantTask.export_network`, which adapts its outputs.

    Args:
        model: the quantized model (``quantize_model`` result with trained weights).
        example_input: one input batch, used for tracing (its values do not matter).
        out_dir: created if missing; gets ``{stem}_int.pt``, ``{stem}.onnx``, ``{stem}_report.json``.
        opset: ONNX opset (>= 13).
        onnx: also write and check the ONNX file (needs ``onnx`` and ``onnxruntime``).
        stem: file name stem.
        check_input: the batch every comparison runs on; default: a seeded ``N(0, 1)`` batch
            shaped like ``example_input`` with one more sample (exercises the dynamic batch axis).

    Returns:
        The report dict that was written as JSON.

    Raises:
        TypeError: ``model`` returns something other than one tensor (says what).
    """
    from .onnx_export import export_qdq, op_counts, run_onnxruntime

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    example = _cpu_batch(example_input)
    if check_input is None:
        gen = torch.Generator().manual_seed(0)
        check_input = torch.randn((example.shape[0] + 1, *example.shape[1:]), generator=gen)
    x = _cpu_batch(check_input)
    reference = copy.deepcopy(model).cpu().float().eval()
    _check_one_tensor(reference, example)
    folded, pairing = fold_with_pairing(reference)
    qdq = build_qdq_model(folded, example)
    files = {"integer": str(out / f"{stem}_int.pt")}
    sizes = save_integer(folded, files["integer"]) | {"fp32_bytes": fp32_bytes(reference)}
    sizes["compression"] = sizes["fp32_bytes"] / max(sizes["payload_bytes"], 1)
    with torch.no_grad():
        ref_out, folded_out, qdq_out = reference(x), folded(x), qdq(x)
    outputs = {
        "output_abs_max": float(ref_out.abs().max()),
        "folded_vs_fakequant": float((folded_out - ref_out).abs().max()),
        "onnx_form_vs_fakequant": float((qdq_out - ref_out).abs().max()),
    }
    report: dict[str, Any] = {
        "format": "gdrq-export-report", "version": 1, "input_shape": list(example.shape),
        "check_input_shape": list(x.shape),
        "pairing": {"source": pairing.source, "note": pairing.note, "pairs": pairing.pairs},
        "sizes": sizes, "outputs": outputs, "files": files,
        "layers": layer_report(reference, folded, qdq, x),
    }
    if onnx:
        files["onnx"] = str(export_qdq(qdq, example, out / f"{stem}.onnx", opset=opset))
        ort_out = run_onnxruntime(files["onnx"], x)
        outputs["onnxruntime_vs_fakequant"] = float((ort_out - ref_out).abs().max())
        outputs["onnxruntime_vs_onnx_form"] = float((ort_out - qdq_out).abs().max())
        # informational: ORT's QDQ graph transformers (on by default) change low-bit results, see run_onnxruntime
        ort_opt = run_onnxruntime(files["onnx"], x, optimize=True)
        outputs["onnxruntime_optimized_vs_fakequant"] = float((ort_opt - ref_out).abs().max())
        report["onnx"] = {"opset": opset, "ops": op_counts(files["onnx"])}
    files["report"] = str(out / f"{stem}_report.json")
    Path(files["report"]).write_text(json.dumps(report, indent=2))
    return report
