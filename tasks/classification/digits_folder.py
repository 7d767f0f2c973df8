"""The embedded digits written as an ImageNet-layout image folder (``train/<digit>/*.png``, ``val/...``).

The same 1,438 / 359 split as :class:`~tasks.classification.DigitsDataModule`, each 8x8 scan
upsampled to ``image_size`` px (grayscale PNG), so an ``ImageFolderDataModule`` run can be
compared with the in-memory digits run: ``python -m tasks.classification.digits_folder DIR``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from PIL import Image

from tasks.digits import NUM_DIGIT_CLASSES, load_digits_arrays, split_indices, upsample_glyph


def make_digits_folder(out_dir: str | os.PathLike, *, image_size: int = 32, val_fraction: float = 0.2,
                       seed: int = 0) -> Path:
    """Write ``out_dir/{train,val}/<digit>/<index>.png`` and return ``out_dir``.

    Raises:
        ValueError: ``image_size`` below 8 (the scans' own size).
    """
    if image_size < 8:
        raise ValueError(f"image_size={image_size} must be >= 8 (the digit scans are 8x8)")
    out = Path(out_dir)
    images, labels = load_digits_arrays()
    for split, indices in zip(("train", "val"), split_indices(len(images), val_fraction, seed)):
        for digit in range(NUM_DIGIT_CLASSES):
            (out / split / str(digit)).mkdir(parents=True, exist_ok=True)
        for i in indices:
            glyph = upsample_glyph(images[i], image_size)
            Image.fromarray(glyph, "L").save(out / split / str(labels[i]) / f"{i:04d}.png")
    return out


if __name__ == "__main__":
    print(make_digits_folder(sys.argv[1] if len(sys.argv) > 1 else "data/digits_folder"))
