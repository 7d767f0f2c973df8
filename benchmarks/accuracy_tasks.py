"""Accuracy of quantized fine-tunes on tasks with resolution: digits-VOC FCN-R18 (mIoU) and
digits-COCO Faster R-CNN R18-FPN (mAP), each row at its defaults (no sweep), same budget.

Protocol, per seed: the task's FP32 quickstart config trains FP32 from random weights (once,
cached in ``--cache-dir``); every row then fine-tunes that model with the task's GDRQ
quickstart fine-tune config — same data, optimizer, learning rate, epochs and phase schedule
(FP32 continues with no quantizer) — changing only the ``QuantConfig``:

* ``GDRQ defaults``: the former fixed factors ``k_w = 2``, ``k_a = 4``;
* ``GDRQ k_a auto``: the current defaults, what the quickstarts ship: ``k_w = 2``, ``k_a: auto``;
* ``GDRQ auto``: ``k_w: auto`` too;
* ``PACT``, ``DoReFa``, ``LSQ``: their defaults (PACT alpha init 6; DoReFa/PACT weights times
  ``w_scale`` on layers with no BatchNorm after them; LSQ steps from the first batch).

mIoU / mAP are the validation metrics after the last epoch (100 digits-VOC canvases of
48×48 px = 230,400 labelled pixels; 200 digits-COCO canvases with 2–4 boxes each). Results go
to ``--out`` (JSON lines) as runs finish; runs already there are skipped.

digits-COCO also has ``GDRQ k_a auto W4A4, heads float``: the detector's former default, backbone
+ FPN quantized, RPN and RoI heads float (the other rows quantize the heads' hidden layers at 8
bits, the detection configs' ``overrides``).

Usage:
    python benchmarks/accuracy_tasks.py --task voc --seeds 0 1 --out benchmarks/results/accuracy_voc.jsonl
    python benchmarks/accuracy_tasks.py --task coco --seeds 0 1 --out benchmarks/results/accuracy_coco.jsonl
    python benchmarks/accuracy_tasks.py --task voc --quick --out /tmp/q.jsonl
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import yaml

from gdrq_lightning import GDRQCallback, QuantConfig, Schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {  # task -> (FP32 config, fine-tune config, metric)
    "voc": ("configs/segmentation/digits_voc_fcn_fp32.yaml", "configs/segmentation/digits_voc_fcn_gdrq_w4a4.yaml", "val/mIoU"),
    "coco": ("configs/detection/digits_coco_fp32.yaml", "configs/detection/digits_coco_gdrq_w4a4.yaml", "val/mAP"),
}


# the detector's former quantization default: backbone + FPN only (RPN, RoI heads, stem conv float)
BACKBONE_ONLY = {"skip": ["backbone.body.conv1", "rpn", "roi_heads"], "quant_inputs": ["backbone.fpn.layer_blocks"],
                 "overrides": {}}


@dataclass(frozen=True)
class Row:
    label: str
    config: dict[str, Any]  # QuantConfig fields over the fine-tune config's ("method: none" = FP32)
    bits: tuple[int, int] = (4, 4)


def rows(task: str) -> list[Row]:
    out = [Row("FP32", {"method": "none"}, (32, 32))]
    for w, a in ((4, 4), (2, 4)) if task == "voc" else ((4, 4),):
        bits = {"weight_bits": w, "act_bits": a}
        out += [
            Row(f"GDRQ defaults W{w}A{a}", {"method": "gdrq", "k_w": 2.0, "k_a": 4.0, **bits}, (w, a)),
            Row(f"GDRQ k_a auto W{w}A{a}", {"method": "gdrq", "k_w": 2.0, "k_a": "auto", **bits}, (w, a)),
            Row(f"GDRQ auto W{w}A{a}", {"method": "gdrq", "k_w": "auto", "k_a": "auto", **bits}, (w, a)),
            Row(f"PACT W{w}A{a}", {"method": "pact", **bits}, (w, a)),
            Row(f"DoReFa W{w}A{a}", {"method": "dorefa", **bits}, (w, a)),
            Row(f"LSQ W{w}A{a}", {"method": "lsq", **bits}, (w, a)),
        ]
    if task == "coco":
        out.append(Row("GDRQ k_a auto W4A4, heads float", {"method": "gdrq", "k_w": 2.0, "k_a": "auto", **BACKBONE_ONLY}))
    return out


def load_config(path: str) -> dict[str, Any]:
    with open(os.path.join(ROOT, path)) as f:
        return yaml.safe_load(f)


def build(section: dict[str, Any], **overrides: Any) -> Any:
    module_name, _, class_name = section["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**{**(section.get("init_args") or {}), **overrides})


def trainer_for(config: dict[str, Any], callbacks: list[pl.Callback], args: argparse.Namespace, epochs: int) -> pl.Trainer:
    t = {k: v for k, v in config["trainer"].items() if k not in ("callbacks", "log_every_n_steps")}
    t.update(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False, accelerator="cpu", devices=1, callbacks=callbacks,
             default_root_dir=tempfile.mkdtemp(prefix="gdrq_acc_"))
    if args.quick:
        t.update(limit_train_batches=2, limit_val_batches=2)
    return pl.Trainer(**t)


def data_for(config: dict[str, Any]) -> pl.LightningDataModule:
    data = copy.deepcopy(config["data"])
    init = data.setdefault("init_args", {})
    init["root"] = os.path.join(ROOT, init["root"])
    return build(data)


def pretrained_fp32(task: str, seed: int, args: argparse.Namespace) -> str:
    """This seed's FP32 model from the task's FP32 config; trained once, cached."""
    fp32_config = load_config(TASKS[task][0])
    epochs = args.pretrain_epochs or fp32_config["trainer"]["max_epochs"]
    path = os.path.join(args.cache_dir, f"{task}_fp32_seed{seed}_{epochs}ep{'_quick' if args.quick else ''}.ckpt")
    if not os.path.exists(path):
        pl.seed_everything(seed, verbose=False)
        module = build(fp32_config["model"])
        trainer = trainer_for(fp32_config, [], args, 1 if args.quick else epochs)
        trainer.fit(module, data_for(fp32_config))
        os.makedirs(args.cache_dir, exist_ok=True)
        trainer.save_checkpoint(path + ".tmp", weights_only=True)
        os.replace(path + ".tmp", path)
        metric = float(trainer.callback_metrics[TASKS[task][2]])
        print(f"  pretrained FP32 {task} seed {seed}: {epochs} epochs, {TASKS[task][2]} {100 * metric:.2f} -> {path}", flush=True)
    return path


def run(task: str, row: Row, seed: int, args: argparse.Namespace) -> float:
    """Fine-tune the seed's FP32 model with the task's quickstart fine-tune recipe and ``row``'s QuantConfig."""
    config = load_config(TASKS[task][1])
    callback_args = config["trainer"]["callbacks"][0]["init_args"]
    epochs = 1 if args.quick else config["trainer"]["max_epochs"]
    pl.seed_everything(seed, verbose=False)
    module = build(config["model"], pretrained=pretrained_fp32(task, seed, args))
    callbacks: list[pl.Callback] = []
    if row.config["method"] != "none":
        quant = QuantConfig(**{**callback_args["config"], **row.config})
        callbacks.append(GDRQCallback(quant, Schedule(**callback_args["schedule"])))
    trainer = trainer_for(config, callbacks, args, epochs)
    trainer.fit(module, data_for(config))
    return float(trainer.callback_metrics[TASKS[task][2]])


def done_runs(path: str) -> dict[tuple[str, str, int], dict[str, Any]]:
    if not os.path.exists(path):
        return {}
    records = [json.loads(line) for line in open(path) if line.strip()]
    return {(r["task"], r["row"], r["seed"]): r for r in records}


def table(task: str, records: dict[tuple[str, str, int], dict[str, Any]], seeds: list[int]) -> str:
    metric = TASKS[task][2].split("/")[-1]
    lines = [f"| {task} row | {metric} (mean ± std) | per seed | Δ vs FP32 |", "|---|---:|---|---:|"]
    fp32 = [records[(task, "FP32", s)]["metric"] for s in seeds if (task, "FP32", s) in records]
    for row in rows(task):
        values = [records[(task, row.label, s)]["metric"] for s in seeds if (task, row.label, s) in records]
        if not values:
            continue
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        delta = f"{100 * (mean - statistics.mean(fp32)):+.2f}" if fp32 and row.label != "FP32" else ""
        per_seed = ", ".join(f"{100 * v:.2f}" for v in values)
        lines.append(f"| {row.label} | {100 * mean:.2f} ± {100 * std:.2f} | {per_seed} | {delta} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rows", nargs="+", help="labels of the rows to run (default: all)")
    p.add_argument("--pretrain-epochs", type=int, default=0, help="FP32 epochs (default: the FP32 config's)")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "gdrq_bench_tasks"))
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1 on a shared machine)")
    p.add_argument("--out", required=True, help="JSON-lines file: results are appended; finished runs are skipped")
    p.add_argument("--table-only", action="store_true", help="print the table of what --out holds; train nothing")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 epoch of 2 train / 2 val batches")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = done_runs(args.out)
    if not args.table_only:
        wanted = [r for r in rows(args.task) if not args.rows or r.label in args.rows]
        for seed in args.seeds:
            for row in wanted:
                if (args.task, row.label, seed) in records:
                    continue
                start = time.time()
                value = run(args.task, row, seed, args)
                record = {"task": args.task, "row": row.label, "seed": seed, "metric": value,
                          "seconds": round(time.time() - start, 1), "quick": args.quick}
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
                records[(args.task, row.label, seed)] = record
                print(f"  {row.label:24s} seed {seed}: {TASKS[args.task][2]} {100 * value:.2f}  ({record['seconds']:.0f} s)", flush=True)
    print(table(args.task, records, args.seeds))


if __name__ == "__main__":
    main()
