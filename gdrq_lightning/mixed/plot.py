"""The plan as a picture: per layer, its bits beside its sensitivity at each scored width."""
from __future__ import annotations

import math
from pathlib import Path

from .plan import BitPlan


def plot_plan(plan: BitPlan, path: str | Path, title: str = "") -> Path:
    """Write a PNG: left, each layer's planned bits; right, its score per width (log scale where
    all scores are positive). One row per layer, in network order, top to bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(plan.weight_bits)
    widths = sorted({b for row in plan.scores.values() for b in row})
    height = max(3.0, 0.28 * len(names) + 1.5)
    fig, (ax_bits, ax_score) = plt.subplots(1, 2, figsize=(12, height), sharey=True,
                                            gridspec_kw={"width_ratios": [1, 2]})
    ys = list(range(len(names)))
    bits = [plan.weight_bits[n] for n in names]
    colors = plt.get_cmap("viridis")
    ax_bits.barh(ys, bits, color=[colors(min(b, 8) / 8) for b in bits])
    for y, b in zip(ys, bits):
        ax_bits.text(b + 0.1, y, str(b), va="center", fontsize=7)
    ax_bits.set_yticks(ys, names, fontsize=7)
    ax_bits.invert_yaxis()
    ax_bits.set_xlabel("weight bits")
    ax_bits.set_xlim(0, max(bits) + 1.5)
    positive = all(v > 0 for row in plan.scores.values() for v in row.values() if math.isfinite(v))
    for w in widths:
        values = [plan.scores.get(n, {}).get(w, float("nan")) for n in names]
        ax_score.plot(values, ys, marker="o", markersize=3, linewidth=1, label=f"{w} bits")
    if positive and plan.scores:
        ax_score.set_xscale("log")
    ax_score.set_xlabel(f"sensitivity ({plan.method})")
    ax_score.legend(fontsize=7, loc="best")
    ax_score.grid(True, axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
