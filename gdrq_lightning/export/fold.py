"""Fold each quantized conv's group steps ``s_g`` into the BatchNorm after it (docs/methods.md#group-quantization).

``gamma * (s*z - mu) / sqrt(var + eps) = gamma*s * (z - mu/s) / sqrt(var + eps)``, so
the conv keeps only integer codes ``Z`` and the BN takes ``gamma' = gamma * s``,
``running_mean' = running_mean / s`` (``beta``, ``running_var`` unchanged; a conv
bias ``c`` becomes ``c / s``). The arithmetic runs in float64 and is cast back once,
so the folded pair matches the fake-quant pair to float32 rounding.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..quant import QuantConv2d, QuantLinear
from ..quant.pairing import Pairing, find_conv_bn_pairs
from ..utils.modules import set_submodule
from .layers import INTEGER_LAYER_TYPES, IntegerConv2d, IntegerLinear


def _float_layer(layer: QuantConv2d | QuantLinear, name: str) -> nn.Module:
    """Weights not quantized (e.g. only Scale-Clip on): a float layer with the effective weight."""
    if layer.input_quantizer is not None:
        raise ValueError(f"layer '{name}': its input is quantized but its weights are not yet; export after quant_weights")
    float_layer = copy.deepcopy(layer.to_float())
    with torch.no_grad():
        float_layer.weight = nn.Parameter(layer.weight_quantizer(layer.weight.detach()).clone())
    return float_layer


def _bn_can_fold(bn: nn.Module) -> bool:
    """Needs an affine ``gamma`` and running statistics; batch statistics would see the rescale."""
    return getattr(bn, "weight", None) is not None and getattr(bn, "running_mean", None) is not None


@torch.no_grad()
def _fold_into(layer: IntegerConv2d, bn: nn.Module, bn_name: str) -> None:
    s = layer.step.double()
    bn.weight.copy_(bn.weight.double() * s)
    bn.running_mean.copy_(bn.running_mean.double() / s)
    if layer.bias is not None:
        layer.bias.copy_(layer.bias.double() / s)
    layer.folded_into = bn_name


def fold_with_pairing(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, Pairing]:
    """:func:`fold_groups_into_bn` that also returns how conv/BN pairs were found."""
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    if any(isinstance(m, INTEGER_LAYER_TYPES) for m in model.modules()):
        raise ValueError("model is already folded (it holds integer layers); pass the fake-quant model")
    modules = model.named_modules(remove_duplicate=False)
    entries = [(n, m) for n, m in modules if isinstance(m, (QuantConv2d, QuantLinear))]
    quantized = {n for n, m in entries if m.weight_quantizer.is_on("quant_on")}
    convs = [n for n, m in entries if n in quantized and isinstance(m, QuantConv2d)]
    pairing = find_conv_bn_pairs(model, convs)
    built: dict[int, nn.Module] = {}
    for name, layer in entries:
        if id(layer) not in built:
            if name not in quantized:
                built[id(layer)] = _float_layer(layer, name)
            elif isinstance(layer, QuantConv2d):
                built[id(layer)] = IntegerConv2d(layer, name)
            else:
                built[id(layer)] = IntegerLinear(layer, name)
            new = built[id(layer)]
            bn_name = pairing.pairs.get(name)
            if isinstance(new, IntegerConv2d) and bn_name and _bn_can_fold(model.get_submodule(bn_name)):
                _fold_into(new, model.get_submodule(bn_name), bn_name)
        set_submodule(model, name, built[id(layer)])
    return model, pairing


def fold_groups_into_bn(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace quantized conv/linear layers by integer-code layers and fold steps into BNs.

    Every ``QuantConv2d`` / ``QuantLinear`` with weight quantization on becomes an
    :class:`IntegerConv2d` / :class:`IntegerLinear` holding int8 codes ``Z`` and its
    per-channel step. A conv whose output feeds exactly one BatchNorm (found by
    :func:`find_conv_bn_pairs`) moves its step into that BN; all others keep the step
    as an output scale (docs/methods.md#group-quantization). Layers with weight quantization off become float
    layers with their effective (possibly Scale-Clipped) weight. Activation
    quantizers are left as they are, so the eval output equals the fake-quant model's.

    Args:
        model: a model returned by ``quantize_model``; export always uses eval semantics.
        inplace: modify ``model`` itself instead of a deep copy.

    Raises:
        ValueError: the pairing is ambiguous (a conv output feeds a BN and something
            else), or the model is already folded.
    """
    return fold_with_pairing(model, inplace=inplace)[0]
