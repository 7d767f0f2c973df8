"""The quantization schedule: when each phase begins (docs/methods.md#schedule).

Phases, in order: ``fp`` (implicit, before any other) -> ``scale_clip`` ->
``quant_weights`` -> ``quant_acts`` -> ``groups`` -> ``freeze_bn`` -> ``freeze_act_stats`` -> ``deploy``.
Each phase only turns things on. A start is an epoch or a global step; ``None`` skips the phase.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Union

PHASES: tuple[str, ...] = ("scale_clip", "quant_weights", "quant_acts", "groups", "freeze_bn")  # docs/methods.md#schedule
OPTIONAL_PHASES: tuple[str, ...] = ("freeze_act_stats", "deploy")  # optional, after the five above; skipped unless scheduled
ALL_PHASES = PHASES + OPTIONAL_PHASES
Unit = Literal["epoch", "step"]
PhaseStart = Union[int, str, None]


class Start(NamedTuple):
    """A parsed phase start: ``unit`` is ``"epoch"`` or ``"step"``."""

    unit: str
    at: int


def parse_start(phase: str, value: PhaseStart, default_unit: str) -> Start | None:
    """Parse ``3``, ``"epoch:3"``, ``"step:500"`` or ``None`` (skipped).

    Raises:
        ValueError: negative starts, unknown units or non-integer values, naming the phase.
    """
    if value is None:
        return None
    unit, raw = default_unit, value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("none", "null", "skip", ""):
            return None
        unit, sep, raw = text.partition(":")
        if not sep:
            unit, raw = default_unit, text
        if unit not in ("epoch", "step"):
            raise ValueError(f"Schedule.{phase}={value!r}: unit must be 'epoch' or 'step' (e.g. 'step:500')")
        try:
            raw = int(raw)
        except ValueError:
            raise ValueError(f"Schedule.{phase}={value!r} is not an integer start (e.g. 3 or 'step:500')") from None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ValueError(f"Schedule.{phase}={value!r} must be a non-negative integer, 'epoch:N', 'step:N' or null")
    return Start(unit, raw)


@dataclass
class Schedule:
    """When each phase begins; ints count in ``unit``, strings may name their own unit.

    Args:
        scale_clip: start of Scale-Clip (weights and activations).
        quant_weights: start of weight quantization.
        quant_acts: start of activation quantization.
        groups: switch from one group per layer to the configured ``G``.
        freeze_bn: BatchNorm statistics frozen (BN layers in eval mode) from here on; the
            callback first re-estimates them on the quantized network.
        freeze_act_stats: activation statistics (the Scale-Clip / group EMAs) stop moving
            from here on (activation quantizers in eval mode), for the last epochs.
        deploy: the network becomes the integer graph the export writes
            (:func:`gdrq_lightning.export.simulate_deploy` on ``calib_batches`` training batches) and
            trains on in that form, for the last epoch(s) (docs/methods.md#deploy-form).
        unit: ``epoch`` or ``step`` (global optimizer step) for plain integers.

    The default turns everything but ``freeze_bn``, ``freeze_act_stats`` and ``deploy`` on from the first step.
    """

    scale_clip: PhaseStart = 0
    quant_weights: PhaseStart = 0
    quant_acts: PhaseStart = 0
    groups: PhaseStart = 0
    freeze_bn: PhaseStart = None
    freeze_act_stats: PhaseStart = None
    deploy: PhaseStart = None
    unit: Unit = "epoch"

    def __post_init__(self) -> None:
        if self.unit not in ("epoch", "step"):
            raise ValueError(f"Schedule.unit={self.unit!r} is not one of: epoch, step")
        # Each phase against every earlier phase of its unit, not just the previous one:
        # a step-based phase in between must not hide an epoch phase that starts too early.
        earlier: dict[str, tuple[str, Start]] = {}  # unit -> the latest-starting earlier phase
        for phase, start in self.starts().items():
            if start is None:
                continue
            latest = earlier.get(start.unit)
            if latest is not None and start.at < latest[1].at:
                raise ValueError(
                    f"Schedule phases out of order: {phase} ({start.unit} {start.at}) starts before "
                    f"{latest[0]} ({latest[1].unit} {latest[1].at}); the order is fp -> {' -> '.join(ALL_PHASES)}"
                )
            earlier[start.unit] = (phase, start)
        starts = self.starts()
        missing = [p for p in ("quant_weights", "quant_acts") if starts[p] is None]
        if starts["deploy"] is not None and missing:
            raise ValueError(f"Schedule.deploy={self.deploy!r} needs the quantized network, but {', '.join(missing)} "
                             f"is skipped (null); schedule it before deploy")

    def starts(self) -> dict[str, Start | None]:
        return {p: parse_start(p, getattr(self, p), self.unit) for p in ALL_PHASES}

    def due(self, epoch: int, step: int) -> list[str]:
        """Phases whose start has been reached at ``epoch`` / global ``step``, in order."""
        now = {"epoch": epoch, "step": step}
        return [p for p, s in self.starts().items() if s is not None and now[s.unit] >= s.at]

    def describe(self) -> str:
        parts = [
            f"{p}@{s.unit} {s.at}" if s else f"{p}: skipped"
            for p, s in self.starts().items() if s or p not in OPTIONAL_PHASES
        ]
        return ", ".join(parts)
