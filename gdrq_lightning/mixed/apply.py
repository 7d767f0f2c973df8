"""A plan in use: in a config (``with_plan``), on a swapped network (``apply_plan``), planned on a
swapped network during training (``plan_bits``), or tried without training (``plan_weights``)."""
from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..quant import QuantConfig, WeightQuantizer
from .allocate import allocate
from .layers import LossFn, counted_layers, quantized_weight
from .plan import BitPlan
from .sensitivity import DEFAULT_BITS, DEFAULT_METHOD, measure_sensitivity


def task_loss(module: Any) -> LossFn:
    """``loss_fn(network, batch)`` for :func:`measure_sensitivity`: the LightningModule's own
    ``training_step(batch, 0)`` (the network argument is the module's own network, which the
    step runs). The step runs detached from its Trainer, Lightning's way of calling a step outside
    one, so ``self.log`` does nothing: sensitivity batches never reach the run's logs or metrics,
    and no logging collective runs under DDP (a step that needs ``self.trainer`` cannot be used)."""
    def loss_fn(_network: nn.Module, batch: Any) -> torch.Tensor:
        trainer = module._trainer
        module.trainer = None
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*self.log.*")
                out = module.training_step(batch, 0)
        finally:
            module.trainer = trainer
        return out["loss"] if isinstance(out, dict) else out

    return loss_fn


def with_plan(config: QuantConfig, plan: BitPlan) -> QuantConfig:
    """``config`` with the plan's exact-name entries last in ``overrides`` (so they win over the
    user's patterns for ``weight_bits``; other fields of the user's entries still apply)."""
    overrides = dict(config.overrides)
    for pattern, fields in plan.overrides.items():
        overrides[pattern] = {**overrides.pop(pattern, {}), **fields}
    return dataclasses.replace(config, overrides=overrides)


def _rebits(quantizer: WeightQuantizer, bits: int, weight: torch.Tensor, reinit: bool) -> None:
    """Set the bit width; with ``reinit``, redo what the method chose for the old width from the
    weights: a calibrated ``k_w: auto`` is recalibrated at ``bits`` (GDRQ, Scale-Clip, group);
    an initialised LSQ step is initialised again on the next quantized forward, DoReFa's ``w_scale``
    is fixed again (its own ``set_bits``). HWGQ weights keep no state that depends on the width."""
    setter = getattr(quantizer, "set_bits", None)
    if callable(setter):  # a method that knows its own state
        setter(bits, weight, reinit=reinit)
        return
    quantizer.bits = bits
    if not reinit:
        return
    if getattr(quantizer, "k_auto", False) and bool(getattr(quantizer, "k_calibrated", False)):
        quantizer.calibrate(weight)
    if isinstance(getattr(quantizer, "initialized", None), torch.Tensor) and hasattr(quantizer, "_ready"):
        quantizer.initialized.fill_(False)
        quantizer._ready = False


@torch.no_grad()
def apply_plan(network: nn.Module, plan: BitPlan, *, reinit: bool = True) -> int:
    """Give every planned layer of an already-swapped ``network`` its weight bits, in place; no
    state-dict key changes (bits are not a buffer: a resumed run calls this again).

    Args:
        network: the swapped network (names as in the plan).
        plan: the plan.
        reinit: redo width-dependent choices (see :func:`_rebits`); ``False`` on resume, where the
            checkpoint already holds the state calibrated at the planned widths.

    Returns:
        How many layers changed width.

    Raises:
        ValueError: a planned layer is missing from ``network`` or has no weight quantizer, or a
            width is invalid for the layer's method (e.g. LSQ below 2 bits).
    """
    changed = 0
    for name, bits in plan.weight_bits.items():
        try:
            layer = network.get_submodule(name)
        except AttributeError:
            raise ValueError(f"bit plan layer '{name}' is not in the network") from None
        quantizer = getattr(layer, "weight_quantizer", None)
        if not isinstance(quantizer, WeightQuantizer):
            raise ValueError(f"bit plan layer '{name}' is not a quantized conv/linear layer ({type(layer).__name__})")
        try:
            QuantConfig(method=quantizer.method, weight_bits=bits)
        except ValueError as err:
            raise ValueError(f"bit plan layer '{name}': {err}") from None
        if quantizer.bits != bits:
            _rebits(quantizer, bits, layer.weight, reinit)
            changed += 1
    return changed


def plan_bits(
    network: nn.Module,
    config: QuantConfig,
    batches: Iterable[Any],
    loss_fn: LossFn,
    budget: dict[str, float],
    *,
    method: str = DEFAULT_METHOD,
    bits: Iterable[int] = DEFAULT_BITS,
    pin: dict[str, int] | None = None,
    ties: Any = "auto",
) -> BitPlan:
    """Measure and allocate in one call, on a float or an already-swapped network (scored with its
    quantizers off; switches, modes and statistics restored). Under DDP every rank passes its own
    batches; scores are summed over ranks before allocating, so every rank gets the same plan.

    Args:
        budget: one of ``{"avg_weight_bits": 3}``, ``{"size_mb": ...}``, ``{"bops": ...}``.

    Raises:
        ValueError: see :func:`measure_sensitivity` and :func:`allocate`.
    """
    report = measure_sensitivity(network, config, batches, loss_fn, bits=tuple(bits), method=method)
    return allocate(report, **budget, pin=pin, ties=ties)


@contextmanager
def plan_weights(model: nn.Module, config: QuantConfig, plan: BitPlan) -> Iterator[nn.Module]:
    """Inside: the planned layers' weights replaced by ``Q_b(W)`` at their planned bits (the
    config's method, clip and groups), activations float: a plan tried without training.
    The float weights come back on exit."""
    layers = {layer.name: layer for layer in counted_layers(model, config)}
    missing = sorted(set(plan.weight_bits) - set(layers))
    if missing:
        raise ValueError(f"bit plan layers {missing[:5]} are not planned layers of this model and config")
    saved = []
    with torch.no_grad():
        for name, bits in plan.weight_bits.items():
            w = layers[name].weight
            saved.append((w, w.detach().clone()))
            w.copy_(quantized_weight(layers[name], bits))
    try:
        yield model
    finally:
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)
