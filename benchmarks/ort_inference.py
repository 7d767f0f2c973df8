"""ONNX Runtime inference: FP32 vs ORT's own int8 vs ours (W8A8, W4A4), CPU, default sessions.

Per model (ResNet-18 at 224 px, FCN-ResNet18 at 512 px, Faster R-CNN R18-FPN at 320 px) and
variant: the ONNX file's size, the integer conv/matmul kernels in ORT's optimized graph,
latency at batch 1 and throughput at batch 8 (the detector takes one image: 8 images in a
row) with 1 and 2 intra-op threads, and how close ORT comes to the variant's PyTorch model:

* ``fp32``: ``torch.onnx.export`` of the float network, against itself in PyTorch;
* ``ort int8``: ``onnxruntime.quantization.quantize_static`` of that file (QDQ, per-channel
  int8 weights, uint8 activations, calibrated on the same random images), the anchor,
  against the FP32 PyTorch network;
* ``ours W8A8`` / ``ours W4A4``: GDRQ (4 groups) through the task's ``quantize`` defaults (the
  detector's heads at 8 bits, as its configs set them: ``DetectionModule``'s ``HEAD_OVERRIDES``),
  activation statistics from two train-mode passes, exported by ``to_onnx``, against the
  fake-quant PyTorch model.

Weights are random (the speed does not depend on them); agreement on random weights is a
worst case: their class scores nearly tie, so the last-place rounding of any integer
pipeline reorders some. ``agree`` is top-1 agreement (classification), pixel agreement
(segmentation) or the share of the reference's top-10 boxes found again (IoU >= 0.9, same
label); ``err`` the largest output difference over the largest output value (detectors: of
scores). Every session is timed round-robin, rotating the order each round, on one machine,
so load from other jobs hits every row alike; the table gives medians.

Usage:
    python benchmarks/ort_inference.py --rounds 5 --out results/ort_inference.json
    python benchmarks/ort_inference.py --quick
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gdrq_lightning import QuantConfig, quantize_model  # noqa: E402
from gdrq_lightning.export import kernel_summary, optimized_op_counts, simulate_deploy, to_onnx  # noqa: E402
from gdrq_lightning.export.accuracy import match_detections  # noqa: E402
from gdrq_lightning.export.onnx_export import export_qdq, onnx_spec, ort_session  # noqa: E402
from gdrq_lightning.task import quant_network, resolve_config  # noqa: E402


@dataclass
class Case:
    """One model: its PyTorch module (a task module for detection/segmentation), input size and kind."""

    name: str
    build: Callable[[], Any]
    size: int
    kind: str  # "classification" | "segmentation" | "detection"
    overrides: dict[str, dict[str, int]] = field(default_factory=dict)  # QuantConfig.overrides


def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=1000)


def _fcn():  # noqa: ANN202 - a SegmentationModule
    from tasks.segmentation import SegmentationModule

    return SegmentationModule(arch="fcn_resnet18", num_classes=21, aux_loss=False)


def _faster_rcnn(size: int) -> Callable[[], Any]:
    def build():  # noqa: ANN202 - a DetectionModule
        from tasks.detection import DetectionModule

        return DetectionModule(arch="fasterrcnn_resnet18_fpn", num_classes=91, min_size=size, max_size=size,
                               box_score_thresh=0.05)

    return build


def cases(quick: bool) -> list[Case]:
    from tasks.detection.module import HEAD_OVERRIDES

    size = 128 if quick else 320
    detector = Case("fasterrcnn_r18_fpn", _faster_rcnn(size), size, "detection", HEAD_OVERRIDES)
    if quick:
        return [Case("resnet18", _resnet18, 64, "classification"), Case("fcn_resnet18", _fcn, 64, "segmentation"), detector]
    return [Case("resnet18", _resnet18, 224, "classification"), Case("fcn_resnet18", _fcn, 512, "segmentation"), detector]


def images(case: Case, batch: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    if case.kind == "detection":  # the detector's images: values in [0, 1]
        return torch.rand(1, 3, case.size, case.size, generator=gen)
    return torch.randn(batch, 3, case.size, case.size, generator=gen)


def networks(case: Case, bits: list[int]) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The float export network and, per bit width, the quantized one (task defaults, statistics set)."""
    torch.manual_seed(0)
    module = case.build()
    fp32 = module.export_network() if hasattr(module, "export_network") else module
    quantized = {}
    for b in bits:
        qmodule = copy.deepcopy(module)
        config = QuantConfig(method="gdrq", weight_bits=b, act_bits=b, groups=4, overrides=case.overrides)
        quantize_model(quant_network(qmodule), resolve_config(config, qmodule))
        _statistics(quant_network(qmodule), case)
        quantized[f"ours W{b}A{b}"] = (qmodule.export_network() if hasattr(qmodule, "export_network") else qmodule).eval()
    return fp32.eval(), quantized


@torch.no_grad()
def _statistics(net: nn.Module, case: Case) -> None:
    """Two train-mode passes: BN and activation statistics (and ``k_a: auto``) from random images."""
    net.train()
    for seed in (1, 2):
        if case.kind == "detection":
            boxes = {"boxes": torch.tensor([[10.0, 10.0, case.size / 2, case.size / 2]]), "labels": torch.tensor([1])}
            net([images(case, 1, seed)[0], images(case, 1, seed + 10)[0]], [boxes, boxes])
        else:
            net(images(case, 2, seed))
    net.eval()


def ort_int8(fp32_path: Path, path: Path, calibration: list[Tensor]) -> str | None:
    """``quantize_static`` of the FP32 file (QDQ, per-channel), or why it failed."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": x.numpy()} for x in calibration])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    pre = path.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    except Exception as err:  # noqa: BLE001 - reported in the table instead
        return f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
    return None


def agreement(case: Case, reference: Any, got: list[np.ndarray]) -> tuple[float, float]:
    """(agreement, relative error) of ORT's outputs against the PyTorch reference's."""
    ref = [t.numpy() for t in (reference if isinstance(reference, tuple) else (reference,))]
    if case.kind == "detection":
        found, total = match_detections(tuple(torch.from_numpy(r) for r in ref), tuple(torch.from_numpy(g) for g in got), score=0.0)
        same = ref[2].shape == got[2].shape and ref[2].size
        err = float(np.abs(ref[2] - got[2]).max() / np.abs(ref[2]).max()) if same else float("nan")
        return (found / total if total else float("nan")), err
    agree = float((ref[0].argmax(1) == got[0].argmax(1)).mean())
    return agree, float(np.abs(ref[0] - got[0]).max() / np.abs(ref[0]).max())


@dataclass
class Row:
    model: str
    variant: str
    path: str | None
    note: str = ""
    size: int = 0
    kernels: dict[str, int] = field(default_factory=dict)
    agree: float = float("nan")
    err: float = float("nan")
    times: dict[str, list[float]] = field(default_factory=dict)


def prepare(case: Case, bits: list[int], work: Path, calibration_images: int) -> list[Row]:
    fp32, quantized = networks(case, bits)
    spec = onnx_spec(fp32)
    batch = 1 if not spec.dynamic_batch else 2
    calibration = [images(case, batch, 100 + i) for i in range(calibration_images)]
    rows = [Row(case.name, "fp32", str(work / f"{case.name}_fp32.onnx"))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_qdq(fp32, calibration[0], rows[0].path, spec=spec)
        int8 = Row(case.name, "ort int8", str(work / f"{case.name}_ort_int8.onnx"))
        failed = ort_int8(Path(rows[0].path), Path(int8.path), [c[:1] for c in calibration])
        int8.path, int8.note = (None, failed) if failed else (int8.path, "")
        rows.append(int8)
        for variant, net in quantized.items():
            path = work / f"{case.name}_{variant.split()[1]}.onnx"
            to_onnx(net, calibration[0], path, calibration=calibration)
            rows.append(Row(case.name, variant, str(path)))
    check = images(case, 1, 7)
    references = {"fp32": fp32, "ort int8": fp32} | quantized
    for row in rows:
        if row.path is None:
            continue
        row.size = Path(row.path).stat().st_size
        row.kernels = kernel_summary(optimized_op_counts(row.path))
        with torch.no_grad():
            reference = references[row.variant](check)
        row.agree, row.err = agreement(case, reference, ort_session(row.path).run(None, {"input": check.numpy()}))
    return rows


def time_rows(case: Case, rows: list[Row], threads: list[int], rounds: int, quick: bool) -> None:
    """Round-robin timing; batch 8 is one batch, or 8 single images for a fixed-batch network."""
    timed = [r for r in rows if r.path is not None]
    sessions = {(r.variant, t): ort_session(r.path, threads=t) for r in timed for t in threads}
    big = 2 if quick else 8
    single = images(case, 1, 3).numpy()
    fixed_batch = case.kind == "detection"
    batch = single if fixed_batch else images(case, big, 4).numpy()
    for session in sessions.values():  # warm-up
        session.run(None, {"input": single})
    for i in range(rounds):
        order = list(sessions.items())
        order = order[i % len(order):] + order[: i % len(order)]
        for (variant, t), session in order:
            row = next(r for r in timed if r.variant == variant)
            start = time.perf_counter()
            session.run(None, {"input": single})
            row.times.setdefault(f"lat{t}", []).append(time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(big if fixed_batch else 1):
                session.run(None, {"input": single if fixed_batch else batch})
            row.times.setdefault(f"thr{t}", []).append(big / (time.perf_counter() - start))


def table(rows: list[Row], threads: list[int]) -> str:
    head = ["model", "variant", "file MB (x smaller)", "integer kernels"]
    head += [f"b1 {t}T ms" for t in threads] + [f"b8 {t}T img/s" for t in threads] + ["speed-up b1 1T", "agree", "err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in dict.fromkeys(r.model for r in rows):
        group = [r for r in rows if r.model == model]
        fp32 = group[0]
        for r in group:
            if r.path is None:
                lines.append(f"| {r.model} | {r.variant} | n/a: {r.note} |" + " |" * (len(head) - 3))
                continue
            lat = {t: 1e3 * statistics.median(r.times[f"lat{t}"]) for t in threads}
            thr = {t: statistics.median(r.times[f"thr{t}"]) for t in threads}
            ratios = [f / s for f, s in zip(fp32.times[f"lat{threads[0]}"], r.times[f"lat{threads[0]}"])]
            cells = [r.model, r.variant, f"{r.size / 2**20:.1f} ({fp32.size / r.size:.1f}x)",
                     f"{r.kernels['integer']} of {r.kernels['integer'] + r.kernels['float']}"]
            cells += [f"{lat[t]:.1f}" for t in threads] + [f"{thr[t]:.1f}" for t in threads]
            cells += [f"{statistics.median(ratios):.2f}x", f"{r.agree:.3f}", f"{r.err:.3g}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


EXPORTS = {"int8": {}, "int8, float_outputs": {"float_outputs": True}, "int4": {"weight_format": "int4"}}


@torch.no_grad()
def trained_agreement(ckpt: str, data: Any, work: Path) -> str:
    """ORT (default session) against the trained checkpoint's fake-quant model on a validation split,
    per export form (the last: the network put in deploy form on the 4 calibration batches, no
    training, also against that PyTorch deploy form): a classifier's logits (per image: largest difference over the largest logit)
    and top-1, or a detector's confident boxes (score >= 0.5, IoU >= 0.9, same label). The first row
    is PyTorch's own float32 model against float64, the float rounding every comparison sits on."""
    from gdrq_lightning.checkpoint import load_quantized_module
    from gdrq_lightning.export.accuracy import batch_inputs

    network = load_quantized_module(ckpt).export_network().eval()
    data.setup("validate")
    inputs = [x for batch in data.val_dataloader() for x in batch_inputs(batch)]
    reference = copy.deepcopy(network).double()
    detector = isinstance(network(inputs[0]), tuple)
    head = ["export", "integer kernels"] + (["images all matched", "boxes matched"] if detector else
                                              ["top-1 agreement", "median err", "max err", "images with err > 2%"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, kernels: str, outputs: list[Any], against: nn.Module | None = None) -> None:
        """``against``: the PyTorch model compared with (default: the fake-quant one, in float64)."""
        if detector:
            ref_net = against or network
            pairs = [match_detections(tuple(t.double() for t in ref_net(x)), o, score=0.5) for x, o in zip(inputs, outputs)]
            found, total = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
            lines.append(f"| {label} | {kernels} | {sum(p[0] == p[1] for p in pairs)}/{len(pairs)} | {found}/{total} |")
            return
        ref = torch.cat([reference(x.double()) if against is None else against(x).double() for x in inputs])
        got = torch.cat([o.double() for o in outputs])
        err = (got - ref).abs().amax(1) / ref.abs().amax(1)
        top1 = float((got.argmax(1) == ref.argmax(1)).float().mean())
        lines.append(f"| {label} | {kernels} | {top1:.4f} | {float(err.median()):.2g} | {float(err.max()):.3f} | "
                     f"{int((err > 0.02).sum())}/{len(err)} |")

    if not detector:
        row("PyTorch float32 (no export)", "-", [network(x) for x in inputs])
    calibration = inputs[:4]
    deployed = simulate_deploy(copy.deepcopy(network), calibration)  # no training: the form alone
    for label, options in [*EXPORTS.items(), ("deploy form (simulate_deploy)", None)]:
        path = work / f"trained_{len(lines)}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            to_onnx(deployed if options is None else network, inputs[0], path, calibration=calibration, **(options or {}))
        counts = kernel_summary(optimized_op_counts(path))
        session = ort_session(path)
        outputs = [tuple(torch.from_numpy(o) for o in session.run(None, {"input": x.numpy()})) for x in inputs]
        kernels = f"{counts['integer']} of {counts['integer'] + counts['float']}"
        row(label + (", vs fake-quant" if options is None else ""), kernels, outputs if detector else [o[0] for o in outputs])
        if options is None:  # what --validate compares: the file against the PyTorch deploy form
            row(label + ", vs its PyTorch deploy form", kernels, outputs if detector else [o[0] for o in outputs], deployed)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (each times every session once)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", default=None, help="subset of: resnet18 fcn_resnet18 fasterrcnn_r18_fpn")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4], help="our W/A bit widths")
    parser.add_argument("--calibration", type=int, default=4, help="random calibration batches")
    parser.add_argument("--quick", action="store_true", help="small inputs, 1 round, 1 thread, batch 2: a smoke test")
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--digits-ckpt", help="also: agreement of a trained digits classifier checkpoint on the 359 "
                                              "validation digits (DigitsDataModule, 32 px)")
    parser.add_argument("--coco-ckpt", help="also: agreement of a trained digits-COCO detector checkpoint on the "
                                            "validation canvases of --coco-root")
    parser.add_argument("--coco-root", default="data/digits_coco")
    args = parser.parse_args(argv)
    threads, rounds = ([1], 1) if args.quick else (args.threads, args.rounds)
    selected = [c for c in cases(args.quick) if args.models is None or c.name in args.models]
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"# ORT inference: onnxruntime {__import__('onnxruntime').__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} cores, rounds={rounds}, loadavg at start {load}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in selected:
            case_rows = prepare(case, args.bits, Path(tmp), 1 if args.quick else args.calibration)
            time_rows(case, case_rows, threads, rounds, args.quick)
            rows += case_rows
            print(f"\n### {case.name} at {case.size} px\n")
            print(table(case_rows, threads), flush=True)
        if args.digits_ckpt:
            from tasks.classification import DigitsDataModule

            print("\n### trained digits ResNet-18 (32 px), 359 validation digits\n")
            print(trained_agreement(args.digits_ckpt, DigitsDataModule(image_size=32, batch_size=64), Path(tmp)))
        if args.coco_ckpt:
            from tasks.detection import COCODataModule

            print("\n### trained digits-COCO detector, validation canvases\n")
            print(trained_agreement(args.coco_ckpt, COCODataModule(root=args.coco_root, batch_size=4), Path(tmp)))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
