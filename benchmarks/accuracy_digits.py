"""Top-1 accuracy of every method on the embedded digits: mean ± std over seeds.

Same network (torchvision ResNet-18, 32x32 input, 10 classes), same data split,
epochs, optimizer (SGD, Nesterov momentum 0.9, lr 0.05, weight decay 5e-4 on conv /
linear weights only), per-step cosine schedule, batch 32 and seeds for every row.

* Our methods run through the task code: ``ClassificationModule`` +
  ``DigitsDataModule`` + ``GDRQCallback`` with a ``Schedule`` that trains
  ``--warmup-epochs`` in full precision and then switches every phase on at once
  (Scale-Clip, weight and activation quantization, groups; BN never frozen) —
  except the rows that follow GDRQ's two-step recipe (reshape, then quantize): they
  run Scale-Clip alone for ``reshape_epochs`` first, within the same epoch budget.
  The "all at once" rows are the same methods without that step.
* torch.ao QAT and Brevitas run in a plain PyTorch loop over the same
  ``DigitsDataModule``, with the same optimizer grouping (``tasks.common.param_groups``)
  and the same cosine factor as ``tasks.common.build_optimization`` (which needs a
  Lightning trainer). The warm-up is matched: torch.ao trains with fake-quant and
  observers disabled, Brevitas trains the float network and swaps its layers in
  (sharing the Parameters, so the optimizer state carries over).
  "FP32 (plain loop)" is a control row: it shows what the loop itself contributes.

Two protocols:

* from scratch (default): every row starts from the same random initialisation and trains
  ``--epochs`` at lr 0.05, quantizing after ``--warmup-epochs``;
* fine-tune (``--pretrain-epochs P``): per seed, FP32 is first trained ``P`` epochs at lr 0.05
  (once, cached in ``--cache-dir``); every row then starts from that model and trains
  ``--epochs`` more at ``--lr`` (default a tenth, 0.005) — the usual QAT setting, and the
  one the GDRQ, PACT and LSQ papers report. The FP32 row is the same model trained on.

Either protocol can be tuned (``--tune-holdout F``): a share ``F`` of the training split is set
aside (the FP32 model of the fine-tune protocol never sees it either), and every compared row
runs three settings of one knob: its activation clip where the method sets one (GDRQ ``k_a``,
PACT's alpha init), otherwise the learning rate (x0.5, x1, x2). The setting with the best mean held-out
top-1 over the seeds is chosen, and the table reports *its* validation top-1: the validation
images never choose anything.

Accuracy is measured once, on the validation split, after the last epoch
(torch.ao: fake-quant model with observers frozen, not the converted int8 model).
Results are appended to ``--out`` (JSON lines) as they finish, and runs already in
that file are skipped, so an interrupted run can be resumed.

Usage:
    python benchmarks/accuracy_digits.py --epochs 4 --seeds 0 1 2 --out /tmp/acc.jsonl
    python benchmarks/accuracy_digits.py --pretrain-epochs 10 --epochs 4 --warmup-epochs 0 --out /tmp/ft.jsonl
    python benchmarks/accuracy_digits.py --pretrain-epochs 10 --epochs 4 --warmup-epochs 0 --tune-holdout 0.2 \
        --out /tmp/tuned.jsonl
    python benchmarks/accuracy_digits.py --quick
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import pytorch_lightning as pl
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402

from gdrq_lightning import GDRQCallback, QuantConfig, Schedule  # noqa: E402
from tasks.classification import ClassificationModule, DigitsDataModule  # noqa: E402
from tasks.classification.datamodule import DigitsDataset  # noqa: E402
from tasks.common import param_groups  # noqa: E402
from tasks.digits import load_digits_arrays, split_indices  # noqa: E402

MODEL, IMAGE_SIZE, BATCH, LR, WEIGHT_DECAY, MOMENTUM, GROUPS = "resnet18", 32, 32, 0.05, 5e-4, 0.9, 4


@dataclass(frozen=True)
class Knob:
    """A hyper-parameter ``--tune-holdout`` tries at three values; a tie goes to ``default``."""

    name: str
    values: tuple[float, ...]
    default: float


@dataclass
class Row:
    """One table row: ``kind`` is ``ours`` (Lightning + callback), ``fp32``/``torch_ao``/``brevitas`` (plain loop)."""

    label: str
    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    reshape_epochs: int = 0  # Scale-Clip alone for this many epochs before quantizing (GDRQ's two-step recipe)
    knob: Knob | None = None  # what --tune-holdout tries


# --tune-holdout: every compared row gets three settings of one knob, chosen on held-out data:
# its activation clip where the method sets one (GDRQ k_a, PACT's alpha init), else the lr (x --lr).
# k_a reaches up to 8: for a ReLU of a unit Gaussian, 4-bit MSE is lowest near a clip of 2.9 (k_a 7.3).
K_A = Knob("k_a", (4.0, 6.0, 8.0), 4.0)
PACT_ALPHA = Knob("pact_alpha_init", (3.0, 6.0, 10.0), 6.0)
LR_SCALE = Knob("lr_scale", (0.5, 1.0, 2.0), 1.0)

FIXED = {"k_a": 4.0}  # the former fixed default, kept explicit so records before "auto" stay comparable
AUTO = {"k_w": "auto", "k_a": "auto"}  # calibrated factors (docs/methods.md#scale-clip)

ROWS = [
    Row("FP32", "ours", {"method": "none"}),
    Row(f"GDRQ W4A4 (G={GROUPS})", "ours", {"method": "gdrq", "weight_bits": 4, "act_bits": 4, "groups": GROUPS, **FIXED}, 1, K_A),
    Row(f"GDRQ W2A4 (G={GROUPS})", "ours", {"method": "gdrq", "weight_bits": 2, "act_bits": 4, "groups": GROUPS, **FIXED}, 1, K_A),
    Row(f"GDRQ W4A4 (G={GROUPS}), auto", "ours", {"method": "gdrq", "weight_bits": 4, "act_bits": 4, "groups": GROUPS, **AUTO}, 1),
    Row(f"GDRQ W2A4 (G={GROUPS}), auto", "ours", {"method": "gdrq", "weight_bits": 2, "act_bits": 4, "groups": GROUPS, **AUTO}, 1),
    Row(f"GDRQ W4A4 (G={GROUPS}), all at once", "ours",
           {"method": "gdrq", "weight_bits": 4, "act_bits": 4, "groups": GROUPS, **FIXED}),
    Row(f"GDRQ W2A4 (G={GROUPS}), all at once", "ours",
           {"method": "gdrq", "weight_bits": 2, "act_bits": 4, "groups": GROUPS, **FIXED}),
    Row("Scale-Clip only W4A4", "ours", {"method": "scale_clip", "weight_bits": 4, "act_bits": 4, **FIXED}, 1),
    Row(f"Group only W4A4 (G={GROUPS})", "ours", {"method": "group", "weight_bits": 4, "act_bits": 4, "groups": GROUPS, **FIXED}),
    Row("HWGQ W1A2", "ours", {"method": "hwgq", "weight_bits": 1, "act_bits": 2}),
    Row("DoReFa W4A4", "ours", {"method": "dorefa", "weight_bits": 4, "act_bits": 4}, knob=LR_SCALE),
    Row("DoReFa W2A4", "ours", {"method": "dorefa", "weight_bits": 2, "act_bits": 4}, knob=LR_SCALE),
    Row("PACT W4A4", "ours", {"method": "pact", "weight_bits": 4, "act_bits": 4}, knob=PACT_ALPHA),
    Row("PACT W2A4", "ours", {"method": "pact", "weight_bits": 2, "act_bits": 4}, knob=PACT_ALPHA),
    Row("LSQ W4A4", "ours", {"method": "lsq", "weight_bits": 4, "act_bits": 4}, knob=LR_SCALE),
    Row("LSQ W2A4", "ours", {"method": "lsq", "weight_bits": 2, "act_bits": 4}, knob=LR_SCALE),
    Row("torch.ao QAT W8A8 (x86)", "torch_ao"),
    Row("Brevitas W4A4", "brevitas", {"weight_bits": 4, "act_bits": 4}, knob=LR_SCALE),
    Row("Brevitas W2A4", "brevitas", {"weight_bits": 2, "act_bits": 4}, knob=LR_SCALE),
    Row("FP32 (plain loop)", "fp32"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--warmup-epochs", type=int, default=1, help="full-precision epochs before quantization starts")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None, help="labels (or substrings) of the rows to run")
    p.add_argument("--skip", nargs="+", default=[], help="labels (or substrings) of rows to leave out")
    p.add_argument("--pretrain-epochs", type=int, default=0,
                   help="fine-tune protocol: start every row from FP32 trained this many epochs (0: from scratch)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate of the rows (default {LR} from scratch, {LR / 10:g} when fine-tuning)")
    p.add_argument("--tune-holdout", type=float, default=0.0,
                   help="set this share of the training split aside; every compared row tries three settings of "
                        "one knob (GDRQ k_a, PACT alpha init, else the lr) and reports the one best on it (0: off)")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "gdrq_bench_fp32"),
                   help="where the pretrained FP32 models of --pretrain-epochs are kept between runs")
    p.add_argument("--limit-train-batches", type=int, default=None)
    p.add_argument("--limit-val-batches", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1 on a shared machine)")
    p.add_argument("--out", default=None, help="JSON-lines file: results are appended; finished runs are skipped")
    p.add_argument("--table-only", action="store_true", help="print the table of what --out already holds; train nothing")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch, 2 train / 1 val batches, no warm-up")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.warmup_epochs = args.seeds[:1], 1, 0
        args.limit_train_batches, args.limit_val_batches = 2, 1
    if not 0 <= args.warmup_epochs < args.epochs:
        p.error(f"--warmup-epochs={args.warmup_epochs} must be in [0, --epochs={args.epochs})")
    if args.table_only and not args.out:
        p.error("--table-only needs --out (the results to print)")
    if not 0 <= args.tune_holdout < 1:
        p.error(f"--tune-holdout={args.tune_holdout} must be in [0, 1)")
    if args.pretrain_epochs < 0:
        p.error(f"--pretrain-epochs={args.pretrain_epochs} must be >= 0")
    if args.lr is None:
        args.lr = LR / 10 if args.pretrain_epochs else LR
    return args


class HoldoutDigits(DigitsDataModule):
    """The digits split with ``holdout`` of its training images set aside, unaugmented, to choose settings on.

    The validation split is untouched, so chosen settings are never fitted to the images they are reported on.
    """

    def __init__(self, holdout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.holdout = holdout

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.holdout:
            h = self.hparams
            train_idx, _ = split_indices(len(load_digits_arrays()[1]), h.val_fraction, h.split_seed)
            keep, held = split_indices(len(train_idx), self.holdout, seed=h.split_seed + 1)
            self.train_set = DigitsDataset(train_idx[keep], h.image_size, train=True)
            self.holdout_set = DigitsDataset(train_idx[held], h.image_size, train=False)

    def holdout_dataloader(self) -> DataLoader:
        return self._loader(self.holdout_set, False)


def with_setting(method: Row, args: argparse.Namespace, value: float | None) -> tuple[Row, argparse.Namespace]:
    """The row and arguments with its knob at ``value`` (``None``: as defined)."""
    if value is None:
        return method, args
    name = method.knob.name
    if name == "lr_scale":
        return method, argparse.Namespace(**{**vars(args), "lr": args.lr * value})
    return replace(method, config={**method.config, name: value}), args


def choose(holdout_means: dict[float, float], default: float) -> float:
    """The setting with the best held-out accuracy; a tie goes to the default."""
    return max(holdout_means, key=lambda v: (round(holdout_means[v], 6), v == default))


def _limited(loader, limit: int | None):
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            return
        yield batch


def schedule_for(method: Row, args: argparse.Namespace) -> Schedule:
    """FP warm-up, then Scale-Clip alone for ``reshape_epochs``, then everything else; BN never frozen.

    The reshaping epochs come out of the same ``--epochs`` budget as everyone else's.
    """
    w = args.warmup_epochs
    q = min(w + method.reshape_epochs, args.epochs - 1)
    return Schedule(scale_clip=w, quant_weights=q, quant_acts=q, groups=q, freeze_bn=None)


def pretrained_fp32(seed: int, args: argparse.Namespace) -> str | None:
    """Path of this seed's FP32 model trained ``--pretrain-epochs`` at lr 0.05; trained once, shared by processes."""
    if not args.pretrain_epochs:
        return None
    os.makedirs(args.cache_dir, exist_ok=True)
    limit = "" if args.limit_train_batches is None else f"_limit{args.limit_train_batches}"
    held = f"_holdout{args.tune_holdout:g}" if args.tune_holdout else ""
    path = os.path.join(args.cache_dir, f"fp32_{MODEL}_seed{seed}_{args.pretrain_epochs}ep{limit}{held}.pt")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here instead of training it again
        if not os.path.exists(path):
            fp32 = next(m for m in ROWS if m.label == "FP32")
            module, accs = _fit_ours(fp32, seed, args, epochs=args.pretrain_epochs, lr=LR, pretrained=None)
            torch.save(module.model.state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)
            print(f"  pretrained FP32 seed {seed}: {args.pretrain_epochs} epochs, top-1 {100 * accs['acc']:.2f}% "
                  f"-> {path}", flush=True)
    return path


def run_ours(method: Row, seed: int, args: argparse.Namespace, pretrained: str | None) -> dict[str, float]:
    """Lightning + GDRQCallback from ``pretrained`` (or scratch); top-1 after the last epoch.

    Returns ``{"acc": validation top-1}``, plus ``"holdout_acc"`` with ``--tune-holdout``.
    """
    return _fit_ours(method, seed, args, epochs=args.epochs, lr=args.lr, pretrained=pretrained)[1]


def _fit_ours(method: Row, seed: int, args: argparse.Namespace, *, epochs: int, lr: float,
              pretrained: str | None) -> tuple[ClassificationModule, dict[str, float]]:
    pl.seed_everything(seed, verbose=False)
    dm = HoldoutDigits(args.tune_holdout, image_size=IMAGE_SIZE, batch_size=BATCH)
    module = ClassificationModule(MODEL, num_classes=10, lr=lr, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM,
                                  pretrained=pretrained)
    callbacks = []
    if method.config["method"] != "none":
        # no QuantMonitor: its distribution PNGs cost seconds per phase here and say nothing about accuracy
        callbacks.append(GDRQCallback(QuantConfig(**method.config), schedule_for(method, args)))
    trainer = pl.Trainer(
        default_root_dir=tempfile.mkdtemp(prefix="gdrq_bench_"),
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, check_val_every_n_epoch=epochs,
        limit_train_batches=args.limit_train_batches, limit_val_batches=args.limit_val_batches,
    )
    trainer.fit(module, datamodule=dm)
    accs = {"acc": float(trainer.callback_metrics["val/acc1"])}
    if args.tune_holdout:
        accs["holdout_acc"] = trainer.validate(module, dataloaders=dm.holdout_dataloader(), verbose=False)[0]["val/acc1"]
    return module, accs


def _cosine(step: int, total: int) -> float:
    """The factor of ``tasks.common.build_optimization`` (cosine, no warm-up steps)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


def run_plain(method: Row, seed: int, args: argparse.Namespace, pretrained: str | None) -> dict[str, float]:
    """Plain loop for the FP32 control, torch.ao QAT and Brevitas; accuracies as :func:`run_ours`."""
    import torch.ao.quantization as tq

    pl.seed_everything(seed, verbose=False)
    dm = HoldoutDigits(args.tune_holdout, image_size=IMAGE_SIZE, batch_size=BATCH)
    dm.setup("fit")
    model: nn.Module = torchvision.models.get_model(MODEL, weights=None, num_classes=10)  # same RNG use as the module
    if pretrained:
        model.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True))
    if method.kind == "torch_ao":
        fp_state = model.state_dict()
        model = baselines._quantizable(MODEL, 10)
        model.load_state_dict(fp_state, strict=False)
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fuse_model(is_qat=True)
            model.qconfig = tq.get_default_qat_qconfig("x86")
            tq.prepare_qat(model, inplace=True)
        if args.warmup_epochs:
            model.apply(tq.disable_fake_quant)
            model.apply(tq.disable_observer)
    opt = torch.optim.SGD(param_groups(model, WEIGHT_DECAY), lr=args.lr, momentum=MOMENTUM, nesterov=True)
    n_batches = len(dm.train_dataloader())
    if args.limit_train_batches is not None:
        n_batches = min(n_batches, args.limit_train_batches)
    total, step = args.epochs * n_batches, 0
    for epoch in range(args.epochs):
        if epoch == args.warmup_epochs:
            if method.kind == "torch_ao":
                model.apply(tq.enable_fake_quant)
                model.apply(tq.enable_observer)
            elif method.kind == "brevitas":
                model = baselines.brevitas_swap(model, method.config["weight_bits"], method.config["act_bits"])
                known = {id(p) for g in opt.param_groups for p in g["params"]}
                opt.param_groups[1]["params"].extend(p for p in model.parameters() if id(p) not in known)
        model.train()
        for x, y in _limited(dm.train_dataloader(), args.limit_train_batches):
            for g in opt.param_groups:
                g["lr"] = args.lr * _cosine(step, total)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
    if method.kind == "torch_ao":
        model.apply(tq.disable_observer)
    model.eval()
    accs = {"acc": _accuracy(model, dm.val_dataloader(), args.limit_val_batches)}
    if args.tune_holdout:
        accs["holdout_acc"] = _accuracy(model, dm.holdout_dataloader(), args.limit_val_batches)
    return accs


@torch.no_grad()
def _accuracy(model: nn.Module, loader: DataLoader, limit: int | None) -> float:
    correct = seen = 0
    for x, y in _limited(loader, limit):
        correct += int((model(x).argmax(1) == y).sum())
        seen += len(y)
    return correct / max(seen, 1)


def selected(args: argparse.Namespace) -> list[Row]:
    """The rows to run: ``--methods`` minus ``--skip``; with ``--tune-holdout``, by default the compared rows and FP32."""
    methods = [m for m in ROWS if m.kind != "brevitas" or baselines.brevitas_available()]
    if args.methods:
        methods = [m for m in methods if any(_matches(s, m.label) for s in args.methods)]
    elif args.tune_holdout:
        methods = [m for m in methods if m.knob or m.label == "FP32"]
    return [m for m in methods if not any(_matches(s, m.label) for s in args.skip)]


def settings(method: Row, args: argparse.Namespace) -> tuple[float | None, ...]:
    """The knob values a row runs at: all three with ``--tune-holdout``, otherwise just the row as defined."""
    return method.knob.values if args.tune_holdout and method.knob else (None,)


def _matches(pattern: str, label: str) -> bool:
    """A pattern equal to some row's label selects that row only; otherwise it matches as a substring."""
    labels = [m.label.lower() for m in ROWS]
    pattern, label = pattern.lower(), label.lower()
    return pattern == label if pattern in labels else pattern in label


Results = dict[tuple[str, str | None, float | None], dict[int, dict]]  # (label, knob, value) -> seed -> record


def _key(method: Row, value: float | None) -> tuple[str, str | None, float | None]:
    return method.label, method.knob.name if value is not None else None, value


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def print_table(results: Results, args: argparse.Namespace) -> None:
    if args.tune_holdout:
        print_tuned_table(results, args)
        return
    print("\n| method | top-1 % (mean ± std) | seeds | per seed | s/run |")
    print("|---|---:|---:|---|---:|")
    for m in selected(args):
        runs = results.get(_key(m, None), {})
        accs = [100 * runs[s]["acc"] for s in args.seeds if s in runs]
        if not accs:
            print(f"| {m.label} | (not run) | 0 | | |")
            continue
        secs = statistics.mean(runs[s]["seconds"] for s in args.seeds if s in runs)
        per_seed = ", ".join(f"{a:.1f}" for a in accs)
        print(f"| {m.label} | {_mean_std(accs)} | {len(accs)} | {per_seed} | {secs:.0f} |")


def print_tuned_table(results: Results, args: argparse.Namespace) -> None:
    """Per row: held-out top-1 of each setting, the one chosen there, and its validation top-1.

    Only seeds that every setting of the row has finished count, so the settings are compared on the same runs.
    """
    print(f"\n| method | held-out top-1 % by setting ({100 * args.tune_holdout:g} % of train) | chosen "
          "| val top-1 % (mean ± std) | seeds | val per seed |")
    print("|---|---|---|---:|---:|---|")
    for m in selected(args):
        values = settings(m, args)
        seeds = [s for s in args.seeds if all(s in results.get(_key(m, v), {}) for v in values)]
        if not seeds:
            print(f"| {m.label} | (not run) | | | 0 | |")
            continue
        held = {v: statistics.mean(100 * results[_key(m, v)][s]["holdout_acc"] for s in seeds) for v in values}
        name = m.knob.name if values != (None,) else None
        best = choose(held, m.knob.default) if name else None
        shown = " · ".join(f"{name}={v:g}: {a:.1f}" if name else f"{a:.1f}" for v, a in held.items())
        accs = [100 * results[_key(m, best)][s]["acc"] for s in seeds]
        per_seed = ", ".join(f"{a:.1f}" for a in accs)
        chosen = f"{name}={best:g}" if name else "–"
        print(f"| {m.label} | {shown} | {chosen} | {_mean_std(accs)} | {len(accs)} | {per_seed} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # quiet Lightning for the sweep, and leave the caller's logging / warnings as they were
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sweep(args)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def sweep(args: argparse.Namespace) -> None:
    """Run every selected (method, seed) not yet in ``--out`` and print the table."""
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    start = f"from FP32 trained {args.pretrain_epochs} epochs, " if args.pretrain_epochs else "from scratch, "
    print(f"# digits accuracy: {MODEL} {IMAGE_SIZE}x{IMAGE_SIZE}, batch {BATCH}, {start}{args.epochs} epochs "
          f"({args.warmup_epochs} FP warm-up) at lr {args.lr:g}, seeds {args.seeds}, threads {args.threads}, "
          f"loadavg {load}", flush=True)
    if not baselines.brevitas_available():
        print(baselines.BREVITAS_MISSING)
    key = {"epochs": args.epochs, "warmup": args.warmup_epochs, "limit": args.limit_train_batches,
           "pretrain": args.pretrain_epochs, "lr": args.lr, "holdout": args.tune_holdout}
    # records from before these fields existed were scratch runs at LR on the whole training split
    written_before = {"pretrain": 0, "lr": LR, "holdout": 0.0}
    results: Results = {}
    if args.out and os.path.exists(args.out):
        with open(args.out) as f:
            for line in f:
                r = json.loads(line)
                if all(r.get(k, written_before.get(k)) == v for k, v in key.items()):
                    results.setdefault((r["method"], r.get("knob"), r.get("setting")), {})[r["seed"]] = r
    for seed in [] if args.table_only else args.seeds:  # seed-major: a partial table has every method
        for m in selected(args):
            for value in settings(m, args):
                if seed in results.get(_key(m, value), {}):
                    continue
                pretrained = pretrained_fp32(seed, args)  # trained (once) outside the row's clock
                row, row_args = with_setting(m, args, value)
                t0 = time.perf_counter()
                accs = (run_ours if m.kind == "ours" else run_plain)(row, seed, row_args, pretrained)
                r = {"method": m.label, "seed": seed, **accs, "seconds": time.perf_counter() - t0, **key}
                if value is not None:
                    r |= {"knob": m.knob.name, "setting": value}
                results.setdefault(_key(m, value), {})[seed] = r
                at = f" {m.knob.name}={value:g}" if value is not None else ""
                held = f", held-out {100 * accs['holdout_acc']:.2f}%" if "holdout_acc" in accs else ""
                print(f"  {m.label:32s}{at} seed {seed}: top-1 {100 * accs['acc']:.2f}%{held}  "
                      f"({r['seconds']:.0f} s)", flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(r) + "\n")
    print_table(results, args)


if __name__ == "__main__":
    main()
