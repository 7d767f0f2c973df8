"""``QuantConfig``: the one description of what to quantize and how (docs/methods.md#public-interface).

The dataclass validates itself so a bad YAML value fails at parse time with the
field, the value and the allowed set in the message.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, Union

from .registry import validators


class Method(str, Enum):
    """Quantization method. Member names equal their values so YAML may use either."""

    gdrq = "gdrq"
    scale_clip = "scale_clip"
    group = "group"
    hwgq = "hwgq"
    dorefa = "dorefa"
    pact = "pact"
    lsq = "lsq"
    none = "none"


class HWGQBackward(str, Enum):
    """HWGQ backward approximator (docs/methods.md#hwgq)."""

    relu = "relu"
    clipped = "clipped"
    log_tailed = "log_tailed"


# Fields an ``overrides`` entry may set for the layers it matches (mixed precision).
LAYER_FIELDS = (
    "method", "weight_bits", "act_bits", "groups", "k_w", "k_a", "momentum", "act_groups",
    "hwgq_backward", "hwgq_step", "project", "pact_alpha_init", "pact_decay",
)


def _enum(cls: type[Enum], name: str, value: Any) -> Enum:
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).lower())
    except ValueError:
        allowed = ", ".join(m.value for m in cls)
        raise ValueError(f"QuantConfig.{name}={value!r} is not one of: {allowed}") from None


def _check_int(name: str, value: Any, lo: int, hi: int | None = None, where: str = "") -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{where}QuantConfig.{name}={value!r} is out of range (allowed: integer {rng})")


def _patterns(name: str, value: Any) -> list[str] | None:
    """A pattern list option (``skip``, ``quant_inputs``): ``None``, one string or a list of them."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"QuantConfig.{name}={value!r} must be a module-name pattern or a list of them")
    return [str(p) for p in value]


ClipFactor = Union[float, Literal["auto"]]


def _clip_factor(name: str, value: Any, where: str = "") -> float | str:
    """A Scale-Clip factor: a number > 0, or ``"auto"`` (calibrated to the least quantization MSE)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    _check_positive(name, value, where)
    return value


def _check_positive(name: str, value: Any, where: str = "") -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{where}QuantConfig.{name}={value!r} must be a number > 0")


@dataclass
class QuantConfig:
    """What to quantize and how.

    Args:
        method: ``gdrq`` (Scale-Clip + groups), ``scale_clip``, ``group``, ``hwgq``,
            ``dorefa``, ``pact``, ``lsq`` or ``none`` (leave the model untouched).
        weight_bits: 1..8; 1 means binary weights ``alpha * sign(w)``.
        act_bits: 1..8 for activations after ReLU/ReLU6.
        groups: filter groups ``G`` along ``C_out`` per conv/linear (must divide
            ``C_out``; 1 = per layer). ``hwgq`` always uses one ``alpha`` per filter.
        k_w: Scale-Clip weight factor, ``T_g = k_w * mean|W_g|``, or ``"auto"``: per layer, the
            factor with the least quantization MSE of its weights at its bit width.
        k_a: Scale-Clip activation factor, ``T_a = k_a * EMA(mean|a|)``; ``"auto"`` (default):
            per layer, the factor with the least quantization MSE of its activations, chosen on
            calibration batches (docs/methods.md#scale-clip).
        momentum: EMA momentum of activation statistics.
        act_groups: channel groups with their own activation statistics.
        hwgq_backward: ``relu``, ``clipped`` (default) or ``log_tailed``.
        hwgq_step: override of the MSE-optimal HWGQ step ``D_b``.
        project: also clamp the weights in place to ``[-T, T]`` after each optimizer step.
        pact_alpha_init: PACT's initial clip value.
        pact_decay: L2 decay on PACT's alpha.
        skip: ``fnmatch`` patterns of module names left full precision. ``None``
            (default) keeps the first conv and the last linear (or, with no linear,
            the last conv) in full precision; ``[]`` quantizes everything.
        overrides: pattern -> partial config, e.g. ``{"layer4.*": {"weight_bits": 8}}``;
            later patterns win where several match.
        quant_inputs: ``fnmatch`` patterns of conv/linear layers whose *input* gets its own
            signed quantizer (:mod:`.inputs`), for layers that read a float tensor (FPN sums,
            concatenations, pooled maps), so export stays integer. ``None`` (default): the
            task's ``quant_inputs_default()`` (detection: the FPN output convs), else none.
    """

    method: Method | str = Method.gdrq
    weight_bits: int = 4
    act_bits: int = 4
    groups: int = 1
    k_w: ClipFactor = 2.0
    k_a: ClipFactor = "auto"
    momentum: float = 0.01
    act_groups: int = 1
    hwgq_backward: HWGQBackward | str = HWGQBackward.clipped
    hwgq_step: float | None = None
    project: bool = False
    pact_alpha_init: float = 6.0
    pact_decay: float = 1e-4
    skip: list[str] | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    quant_inputs: list[str] | None = None

    def __post_init__(self) -> None:
        self.method = _enum(Method, "method", self.method)
        self.hwgq_backward = _enum(HWGQBackward, "hwgq_backward", self.hwgq_backward)
        self.validate()
        self.skip = _patterns("skip", self.skip)
        self.quant_inputs = _patterns("quant_inputs", self.quant_inputs)
        if not isinstance(self.overrides, dict):
            raise ValueError(f"QuantConfig.overrides must be a mapping pattern -> fields, got {self.overrides!r}")
        for pattern, fields in self.overrides.items():
            if not isinstance(fields, dict):
                raise ValueError(f"QuantConfig.overrides[{pattern!r}] must be a mapping, got {fields!r}")
            unknown = sorted(set(fields) - set(LAYER_FIELDS))
            if unknown:
                raise ValueError(
                    f"QuantConfig.overrides[{pattern!r}] has unknown field(s) {unknown}; "
                    f"allowed: {', '.join(LAYER_FIELDS)}"
                )
            self.for_layer(pattern, fields)  # validates the merged values

    def validate(self, where: str = "") -> None:
        """Check every per-layer field; ``where`` prefixes messages with a layer name.

        Fields every method reads are checked here; a method checks its own options
        (``methods/<name>.py``), and every registered method's check runs.
        """
        _check_int("weight_bits", self.weight_bits, 1, 8, where)
        _check_int("act_bits", self.act_bits, 1, 8, where)
        _check_int("groups", self.groups, 1, None, where)
        _check_int("act_groups", self.act_groups, 1, None, where)
        self.k_w = _clip_factor("k_w", self.k_w, where)
        self.k_a = _clip_factor("k_a", self.k_a, where)
        if not isinstance(self.momentum, (int, float)) or not 0 < self.momentum <= 1:
            raise ValueError(f"{where}QuantConfig.momentum={self.momentum!r} must be in (0, 1]")
        for check in validators():
            check(self, where)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (enums as strings), safe for ``torch.load(weights_only=True)`` and YAML."""
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in dataclasses.asdict(self).items()}

    def for_layer(self, name: str, fields: dict[str, Any]) -> QuantConfig:
        """This config with ``fields`` applied, validated, for the layer ``name``."""
        base = {f: getattr(self, f) for f in LAYER_FIELDS}
        base.update(fields)
        try:  # ``replace`` runs ``__post_init__``, which converts the enums and validates
            return dataclasses.replace(self, skip=[], overrides={}, quant_inputs=[], **{k: base[k] for k in LAYER_FIELDS})
        except ValueError as err:
            raise ValueError(f"layer '{name}': {err}") from None
