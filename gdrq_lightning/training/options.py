"""Validation of the callback's constructor arguments (Lightning's own callbacks check theirs in
``__init__``, so a bad YAML value fails before any training) and of the state it resumes from."""
from __future__ import annotations

from typing import Any


def as_instance(owner: str, name: str, cls: type, value: Any) -> Any:
    """``value`` as ``cls``: ``None`` gives the default, a dict its fields; anything else is a ``TypeError``."""
    value = cls() if value is None else cls(**value) if isinstance(value, dict) else value
    if not isinstance(value, cls):
        raise TypeError(f"{owner}({name}=...) needs a {cls.__name__} or a dict of its fields, got {type(value).__name__}")
    return value


def check_counts(owner: str, **counts: tuple[int | None, int]) -> None:
    """Each ``name=(value, lowest)``: ``value`` is ``None`` or an integer >= ``lowest``.

    Raises:
        ValueError: names the argument, the value and the bound.
    """
    for name, (value, low) in counts.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ValueError(f"{owner}({name}={value!r}) must be an integer >= {low}")


def check_state(state: dict[str, Any], version: int, phases: tuple[str, ...]) -> None:
    """A ``GDRQCallback`` checkpoint state this code can resume.

    Raises:
        ValueError: another state version, or phases this code does not know.
    """
    if state.get("version") != version:
        raise ValueError(f"GDRQCallback state version {state.get('version')!r} is not supported (expected {version})")
    unknown = [p for p in state["done"] if p not in phases]
    if unknown:
        raise ValueError(f"GDRQCallback checkpoint names unknown phases {unknown}")
