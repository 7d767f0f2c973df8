"""Quantization core: shared math (:mod:`.primitives`, :mod:`.kernels`), one module per
method (:mod:`.methods`, registered in :mod:`.registry` when imported here), config, quantizer
base classes, layers and the swap."""
from . import methods  # noqa: F401 (each method module registers itself)
from .calibration import calibrate_weights, calibrating_activations
from .config import HWGQBackward, Method, QuantConfig
from .layers import QuantConv2d, QuantLinear, QuantReLU, QuantReLU6
from .quantizers import ActGrid, ActQuantizer, WeightQuantizer
from .swap import dequantize_model, named_quantizers, quantize_model, quantized_layers, set_quant_state

__all__ = [
    "ActGrid", "ActQuantizer", "calibrate_weights", "calibrating_activations", "HWGQBackward", "Method", "QuantConfig", "QuantConv2d", "QuantLinear", "QuantReLU",
    "QuantReLU6", "WeightQuantizer", "dequantize_model", "named_quantizers", "quantize_model", "quantized_layers",
    "set_quant_state",
]
