"""Quantized layers that subclass their float layers (the swap: docs/methods.md#uniform-quantizers).

``from_float`` shares the float layer's Parameters (no copy), so the optimizer and
``state_dict`` keys of weights are unchanged by the swap; the quantizers add keys
under ``weight_quantizer.`` / ``act_quantizer.`` (and ``input_quantizer.`` for a conv/linear
that ``QuantConfig.quant_inputs`` names), and the deploy form's state (off until
``simulate_deploy``) keys under ``weight_quantizer.deploy.`` / ``act_quantizer.deploy.`` (:mod:`.deploy`).
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from .config import QuantConfig
from .deploy import ActDeploy, LayerDeploy
from .inputs import InputQuantizer
from .quantizers import ActQuantizer, WeightQuantizer


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight passes through a :class:`WeightQuantizer` (and its input through an
    :class:`InputQuantizer` where ``QuantConfig.quant_inputs`` asks)."""

    weight_quantizer: WeightQuantizer

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.input_quantizer: InputQuantizer | None = None  # set by ``quantize_model`` for ``quant_inputs`` layers

    @classmethod
    def from_float(cls, conv: nn.Conv2d, cfg: QuantConfig, name: str = "") -> QuantConv2d:
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, device="meta",
        )
        new.weight, new.bias = conv.weight, conv.bias
        new.weight_quantizer = WeightQuantizer(cfg, conv.out_channels, name).to(conv.weight.device)
        new.weight_quantizer.deploy = LayerDeploy(conv.weight.device)
        return new.train(conv.training)

    def to_float(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, bias=self.bias is not None,
            padding_mode=self.padding_mode, device="meta",
        )
        conv.weight, conv.bias = self.weight, self.bias
        return conv.train(self.training)

    @property
    def deploy(self) -> LayerDeploy:
        """The layer's deploy-form state (kept in its weight quantizer: keys ``weight_quantizer.deploy.*``)."""
        return self.weight_quantizer.deploy

    def _op(self, x: Tensor, w: Tensor) -> Tensor:
        """The layer's operation without bias (the deploy form's integer accumulation)."""
        return self._conv_forward(x, w, None)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy.active:
            return self.deploy(self, x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose weight passes through a :class:`WeightQuantizer` (input: as ``QuantConv2d``)."""

    weight_quantizer: WeightQuantizer

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.input_quantizer: InputQuantizer | None = None  # set by ``quantize_model`` for ``quant_inputs`` layers

    @classmethod
    def from_float(cls, linear: nn.Linear, cfg: QuantConfig, name: str = "") -> QuantLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.weight_quantizer = WeightQuantizer(cfg, linear.out_features, name).to(linear.weight.device)
        new.weight_quantizer.deploy = LayerDeploy(linear.weight.device)
        return new.train(linear.training)

    def to_float(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear.train(self.training)

    @property
    def deploy(self) -> LayerDeploy:
        return self.weight_quantizer.deploy

    def _op(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x, w)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy.active:
            return self.deploy(self, x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


class QuantReLU(nn.ReLU):
    """``nn.ReLU`` followed by activation quantization (never in place)."""

    act_quantizer: ActQuantizer

    def __init__(self, cfg: QuantConfig, name: str = "") -> None:
        super().__init__(inplace=False)
        self.act_quantizer = ActQuantizer(cfg, upper=None, layer_name=name)
        self.act_quantizer.deploy = ActDeploy(self.act_quantizer.act_groups)

    @classmethod
    def from_float(cls, act: nn.ReLU, cfg: QuantConfig, name: str = "") -> QuantReLU:
        return cls(cfg, name).train(act.training)

    def to_float(self) -> nn.ReLU:
        return nn.ReLU()

    @property
    def deploy(self) -> ActDeploy:
        """The activation's deploy-form grid (kept in its quantizer: keys ``act_quantizer.deploy.*``)."""
        return self.act_quantizer.deploy

    def forward(self, x: Tensor) -> Tensor:
        return self.deploy(x, self.act_quantizer) if self.deploy.active else self.act_quantizer(x)


class QuantReLU6(nn.ReLU6):
    """``nn.ReLU6`` followed by activation quantization; clip values never exceed 6."""

    act_quantizer: ActQuantizer

    def __init__(self, cfg: QuantConfig, name: str = "") -> None:
        super().__init__(inplace=False)
        self.act_quantizer = ActQuantizer(cfg, upper=6.0, layer_name=name)
        self.act_quantizer.deploy = ActDeploy(self.act_quantizer.act_groups)

    @classmethod
    def from_float(cls, act: nn.ReLU6, cfg: QuantConfig, name: str = "") -> QuantReLU6:
        return cls(cfg, name).train(act.training)

    def to_float(self) -> nn.ReLU6:
        return nn.ReLU6()

    @property
    def deploy(self) -> ActDeploy:
        """The activation's deploy-form grid (kept in its quantizer: keys ``act_quantizer.deploy.*``)."""
        return self.act_quantizer.deploy

    def forward(self, x: Tensor) -> Tensor:
        return self.deploy(x, self.act_quantizer) if self.deploy.active else self.act_quantizer(x)


QUANT_LAYER_TYPES = (QuantConv2d, QuantLinear, QuantReLU, QuantReLU6)
