"""Which export-form layers can be integer kernels: one pass over example data with hooks.

A layer's int32 bias needs its input's scale ``s_x``, and an integer kernel needs a
``QuantizeLinear`` right after the layer. Both are read off the running model by tensor
identity: a :class:`~.qdq.QDQAct` tags its output with its grid; modules that keep values
on their input's grid (max pooling, dropout in eval, the identities that replaced folded
BatchNorms) pass the tag on; a layer reads its input's tag (or its own input quantizer's
grid) and records its output tensor, and an activation quantizer that receives that very
tensor, unmodified (same version: an in-place ``out += identity`` changes it), is the
layer's output quantizer, provided nothing else reads the tensor (a ``TorchFunctionMode``
counts the other readers). A layer whose output anything but quantizers reads (a residual
branch before its add, an FPN output) gets an 8-bit output grid spanning the values it
produced on the example data.

A tensor that reaches a layer through other operations (``torch.flatten``, upsampling,
concatenation, pooling that averages) carries no tag: that layer stays float (exact), and
its report row says so; ``QuantConfig.quant_inputs`` gives it an input quantizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..utils.modules import set_submodule
from .qdq import QDQAct, QDQWeightLayer, output_grid

PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout, nn.Dropout2d)  # in eval: x itself
GRID_PRESERVING: tuple[type[nn.Module], ...] = (nn.MaxPool2d, *PASS_THROUGH)


def as_args(example: Any) -> tuple[Any, ...]:
    """Model arguments from an example input: a tuple as is, anything else as one argument."""
    return example if isinstance(example, tuple) else (example,)


def cast_args(example: Any, dtype: torch.dtype) -> tuple[Any, ...]:
    return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in as_args(example))


@dataclass
class _Seen:
    """What one layer saw over all its calls."""

    inputs: list[QDQAct | None] = field(default_factory=list)
    outputs: int = 0
    to_act: list[QDQAct] = field(default_factory=list)
    others: int = 0  # reads of its output by anything but an activation quantizer
    lo: float = float("inf")
    hi: float = float("-inf")


class _Tags:
    """``id(tensor) -> (tensor, version, value)``; holding the tensor keeps its id unique."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[Tensor, int, Any]] = {}

    def put(self, t: Any, value: Any) -> None:
        if isinstance(t, Tensor):
            self._items[id(t)] = (t, t._version, value)

    def get(self, t: Any) -> Any:
        item = self._items.get(id(t)) if isinstance(t, Tensor) else None
        return item[2] if item is not None and item[0] is t and item[1] == t._version else None


class _OtherReaders(TorchFunctionMode):
    """Counts the torch functions that read a recorded layer output, except inside an activation
    quantizer or a pass-through module (``quiet``): a layer whose output something else reads too
    (an FPN's lateral conv feeds its output conv and the top-down path) needs its own output grid."""

    def __init__(self, outputs: _Tags, seen: dict[str, _Seen]) -> None:
        super().__init__()
        self.outputs, self.seen, self.quiet = outputs, seen, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if not self.quiet and getattr(func, "__name__", "") != "__get__":  # attribute reads (``_version``) aren't reads
            for t in _flat(args) + _flat(list(kwargs.values())):
                name = self.outputs.get(t)
                if name is not None:
                    self.seen[name].others += 1
        return func(*args, **kwargs)

    def enter(self, *_: Any) -> None:
        self.quiet += 1

    def leave(self, *_: Any) -> None:
        self.quiet -= 1


def _flat(items: Any) -> list[Any]:
    if isinstance(items, (list, tuple)):
        return [x for item in items for x in _flat(item)]
    return [items]


@torch.no_grad()
def wire(
    model: nn.Module, batches: list[Any], exact_bias: dict[str, Tensor | None] | None, dtype: torch.dtype,
    float_outputs: bool = False,
) -> None:
    """Make every layer that can be an integer kernel one (int32 bias, output grid); see module doc.
    ``float_outputs``: a layer whose output no quantizer reads stays float instead (exact).
    ``exact_bias=None``: the layers are set up already (a deploy-form model's export): only
    move quantizers after max pools."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QDQWeightLayer)}
    seen = {n: _Seen() for n in layers}
    grids, outputs, act_outputs = _Tags(), _Tags(), _Tags()
    pools: dict[str, str] = {}  # max pool -> the activation quantizer whose output it pools
    hooks = []

    def tag_act(name: str):  # noqa: ANN202 - hook factory
        def hook(act: QDQAct, args: tuple[Any, ...], out: Tensor) -> None:
            grids.put(out, act if act.integer else None)
            act_outputs.put(out, name if act.integer else None)

        return hook

    def to_act(act: nn.Module, args: tuple[Any, ...]) -> None:
        name = outputs.get(args[0])
        if name is not None:
            seen[name].to_act.append(act)

    def keep_grid(name: str):  # noqa: ANN202 - hook factory
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            grid = grids.get(args[0]) if args else None
            if grid is not None:
                grids.put(out, grid)
            if isinstance(module, nn.MaxPool2d) and act_outputs.get(args[0]) is not None:
                pools[name] = act_outputs.get(args[0])

        return hook

    def layer_in(name: str):  # noqa: ANN202 - hook factory
        def hook(layer: QDQWeightLayer, args: tuple[Any, ...]) -> None:
            own = layer.input_act
            grid = (own if own.integer else None) if isinstance(own, QDQAct) else grids.get(args[0]) if own is None else None
            seen[name].inputs.append(grid)

        return hook

    def layer_out(name: str):  # noqa: ANN202 - hook factory
        def hook(_layer: nn.Module, _args: tuple[Any, ...], out: Tensor) -> None:
            s = seen[name]
            s.outputs += 1
            s.lo, s.hi = min(s.lo, float(out.min())), max(s.hi, float(out.max()))
            outputs.put(out, name)

        return hook

    readers = _OtherReaders(outputs, seen)
    for name, module in model.named_modules():
        if isinstance(module, QDQAct):
            hooks += [module.register_forward_hook(tag_act(name)), module.register_forward_pre_hook(to_act)]
        elif type(module) in GRID_PRESERVING:
            hooks.append(module.register_forward_hook(keep_grid(name)))
        elif name in layers:
            hooks += [module.register_forward_pre_hook(layer_in(name)), module.register_forward_hook(layer_out(name))]
        if isinstance(module, QDQAct) or type(module) in PASS_THROUGH:
            hooks += [module.register_forward_pre_hook(readers.enter), module.register_forward_hook(readers.leave)]
    try:
        with readers:
            for batch in batches:
                model(*cast_args(batch, dtype))
    finally:
        for h in hooks:
            h.remove()
    for name, layer in layers.items():
        if exact_bias is not None:
            _decide(layer, seen[name], exact_bias[name], float_outputs)
    _quantize_after_pools(model, pools, cast_args(batches[0], dtype))


def _quantize_after_pools(model: nn.Module, pools: dict[str, str], args: tuple[Any, ...]) -> None:
    """``quantize(max_pool(x)) == max_pool(quantize(x))`` (the quantizer is monotone), so an
    activation quantizer followed by a max pool moves after it, with a guard (``QDQAct.guard``):
    ORT then pools in float (fast NCHWc) and the next layer reads integers, instead of running
    a uint8 max pool in NCHW (measured on ResNet-18 at 224 px: 8.7 of 27 ms). Kept only where
    the model's output is unchanged (the activation had no other reader)."""
    if not pools:
        return
    before = model(*args)
    for pool, act in pools.items():
        quantizer = model.get_submodule(act)
        set_submodule(model, act, nn.Identity())
        set_submodule(model, pool, nn.Sequential(model.get_submodule(pool), quantizer))
        quantizer.guard = True
        if not _same(before, model(*args)):
            quantizer.guard = False
            set_submodule(model, pool, model.get_submodule(pool)[0])
            set_submodule(model, act, quantizer)


def _same(a: Any, b: Any) -> bool:
    """Equal model outputs: tensors, and tuples, lists and dicts of them (anything else by ``==``)."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _decide(layer: QDQWeightLayer, seen: _Seen, exact_bias: Tensor | None, float_outputs: bool) -> None:
    grid = seen.inputs[0] if seen.inputs else None
    direct = len(seen.to_act) == seen.outputs and not seen.others  # only quantizers read its output
    if not seen.inputs:
        layer.keep_float("float: not called on the example input")
    elif not layer.integer_weights:
        layer.keep_float("float: INT4 weights (ONNX Runtime runs them in float)" if layer.int4 else "float: 8-bit odd codes need 9 bits")
    elif grid is None or any(g is not grid for g in seen.inputs):
        layer.keep_float("float: its input is not a per-tensor quantized activation (see QuantConfig.quant_inputs)")
    elif direct and not all(a.integer for a in seen.to_act):
        layer.keep_float("float: its output quantizer is per-channel or HWGQ's (no integer form)")
    elif float_outputs and not direct:
        layer.keep_float("float: its output is read unquantized (float_outputs=True)")
    else:
        layer.make_integer(grid.scale, exact_bias)
        layer.wired = (grid, None if not direct else seen.to_act)  # what simulate_deploy installs
        if not direct:
            out_grid, zero = output_grid(seen.lo, seen.hi)
            layer.output_act = QDQAct(out_grid, {"output": True}, zero).to(layer.scale.dtype)
            layer.note = "integer, 8-bit output grid" + (" (also read by its quantizer)" if seen.to_act else "")
