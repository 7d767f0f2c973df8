"""Embedded default data: scikit-learn's bundled digits (1,797 real 8x8 scans, no network).

Every task's quickstart starts here: classification uses the images directly,
detection and segmentation place the glyphs on larger canvases and write real
COCO / VOC layouts to disk (see the task packages' ``make_digits_*`` functions).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch.nn import functional as F

NUM_DIGIT_CLASSES = 10


@functools.lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as ``uint8`` images ``[N, 8, 8]`` in 0..255 and ``int64`` labels ``[N]``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def split_indices(n: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded train/val split of ``range(n)`` (same on every machine)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def upsample_glyph(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of one ``uint8`` 8x8 glyph to ``size x size`` (``uint8``)."""
    t = torch.from_numpy(image.astype(np.float32))[None, None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return out[0, 0].clamp(0, 255).round().to(torch.uint8).numpy()
