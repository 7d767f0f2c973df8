"""Export of quantized models (docs/methods.md#export): folded integer model, packed file, ONNX.

``fold_groups_into_bn`` moves group steps into BatchNorms, ``to_integer`` stores
integer codes (packed file), ``to_onnx`` writes the QDQ ONNX that ONNX Runtime runs with
integer kernels, and ``export_model`` does all of it plus a JSON report (the ``gdrq export`` job).
``simulate_deploy`` puts a network into the form ``to_onnx`` writes, trainable (``restore_deploy``
after loading its state dict), so what is validated in PyTorch is what ONNX Runtime runs.
"""
from ..quant.pairing import PairingError, find_conv_bn_pairs
from .deploy import clear_deploy, network_inputs, restore_deploy, simulate_deploy
from .deploy_export import is_deployed
from .fold import fold_groups_into_bn
from .integer import load_integer, pack_bits, save_integer, to_integer, unpack_bits
from .layers import IntegerConv2d, IntegerLinear
from .onnx_export import OnnxSpec, kernel_summary, optimized_op_counts, run_onnxruntime, to_onnx
from .report import export_model, layer_report

__all__ = [
    "IntegerConv2d", "IntegerLinear", "OnnxSpec", "PairingError", "clear_deploy", "export_model", "find_conv_bn_pairs",
    "fold_groups_into_bn", "is_deployed", "kernel_summary", "layer_report", "load_integer", "network_inputs",
    "optimized_op_counts", "pack_bits", "restore_deploy", "run_onnxruntime", "save_integer", "simulate_deploy",
    "to_integer", "to_onnx", "unpack_bits",
]
