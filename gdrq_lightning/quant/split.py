"""One activation module per call site, so every activation quantizer sees one distribution.

A quantized activation keeps one set of statistics (or one learned clip) per *module*.
torchvision's ResNet blocks call one ``self.relu`` two (``BasicBlock``) or three
(``Bottleneck``) times, so its quantizer would pool the mid-block and the post-residual
activations, whose means differ 2-3x. :func:`split_known_blocks` gives those call sites
their own modules (``relu``, ``relu2``, ``relu_out``; same parameters and float
``state_dict`` keys). :func:`activation_reuse` finds any other activation module called
more than once per forward, by tracing the model with ``torch.fx`` (submodule by submodule
where the whole model does not trace), so ``quantize_model`` can refuse it by name.
"""
from __future__ import annotations

import copy
from collections import Counter
from contextlib import contextmanager
from typing import Iterable, Iterator

from torch import Tensor, fx, nn
from torchvision.models.resnet import BasicBlock, Bottleneck


class SplitReLUBasicBlock(BasicBlock):
    """torchvision ``BasicBlock`` whose two activations are separate modules (``relu``, ``relu_out``)."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu_out(out + identity)


class SplitReLUBottleneck(Bottleneck):
    """torchvision ``Bottleneck`` whose three activations are separate modules (``relu``, ``relu2``, ``relu_out``)."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu_out(out + identity)


# block type -> (its split class, the new activation attributes)
SPLIT_BLOCKS: dict[type[nn.Module], tuple[type[nn.Module], tuple[str, ...]]] = {
    BasicBlock: (SplitReLUBasicBlock, ("relu_out",)),
    Bottleneck: (SplitReLUBottleneck, ("relu2", "relu_out")),
}


def split_known_blocks(model: nn.Module) -> int:
    """Give each activation call site of known blocks its own module, in place; returns how
    many blocks changed. The new modules are copies of the block's ``relu``."""
    changed = 0
    for module in model.modules():
        entry = SPLIT_BLOCKS.get(type(module))
        if entry is None:
            continue
        cls, names = entry
        for name in names:
            module.add_module(name, copy.deepcopy(module.relu))
        module.__class__ = cls  # same attributes, forward with one module per call site
        changed += 1
    return changed


class _CallTracer(fx.Tracer):
    def __init__(self, leaves: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def _count_calls(module: nn.Module, leaves: tuple[type[nn.Module], ...], counts: Counter) -> None:
    """Calls per module object (``id``), from the traced graph of ``module`` or, where it does
    not trace (data-dependent control flow, non-tensor inputs), of each child in turn."""
    try:
        graph = _CallTracer(leaves).trace(module)
    except Exception:  # noqa: BLE001 - any tracing failure: look one level down
        for child in module.children():
            _count_calls(child, leaves, counts)
        return
    for node in graph.nodes:
        if node.op == "call_module":
            counts[id(module.get_submodule(str(node.target)))] += 1


@contextmanager
def _attributes_restored(model: nn.Module) -> Iterator[None]:
    """Undo what a symbolic trace may write into modules: some ``forward``s cache values
    computed from their input (torchvision's ``MultiScaleRoIAlign`` keeps its scales), and
    under tracing those would be fx proxies."""
    containers = ("_parameters", "_buffers", "_modules")
    saved = [(m, dict(vars(m)), {k: dict(getattr(m, k)) for k in containers}) for m in model.modules()]
    try:
        yield
    finally:
        for module, attrs, inner in saved:
            vars(module).clear()
            vars(module).update(attrs)
            for key, value in inner.items():
                getattr(module, key).clear()
                getattr(module, key).update(value)


def activation_reuse(model: nn.Module, kinds: Iterable[type[nn.Module]]) -> dict[str, int]:
    """Names of modules of the given ``kinds`` that are called more often per forward than
    they are registered, with their call count.

    A module registered under several names may be called once through each (each name
    then gets its own quantized module); more calls than names means one name is called
    repeatedly. Only traceable code is seen: activations called inside a submodule whose
    ``forward`` torch.fx cannot trace are not counted.
    """
    kinds = tuple(kinds)
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and isinstance(module, kinds):
            names.setdefault(id(module), []).append(name)
    if not names:
        return {}
    counts: Counter = Counter()
    with _attributes_restored(model):
        _count_calls(model, kinds, counts)
    return {found[0]: counts[key] for key, found in names.items() if counts[key] > len(found)}
