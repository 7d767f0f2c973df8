"""Which layers a bit plan covers, their own weight quantizers, and their size and MACs.

A float network counts the conv/linear layers ``quantize_model`` would quantize with the same
config (``skip``, or the library's default skip when it is None; ``overrides`` that set
``method: none``); an already-swapped network counts its quantized conv/linear layers. Each
layer's error at ``b`` bits comes from a fresh weight quantizer of the configured method (built
through the method registry, as the swap builds it) with that layer's config at ``b`` bits and
everything on: Scale-Clip where the method has it, quantization, groups (:func:`weight_errors`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..quant import QuantConfig, WeightQuantizer, named_quantizers, quantized_layers
from ..quant.config import Method
from ..quant.swap import default_skip, name_matches

LossFn = Callable[[nn.Module, Any], Tensor]
WEIGHTED = (nn.Conv2d, nn.Linear)


@dataclass
class Layer:
    """A layer the plan covers: the module, its resolved config, its weight."""

    name: str
    module: nn.Module
    config: QuantConfig

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def out_channels(self) -> int:
        return int(self.module.weight.shape[0])


def layer_fields(config: QuantConfig, name: str) -> dict[str, Any]:
    """The ``overrides`` fields that apply to ``name`` (later patterns win, as in ``quantize_model``)."""
    fields: dict[str, Any] = {}
    for pattern, override in config.overrides.items():
        if name_matches(name, pattern):
            fields.update(override)
    return fields


def counted_layers(model: nn.Module, config: QuantConfig) -> list[Layer]:
    """The conv/linear layers of ``model`` a plan covers, in module order (weights shared under
    two names count once).

    Raises:
        ValueError: ``config.method`` is ``none``, or no layer is left to plan.
    """
    if config.method == Method.none:
        raise ValueError("QuantConfig.method='none' quantizes no layer: there are no bits to plan")
    swapped = {n for n, m in quantized_layers(model) if hasattr(m, "weight_quantizer")}
    if swapped:
        candidates = [(n, m) for n, m in model.named_modules() if n in swapped]
    else:
        skip = config.skip if config.skip is not None else default_skip(model)
        candidates = [(n, m) for n, m in model.named_modules() if type(m) in WEIGHTED and n
                      and not any(name_matches(n, p) for p in skip)]
    layers = []
    for name, module in candidates:
        cfg = config.for_layer(name, layer_fields(config, name))
        if cfg.method != Method.none:
            layers.append(Layer(name, module, cfg))
    if not layers:
        raise ValueError("no conv/linear layer is left to plan bits for (check QuantConfig.skip and overrides)")
    return layers


def _quantizer(layer: Layer, bits: int) -> WeightQuantizer:
    cfg = layer.config.for_layer(layer.name, {"weight_bits": bits})
    return WeightQuantizer(cfg, layer.out_channels, layer.name).to(layer.weight.device)


@torch.no_grad()
def quantized_weight(layer: Layer, bits: int) -> Tensor:
    """``Q_b(W)``: the layer's method at ``bits`` with everything on (Scale-Clip, quantization,
    groups; ``auto`` factors calibrated at ``bits``)."""
    w = layer.weight.detach()
    return _quantizer(layer, bits)(w).to(w.dtype)


@torch.no_grad()
def weight_errors(layer: Layer, bits: tuple[int, ...]) -> dict[int, Tensor]:
    """``{b: ΔW_b}``, the part of the layer's weight error its bit width decides.

    ``ΔW_b = Q_b(W) - R`` with ``R`` what the same quantizer gives with quantization off (its
    clip alone) where that is the same at every width, else ``R = W``. So a Scale-Clip method
    with a numeric ``k_w`` is scored on its rounding inside ``[-T, T]`` (the clip is the same in
    every plan, and the Scale-Clip phase trains the weights into it: on the digits classifier
    that clip alone takes the float network from 0.062 to 2.78 validation loss, and would
    swamp the bits), while ``k_w: auto`` (a clip chosen per width), LSQ, DoReFa and ``group``
    are scored on ``Q_b(W) - W``.
    """
    w = layer.weight.detach()
    quantized, clipped = {}, {}
    for b in bits:
        quantizer = _quantizer(layer, b)
        quantized[b] = quantizer(w).to(w.dtype)
        quantizer.set_switches(quant_on=False)
        clipped[b] = quantizer(w).to(w.dtype)
    first = clipped[bits[0]]
    reference = first if all(torch.equal(first, c) for c in clipped.values()) else w
    return {b: quantized[b] - reference for b in bits}


def count_macs(model: nn.Module, layers: list[Layer], loss_fn: LossFn, batch: Any) -> dict[str, int]:
    """Multiply-accumulates per image of each layer, from one loss evaluation on ``batch``.

    Images per batch are read off the call of ``model`` itself (a tensor's leading dimension, or
    the length of a list of images, e.g. a detector's input); a layer called several times (a
    shared head) counts every call.
    """
    macs = dict.fromkeys((layer.name for layer in layers), 0)
    images: list[int] = []

    def on_model(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else next(iter(kwargs.values()), None)
        if not images and isinstance(first, Tensor) and first.dim() > 0:
            images.append(int(first.shape[0]))
        elif not images and isinstance(first, (list, tuple)) and first:
            images.append(len(first))

    def on_layer(name: str, module: nn.Module, out: Tensor) -> None:
        w = module.weight
        per_output = w[0].numel() if isinstance(module, nn.Conv2d) else w.shape[1]
        macs[name] += int(out.numel()) * int(per_output)

    hooks = [model.register_forward_pre_hook(on_model, with_kwargs=True)]
    for layer in layers:
        hooks.append(layer.module.register_forward_hook(lambda m, _a, y, n=layer.name: on_layer(n, m, y)))
    try:
        with torch.no_grad():
            loss_fn(model, batch)
    finally:
        for h in hooks:
            h.remove()
    n = images[0] if images else 1
    return {name: value // max(n, 1) for name, value in macs.items()}


@contextmanager
def measuring(model: nn.Module, layers: list[Layer]) -> Iterator[None]:
    """The network as sensitivity measures it, restored afterwards: train mode (detectors compute
    their losses only there), every BatchNorm in eval mode (running statistics, as the network
    infers, and none updated), quantizers switched off and in eval mode (an already-swapped
    network computes its float function, and no statistic moves), and the counted weights
    requiring gradients (a frozen layer is scored too)."""
    modes = [(m, m.training) for m in model.modules()]
    quantizers = [q for _, q in named_quantizers(model)]
    quantizer_ids = {id(q) for q in quantizers}
    switches = [(q, {n: q.is_on(n) for n in q.switch_names}) for q in quantizers]
    grads = [(layer.weight, layer.weight.requires_grad) for layer in layers]
    try:
        model.train()
        for m in model.modules():
            if isinstance(m, _BatchNorm) or id(m) in quantizer_ids:
                m.eval()
        for q in quantizers:
            q.set_switches(**dict.fromkeys(q.switch_names, False))
        for w, _ in grads:
            w.requires_grad_(True)
        yield
    finally:
        for m, training in modes:
            m.training = training
        for q, on in switches:
            q.set_switches(**on)
        for w, flag in grads:
            w.requires_grad_(flag)
