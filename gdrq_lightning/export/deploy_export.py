"""The export form of a deploy-form model, read off the model as it is (docs/methods.md#deploy-form).

:func:`~.deploy.simulate_deploy` fixed which layers are integer kernels and every grid; here
each layer writes exactly the numbers its deploy forward computes with: the integer codes
(times ``m``), the per-channel scale ``s_w``, the int32 bias and the grids, with nothing
calibrated again. ONNX Runtime then multiplies by ``f32(f32(s_x · s_w) / s_y)``, the number the
deploy forward multiplies by, so the two agree code for code in every ``QLinearConv``.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..quant import QuantConv2d, QuantLinear, QuantReLU, QuantReLU6
from ..quant.deploy import FLOAT, OWN_GRID, LayerDeploy, release_batchnorm
from ..utils.modules import set_submodule
from .build import act_channels, act_meta, float_parts, no_inplace, qdq_weight
from .qdq import QDQAct, QDQConv2d, QDQLinear, QDQWeightLayer
from .wiring import as_args, wire

WEIGHT_LAYERS = (QuantConv2d, QuantLinear)
ACT_LAYERS = (QuantReLU, QuantReLU6)


def is_deployed(model: nn.Module) -> bool:
    """Whether ``model`` is in deploy form (any quantized layer's deploy state is on)."""
    return any(isinstance(m, (*WEIGHT_LAYERS, *ACT_LAYERS)) and m.deploy.active for m in model.modules())


@torch.no_grad()
def _weight_layer(layer: QuantConv2d | QuantLinear) -> QDQWeightLayer:
    d: LayerDeploy = layer.deploy
    cls = QDQConv2d if isinstance(layer, QuantConv2d) else QDQLinear
    in_grid, out_grid = d.grids()
    if d._mode == FLOAT:
        codes, step = layer.weight_quantizer.to_integer(layer.weight)
        a, c = d.affine(layer)
        factor = step.double() if a is None else step.double() * a.double()
        state = qdq_weight(codes.to(torch.int32), factor, None if c is None else c.double(), layer.weight_quantizer.bits, "int8")
        new = cls(layer, *float_parts(state, torch.float32))
        new.keep_float("float (deploy form)")
    else:
        z, s_w, c, _ = d.integer_terms(layer)
        new = cls(layer, z.to(torch.int8), s_w.float(), None, None, False)
        new.integer, new.note = True, "integer (deploy form)"
        if c is not None:
            lattice = d.in_scale * s_w
            codes = torch.round(c / lattice)
            if codes.abs().max() >= 2**31:
                raise ValueError(f"bias does not fit int32 on the lattice s_x * s_w (min step {float(lattice.min()):.3g})")
            new.bias_codes, new.bias_scale = codes.to(torch.int32), lattice.float()
        if d._mode == OWN_GRID:
            new.output_act = QDQAct(out_grid, {"output": True}, d._zero)
            new.note = "integer, 8-bit output grid (deploy form)"
    if layer.input_quantizer is not None:
        new.input_act = QDQAct(in_grid, act_meta(layer.input_quantizer))
    return new


def deploy_qdq_model(model: nn.Module, example_input: Any) -> nn.Module:
    """A float32 copy of a deploy-form ``model`` in export form (:mod:`.qdq` modules), as it is.

    Args:
        model: a model in deploy form (:func:`~.deploy.simulate_deploy`), any device.
        example_input: one input (a batch tensor, or a tuple of model arguments); it only finds
            the channel counts of per-channel grids and checks that moving a quantizer after a
            max pool leaves the output unchanged.
    """
    qdq = no_inplace(copy.deepcopy(model).eval())
    grouped = any(isinstance(m, ACT_LAYERS) and m.deploy.active and m.deploy.groups > 1 for m in qdq.modules())
    channels = act_channels(qdq, *as_args(example_input)) if grouped else {}
    for name, module in list(qdq.named_modules()):
        folded = getattr(module, "_deploy_folded", None)
        if folded:  # a BatchNorm the deploy form folded into its conv
            set_submodule(qdq, name, nn.Identity())
        elif folded is not None:  # one it froze: itself again, in eval mode
            release_batchnorm(module)
        elif isinstance(module, WEIGHT_LAYERS) and module.deploy.active:
            set_submodule(qdq, name, _weight_layer(module))
        elif isinstance(module, ACT_LAYERS) and module.deploy.active:
            set_submodule(qdq, name, QDQAct(module.deploy.grid(channels.get(name)), act_meta(module.act_quantizer)))
    qdq = qdq.float()
    wire(qdq, [example_input], None, torch.float32)
    return qdq
