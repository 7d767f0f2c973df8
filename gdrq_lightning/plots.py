"""The PNGs of :class:`~gdrq_lightning.monitoring.QuantMonitor`: one tensor raw and as used.

Both histograms share one set of bins (so a bar of the quantized tensor sits on the values
it collects), the clip threshold is drawn as dashed lines and written, with the share of
values it clips, under the title. matplotlib's object API with the Agg canvas: no global
backend is changed.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from torch import Tensor

Series = dict[str, "Tensor | float | Sequence[float]"]


def common_bins(tensors: Sequence[Tensor], bins: int = 121) -> np.ndarray:
    """``bins + 1`` equal-width edges over the joint range of ``tensors`` (one set for all)."""
    lo = min(float(t.min()) for t in tensors if t.numel())
    hi = max(float(t.max()) for t in tensors if t.numel())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def clip_note(thresholds: Tensor | None, clipped_frac: float | None, what: str) -> str:
    """``T = 0.0812 (4 groups: 0.0610..0.1020); clips 1.3 % of the weights`` (or ``no clip threshold``)."""
    if thresholds is None or not thresholds.numel():
        return "no clip threshold"
    t = thresholds.detach().float().flatten()
    text = f"T = {float(t.mean()):.4g}"
    if t.numel() > 1:
        text += f" ({t.numel()} groups: {float(t.min()):.4g}..{float(t.max()):.4g})"
    if clipped_frac is not None:
        text += f"; clips {100 * clipped_frac:.2f} % of the {what}"
    return text


def save_distribution_plot(path: str, title: str, series: Series) -> str:
    """One PNG: every tensor of ``series`` as a histogram on the same bins, every number (or
    list of numbers) as dashed vertical lines, e.g. ``{"raw weight": w, "as used": q(w),
    "clip threshold ±T": [-t, t]}``. ``title`` may have a second line (the clip note)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    hists = {k: v.detach().float().cpu().flatten() for k, v in series.items() if isinstance(v, Tensor)}
    lines = {k: v for k, v in series.items() if not isinstance(v, Tensor)}
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    edges = common_bins(list(hists.values())) if hists else None
    for label, values in hists.items():
        ax.hist(values.numpy(), bins=edges, alpha=0.55, label=label)
    for label, values in lines.items():
        xs = [float(values)] if isinstance(values, (int, float)) else [float(x) for x in values]
        for i, x in enumerate(xs):
            ax.axvline(x, color="black", linestyle="--", linewidth=1, label=label if i == 0 else None)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("value")
    ax.set_ylabel("count (log)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    return path


def threshold_lines(thresholds: Tensor | None, signed: bool) -> list[float]:
    """Where to draw the threshold: ``±T`` (the smallest and largest ``T`` of a grouped layer)."""
    if thresholds is None or not thresholds.numel():
        return []
    t = thresholds.detach().float().flatten()
    values = sorted({float(t.min()), float(t.max())})
    return [-v for v in values] + values if signed else values

