"""Train what you deploy: put a quantized network into the form ``to_onnx`` writes
(docs/methods.md#deploy-form).

:func:`simulate_deploy` runs export's own decision (:mod:`.wiring`, on a folded copy, over
``batches``) once: which conv/linear layers become integer kernels, the grid each reads, the
grid its output is requantized to (the next activation quantizer's, or an 8-bit grid spanning
what it produced on ``batches``). It then switches the live network's deploy state on
(:mod:`gdrq_lightning.quant.deploy`): every activation on its grid, fixed from now on; every
integer layer computing ONNX Runtime's integer arithmetic with its BatchNorm folded in; the
other BatchNorms normalising with frozen statistics, in train mode too. Weights, BatchNorm
affine parameters and learned weight steps keep training; the grids do not (they are what the
file will hold, and they stay the ones every later checkpoint and export reads).

Checkpoints: the state is buffers every quantized layer has from construction, so a state dict
has the same keys before and after; one from before the deploy form loads with it off. After
loading a deploy-form state dict into a freshly quantized network, :func:`restore_deploy`
(or ``simulate_deploy(model, None)``) links the folded BatchNorms again; nothing is calibrated.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..quant import ActGrid
from ..quant.deploy import DIRECT, FLOAT, OWN_GRID, freeze_batchnorm, release_batchnorm
from ..quant.distributed import world_size
from ..quant.pairing import find_conv_bn_pairs, is_batchnorm
from .build import build_qdq_model
from .deploy_export import ACT_LAYERS, WEIGHT_LAYERS, is_deployed
from .fold import _bn_can_fold, fold_groups_into_bn
from .qdq import QDQAct, QDQWeightLayer

RUNTIMES = ("ort",)  # where the integer kernels run; TensorRT (quantized identity input, conv+add fused) could follow
Plan = dict[str, tuple[int, ActGrid | None, ActGrid | None, int]]


def _grid(act: QDQAct) -> ActGrid:
    return ActGrid(act.scale.clone(), act.qmin, act.qmax, act.zero_nonpositive)


def _check_on(model: nn.Module) -> None:
    for name, m in model.named_modules():
        off = (isinstance(m, WEIGHT_LAYERS) and not m.weight_quantizer.is_on("quant_on")) or (
            isinstance(m, ACT_LAYERS) and not m.act_quantizer.is_on("quant_on")
        ) or (isinstance(m, WEIGHT_LAYERS) and m.input_quantizer is not None and not m.input_quantizer.is_on())
        if off:
            raise ValueError(f"layer '{name}': a quantizer is switched off; simulate_deploy needs the quantized "
                             f"network (every phase up to quant_acts begun)")


def _plan(model: nn.Module, batches: list[Any]) -> Plan:
    """Export's decisions on a folded eval copy: layer name -> (mode, input grid, output grid, zero point)."""
    folded = fold_groups_into_bn(copy.deepcopy(model).eval(), inplace=True)
    qdq = build_qdq_model(folded, batches[0], calibration=batches)
    plan: Plan = {}
    for name, layer in qdq.named_modules():
        if not isinstance(layer, QDQWeightLayer):
            continue
        if not layer.integer or layer.wired is None:
            plan[name] = (FLOAT, None, None, 0)
            continue
        grid, direct = layer.wired
        if direct is None:
            out = layer.output_act
            plan[name] = (OWN_GRID, _grid(grid), _grid(out), out.zero)
        elif all(a is direct[0] for a in direct):
            plan[name] = (DIRECT, _grid(grid), _grid(direct[0]), direct[0].zero)
        else:  # called several times into different quantizers: one deploy state cannot hold them
            plan[name] = (FLOAT, None, None, 0)
    return plan


def _input_grid(name: str, layer: nn.Module) -> ActGrid | None:
    iq = layer.input_quantizer
    if iq is None:
        return None
    if iq.magnitude.act_groups > 1:
        raise ValueError(f"layer '{name}': its input quantizer has act_groups={iq.magnitude.act_groups}; the deploy "
                         f"form needs one grid per tensor there")
    return iq.export_grid(None)


def _freeze_batchnorms(model: nn.Module, folded: dict[str, nn.Module]) -> None:
    for bn in model.modules():
        if isinstance(bn, _BatchNorm) or is_batchnorm(bn):
            if any(bn is f for f in folded.values()):
                freeze_batchnorm(bn, folded=True)
            elif isinstance(bn, _BatchNorm):
                freeze_batchnorm(bn, folded=False)


def _pairs(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The foldable BatchNorm of each conv in ``names`` (data-free: :func:`find_conv_bn_pairs`)."""
    pairs = find_conv_bn_pairs(model, names).pairs
    bns = {conv: model.get_submodule(bn) for conv, bn in pairs.items()}
    return {conv: bn for conv, bn in bns.items() if _bn_can_fold(bn)}


def simulate_deploy(model: nn.Module, batches: Iterable[Any] | None, runtime: str = "ort") -> nn.Module:
    """Put a quantized network, in place, into the form ``to_onnx`` writes, trainable (module docstring).

    Args:
        model: a ``quantize_model`` result with every quantizer on (BatchNorms in eval, as the
            decision pass runs a copy in eval mode); any device, the batches on it.
        batches: model inputs (tensors, or tuples of positional arguments) that set the 8-bit
            output grids; a few training batches. ``None``: a model whose deploy state came from
            a state dict is linked up again (:func:`restore_deploy`), nothing calibrated.
        runtime: where the file will run; ``"ort"`` (ONNX Runtime's CPU kernels).

    Returns:
        ``model``, whose ``model(x)`` ONNX Runtime's default session reproduces from
        ``to_onnx(model, ...)`` up to rounding ties (ORT's ``QLinearAdd`` rounds in its own float
        arithmetic; every ``QLinearConv`` output code agrees).

    Under ``torch.distributed`` call it on every rank: the ranks take rank 0's grids (one broadcast).

    Raises:
        ValueError: unknown ``runtime`` (lists the supported ones), an empty ``batches``, a
            quantizer switched off (names the layer), a model already in deploy form given
            ``batches`` (its grids are fixed; :func:`clear_deploy` first), or ``None`` for a model
            without deploy state.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r} is not supported; supported runtimes: {', '.join(RUNTIMES)}")
    if batches is None:
        if not restore_deploy(model):
            raise ValueError("simulate_deploy(model, None): the model has no deploy state to restore; pass batches")
        return model
    if is_deployed(model):
        raise ValueError("the model is in deploy form already and its grids are fixed; after loading a state dict "
                         "call restore_deploy(model), to set it up again call clear_deploy(model) first")
    batches = list(batches)
    if not batches:
        raise ValueError("simulate_deploy: batches is empty; pass at least one model input")
    _check_on(model)
    plan = _plan(model, batches)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}
    bns = _pairs(model, [n for n in layers if isinstance(layers[n], nn.Conv2d)])
    for name, layer in layers.items():
        mode, in_grid, out_grid, zero = plan.get(name, (FLOAT, None, None, 0))
        in_grid = _input_grid(name, layer) or in_grid
        layer.deploy.configure(mode, in_grid, out_grid, zero, folded=name in bns)
        layer.deploy.link(bns.get(name))
    for act in model.modules():
        if isinstance(act, ACT_LAYERS):
            q = act.act_quantizer
            act.deploy.set_grid(q.export_grid(q.act_groups if q.act_groups > 1 else None))
    _freeze_batchnorms(model, bns)
    _broadcast(model)
    return model


@torch.no_grad()
def _broadcast(model: nn.Module) -> None:
    """Under ``torch.distributed``: every rank takes rank 0's deploy state (its 8-bit output grids
    came from rank 0's batches), in one collective; nothing on one process."""
    if world_size() == 1:
        return
    states = [m.deploy for m in model.modules() if isinstance(m, (*WEIGHT_LAYERS, *ACT_LAYERS))]
    buffers = [b for s in states for b in s.buffers()]
    flat = torch.cat([b.reshape(-1).double() for b in buffers])  # int32 codes and float32 scales exactly
    dist.broadcast(flat, src=0)
    for b, value in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(value.reshape(b.shape).to(b.dtype))
    for state in states:
        state._sync({})


def restore_deploy(model: nn.Module) -> bool:
    """Link a model whose deploy state was loaded from a state dict (folded BatchNorms found again
    by :func:`find_conv_bn_pairs`, the others frozen); ``False`` when it has no deploy state.

    Raises:
        ValueError: a layer saved with a BatchNorm folded in has none now (names the layer).
    """
    if not is_deployed(model):
        return False
    folded = [n for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS) and m.deploy._folded]
    bns = _pairs(model, folded)
    for name in folded:
        if name not in bns:
            raise ValueError(f"layer '{name}': saved in deploy form with a BatchNorm folded in, but none follows it now")
        model.get_submodule(name).deploy.link(bns[name])
    _freeze_batchnorms(model, bns)
    return True


def clear_deploy(model: nn.Module) -> nn.Module:
    """Switch the deploy form off again, in place (the fake-quant network, BatchNorms as before)."""
    for m in model.modules():
        if isinstance(m, (*WEIGHT_LAYERS, *ACT_LAYERS)):
            m.deploy.reset()
        release_batchnorm(m)
    return model


def network_inputs(network: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any]) -> list[tuple[Any, ...]]:
    """The positional arguments ``network`` is called with while ``forward(batch)`` runs on each
    batch, in eval mode and without gradients: training batches as :func:`simulate_deploy`'s
    ``batches`` (e.g. ``forward=task.quant_forward``, which maps a detection batch to the images)."""
    captured: list[tuple[Any, ...]] = []
    hook = network.register_forward_pre_hook(lambda _m, args: captured.append(tuple(args)))
    training = network.training
    network.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(batch)
    finally:
        hook.remove()
        network.train(training)
    return captured
