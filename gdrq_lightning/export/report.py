"""Per-layer export report and the whole ``gdrq export`` job for an ``nn.Module``.

Layer differences are *teacher-forced*: each exported layer (plus its folded BN) gets
the input the fake-quant layer saw in the reference model, so a number isolates that
layer's export error from upstream ones: for an integer layer, the int32 bias's rounding
(at most half its lattice ``s_x · s_w``) and, for an output the fake-quant model keeps in
float, the 8-bit output grid's rounding (at most half its step). End-to-end output
differences are reported separately: a quantized network amplifies any perturbation that
moves an activation across a rounding boundary, so one flipped level can move the logits of
that image by several per cent (measured on a digits ResNet-18 at 32 px: the float32 fake-quant
model against itself in float64 differs by up to 0.19 of an image's largest logit).
``flips_at_ties`` counts the activation-level flips of float rounding alone.
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

from .build import build_qdq_model
from .deploy import clear_deploy
from .deploy_export import deploy_qdq_model, is_deployed
from .fold import fold_with_pairing
from .integer import fp32_bytes, save_integer
from .layers import INTEGER_LAYER_TYPES
from .qdq import QDQAct, QDQWeightLayer
from .wiring import as_args

Captured = dict[str, list[Tensor]]


def _capture(model: nn.Module, names: dict[str, str], args: tuple[Any, ...]) -> tuple[Captured, Captured]:
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
            model(*args)
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


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def layer_report(reference: nn.Module, folded: nn.Module, qdq: nn.Module, x: Any) -> list[dict[str, Any]]:
    """One entry per exported weight layer and activation quantizer (teacher-forced diffs).

    ``reference`` is the fake-quant model, ``folded`` its :func:`fold_groups_into_bn`
    result and ``qdq`` the export-form model; they share module names (an activation
    quantizer that export moved behind a max pool is reported at its new place only if the
    reference has one there, i.e. not).
    """
    weights = {n: m for n, m in folded.named_modules() if isinstance(m, INTEGER_LAYER_TYPES)}
    acts = [n for n, m in qdq.named_modules() if isinstance(m, QDQAct) and _has(reference, n)]
    names = {n: (m.folded_into or n) for n, m in weights.items()} | {n: n for n in acts}
    inputs, outputs = _capture(reference, names, as_args(x))
    rows: list[dict[str, Any]] = []
    for name, layer in weights.items():
        bn_name = layer.folded_into

        def run(model: nn.Module, t: Tensor, name: str = name, bn_name: str | None = bn_name) -> Tensor:
            y = model.get_submodule(name)(t)
            return model.get_submodule(bn_name)(y) if bn_name else y

        exported: QDQWeightLayer = qdq.get_submodule(name)
        meta = layer.meta()
        row = {"name": name} | meta | {"kind": "conv" if meta["kind"] == "IntegerConv2d" else "linear"}
        row["integer"], row["export"] = exported.integer, exported.note
        row["step_min"], row["step_max"] = _range(layer.step)
        row["onnx_scale_min"], row["onnx_scale_max"] = _range(exported.scale)
        row["bias_lattice_max"] = None if exported.bias_scale is None else float(exported.bias_scale.max())
        row["output_step"] = None if exported.output_act is None else float(exported.output_act.scale)
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
            "scale_min": lo, "scale_max": hi, "qmin": act.qmin, "qmax": act.qmax, "zero_point": act.zero,
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


def as_outputs(out: Any) -> tuple[Tensor, ...]:
    """A model's outputs as a tuple of tensors (one tensor, or a tuple/list of them)."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check_outputs(model: nn.Module, example: Any) -> None:
    """Refuse a model whose outputs are not tensors, naming what it returns."""
    with torch.no_grad():
        out = model(*as_args(example))
    if isinstance(out, Tensor) or (isinstance(out, (tuple, list)) and out and all(isinstance(t, Tensor) for t in out)):
        return
    if isinstance(out, dict):
        kind = f"dict with keys {sorted(out)}"
    else:
        kind = type(out).__name__ + (f" of {type(out[0]).__name__}" if isinstance(out, (list, tuple)) and out else "")
    raise TypeError(
        f"export_model needs a model that maps an image batch to one tensor or a tuple of tensors; this one "
        f"returns a {kind} (export a task's export_network(), e.g. a segmentation model's main map or a "
        f"detector's boxes, labels and scores)"
    )


def output_differences(a: Any, b: Any) -> dict[str, Any]:
    """Largest absolute difference per output (shapes named where they differ)."""
    diffs: dict[str, Any] = {}
    for i, (x, y) in enumerate(zip(as_outputs(a), as_outputs(b))):
        key = "output" if i == 0 and len(as_outputs(a)) == 1 else f"output{i}"
        same = x.shape == y.shape
        diffs[key] = float((x.double() - y.double()).abs().max()) if same and x.numel() else (0.0 if same else f"shapes {list(x.shape)} vs {list(y.shape)}")
    return diffs


def default_check_input(example: Tensor, dynamic_batch: bool, dynamic_size: bool) -> Tensor:
    """A seeded ``N(0, 1)`` batch: one more sample where the batch is dynamic, 8 more pixels a
    side where the size is (so the checks run the dynamic axes)."""
    shape = list(example.shape)
    if dynamic_batch:
        shape[0] += 1
    if dynamic_size and len(shape) == 4:
        shape[2] += 8
        shape[3] += 8
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


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
    weight_format: str = "int8",
    calibration: list[Tensor] | None = None,
    float_outputs: bool = False,
) -> dict[str, Any]:
    """The whole ``gdrq export`` job: integer file, ONNX file and a JSON report in ``out_dir``.

    Works on a CPU copy in eval mode; ``model`` itself is not changed. ``model(x)`` returns
    one tensor (classifier logits, a segmentation map) or a tuple of tensors (a detector's
    boxes, labels, scores): pass a task's :meth:`~gdrq_lightning.task.QuantTask.export_network`,
    which adapts its outputs and may say how in an ``onnx_spec`` (:class:`~.onnx_export.OnnxSpec`).

    Args:
        model: the quantized model (``quantize_model`` result with trained weights).
        example_input: one input batch, used for tracing (its values do not matter).
        out_dir: created if missing; gets ``{stem}_int.pt``, ``{stem}.onnx``, ``{stem}_report.json``.
        opset: ONNX opset (>= 13).
        onnx: also write and check the ONNX file (needs ``onnx`` and ``onnxruntime``).
        stem: file name stem.
        check_input: the batch every comparison runs on; default :func:`default_check_input`.
        weight_format: ``"int8"`` (integer kernels) or ``"int4"`` (smallest file), see :func:`~.onnx_export.to_onnx`.
        calibration: batches that set the 8-bit grids of float outputs made integer (real
            images; default: ``[check_input]``); unused for a model in deploy form, which is
            written as it computes (``report["deploy"]``; ``outputs["fakequant_vs_deploy"]``).
        float_outputs: keep the layers with float outputs float (see :func:`~.onnx_export.to_onnx`).

    Returns:
        The report dict that was written as JSON.

    Raises:
        TypeError: ``model`` returns something other than tensors (says what).
    """
    from .onnx_export import (
        check_deploy_options, export_qdq, kernel_summary, onnx_spec, op_counts, optimized_op_counts, run_onnxruntime,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    example = _cpu_batch(example_input)
    spec = onnx_spec(model)
    x = _cpu_batch(default_check_input(example, spec.dynamic_batch, spec.dynamic_size) if check_input is None else check_input)
    reference = copy.deepcopy(model).cpu().float().eval()
    check_outputs(reference, example)
    deployed = is_deployed(reference)
    if deployed:  # written as it computes; the integer file and the layer rows from its fake-quant twin
        check_deploy_options(weight_format, float_outputs)
        plain = clear_deploy(copy.deepcopy(reference))
        folded, pairing = fold_with_pairing(plain)
        qdq = deploy_qdq_model(reference, example)
    else:
        plain = reference
        folded, pairing = fold_with_pairing(reference)
        qdq = build_qdq_model(folded, example, weight_format=weight_format, calibration=calibration or [x],
                              float_outputs=float_outputs)
    files = {"integer": str(out / f"{stem}_int.pt")}
    sizes = save_integer(folded, files["integer"]) | {"fp32_bytes": fp32_bytes(reference)}
    sizes["compression"] = sizes["fp32_bytes"] / max(sizes["payload_bytes"], 1)
    with torch.no_grad():
        ref_out, folded_out, qdq_out = reference(x), folded(x), qdq(x)
        plain_out = plain(x) if deployed else None
    scale = max((float(t.abs().max()) for t in as_outputs(ref_out) if t.is_floating_point() and t.numel()), default=0.0)
    outputs: dict[str, Any] = {
        "output_abs_max": scale,
        "folded_vs_fakequant": output_differences(folded_out, ref_out),
        "onnx_form_vs_fakequant": output_differences(qdq_out, ref_out),
    }
    if deployed:  # the reference is the deploy form; how far it moved from the fake-quant network
        outputs["fakequant_vs_deploy"] = output_differences(plain_out, ref_out)
    rows = layer_report(plain, folded, qdq, x)
    layers = [r for r in rows if r["kind"] != "act"]
    report: dict[str, Any] = {
        "format": "gdrq-export-report", "version": 2, "input_shape": list(example.shape),
        "check_input_shape": list(x.shape), "weight_format": weight_format, "float_outputs": float_outputs,
        "deploy": deployed,
        "dynamic": {"batch": spec.dynamic_batch, "size": spec.dynamic_size, "fixed_size_reason": spec.fixed_size_reason},
        "pairing": {"source": pairing.source, "note": pairing.note, "pairs": pairing.pairs},
        "sizes": sizes, "outputs": outputs, "files": files,
        "integer_layers": sum(r["integer"] for r in layers), "float_layers": {r["name"]: r["export"] for r in layers if not r["integer"]},
        "layers": rows,
    }
    if onnx:
        files["onnx"] = str(export_qdq(qdq, example, out / f"{stem}.onnx", opset=opset, spec=spec))
        sizes["onnx_bytes"] = Path(files["onnx"]).stat().st_size
        ort_out = run_onnxruntime(files["onnx"], x)  # ORT's default session: what users run
        outputs["onnxruntime_vs_fakequant"] = output_differences(ort_out, ref_out)
        outputs["onnxruntime_vs_onnx_form"] = output_differences(ort_out, qdq_out)
        optimized = optimized_op_counts(files["onnx"])
        report["onnx"] = {"opset": opset, "ops": op_counts(files["onnx"]), "kernels": kernel_summary(optimized),
                          "optimized_ops": optimized}
    files["report"] = str(out / f"{stem}_report.json")
    Path(files["report"]).write_text(json.dumps(report, indent=2))
    return report
