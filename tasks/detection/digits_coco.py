"""Embedded detection data: scikit-learn digits placed on canvases, written as real COCO.

``make_digits_coco(out_dir)`` writes::

    out_dir/annotations/instances_train.json   out_dir/train/000001.png ...
    out_dir/annotations/instances_val.json     out_dir/val/000001.png ...

Each canvas holds 0-4 non-overlapping glyphs, bilinearly upsampled to one of a few
sizes, over faint noise. The box is the glyph's inked extent; the category is the
digit, with deliberately non-contiguous COCO ids ``1 + 2 * digit`` (names "0".."9")
so the category id <-> label mapping is exercised on every run. Train and val
canvases use disjoint scans (``tasks.digits.split_indices``). Same seed, same bytes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.digits import NUM_DIGIT_CLASSES, load_digits_arrays, split_indices, upsample_glyph

GLYPH_SIZES = (16, 24, 32, 44)
INK_THRESHOLD = 64  # a pixel belongs to the glyph's box above this value (0..255)


def digit_category_id(digit: int) -> int:
    """The COCO category id of ``digit`` in digits-COCO (non-contiguous on purpose)."""
    return 1 + 2 * int(digit)


def _place(rng: np.random.Generator, canvas: int, size: int, taken: list[tuple[int, int, int, int]]) -> tuple[int, int] | None:
    for _ in range(50):
        x, y = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
        if all(x + size + 2 <= a or a + c + 2 <= x or y + size + 2 <= b or b + c + 2 <= y for a, b, c, _ in taken):
            return x, y
    return None


def _split(
    out_dir: Path, split: str, n: int, pool: np.ndarray, canvas: int, max_objects: int, rng: np.random.Generator
) -> None:
    images, labels = load_digits_arrays()
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    coco_images, annotations = [], []
    glyph_cache: dict[tuple[int, int], np.ndarray] = {}
    for image_id in range(1, n + 1):
        img = rng.integers(0, 40, size=(canvas, canvas)).astype(np.uint8)
        taken: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(0, max_objects + 1))):
            idx = int(rng.choice(pool))
            size = int(rng.choice(GLYPH_SIZES))
            if size > canvas:
                continue
            pos = _place(rng, canvas, size, taken)
            if pos is None:
                continue
            x, y = pos
            glyph = glyph_cache.get((idx, size))
            if glyph is None:
                glyph = glyph_cache[(idx, size)] = upsample_glyph(images[idx], size)
            ys, xs = np.nonzero(glyph > INK_THRESHOLD)
            if len(xs) == 0:
                continue
            taken.append((x, y, size, idx))
            region = img[y:y + size, x:x + size]
            np.maximum(region, glyph, out=region)
            x0, y0, x1, y1 = x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": digit_category_id(labels[idx]),
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            })
        name = f"{image_id:06d}.png"
        Image.fromarray(img).save(out_dir / split / name)
        coco_images.append({"id": image_id, "file_name": name, "width": canvas, "height": canvas})
    data = {
        "info": {"description": f"digits-COCO {split}: scikit-learn digits on {canvas}x{canvas} canvases"},
        "licenses": [],
        "images": coco_images,
        "annotations": annotations,
        "categories": [
            {"id": digit_category_id(d), "name": str(d), "supercategory": "digit"} for d in range(NUM_DIGIT_CLASSES)
        ],
    }
    ann_dir = out_dir / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    final = ann_dir / f"instances_{split}.json"
    tmp = final.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, final)  # the json appears only once every image is on disk


def make_digits_coco(
    out_dir: str | os.PathLike,
    *,
    num_train: int = 600,
    num_val: int = 200,
    canvas: int = 96,
    max_objects: int = 4,
    seed: int = 0,
) -> Path:
    """Write the digits-COCO detection set to ``out_dir`` and return ``out_dir``.

    Args:
        out_dir: target folder (created; existing files of the same names are overwritten).
        num_train: training canvases.
        num_val: validation canvases.
        canvas: canvas side in pixels (>= 16).
        max_objects: at most this many glyphs per canvas (0..max, uniformly; about
            1 canvas in ``max_objects + 1`` is empty, a pure negative).
        seed: everything (scan split, placement, noise) follows from it.

    Raises:
        ValueError: a count or size out of range.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train={num_train} and num_val={num_val} must be >= 1")
    if canvas < min(GLYPH_SIZES):
        raise ValueError(f"canvas={canvas} must be >= {min(GLYPH_SIZES)} pixels")
    if max_objects < 1:
        raise ValueError(f"max_objects={max_objects} must be >= 1")
    out = Path(out_dir)
    images, _ = load_digits_arrays()
    train_pool, val_pool = split_indices(len(images), 0.2, seed)
    train_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    _split(out, "train", num_train, train_pool, canvas, max_objects, train_rng)
    _split(out, "val", num_val, val_pool, canvas, max_objects, val_rng)
    return out
