"""Class names, palettes and the Cityscapes ``labelId -> trainId`` table.

The Cityscapes table is written out from the official label definition
(``cityscapesscripts/helpers/labels.py``) so the package needs no extra dependency:
the 19 evaluated classes get train ids 0..18, every other id (void, flat "parking",
"rail track", "guard rail", "bridge", "tunnel", "polegroup", "caravan", "trailer",
license plate) maps to the ignore index 255.
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

DIGITS_VOC_CLASSES: tuple[str, ...] = ("background",) + tuple(f"digit{i}" for i in range(10))

# (name, labelId, trainId) for every Cityscapes label with an id >= 0.
CITYSCAPES_LABELS: tuple[tuple[str, int, int], ...] = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(
    name for name, _, train_id in sorted(CITYSCAPES_LABELS, key=lambda t: t[2]) if train_id != IGNORE_INDEX
)
# Raw ids a gtFine ``*_labelIds.png`` may hold: 0..33, and 255 where tools wrote license plate (-1) as uint8.
CITYSCAPES_VALID_IDS: frozenset[int] = frozenset({label_id for _, label_id, _ in CITYSCAPES_LABELS} | {IGNORE_INDEX})


def cityscapes_lut() -> np.ndarray:
    """``uint8 [256]`` lookup table: ``lut[label_id] = train_id`` (255 for ignored and unknown ids)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for _, label_id, train_id in CITYSCAPES_LABELS:
        lut[label_id] = train_id
    return lut


def labelid_to_trainid(mask: np.ndarray) -> np.ndarray:
    """Map a Cityscapes ``labelIds`` array (any integer dtype, values 0..255) to train ids."""
    return cityscapes_lut()[np.asarray(mask).astype(np.int64) & 0xFF]


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map, ``uint8 [n, 3]`` (index 255 = the boundary colour 224,224,192)."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def default_class_names(num_classes: int) -> list[str]:
    """Known names for 21 (VOC), 19 (Cityscapes) and 11 (digits-VOC) classes, else ``class<i>``."""
    known = {len(VOC_CLASSES): VOC_CLASSES, len(CITYSCAPES_CLASSES): CITYSCAPES_CLASSES,
             len(DIGITS_VOC_CLASSES): DIGITS_VOC_CLASSES}
    return list(known.get(num_classes, [f"class{i}" for i in range(num_classes)]))
