"""Quantization core: shared math (:mod:`.primitives`, :mod:`.kernels`), one module per
method (:mod:`.methods`), config, quantizer base classes, layers and the swap."""
from .config import HWGQBackward, Method, QuantConfig
from .layers import QuantConv2d, QuantLinear, QuantReLU, QuantReLU6
from .quantizers import ActGrid, ActQuantizer, WeightQuantizer
from .swap import dequantize_model, named_quantizers, quantize_model, quantized_layers, set_quant_state

__all__ = [
    "ActGrid", "ActQuantizer", "HWGQBackward", "Method", "QuantConfig", "QuantConv2d", "QuantLinear", "QuantReLU",
    "QuantReLU6", "WeightQuantizer", "dequantize_model", "named_quantizers", "quantize_model", "quantized_layers",
    "set_quant_state",
]
