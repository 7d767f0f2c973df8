"""Is a checkpoint far enough in its schedule to export integer kernels?

``gdrq export`` makes a layer an integer kernel when its input is a quantized activation,
and activations are quantized from the ``quant_acts`` phase on (docs/methods.md#schedule).
A checkpoint of an earlier phase (the warm-up, Scale-Clip, weights only) exports every
layer in float; the per-layer notes of the report then name the wiring, while the cause
is the checkpoint's phase. This module says so in one line, from the checkpoint's
``GDRQCallback`` state (``gdrq_lightning.checkpoint.gdrq_state``).
"""
from __future__ import annotations

from typing import Any

from ..schedule import ALL_PHASES

EXPORT_PHASE = "quant_acts"  # the phase from which activations are quantized


def export_phase_warning(gdrq_state: dict[str, Any] | None) -> str | None:
    """One line when the checkpoint's activations are not quantized yet, else ``None``.

    Args:
        gdrq_state: the ``GDRQCallback`` state stored in the checkpoint (``done``: the phases
            that have begun, in order; ``config``: the ``QuantConfig`` fields). ``None`` (no
            callback state) and ``method: none`` (a float reference) give no warning.

    Example:
        >>> export_phase_warning({"done": ["scale_clip"], "config": {"method": "gdrq"}})[:61]
        "gdrq export: warning: the checkpoint is in phase 'scale_clip'"
    """
    if not gdrq_state:
        return None
    config = gdrq_state.get("config") or {}
    if str(config.get("method", "")).lower() == "none":
        return None
    done = [p for p in gdrq_state.get("done") or [] if p in ALL_PHASES]
    if EXPORT_PHASE in done:
        return None
    phase = done[-1] if done else "fp"
    return (f"gdrq export: warning: the checkpoint is in phase '{phase}' (activations not quantized yet); integer "
            f"kernels need a checkpoint from phase '{EXPORT_PHASE}' on, so its layers export in float")
