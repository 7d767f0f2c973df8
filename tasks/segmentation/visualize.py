"""A PNG of predictions beside the ground truth, coloured with the VOC palette, with a legend
of the classes that appear (colour -> name).

Uses matplotlib's object API with the Agg canvas, so no global backend is changed.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .labels import voc_palette


def colorize(mask: Tensor | np.ndarray) -> np.ndarray:
    """``[H, W]`` class indices (255 = ignore) -> ``uint8 [H, W, 3]`` VOC colours."""
    m = np.asarray(mask.cpu() if isinstance(mask, Tensor) else mask).astype(np.int64) & 0xFF
    return voc_palette()[m]


def denormalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised ``[3, H, W]`` -> ``float [H, W, 3]`` in 0..1 for display."""
    x = image.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def legend_entries(masks: Sequence[Tensor], class_names: Sequence[str] | None) -> list[tuple[str, np.ndarray]]:
    """``(name, rgb 0..1)`` of every class index present in ``masks``, then the ignore index if present."""
    values = {int(v) for m in masks for v in np.unique(np.asarray(m.cpu()))}
    palette = voc_palette()
    names = list(class_names or [])
    entries = [(names[c] if c < len(names) else f"class {c}", palette[c & 0xFF] / 255.0) for c in sorted(values - {255})]
    return entries + ([("not scored (255)", palette[255] / 255.0)] if 255 in values else [])


def save_prediction_grid(images: Tensor, targets: Tensor, preds: Tensor, path: str | Path, *,
                         mean: Sequence[float], std: Sequence[float], title: str = "",
                         class_names: Sequence[str] | None = None) -> Path:
    """One row per sample: image | ground truth | prediction, and a legend of the classes
    present (``class_names[i]`` names class ``i``; default: ``class i``). Returns the written path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = images.shape[0]
    fig = Figure(figsize=(7.5, 2.6 * n + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        panels = (denormalize(images[i], mean, std), colorize(targets[i]), colorize(preds[i]))
        for j, (ax, panel, name) in enumerate(zip(axes[i], panels, ("image", "ground truth", "prediction"))):
            ax.imshow(panel, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name)
    if title:
        fig.suptitle(title)
    entries = legend_entries([targets, preds], class_names)
    fig.tight_layout(rect=(0, 0.6 / (2.6 * n + 0.6), 1, 1))
    if entries:
        handles = [Patch(facecolor=rgb, edgecolor="black", linewidth=0.5, label=name) for name, rgb in entries]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False,
                   handlelength=1.2, columnspacing=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path
