"""Mixed precision on the digits quickstarts: which sensitivity score plans bits best.

Three parts, each appending JSON lines to ``--out``:

* ``rank``: every method's per-layer score (on ``--batches`` training batches) against the loss
  increase measured one layer at a time (``measured``) on the same batches and on the validation
  split: Spearman rank correlation per bit width, and seconds per ``measure_sensitivity`` call.
* ``notrain``: plans of every method at each ``--budgets`` average weight bits (ties ``auto`` and
  ``none``), tried without training: weights fake-quantized at the plan, activations float,
  BatchNorm statistics as trained; validation loss (the task's training loss on the validation
  split) and the task metric, against uniform widths, against ``--random-plans`` random plans
  with the same bit histogram as the first method's plan (``random``; their size differs) and
  against as many plans at the same budget from random layer priorities (``random_budget``).
* ``finetune``: quantization-aware fine-tuning from the FP32 model with the run config's
  callback and schedule (activations at the config's bits), weights uniform W3, uniform W2, the
  plan at W3's total weight bits, and a random plan with the plan's histogram; ``--seeds``.

The network, data and loss are the run config's, built as ``gdrq bits`` builds them; the FP32
weights come from ``--ckpt`` (train them first with the task's ``*_fp32.yaml`` quickstart).

Usage:
    python benchmarks/mixed_precision.py --task classification --ckpt runs/classification/digits_fp32/last.ckpt \
        --k-w auto --parts rank notrain --out benchmarks/results/mixed_classification.jsonl
    python benchmarks/mixed_precision.py --task segmentation --ckpt runs/segmentation/digits_voc_fcn_fp32/last.ckpt \
        --k-w auto --out benchmarks/results/mixed_segmentation.jsonl
    python benchmarks/mixed_precision.py summarize benchmarks/results/mixed_*.jsonl   # markdown tables
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from scipy.stats import spearmanr

from gdrq_lightning import QuantConfig
from gdrq_lightning.mixed import METHODS, BitPlan, allocate, measure_sensitivity, plan_weights, with_plan
from gdrq_lightning.mixed import task_loss
from gdrq_lightning.mixed.command import build_task, load_float_weights, training_batches
from gdrq_lightning.mixed.layers import counted_layers, measuring
from gdrq_lightning.mixed.sensitivity import gradient_scorer, seeded
from gdrq_lightning.task import quant_network, resolve_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "classification": "configs/classification/digits_gdrq_w4a4.yaml",
    "segmentation": "configs/segmentation/digits_voc_fcn_gdrq_w4a4.yaml",
    "detection": "configs/detection/digits_coco_gdrq_w4a4.yaml",
}
# the default's statistic from whole batches and from single samples (the default splits batches into 8)
METHODS.setdefault("fisher_batch", gradient_scorer("linear_sq"))
METHODS.setdefault("fisher_m1", gradient_scorer("linear_sq", micro_batch=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=list(CONFIGS), required=True)
    p.add_argument("--config", help="run config (default: the task's digits quickstart)")
    p.add_argument("--ckpt", required=True, help="FP32 Lightning checkpoint of the task's *_fp32.yaml run")
    p.add_argument("--k-w", default=None, help="override the config's k_w (e.g. auto)")
    p.add_argument("--parts", nargs="+", default=["rank", "notrain"], choices=["rank", "notrain", "finetune"])
    p.add_argument("--methods", nargs="+",
                   default=["fisher", "fisher_batch", "fisher_m1", "fisher_diag", "fisher_naive", "mse", "measured"])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    p.add_argument("--batches", type=int, default=8, help="training batches for sensitivity")
    p.add_argument("--val-batches", type=int, default=None, help="validation batches (default: all)")
    p.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0])
    p.add_argument("--random-plans", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="finetune: training seeds")
    p.add_argument("--epochs", type=int, default=4, help="finetune: epochs")
    p.add_argument("--lr", type=float, default=None, help="finetune: learning rate (default: the config's)")
    p.add_argument("--schedule", default="scale_clip=0,quant_weights=1,quant_acts=1,groups=1",
                   help="finetune: phase epochs, NAME=EPOCH,... (default: GDRQ's reshape-then-quantize in 4 epochs)")
    p.add_argument("--limit-train-batches", type=int, default=None)
    p.add_argument("--plan-method", default="fisher", help="finetune: the method whose plan is trained")
    p.add_argument("--rows", nargs="+", default=["W3", "W2", "plan", "random"], help="finetune: rows to train")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


class Setup:
    """The task's module, float network, config, loss, training and validation batches."""

    def __init__(self, args: argparse.Namespace) -> None:
        import pytorch_lightning as pl

        self.path = args.config or str(ROOT / CONFIGS[args.task])
        self.raw = yaml.safe_load(Path(self.path).read_text())
        pl.seed_everything(args.seed, verbose=False)
        self.module, self.datamodule = build_task(copy.deepcopy(self.raw))
        load_float_weights(self.module, args.ckpt)
        self.net = quant_network(self.module)
        entry = next(c for c in self.raw["trainer"]["callbacks"] if c["class_path"].endswith("GDRQCallback"))
        self.user_config = dict(entry["init_args"].get("config") or {})
        if args.k_w is not None:
            self.user_config["k_w"] = args.k_w if args.k_w == "auto" else float(args.k_w)
        self.config = resolve_config(QuantConfig(**self.user_config), self.module)
        self.loss_fn = task_loss(self.module)
        self.train = training_batches(self.datamodule, self.module, args.batches, torch.device("cpu"))
        self.val = training_batches(self.datamodule, self.module, args.val_batches or 10**9, torch.device("cpu"), "val")
        self.task = args.task

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (the task loss, BatchNorms in eval mode, the same dropout masks and detector
        samples for every plan) and the task's metric."""
        layers = counted_layers(self.net, self.config)
        losses = []
        with measuring(self.net, layers):
            for i, b in enumerate(self.val):
                with seeded(i):
                    losses.append(float(self.loss_fn(self.net, b)))
        out = {"val_loss": sum(losses) / len(losses)}
        self.net.eval()
        if self.task == "classification":
            self.module.val_acc1.reset()
            for i, b in enumerate(self.val):
                self.module.val_acc1(self.module(b[0]), b[1])
            out["val_acc1"] = float(self.module.val_acc1.compute())
        elif self.task == "segmentation":
            from tasks.segmentation.metrics import iou_per_class

            self.module.val_confmat.reset()
            for b in self.val:
                self.module.val_confmat.update(self.module(b[0]).argmax(1), b[1].long())
            out["val_mIoU"] = float(iou_per_class(self.module.val_confmat.compute()).nanmean())
        return out


def append(path: str, row: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def common(args: argparse.Namespace, s: Setup) -> dict[str, Any]:
    return {"task": args.task, "config": os.path.relpath(s.path, ROOT), "k_w": s.config.k_w, "method_q": s.config.method.value,
            "groups": s.config.groups, "bits": args.bits, "batches": args.batches, "seed": args.seed,
            "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}


def part_rank(args: argparse.Namespace, s: Setup) -> dict[str, Any]:
    reports = {}
    for method in args.methods:
        reports[method] = measure_sensitivity(s.net, s.config, s.train, s.loss_fn, args.bits, method=method)
        append(args.out, {**common(args, s), "part": "rank", "kind": "report", "method": method,
                          "seconds": reports[method].seconds, "report": reports[method].to_dict()})
    truth = {"train": reports.get("measured")}
    start = time.perf_counter()
    truth["val"] = measure_sensitivity(s.net, s.config, s.val, s.loss_fn, args.bits, method="measured")
    append(args.out, {**common(args, s), "part": "rank", "kind": "report", "method": "measured@val",
                      "seconds": time.perf_counter() - start, "report": truth["val"].to_dict()})
    names = truth["val"].layers
    for method, rep in reports.items():
        for split, ref in truth.items():
            if ref is None:
                continue
            rho = {b: float(spearmanr([ref.scores[n][b] for n in names], [rep.scores[n][b] for n in names])[0]) for b in args.bits}
            append(args.out, {**common(args, s), "part": "rank", "kind": "spearman", "method": method,
                              "against": f"measured@{split}", "spearman": rho, "seconds": rep.seconds})
    return reports


def random_plans(plan: BitPlan, n: int, seed: int) -> list[BitPlan]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        values = list(plan.weight_bits.values())
        rng.shuffle(values)
        out.append(dataclasses.replace(plan, weight_bits=dict(zip(plan.weight_bits, values)), solver="random"))
    return out


def random_budget_plans(report: Any, budget: float, ties: str, n: int, seed: int) -> list[BitPlan]:
    """Plans at the same budget from random per-layer sensitivities ``u_l · 4^-b`` (the shape of a
    quantization MSE): the budget is used as fully as by a scored plan, the priorities are random."""
    rng = random.Random(seed + 1)
    out = []
    for _ in range(n):
        scores = {name: dict.fromkeys(report.bits, 0.0) for name in report.layers}
        for name in report.layers:
            u = rng.random()
            scores[name] = {b: u * 4.0 ** -b for b in report.bits}
        fake = dataclasses.replace(report, scores=scores, method="random")
        out.append(allocate(fake, avg_weight_bits=budget, ties=ties))
    return out


def plan_row(plan: BitPlan) -> dict[str, Any]:
    return {"avg_weight_bits": plan.avg_weight_bits, "size_mb": plan.size_mb, "bops": plan.bops,
            "histogram": plan.histogram(), "weight_bits": plan.weight_bits}


def part_notrain(args: argparse.Namespace, s: Setup, reports: dict[str, Any]) -> None:
    base = {**common(args, s), "part": "notrain"}
    append(args.out, {**base, "kind": "fp32", **s.evaluate()})
    any_report = next(iter(reports.values()))
    for b in args.bits:
        uniform = allocate(any_report, avg_weight_bits=b, ties="none").uniform(b)
        with plan_weights(s.net, s.config, uniform):
            append(args.out, {**base, "kind": "uniform", "bits_uniform": b, **plan_row(uniform), **s.evaluate()})
    for budget in args.budgets:
        for method, rep in reports.items():
            for ties in ("auto", "none"):
                plan = allocate(rep, avg_weight_bits=budget, ties=ties)
                with plan_weights(s.net, s.config, plan):
                    result = s.evaluate()
                append(args.out, {**base, "kind": "plan", "method": method, "budget": budget, "ties": ties,
                                  "solver": plan.solver, **plan_row(plan), **result})
                if method == args.methods[0]:
                    for i, rnd in enumerate(random_plans(plan, args.random_plans, args.seed)):
                        with plan_weights(s.net, s.config, rnd):
                            append(args.out, {**base, "kind": "random", "like": method, "budget": budget, "ties": ties,
                                              "draw": i, **plan_row(rnd), **s.evaluate()})
                    for i, rnd in enumerate(random_budget_plans(rep, budget, ties, args.random_plans, args.seed)):
                        with plan_weights(s.net, s.config, rnd):
                            append(args.out, {**base, "kind": "random_budget", "budget": budget, "ties": ties,
                                              "draw": i, **plan_row(rnd), **s.evaluate()})


def part_finetune(args: argparse.Namespace, s: Setup) -> None:
    """Train each row from the FP32 model with the config's callback and schedule."""
    report = measure_sensitivity(s.net, s.config, s.train, s.loss_fn, args.bits, method=args.plan_method)
    plan = allocate(report, avg_weight_bits=3.0)
    rows = {"W3": plan.uniform(3), "W2": plan.uniform(2), "plan": plan, "random": random_plans(plan, 1, args.seed)[0]}
    for seed in args.seeds:
        for label in args.rows:
            result = finetune(args, s, rows[label], seed)
            append(args.out, {**common(args, s), "part": "finetune", "row": label, "train_seed": seed,
                              "plan_method": args.plan_method, **plan_row(rows[label]), **result})


def finetune(args: argparse.Namespace, s: Setup, plan: BitPlan, seed: int) -> dict[str, Any]:
    import pytorch_lightning as pl

    from gdrq_lightning import GDRQCallback, Schedule

    raw = copy.deepcopy(s.raw)
    entry = next(c for c in raw["trainer"]["callbacks"] if c["class_path"].endswith("GDRQCallback"))
    init = dict(entry["init_args"])
    if args.lr is not None:
        raw["model"]["init_args"]["lr"] = args.lr
    schedule = {k: int(v) for k, v in (item.split("=") for item in args.schedule.split(","))}
    config = with_plan(QuantConfig(**{**s.user_config, "overrides": {}}), plan)
    pl.seed_everything(seed, verbose=False)
    module, datamodule = build_task(raw)
    load_float_weights(module, args.ckpt)  # the start; a loaded state dict also stands in for `pretrained`
    callback = GDRQCallback(config, Schedule(**schedule), summary_metric=init.get("summary_metric"))
    epochs = args.epochs
    trainer = pl.Trainer(default_root_dir=tempfile.mkdtemp(prefix="gdrq_mixed_"), max_epochs=epochs, accelerator="cpu",
                         devices=1, logger=False, callbacks=[callback], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         check_val_every_n_epoch=epochs, limit_train_batches=args.limit_train_batches,
                         gradient_clip_val=raw["trainer"].get("gradient_clip_val"))
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return {"metrics": metrics, "epochs": epochs, "lr": raw["model"]["init_args"].get("lr"), "schedule": schedule,
            "seconds": time.perf_counter() - start}


def summarize(paths: list[str]) -> str:
    """Markdown tables of result files: ranking, no-training plans, fine-tuning, cost."""
    import statistics as st

    rows = [json.loads(line) for p in paths for line in open(p)]
    metric = {"classification": ("val_acc1", 100, "top-1 %"), "segmentation": ("val_mIoU", 100, "mIoU")}
    out = ["| task | method | vs | 2 bits | 3 bits | 4 bits | 8 bits | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") == "spearman":
            rho = " | ".join(f"{r['spearman'][str(b)]:.2f}" for b in (2, 3, 4, 8))
            out.append(f"| {r['task']} | {r['method']} | {r['against'].replace('measured@', '')} | {rho} | {r['seconds']:.0f} |")
    out += ["", "| task | budget | ties | plan | val loss | metric | avg bits |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] != "notrain" or r.get("kind") not in ("fp32", "uniform"):
            continue
        key, scale, _ = metric.get(r["task"], (None, 1, ""))
        label = "FP32" if r["kind"] == "fp32" else f"uniform W{r['bits_uniform']}"
        m = f"{r[key] * scale:.1f}" if key else "-"
        out.append(f"| {r['task']} | - | - | {label} | {r['val_loss']:.3f} | {m} | {r.get('avg_weight_bits', 32):.2f} |")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["part"] == "notrain" and r.get("kind") in ("plan", "random", "random_budget"):
            label = r["method"] if r["kind"] == "plan" else ("random (histogram)" if r["kind"] == "random" else "random (budget)")
            groups.setdefault((r["task"], r["budget"], r["ties"], label), []).append(r)
    for (task, budget, ties, label), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        key, scale, _ = metric.get(task, (None, 1, ""))
        loss = [r["val_loss"] for r in rs]
        text = f"{st.mean(loss):.3f}" + (f" ± {st.stdev(loss):.3f}" if len(loss) > 1 else "")
        m = f"{st.mean(r[key] for r in rs) * scale:.1f}" if key else "-"
        bits = [r["avg_weight_bits"] for r in rs]
        span = f"{min(bits):.2f}" + (f"-{max(bits):.2f}" if max(bits) - min(bits) > 0.005 else "")
        out.append(f"| {task} | {budget:g} | {ties} | {label} | {text} | {m} | {span} |")
    fine: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["part"] == "finetune":
            fine.setdefault((r["task"], r["row"]), []).append(r)
    if fine:
        out += ["", "| task | row | avg bits | seeds | validation metric per seed | mean |", "|---|---|---|---|---|---|"]
        for (task, row), rs in fine.items():
            name = {"classification": "val/acc1", "segmentation": "val/mIoU", "detection": "val/mAP"}[task]
            vals = [100 * r["metrics"].get(name, float("nan")) for r in rs]
            out.append(f"| {task} | {row} | {rs[0]['avg_weight_bits']:.2f} | {len(rs)} | "
                       f"{', '.join(f'{v:.1f}' for v in vals)} | {st.mean(vals):.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    if argv is None and sys.argv[1:2] == ["summarize"]:
        print(summarize(sys.argv[2:]))
        return
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s = Setup(args)
    reports: dict[str, Any] = {}
    if "rank" in args.parts or "notrain" in args.parts:
        if "rank" in args.parts:
            reports = part_rank(args, s)
        else:
            reports = {m: measure_sensitivity(s.net, s.config, s.train, s.loss_fn, args.bits, method=m) for m in args.methods}
    if "notrain" in args.parts:
        part_notrain(args, s, reports)
    if "finetune" in args.parts:
        part_finetune(args, s)


if __name__ == "__main__":
    sys.exit(main())
