"""gdrq-lightning: low-bit quantization-aware training of vision networks for Lightning.

Public interface (docs/methods.md#public-interface): :class:`QuantConfig`, :func:`quantize_model`,
:func:`quantized_layers`, :class:`GDRQCallback` and :mod:`gdrq_lightning.export`; beside
them :class:`QuantMonitor` (statistics and plots) and :class:`QuantTask` (what a
LightningModule implements to be quantized). Lightning-dependent names load lazily so the
quantization core imports fast.
"""
from __future__ import annotations

import importlib
from typing import Any

from .quant import Method, QuantConfig, quantize_model, quantized_layers, set_quant_state

__version__ = "0.1.0"
__all__ = [
    "GDRQCallback", "Method", "QuantConfig", "QuantMonitor", "QuantTask", "Schedule", "export", "quantize_model",
    "quantized_layers", "set_quant_state",
]

_LAZY = {
    "GDRQCallback": "gdrq_lightning.callback", "QuantMonitor": "gdrq_lightning.monitoring",
    "QuantTask": "gdrq_lightning.task", "Schedule": "gdrq_lightning.schedule", "export": "gdrq_lightning.export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if name == "export" else getattr(module, name)
    raise AttributeError(f"module 'gdrq_lightning' has no attribute {name!r}")
