"""Quantized layers that subclass their float layers (docs/methods.md#public-interface).

``from_float`` shares the float layer's Parameters (no copy), so the optimizer and
``state_dict`` keys of weights are unchanged by the swap; the quantizers add keys
under ``weight_quantizer.`` / ``act_quantizer.`` (and ``input_quantizer.`` for a conv/linear
that ``QuantConfig.quant_inputs`` names), and the deploy form's state (off until
``simulate_deploy``) keys under ``weight_quantizer.deploy.`` / ``act_quantizer.deploy.`` (:mod:`.deploy`).
"""
from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn import functional as F

from .config import QuantConfig
from .deploy import ActDeploy, LayerDeploy
from .inputs import InputQuantizer
from .quantizers import ActQuantizer, WeightQuantizer


class _WeightLayer(nn.Module):
    """What :class:`QuantConv2d` and :class:`QuantLinear` share: the float layer's own Parameters,
    a :class:`WeightQuantizer` for the weight and an optional :class:`InputQuantizer` for the input."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_quantizer: WeightQuantizer
    input_quantizer: InputQuantizer | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # the float layer's own __init__ (next in the MRO)
        self.input_quantizer = None  # ``quantize_model`` sets one for ``quant_inputs`` layers

    def _share(self, layer: nn.Module, cfg: QuantConfig, name: str) -> _WeightLayer:
        """Take ``layer``'s Parameters (no copy) and its mode, add the weight quantizer."""
        self.weight, self.bias = layer.weight, layer.bias
        self.weight_quantizer = WeightQuantizer(cfg, layer.weight.shape[0], name).to(layer.weight.device)
        self.weight_quantizer.deploy = LayerDeploy(layer.weight.device)
        return self.train(layer.training)

    @property
    def deploy(self) -> LayerDeploy:
        """The layer's deploy-form state (kept in its weight quantizer: keys ``weight_quantizer.deploy.*``)."""
        return self.weight_quantizer.deploy

    def _op(self, x: Tensor, w: Tensor) -> Tensor:
        """The layer's operation without bias (the deploy form's integer accumulation)."""
        raise NotImplementedError

    def _give(self, layer: nn.Module) -> nn.Module:
        """``layer`` (built on ``meta``) with this layer's Parameters and mode."""
        layer.weight, layer.bias = self.weight, self.bias
        return layer.train(self.training)

    def _quantized(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The input and the weight as the layer computes with them."""
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return x, self.weight_quantizer(self.weight)


class QuantConv2d(_WeightLayer, nn.Conv2d):
    """``nn.Conv2d`` whose weight passes through a :class:`WeightQuantizer` (and its input through an
    :class:`InputQuantizer` where ``QuantConfig.quant_inputs`` asks)."""

    def _float_args(self) -> dict:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
                    stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                    bias=self.bias is not None, padding_mode=self.padding_mode, device="meta")

    @classmethod
    def from_float(cls, conv: nn.Conv2d, cfg: QuantConfig, name: str = "") -> QuantConv2d:
        return cls(**QuantConv2d._float_args(conv))._share(conv, cfg, name)

    def to_float(self) -> nn.Conv2d:
        return self._give(nn.Conv2d(**self._float_args()))

    def _op(self, x: Tensor, w: Tensor) -> Tensor:
        return self._conv_forward(x, w, None)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy.active:
            return self.deploy(self, x)
        return self._conv_forward(*self._quantized(x), self.bias)


class QuantLinear(_WeightLayer, nn.Linear):
    """``nn.Linear`` whose weight passes through a :class:`WeightQuantizer` (input: as ``QuantConv2d``)."""

    @classmethod
    def from_float(cls, linear: nn.Linear, cfg: QuantConfig, name: str = "") -> QuantLinear:
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")._share(linear, cfg, name)

    def to_float(self) -> nn.Linear:
        return self._give(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta"))

    def _op(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x, w)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy.active:
            return self.deploy(self, x)
        return F.linear(*self._quantized(x), self.bias)


class _ActLayer:
    """What :class:`QuantReLU` and :class:`QuantReLU6` share: the activation quantizer replaces
    the float activation (it applies the ReLU / ReLU6 itself, never in place)."""

    float_type: ClassVar[type[nn.Module]]
    upper: ClassVar[float | None]
    act_quantizer: ActQuantizer

    def _add_quantizer(self, cfg: QuantConfig, name: str) -> None:
        self.act_quantizer = ActQuantizer(cfg, upper=self.upper, layer_name=name)
        self.act_quantizer.deploy = ActDeploy(self.act_quantizer.act_groups)

    @classmethod
    def from_float(cls, act: nn.Module, cfg: QuantConfig, name: str = "") -> Any:
        return cls(cfg, name).train(act.training)

    def to_float(self) -> nn.Module:
        return self.float_type()

    @property
    def deploy(self) -> ActDeploy:
        """The activation's deploy-form grid (kept in its quantizer: keys ``act_quantizer.deploy.*``)."""
        return self.act_quantizer.deploy

    def forward(self, x: Tensor) -> Tensor:
        return self.deploy(x, self.act_quantizer) if self.deploy.active else self.act_quantizer(x)


class QuantReLU(_ActLayer, nn.ReLU):
    """``nn.ReLU`` followed by activation quantization."""

    float_type, upper = nn.ReLU, None

    def __init__(self, cfg: QuantConfig, name: str = "") -> None:
        nn.ReLU.__init__(self, inplace=False)
        self._add_quantizer(cfg, name)


class QuantReLU6(_ActLayer, nn.ReLU6):
    """``nn.ReLU6`` followed by activation quantization; clip values never exceed 6."""

    float_type, upper = nn.ReLU6, 6.0

    def __init__(self, cfg: QuantConfig, name: str = "") -> None:
        nn.ReLU6.__init__(self, inplace=False)
        self._add_quantizer(cfg, name)


QUANT_LAYER_TYPES = (QuantConv2d, QuantLinear, QuantReLU, QuantReLU6)
