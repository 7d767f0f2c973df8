"""``auto_bits`` (docs/methods.md#mixed-precision): the callback plans one weight bit width per
layer at the end of the full-precision warm-up (from the pretrained weights when the warm-up is
0), from the task's own training loss on a few training batches, and keeps the plan in its
checkpoint so a resumed run (and ``gdrq export``) uses the same bits."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from ..mixed import BitPlan, apply_plan, plan_bits, task_loss
from ..mixed.allocate import BUDGETS, parse_budget
from ..mixed.sensitivity import DEFAULT_BITS, DEFAULT_METHOD, METHODS, check_bits
from ..quant import QuantConfig
from .batches import training_batches


@dataclass
class AutoBits:
    """The ``auto_bits`` option: ``budget`` (``{"avg_weight_bits": 3}``, ``"size_mb=1.5"``, ...),
    sensitivity ``method``, training ``batches`` scored, candidate ``bits``, ``pin``
    (``{pattern: bits}``) and ``ties`` (see :func:`gdrq_lightning.mixed.allocate`)."""

    budget: dict[str, float] | str
    method: str = DEFAULT_METHOD
    batches: int = 8
    bits: tuple[int, ...] = DEFAULT_BITS
    pin: dict[str, int] | None = None
    ties: Any = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.budget, str):
            self.budget = parse_budget(self.budget, "auto_bits.budget")
        if not isinstance(self.budget, dict) or len(self.budget) != 1 or not set(self.budget) <= set(BUDGETS):
            raise ValueError(f"auto_bits.budget={self.budget!r} must be one of {', '.join(BUDGETS)} with a number, "
                             f"e.g. {{avg_weight_bits: 3}}")
        if self.method not in METHODS:
            raise ValueError(f"auto_bits.method={self.method!r} is not one of: {', '.join(METHODS)}")
        if not isinstance(self.batches, int) or isinstance(self.batches, bool) or self.batches < 1:
            raise ValueError(f"auto_bits.batches={self.batches!r} must be an integer >= 1")
        self.bits = check_bits(self.bits)

    @classmethod
    def parse(cls, value: AutoBits | dict[str, Any] | None) -> AutoBits | None:
        if value is None or isinstance(value, AutoBits):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"auto_bits={value!r} must be a mapping, e.g. {{budget: {{avg_weight_bits: 3}}}}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"auto_bits has unknown field(s) {unknown}; allowed: {', '.join(known)}")
        return cls(**value)


def plan_and_apply(trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module, config: QuantConfig,
                   options: AutoBits) -> BitPlan:
    """Plan on ``options.batches`` training batches of this rank (scores summed over ranks: every
    rank gets the same plan) and give the network's weight quantizers their planned bits."""
    batches = list(training_batches(trainer, options.batches))
    plan = plan_bits(network, config, batches, task_loss(pl_module), dict(options.budget), method=options.method,
                     bits=options.bits, pin=options.pin, ties=options.ties)
    apply_plan(network, plan)
    histogram = ", ".join(f"{b} bits: {n}" for b, n in sorted(Counter(plan.weight_bits.values()).items()))
    rank_zero_info(f"[gdrq] auto_bits: {options.method} plan under {plan.budget} from {len(batches)} batches -> "
                   f"{histogram} ({plan.size_mb:.3f} MB of weights)")
    return plan

