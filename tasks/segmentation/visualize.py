"""A PNG of predictions beside the ground truth, coloured with the VOC palette.

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


def save_prediction_grid(images: Tensor, targets: Tensor, preds: Tensor, path: str | Path, *,
                         mean: Sequence[float], std: Sequence[float], title: str = "") -> Path:
    """One row per sample: image | ground truth | prediction. Returns the written path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = images.shape[0]
    fig = Figure(figsize=(7.5, 2.6 * n))
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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path
