"""The one swap entry point: ``quantize_model`` and its helpers (docs/methods.md#public-interface).

Dispatch goes through ``SWAP_REGISTRY`` on the module's exact type, so subclasses
with their own math (timm ``StdConv2d``, torchvision ``FrozenBatchNorm2d`` neighbours,
our own quantized layers) are never swapped by accident. Every activation call site gets
its own quantizer (see :mod:`.split`).
"""
from __future__ import annotations

import fnmatch
import warnings
from typing import Callable, Iterable, Iterator

from torch import nn

from ..utils.modules import set_submodule
from .config import Method, QuantConfig
from .inputs import InputQuantizer
from .layers import QUANT_LAYER_TYPES, QuantConv2d, QuantLinear, QuantReLU, QuantReLU6
from .pairing import followed_by_batchnorm
from .quantizers import ActQuantizer, WeightQuantizer
from .split import activation_reuse, split_known_blocks

Builder = Callable[[nn.Module, QuantConfig, str], nn.Module]
FilterFn = Callable[[nn.Module, str], bool]

ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
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

    Activation modules get one quantizer per call site: torchvision ResNet blocks, which
    call one ``relu`` several times, are split first (:func:`split_known_blocks`); a
    module registered under several names gets one quantized module per name. Quantized
    conv/linear layers matching ``config.quant_inputs`` also get an
    :class:`~gdrq_lightning.quant.inputs.InputQuantizer` for their input.

    Raises:
        ValueError: an ``overrides`` or ``quant_inputs`` pattern matches no swappable layer, a
            layer's resolved config is invalid, or an activation to quantize is called more than
            once per forward (one quantizer would pool the statistics of its call sites);
            the message names the layer.
    """
    if config.method == Method.none:
        return model
    split_known_blocks(model)
    skip = config.skip if config.skip is not None else default_skip(model)
    targets = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n and type(m) in SWAP_REGISTRY]
    names = [n for n, _ in targets]
    for pattern in skip:
        if not any(name_matches(n, pattern) for n in names):
            warnings.warn(f"QuantConfig.skip pattern {pattern!r} matches no conv/linear/ReLU layer", stacklevel=2)
    _check_patterns("overrides", config.overrides, names, "conv/linear/ReLU")
    weighted = [n for n, m in targets if type(m) not in ACTIVATIONS]
    _check_patterns("quant_inputs", config.quant_inputs or [], weighted, "conv/linear")
    plan: list[tuple[str, nn.Module, QuantConfig]] = []
    for name, module in targets:
        if any(name_matches(name, p) for p in skip) or (filter_fn is not None and not filter_fn(module, name)):
            continue
        fields: dict = {}
        for pattern, override in config.overrides.items():
            if name_matches(name, pattern):
                fields.update(override)
        layer_cfg = config.for_layer(name, fields)
        if layer_cfg.method != Method.none:
            plan.append((name, module, layer_cfg))
    _check_activation_reuse(model, {name for name, module, _ in plan if type(module) in ACTIVATIONS})
    device = next((p.device for p in model.parameters()), None)
    # a conv/linear registered under two names shares its weights: one quantized layer;
    # an activation gets one quantized module per name
    swapped: dict[tuple[int, str], nn.Module] = {}
    for name, module, layer_cfg in plan:
        key = (id(module), name if type(module) in ACTIVATIONS else "")
        if key not in swapped:
            swapped[key] = SWAP_REGISTRY[type(module)](module, layer_cfg, name)
            if device is not None and type(module) in ACTIVATIONS:  # no weights to say where it lives
                swapped[key].to(device)
            if type(module) not in ACTIVATIONS and any(name_matches(name, p) for p in config.quant_inputs or []):
                quantizer = InputQuantizer(layer_cfg, name).train(module.training)
                swapped[key].input_quantizer = quantizer if device is None else quantizer.to(device)
        set_submodule(model, name, swapped[key])
    _mark_layers_without_batchnorm(model)
    return model


def _mark_layers_without_batchnorm(model: nn.Module) -> None:
    """Tell weight quantizers that keep a float layer's magnitude only without a BatchNorm after
    them (DoReFa's ``w_scale``) which layers those are."""
    asking = {n: m.weight_quantizer for n, m in model.named_modules()
              if isinstance(m, (QuantConv2d, QuantLinear)) and getattr(m.weight_quantizer, "rescales_without_batchnorm", False)}
    if not asking:
        return
    with_bn = followed_by_batchnorm(model, asking)
    for name, quantizer in asking.items():
        if name not in with_bn:
            quantizer.rescale_without_batchnorm()


def _check_patterns(option: str, patterns: Iterable[str], names: list[str], kinds: str) -> None:
    for pattern in patterns:
        if not any(name_matches(n, pattern) for n in names):
            raise ValueError(
                f"QuantConfig.{option} pattern {pattern!r} matches no {kinds} layer "
                f"(some layer names: {', '.join(names[:5])} ...)"
            )


def _check_activation_reuse(model: nn.Module, to_quantize: set[str]) -> None:
    reused = {n: c for n, c in activation_reuse(model, ACTIVATIONS).items() if n in to_quantize}
    if reused:
        found = ", ".join(f"'{n}' ({c} calls)" for n, c in reused.items())
        raise ValueError(
            f"activation module(s) {found} are called more than once per forward; one quantizer per module "
            f"would pool the statistics of its call sites. Give each call site its own module "
            f"(torchvision ResNet blocks are split automatically) or keep it float with QuantConfig.skip"
        )


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every quantized layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYER_TYPES)]


def named_quantizers(model: nn.Module) -> Iterator[tuple[str, WeightQuantizer | ActQuantizer]]:
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
    """Flip the switches of every quantizer in ``model``, named after the phases that turn them on
    (``groups``: from one quantization group per layer to the configured ``G``, the ``groups_on``
    switch); ``None`` leaves a switch as it is."""
    for _, q in named_quantizers(model):
        quant = quant_weights if isinstance(q, WeightQuantizer) else quant_acts
        flags = {"clip_on": scale_clip, "quant_on": quant, "groups_on": groups}
        q.set_switches(**{k: v for k, v in flags.items() if v is not None and k in q.switch_names})


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap quantized layers back to their float layers (same Parameters), in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QUANT_LAYER_TYPES) and name:
            set_submodule(model, name, module.to_float())
    return model
