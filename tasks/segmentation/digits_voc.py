"""digits-VOC: a small PASCAL-VOC-layout segmentation set built from scikit-learn's digits.

Real 8x8 digit scans are upsampled and blended onto textured canvases. The masks are
VOC-style palette PNGs: 0 = background, ``digit + 1`` on glyph pixels (11 classes),
and 255 on a one-pixel band just outside every glyph (VOC marks object boundaries
as "void" the same way). Train and validation canvases draw from disjoint digit
scans (:func:`tasks.digits.split_indices`), so validation measures generalisation.

The result is a real VOC layout that :class:`VOCSegmentationDataModule` reads like VOC2012::

    <out_dir>/JPEGImages/<id>.jpg
    <out_dir>/SegmentationClass/<id>.png
    <out_dir>/ImageSets/Segmentation/{train,val,trainval}.txt
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tasks.digits import load_digits_arrays, split_indices, upsample_glyph

from .labels import IGNORE_INDEX, voc_palette

NUM_CLASSES = 11  # background + 10 digits


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Binary 3x3 dilation (8-neighbourhood) with numpy only."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def _background(rng: np.random.Generator, canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth colour gradient plus noise; returns the image and its base colour."""
    base = rng.uniform(0, 255, size=3)
    yy, xx = np.mgrid[0:canvas, 0:canvas] / max(canvas - 1, 1)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy - 0.5)[..., None]
    img = base + ramp * rng.uniform(-60, 60, size=3) + rng.normal(0, 8, size=(canvas, canvas, 3))
    return img, base


def _contrasting_color(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    for _ in range(100):
        color = rng.uniform(0, 255, size=3)
        if np.abs(color - base).sum() > 220:
            return color
    return 255.0 - base


def render_sample(rng: np.random.Generator, glyphs: np.ndarray, labels: np.ndarray, *, canvas: int,
                  max_digits: int, min_size: int, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One canvas: ``uint8 [canvas, canvas, 3]`` image and ``uint8 [canvas, canvas]`` mask."""
    img, base = _background(rng, canvas)
    mask = np.zeros((canvas, canvas), dtype=np.uint8)
    band = np.zeros((canvas, canvas), dtype=bool)
    boxes: list[tuple[int, int, int]] = []
    for _ in range(int(rng.integers(1, max_digits + 1))):
        size = int(rng.integers(min_size, min(max_size, canvas - 2) + 1))
        for _attempt in range(30):
            top, left = (int(v) for v in rng.integers(1, canvas - size, size=2))
            # at least 2 px between boxes, so the boundary bands of two digits never touch
            if all(top + size + 2 <= t or t + s + 2 <= top or left + size + 2 <= l or l + s + 2 <= left
                   for t, l, s in boxes):
                break
        else:
            continue
        boxes.append((top, left, size))
        k = int(rng.integers(len(glyphs)))
        alpha = upsample_glyph(glyphs[k], size).astype(np.float64) / 255.0
        color = _contrasting_color(rng, base)
        region = img[top:top + size, left:left + size]
        img[top:top + size, left:left + size] = region * (1 - alpha[..., None]) + color * alpha[..., None]
        glyph = np.zeros((canvas, canvas), dtype=bool)
        glyph[top:top + size, left:left + size] = alpha > 0.5
        mask[glyph] = labels[k] + 1
        band |= _dilate(glyph) & ~glyph
    mask[band & (mask == 0)] = IGNORE_INDEX
    return np.clip(np.round(img), 0, 255).astype(np.uint8), mask


def make_digits_voc(out_dir: str | Path, *, num_train: int = 400, num_val: int = 100, canvas: int = 48,
                    max_digits: int = 2, min_size: int = 22, max_size: int = 36, seed: int = 0) -> Path:
    """Write a digits-VOC set in the PASCAL VOC layout and return ``out_dir``.

    Deterministic given the arguments (same files on every run). The defaults are the
    quickstart's: 400 + 100 canvases of 48x48 px with one or two digits of 22-36 px
    (about 11% digit pixels), small enough to train from scratch on a CPU.

    Args:
        out_dir: created if needed; existing files of the same ids are overwritten.
        num_train / num_val: canvases per split.
        canvas: square image side in pixels.
        max_digits: 1..max_digits digits per canvas, in non-overlapping boxes.
        min_size / max_size: digit side in pixels (the 8x8 scans are upsampled).
        seed: random seed.

    Raises:
        ValueError: sizes that cannot fit on the canvas.
    """
    if not 8 <= min_size <= max_size or max_size > canvas - 3:
        raise ValueError(f"need 8 <= min_size <= max_size <= canvas - 3, got {min_size}, {max_size}, {canvas}")
    if num_train < 1 or num_val < 1 or max_digits < 1:
        raise ValueError("num_train, num_val and max_digits must be >= 1")
    out = Path(out_dir)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_arrays()
    pools = dict(zip(("train", "val"), split_indices(len(images), val_fraction=0.2, seed=seed)))
    palette = voc_palette().reshape(-1).tolist()
    lists: dict[str, list[str]] = {}
    for split_no, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        rng = np.random.default_rng([seed, split_no])
        pool = pools[split]
        ids = []
        for i in range(count):
            img, mask = render_sample(rng, images[pool], labels[pool], canvas=canvas, max_digits=max_digits,
                                      min_size=min_size, max_size=max_size)
            sample_id = f"digits_{split}_{i:05d}"
            Image.fromarray(img, "RGB").save(out / "JPEGImages" / f"{sample_id}.jpg", quality=95)
            png = Image.fromarray(mask, "P")
            png.putpalette(palette)
            png.save(out / "SegmentationClass" / f"{sample_id}.png")
            ids.append(sample_id)
        lists[split] = ids
    lists["trainval"] = lists["train"] + lists["val"]
    for split, ids in lists.items():
        (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return out
