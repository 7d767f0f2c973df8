"""Find which BatchNorm follows each quantized conv, so its step can fold into it (docs/methods.md#group-quantization).

Primary source: the ``torch.fx`` graph (quantized layers and BatchNorms traced as
leaves). A conv pairs with a BN when the BN is the *only* consumer of the conv's
output and both modules are called once. When symbolic tracing fails (data-dependent
control flow), known layouts are used instead, which cannot see other consumers:

* ``nn.Sequential`` adjacency ``[..., conv, bn, ...]`` (VGG-BN, MobileNet
  ``Conv2dNormActivation``, torchvision/timm ``downsample = Sequential(conv, bn)``);
* sibling attributes ``conv{k}`` / ``bn{k}`` (torchvision and timm ResNet stems,
  ``BasicBlock``, ``Bottleneck``).

Convs with no BN after them keep their step as an output scale; that is always correct.
"""
from __future__ import annotations

import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from torch import fx, nn

from .layers import QuantConv2d, QuantLinear, QuantReLU, QuantReLU6

_LEAVES = (QuantConv2d, QuantLinear, QuantReLU, QuantReLU6)
_SHAPE_ONLY = {"size", "dim"}


def is_batchnorm(module: nn.Module) -> bool:
    """BatchNorm2d and subclasses (SyncBatchNorm, timm ``BatchNormAct2d``) or torchvision ``FrozenBatchNorm2d``."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module).__name__ == "FrozenBatchNorm2d"


@dataclass
class Pairing:
    """``pairs`` maps conv name -> BN name; ``source`` is ``"fx"`` or ``"layout"``."""

    pairs: dict[str, str] = field(default_factory=dict)
    source: str = "fx"
    note: str = ""


class PairingError(ValueError):
    """The graph shows a conv -> BN pairing that folding would break (names the layer)."""


class _LeafTracer(fx.Tracer):
    """Keeps quantized layers and BatchNorms as single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or is_batchnorm(m) or super().is_leaf_module(m, qualname)


def _is_shape_only(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _SHAPE_ONLY:
        return True
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr" and node.args[1] == "shape"


def pair_with_fx(model: nn.Module, convs: Iterable[str]) -> dict[str, str]:
    """Pairs from the traced graph.

    Raises:
        PairingError: (a ``ValueError``) a conv's output feeds a BatchNorm *and* another consumer, or a
            conv/BN taking part is called more than once; the message names the layer.
        Exception: whatever ``torch.fx`` raises when the model cannot be traced.
    """
    graph = _LeafTracer().trace(model)
    calls: dict[str, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)].append(node)
    pairs: dict[str, str] = {}
    for name in convs:
        nodes = calls.get(name, [])
        if not nodes:
            continue
        users = [u for n in nodes for u in n.users if not _is_shape_only(u)]
        bns = [u for u in users if u.op == "call_module" and is_batchnorm(model.get_submodule(str(u.target)))]
        if not bns:
            continue
        bn = str(bns[0].target)
        if len(nodes) > 1:
            raise PairingError(
                f"layer '{name}': called {len(nodes)} times, so its step cannot fold into BatchNorm '{bn}'"
            )
        if len(users) > 1:
            others = ", ".join(sorted(str(u.target) for u in users if u is not bns[0]))
            raise PairingError(
                f"layer '{name}': its output feeds BatchNorm '{bn}' and also {others}; folding the step into "
                f"'{bn}' would change what the others see. Give it a single BatchNorm consumer or keep it float."
            )
        if len(calls[bn]) > 1 or bns[0].args[0] is not nodes[0]:
            raise PairingError(f"layer '{name}': BatchNorm '{bn}' is shared or not applied to its output alone")
        pairs[name] = bn
    return pairs


def pair_by_layout(model: nn.Module, convs: Iterable[str]) -> dict[str, str]:
    """Pairs from known module layouts (see the module docstring)."""
    wanted = set(convs)
    pairs: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        children = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            for (a, _), (b, mb) in zip(children, children[1:]):
                if prefix + a in wanted and is_batchnorm(mb):
                    pairs[prefix + a] = prefix + b
        named = dict(children)
        for child_name in named:
            match = re.fullmatch(r"conv(\d*)", child_name)
            bn_name = f"bn{match.group(1)}" if match else ""
            if match and prefix + child_name in wanted and bn_name in named and is_batchnorm(named[bn_name]):
                pairs[prefix + child_name] = prefix + bn_name
    return pairs


def find_conv_bn_pairs(model: nn.Module, convs: Iterable[str]) -> Pairing:
    """Pair each conv in ``convs`` with the BatchNorm that alone consumes its output.

    Tries ``torch.fx`` first and falls back to :func:`pair_by_layout` with a warning.

    Raises:
        PairingError: (a ``ValueError``) from :func:`pair_with_fx`, when the graph shows a
            pairing that folding would break.
    """
    convs = list(convs)
    try:
        return Pairing(pair_with_fx(model, convs), "fx")
    except PairingError:
        raise
    except Exception as err:  # noqa: BLE001 - any tracing failure means "use the layouts"
        note = f"torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err}); used known layouts"
        warnings.warn(note, stacklevel=2)
        return Pairing(pair_by_layout(model, convs), "layout", note)


def followed_by_batchnorm(model: nn.Module, layers: Iterable[str]) -> set[str]:
    """Those of ``layers`` whose output goes to a BatchNorm (the graph when ``torch.fx`` traces
    ``model``, the known layouts otherwise; quietly, as a training-time question, not a fold)."""
    layers = list(layers)
    try:
        return set(pair_with_fx(model, layers))
    except Exception:  # noqa: BLE001 - untraceable models (or shared BNs) use the layouts
        return set(pair_by_layout(model, layers))
