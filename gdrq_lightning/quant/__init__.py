"""Quantization core: math (:mod:`.primitives`), config, quantizer modules, layers, swap."""
from .config import HWGQBackward, Method, QuantConfig
from .layers import QuantConv2d, QuantLinear, QuantReLU, QuantReLU6
from .quantizers import ActQuantizer, WeightQuantizer
from .swap import dequantize_model, quantize_model, quantized_layers, quantizers, set_quant_state

__all__ = [
    "ActQuantizer", "HWGQBackward", "Method", "QuantConfig", "QuantConv2d", "QuantLinear", "QuantReLU",
    "QuantReLU6", "WeightQuantizer", "dequantize_model", "quantize_model", "quantized_layers", "quantizers",
    "set_quant_state",
]
