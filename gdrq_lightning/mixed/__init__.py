"""Mixed precision (docs/methods.md#mixed-precision): per-layer sensitivity to weight
quantization, one bit width per layer under a size or BOPs budget, and the plan applied to a
config or to a swapped network.

>>> report = measure_sensitivity(model, config, batches, loss_fn)          # doctest: +SKIP
>>> plan = allocate(report, avg_weight_bits=3, pin={"layer4.*": 8})        # doctest: +SKIP
>>> config = with_plan(config, plan)  # plan.overrides as QuantConfig.overrides  # doctest: +SKIP
"""
from .allocate import allocate
from .apply import apply_plan, plan_bits, plan_weights, task_loss, with_plan
from .plan import BitPlan
from .sensitivity import DEFAULT_METHOD, METHODS, SensitivityReport, measure_sensitivity

__all__ = [
    "DEFAULT_METHOD", "METHODS", "BitPlan", "SensitivityReport", "allocate", "apply_plan", "measure_sensitivity",
    "plan_bits", "plan_weights", "task_loss", "with_plan",
]
