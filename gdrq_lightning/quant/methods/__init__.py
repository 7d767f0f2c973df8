"""One module per quantization method; importing this package registers all of them in
:mod:`gdrq_lightning.quant.registry` (each module calls ``register`` at import)."""
from __future__ import annotations

import importlib
import pkgutil

from ..registry import MethodSpec, method_spec, register, validators

__all__ = ["MethodSpec", "method_spec", "register", "validators"]

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
