"""Reaching into module trees and Python paths by dotted name."""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at the dotted ``name`` (``"layer1.0.conv1"``) by ``module``."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def import_object(path: str) -> Any:
    """The object at a dotted import path (``"tasks.detection.DetectionModule"``).

    Raises:
        ImportError: the module cannot be imported or has no such attribute (names the path).
    """
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ImportError(f"cannot import {path!r}: {err}") from None
