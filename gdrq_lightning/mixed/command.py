"""``gdrq bits``: plan weight bits per layer for a run config, from its own task loss and data.

The model and datamodule are built from the config's ``class_path`` entries with jsonargparse
(as LightningCLI builds them, without a Trainer); the quantization config is the
``GDRQCallback``'s, with the task's default ``skip``. Float weights come from ``--ckpt`` or, as
the task's ``setup`` loads them, from its ``pretrained`` files. The loss is the module's own
``training_step`` (:func:`~.apply.task_loss`), on the first ``--batches`` training batches.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from ..task import QuantTask, quant_network, resolve_config
from .allocate import BUDGETS, allocate, parse_budget
from .apply import task_loss, with_plan
from .plan import BitPlan
from .sensitivity import DEFAULT_METHOD, METHODS, SensitivityReport, measure_sensitivity

CALLBACK_NAMES = ("gdrq_lightning.GDRQCallback", "gdrq_lightning.callback.GDRQCallback")


def parse_bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise ValueError(f"--bits {text!r} must be comma-separated integers, e.g. 2,3,4,8") from None


def parse_pins(items: list[str]) -> dict[str, int]:
    pins = {}
    for item in items:
        pattern, sep, bits = item.rpartition("=")
        if not sep or not pattern or not bits.isdigit():
            raise ValueError(f"--pin {item!r} must be PATTERN=BITS, e.g. 'layer4.*=8'")
        pins[pattern] = int(bits)
    return pins


def gdrq_callback_entry(raw: dict[str, Any], path: str) -> dict[str, Any]:
    """The ``GDRQCallback`` entry of ``trainer.callbacks`` (a dict, changed in place by the caller).

    Raises:
        ValueError: the config has no ``GDRQCallback``.
    """
    for cb in (raw.get("trainer") or {}).get("callbacks") or []:
        if isinstance(cb, dict) and cb.get("class_path") in CALLBACK_NAMES:
            return cb
    raise ValueError(f"{path} has no gdrq_lightning.GDRQCallback in trainer.callbacks: there is no quantization to plan bits for")


def build_task(raw: dict[str, Any]) -> tuple[Any, Any]:
    """The LightningModule and LightningDataModule of a run config (``model:`` / ``data:`` with
    ``class_path``), built as LightningCLI builds them."""
    import pytorch_lightning as pl
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model", required=True)
    parser.add_subclass_arguments(pl.LightningDataModule, "data", required=True)
    parsed = parser.parse_object({"model": raw.get("model"), "data": raw.get("data")})
    init = parser.instantiate_classes(parsed)
    return init.model, init.data


def load_float_weights(module: Any, path: str) -> None:
    """Float weights from a Lightning checkpoint (or a plain state dict) into ``module``; quantizer
    entries of a quantized run's checkpoint are ignored.

    Raises:
        FileNotFoundError: no file; ValueError: the weights do not fit the module.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--ckpt {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"--ckpt {path} holds no state dict")
    state = {k: v for k, v in state.items() if "_quantizer." not in k}
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ValueError(f"--ckpt {path} does not fit {type(module).__name__}: missing {result.missing_keys[:5]}")


def training_batches(datamodule: Any, module: Any, n: int, device: torch.device, split: str = "train") -> list[Any]:
    """The first ``n`` batches of a split (``train`` or ``val``), through the datamodule's and the
    module's batch hooks, on ``device``: what a training (validation) step receives."""
    from lightning_fabric.utilities.apply_func import move_data_to_device

    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader() if split == "train" else datamodule.val_dataloader()
    batches = []
    for batch in loader:
        if len(batches) == n:
            break
        for owner in (datamodule, module):
            batch = owner.on_before_batch_transfer(batch, 0)
        batch = move_data_to_device(batch, device)
        for owner in (datamodule, module):
            batch = owner.on_after_batch_transfer(batch, 0)
        batches.append(batch)
    return batches


def write_outputs(out: Path, stem: str, raw: dict[str, Any], entry: dict[str, Any], plan: BitPlan,
                  header: list[str]) -> dict[str, Path]:
    """``<stem>.mixed.yaml``, ``bits.csv`` and ``bits.png`` in ``out``."""
    from ..quant import QuantConfig
    from .plot import plot_plan

    out.mkdir(parents=True, exist_ok=True)
    args = entry.setdefault("init_args", {})
    user = dict(args.get("config") or {})
    merged = with_plan(QuantConfig(**{**user, "overrides": user.get("overrides") or {}}), plan)
    args["config"] = {**user, "overrides": merged.overrides}
    files = {"config": out / f"{stem}.mixed.yaml", "csv": out / "bits.csv", "png": out / "bits.png"}
    files["config"].write_text("\n".join(f"# {line}" for line in header) + "\n" + yaml.safe_dump(raw, sort_keys=False))
    widths = sorted({b for row in plan.scores.values() for b in row})
    with open(files["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "params", "macs", "bits", *(f"score_w{b}" for b in widths)])
        for name, bits in plan.weight_bits.items():
            writer.writerow([name, plan.params[name], plan.macs[name], bits, *(repr(plan.scores[name][b]) for b in widths)])
    plot_plan(plan, files["png"], title=f"{stem}: {plan.summary()}")
    return files


def comparison_rows(plan: BitPlan) -> list[tuple[str, float, float, int, float]]:
    """``(name, avg bits, MB, BOPs, summed score)`` for the plan and every uniform width."""
    rows = [("plan", plan.avg_weight_bits, plan.size_mb, plan.bops, plan.score)]
    for b in sorted({b for row in plan.scores.values() for b in row}):
        u = plan.uniform(b)
        rows.append((f"uniform W{b}", u.avg_weight_bits, u.size_mb, u.bops, u.score))
    return rows


def run_bits(args: list[str]) -> None:
    """The ``gdrq bits`` command (see the module docstring)."""
    p = argparse.ArgumentParser(prog="gdrq bits", description="Plan weight bits per layer under a size or BOPs budget "
                                "from the run's own task loss and training data; writes a config with the plan.")
    p.add_argument("--config", required=True, help="the run's config (a gdrq fit YAML with a GDRQCallback)")
    p.add_argument("--budget", required=True, help=f"KIND=NUMBER, KIND one of {', '.join(BUDGETS)} (e.g. avg_weight_bits=3)")
    p.add_argument("--bits", default="2,3,4,8", help="weight bit widths to choose from (default: 2,3,4,8)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), help=f"sensitivity score (default: {DEFAULT_METHOD})")
    p.add_argument("--ckpt", help="float weights (a Lightning checkpoint); default: the task's pretrained weights")
    p.add_argument("--batches", type=int, default=8, help="training batches to measure on (default: 8)")
    p.add_argument("--seed", type=int, default=None, help="seed of the batch draw (default: the config's seed_everything, else 0)")
    p.add_argument("--pin", action="append", default=[], metavar="PATTERN=BITS", help="fix matching layers, e.g. 'layer4.*=8'")
    p.add_argument("--ties", choices=["auto", "none"], default="auto", help="residual ties (default: auto)")
    p.add_argument("--out", required=True, help="output directory")
    ns = p.parse_args(args)
    budget, bits, pins = parse_budget(ns.budget, "--budget"), parse_bits(ns.bits), parse_pins(ns.pin)
    if ns.batches < 1:
        raise ValueError(f"--batches={ns.batches} must be >= 1")
    raw = yaml.safe_load(Path(ns.config).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{ns.config} is not a YAML mapping")
    entry = gdrq_callback_entry(raw, ns.config)
    seed = ns.seed if ns.seed is not None else int(raw.get("seed_everything") or 0)

    import pytorch_lightning as pl
    from rich.console import Console

    from ..quant import QuantConfig

    pl.seed_everything(seed, verbose=False)
    module, datamodule = build_task(copy.deepcopy(raw))
    if ns.ckpt:
        load_float_weights(module, ns.ckpt)
    elif isinstance(module, QuantTask):
        module.load_pretrained()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device)
    config = resolve_config(QuantConfig(**((entry.get("init_args") or {}).get("config") or {})), module)
    batches = training_batches(datamodule, module, ns.batches, device)
    report: SensitivityReport = measure_sensitivity(quant_network(module), config, batches, task_loss(module), bits=bits,
                                                    method=ns.method)
    plan = allocate(report, **budget, pin=pins, ties=ns.ties)
    header = [f"gdrq bits: {ns.config} -> per-layer weight bits as GDRQCallback config.overrides",
              f"budget {ns.budget}; method {ns.method}; {report.batches} training batches; seed {seed}; bits {list(bits)}",
              f"plan: {plan.summary()}"]
    files = write_outputs(Path(ns.out), Path(ns.config).stem, raw, entry, plan, header)
    console = Console(width=None if sys.stdout.isatty() else 200)  # a log file: no cut layer names
    console.print(plan.table())
    from rich.table import Table

    table = Table(title="plan against uniform widths (planned layers only)", title_justify="left")
    for col in ("", "avg bits", "MB", "BOPs", "summed score"):
        table.add_column(col, justify="right")
    for name, avg, mb, bops, score in comparison_rows(plan):
        table.add_row(name, f"{avg:.3f}", f"{mb:.4f}", f"{bops:.4g}", f"{score:.4g}")
    console.print(table)
    console.print(f"measured in {report.seconds:.1f} s; wrote {', '.join(str(f) for f in files.values())}")
