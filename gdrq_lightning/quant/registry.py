"""The method registry: ``Method`` -> the quantizer classes that implement it.

Each module of :mod:`.methods` registers its method(s) with :func:`register` when it is
imported (the ``methods`` package imports all of them), so adding a method is its module
plus one ``Method`` entry (the README walks through one). The rest of the library asks
the quantizer objects (forward, integer codes, export grid, clip value), never
``if method == ...``. This module imports nothing that uses it: the quantizer base classes
and the config ask it for a method's classes without an import cycle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .config import Method, QuantConfig
    from .quantizers import ActQuantizer, WeightQuantizer

Validator = Callable[["QuantConfig", str], None]


@dataclass(frozen=True)
class MethodSpec:
    """What implements a method: its weight and activation quantizer classes, a check of its
    own config options (``validate(cfg, where)`` raises ``ValueError`` naming the field), and
    ``input``: the unsigned activation quantizer that :class:`~gdrq_lightning.quant.inputs.InputQuantizer`
    applies to ``|x|`` for a signed input grid (``None``: the method has no input quantizer)."""

    weight: type[WeightQuantizer]
    act: type[ActQuantizer]
    validate: Validator | None = None
    input: type[ActQuantizer] | None = None


_REGISTRY: dict[Method, MethodSpec] = {}


def register(
    method: Method,
    *,
    weight: type[WeightQuantizer],
    act: type[ActQuantizer],
    validate: Validator | None = None,
    input: type[ActQuantizer] | None = None,  # noqa: A002 (the registry's field name)
) -> None:
    """Make ``method`` available to ``quantize_model`` (called by each method module)."""
    if method in _REGISTRY:
        raise ValueError(f"method {method.value!r} is registered twice")
    _REGISTRY[method] = MethodSpec(weight, act, validate, input)


def method_spec(method: Method) -> MethodSpec:
    """The implementation of ``method``.

    Raises:
        ValueError: no module registered it (the message lists the registered methods).
    """
    try:
        return _REGISTRY[method]
    except KeyError:
        known = ", ".join(sorted(m.value for m in _REGISTRY))
        raise ValueError(f"quantization method {getattr(method, 'value', method)!r} has no implementation; registered: {known}") from None


def validators() -> list[Validator]:
    """Every registered method's option check, once each."""
    seen: list[Validator] = []
    for spec in _REGISTRY.values():
        if spec.validate is not None and spec.validate not in seen:
            seen.append(spec.validate)
    return seen
