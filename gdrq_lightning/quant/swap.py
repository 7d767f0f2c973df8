"""The one swap entry point: ``quantize_model`` and its helpers (SPEC §7).

Dispatch goes through ``SWAP_REGISTRY`` on the module's exact type, so subclasses
with their own math (timm ``StdConv2d``, torchvision ``FrozenBatchNorm2d`` neighbours,
our own quantized layers) are never swapped by accident.
"""
from __future__ import annotations

import fnmatch
import warnings
from typing import Callable, Iterator

from torch import nn

from .config import Method, QuantConfig
from .layers import QUANT_LAYER_TYPES, QuantConv2d, QuantLinear, QuantReLU, QuantReLU6
from .quantizers import ActQuantizer, WeightQuantizer

Builder = Callable[[nn.Module, QuantConfig, str], nn.Module]
FilterFn = Callable[[nn.Module, str], bool]

SWAP_REGISTRY: dict[type[nn.Module], Builder] = {
    nn.Conv2d: QuantConv2d.from_float,
    nn.Linear: QuantLinear.from_float,
    nn.ReLU: QuantReLU.from_float,
    nn.ReLU6: QuantReLU6.from_float,
}


def name_matches(name: str, pattern: str) -> bool:
    """``fnmatch`` on the module name or any dotted ancestor (``"head"`` matches ``head.0.conv``)."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def default_skip(model: nn.Module) -> list[str]:
    """The first conv and the last linear (the last conv when there is no linear)."""
    convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    skip = convs[:1]
    if linears:
        skip.append(linears[-1])
    elif len(convs) > 1:
        skip.append(convs[-1])
    return skip


def quantize_model(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None) -> nn.Module:
    """Swap conv/linear/ReLU modules of ``model`` in place for quantized ones.

    Every part the config asks for is switched **on** in the result, so
    ``quantize_model(m, cfg)(x)`` is the quantized forward.

    Args:
        model: any ``nn.Module`` (torchvision, timm, or your own).
        config: the quantization config; ``method='none'`` returns ``model`` untouched.
        filter_fn: optional ``(module, name) -> bool``; ``False`` keeps a module float.

    Raises:
        ValueError: an ``overrides`` pattern matches no swappable layer, or a layer's
            resolved config is invalid (the message names the layer and value).
    """
    if config.method == Method.none:
        return model
    skip = config.skip if config.skip is not None else default_skip(model)
    targets = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n and type(m) in SWAP_REGISTRY]
    names = [n for n, _ in targets]
    for pattern in skip:
        if not any(name_matches(n, pattern) for n in names):
            warnings.warn(f"QuantConfig.skip pattern {pattern!r} matches no conv/linear/ReLU layer", stacklevel=2)
    for pattern in config.overrides:
        if not any(name_matches(n, pattern) for n in names):
            raise ValueError(
                f"QuantConfig.overrides pattern {pattern!r} matches no conv/linear/ReLU layer "
                f"(some layer names: {', '.join(names[:5])} ...)"
            )
    swapped: dict[int, nn.Module] = {}
    for name, module in targets:
        if any(name_matches(name, p) for p in skip) or (filter_fn is not None and not filter_fn(module, name)):
            continue
        if id(module) not in swapped:
            fields: dict = {}
            for pattern, override in config.overrides.items():
                if name_matches(name, pattern):
                    fields.update(override)
            layer_cfg = config.for_layer(name, fields)
            if layer_cfg.method == Method.none:
                continue
            swapped[id(module)] = SWAP_REGISTRY[type(module)](module, layer_cfg, name)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, swapped[id(module)])
    return model


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every quantized layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYER_TYPES)]


def quantizers(model: nn.Module) -> Iterator[tuple[str, WeightQuantizer | ActQuantizer]]:
    """``(name, quantizer)`` for every weight and activation quantizer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, (WeightQuantizer, ActQuantizer)):
            yield name, module


def set_quant_state(
    model: nn.Module,
    *,
    scale_clip: bool | None = None,
    quant_weights: bool | None = None,
    quant_acts: bool | None = None,
    groups: bool | None = None,
) -> None:
    """Flip the switches of every quantizer in ``model``; ``None`` leaves a switch as it is."""
    for _, q in quantizers(model):
        flags: dict[str, bool] = {}
        if scale_clip is not None:
            flags["clip_on"] = scale_clip
        if isinstance(q, WeightQuantizer):
            if quant_weights is not None:
                flags["quant_on"] = quant_weights
            if groups is not None:
                flags["groups_on"] = groups
        elif quant_acts is not None:
            flags["quant_on"] = quant_acts
        q.set_switches(**flags)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap quantized layers back to their float layers (same Parameters), in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QUANT_LAYER_TYPES) and name:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, module.to_float())
    return model
