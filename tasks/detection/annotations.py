"""COCO annotation files: checked reading, a compact array form for the datasets, a cache.

The training set never keeps the parsed json or a ``pycocotools.COCO`` index: with
COCO 2017 those are millions of small Python objects, which forked loader workers copy
page by page as soon as they touch them (reference counts, garbage collection). The
datasets hold :class:`CocoArrays` instead, a handful of numpy arrays that workers share
as they are. Only evaluation builds a ``COCO`` index, on rank 0 (:func:`load_coco_json`).

With a ``cache_dir`` the arrays of a json file are written once (``np.savez``, keyed by
the file's absolute path, size and modification time) and read back by every later
process: ``COCODataModule.prepare_data`` parses on one process per node, the ranks' ``setup``
loads the cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

MAX_BOX_WARNINGS = 10
CACHE_VERSION = 1


class COCODatasetError(ValueError):
    """A COCO dataset cannot be used as given; the message names the offending file."""


class COCOAnnotationWarning(UserWarning):
    """An annotation was skipped (degenerate or outside its image)."""


def read_coco_json(path: str | Path, *, require_annotations: bool = True) -> dict[str, Any]:
    """Parse and structurally check a COCO annotation file.

    Missing ``area`` / ``iscrowd`` fields are filled in (box area, 0) because COCOeval needs them.

    Args:
        path: an ``instances_*.json``.
        require_annotations: False accepts image-info files without ``annotations``
            (COCO's ``image_info_test2017.json``), for ``predict``.

    Raises:
        COCODatasetError: the file is missing, not valid json (e.g. truncated), or lacks
            required keys / references unknown image or category ids.
    """
    path = Path(path)
    if not path.is_file():
        raise COCODatasetError(f"COCO annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise COCODatasetError(f"COCO annotation file {path} is not valid json (truncated or corrupt?): {e}") from None
    if not isinstance(data, dict):
        raise COCODatasetError(f"COCO annotation file {path}: top level must be an object, got {type(data).__name__}")
    if not require_annotations:
        data.setdefault("annotations", [])
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise COCODatasetError(f"COCO annotation file {path}: missing or non-list key {key!r}")
    if not data["categories"]:
        raise COCODatasetError(f"COCO annotation file {path} defines no categories")
    _require(path, "images", data["images"], ("id", "file_name", "width", "height"))
    _require(path, "annotations", data["annotations"], ("id", "image_id", "category_id", "bbox"))
    _require(path, "categories", data["categories"], ("id", "name"))
    image_ids = {im["id"] for im in data["images"]}
    cat_ids = {c["id"] for c in data["categories"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in image_ids:
            raise COCODatasetError(f"{path}: annotation id {ann['id']} names unknown image id {ann['image_id']}")
        if ann["category_id"] not in cat_ids:
            raise COCODatasetError(
                f"{path}: annotation id {ann['id']} (image id {ann['image_id']}) names unknown category id "
                f"{ann['category_id']}; known: {sorted(cat_ids)}"
            )
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            b = ann["bbox"]
            ann["area"] = float(b[2] * b[3]) if _is_box(b) else 0.0
    data.setdefault("info", {})
    return data


def load_coco_json(path: str | Path) -> COCO:
    """A checked ``pycocotools`` index of ``path`` (the evaluator's ground truth)."""
    coco = COCO()
    coco.dataset = read_coco_json(path)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _require(path: Path, key: str, items: list, fields_: tuple[str, ...]) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, dict) or any(f not in item for f in fields_):
            raise COCODatasetError(f"COCO annotation file {path}: {key}[{i}] must be an object with keys {fields_}")


def _is_box(b: Any) -> bool:
    return isinstance(b, (list, tuple)) and len(b) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b
    )


@dataclass
class CocoArrays:
    """One annotation file as arrays; image ``i`` owns annotations ``offsets[i]:offsets[i+1]``.

    Images are sorted by id; bad boxes are already left out (``skipped`` counts them,
    ``warnings`` holds the first messages).
    """

    image_ids: np.ndarray  # int64 [N]
    sizes: np.ndarray  # int32 [N, 2] (width, height)
    files: np.ndarray  # bytes [N], file_name relative to the image folder
    offsets: np.ndarray  # int64 [N + 1]
    boxes: np.ndarray  # float32 [M, 4] xyxy, clipped to the image
    category_ids: np.ndarray  # int64 [M]
    iscrowd: np.ndarray  # uint8 [M]
    area: np.ndarray  # float32 [M]
    categories: np.ndarray  # int64 [K], sorted
    names: np.ndarray  # str [K]
    warnings: np.ndarray  # str [<= MAX_BOX_WARNINGS]
    skipped: int


def parse_coco(path: str | Path, *, require_annotations: bool = True) -> CocoArrays:
    """Read, check and convert one annotation file (see :class:`CocoArrays`).

    A degenerate box (non-positive width or height, non-finite, wrong length) or one entirely
    outside its image is skipped and reported; boxes partly outside are clipped.
    """
    data = read_coco_json(path, require_annotations=require_annotations)
    images = sorted(data["images"], key=lambda im: im["id"])
    row = {im["id"]: i for i, im in enumerate(images)}
    per_image: list[list[tuple]] = [[] for _ in images]
    bad: list[str] = []
    for ann in data["annotations"]:
        i = row[ann["image_id"]]
        w, h = float(images[i]["width"]), float(images[i]["height"])
        b, reason = ann["bbox"], None
        if not _is_box(b):
            reason = f"malformed bbox {b!r}"
        elif b[2] <= 0 or b[3] <= 0:
            reason = f"degenerate bbox {b} (width and height must be > 0)"
        else:
            x0, y0, x1, y1 = max(b[0], 0.0), max(b[1], 0.0), min(b[0] + b[2], w), min(b[1] + b[3], h)
            if x1 <= x0 or y1 <= y0:
                reason = f"bbox {b} lies outside the {w:g}x{h:g} image"
        if reason:
            bad.append(f"image id {ann['image_id']}, annotation id {ann['id']}: {reason}")
            continue
        per_image[i].append((ann["id"], x0, y0, x1, y1, ann["category_id"], int(bool(ann["iscrowd"])), float(ann["area"])))
    rows = [a for anns in per_image for a in sorted(anns)]  # annotation-id order within an image
    table = np.asarray([r[1:] for r in rows], dtype=np.float64).reshape(-1, 7)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    messages = [f"{path}: skipping {m}" for m in bad[:MAX_BOX_WARNINGS]]
    if len(bad) > MAX_BOX_WARNINGS:
        messages.append(f"{path}: skipped {len(bad) - MAX_BOX_WARNINGS} more bad boxes")
    return CocoArrays(
        image_ids=np.asarray([im["id"] for im in images], dtype=np.int64),
        sizes=np.asarray([(im["width"], im["height"]) for im in images], dtype=np.int32).reshape(-1, 2),
        files=np.asarray([str(im["file_name"]).encode() for im in images], dtype=bytes),
        offsets=np.concatenate([[0], np.cumsum([len(a) for a in per_image])]).astype(np.int64),
        boxes=table[:, 0:4].astype(np.float32), category_ids=table[:, 4].astype(np.int64),
        iscrowd=table[:, 5].astype(np.uint8), area=table[:, 6].astype(np.float32),
        categories=np.asarray([c["id"] for c in cats], dtype=np.int64),
        names=np.asarray([str(c["name"]) for c in cats]), warnings=np.asarray(messages, dtype=str), skipped=len(bad),
    )


def _cache_file(path: Path, cache_dir: Path, require_annotations: bool) -> Path:
    st = path.stat()
    key = f"{CACHE_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{require_annotations}"
    return cache_dir / f"{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"


def load_arrays(path: str | Path, *, cache_dir: str | Path | None = None, require_annotations: bool = True,
                warn: bool = True) -> CocoArrays:
    """:func:`parse_coco`, through the cache in ``cache_dir`` when given (written if absent).

    Bad-box warnings (:class:`COCOAnnotationWarning`) are raised on every load, cached or not.
    """
    path = Path(path)
    cached = None
    if cache_dir is not None and path.is_file():
        cached = _cache_file(path, Path(os.path.expanduser(str(cache_dir))), require_annotations)
    if cached is not None and cached.is_file():
        with np.load(cached, allow_pickle=False) as z:
            arrays = CocoArrays(**{f.name: (int(z[f.name]) if f.name == "skipped" else z[f.name]) for f in fields(CocoArrays)})
    else:
        arrays = parse_coco(path, require_annotations=require_annotations)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, **{f.name: getattr(arrays, f.name) for f in fields(CocoArrays)})
            os.replace(tmp, cached)  # atomic: a rank never reads a half-written cache
    if warn:
        for message in arrays.warnings:
            warnings.warn(str(message), COCOAnnotationWarning, stacklevel=3)
    return arrays
