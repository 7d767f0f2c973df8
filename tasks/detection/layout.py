"""Where a COCO root keeps each split: the 2017 and 2014 releases and the plain layout.

``root`` is the folder COCO's archives unpack into::

    root/train2017/  root/val2017/  root/test2017/
    root/annotations/instances_train2017.json  instances_val2017.json  image_info_test2017.json

2014 uses the same names with 2014; the plain layout (``train/``, ``val/``,
``annotations/instances_{train,val}.json``) is what :func:`make_digits_coco` writes.
"""
from __future__ import annotations

from pathlib import Path

from .annotations import COCODatasetError

# split -> (image folder, annotation file) candidates, in the order they are tried
LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("train2017", "instances_train2017.json"), ("train2014", "instances_train2014.json"),
              ("train", "instances_train.json")),
    "val": (("val2017", "instances_val2017.json"), ("val2014", "instances_val2014.json"),
            ("val", "instances_val.json")),
    "test": (("test2017", "image_info_test-dev2017.json"), ("test2017", "image_info_test2017.json"),
             ("test2015", "image_info_test2015.json"), ("test", "instances_test.json")),
}


def find_split(root: str | Path, split: str) -> tuple[Path, Path]:
    """The image folder and annotation file of ``split`` (``train``, ``val`` or ``test``) under ``root``.

    Raises:
        COCODatasetError: no candidate is complete; the message lists every path looked for.
    """
    root = Path(root)
    if split not in LAYOUTS:
        raise ValueError(f"COCO split {split!r} is not one of: {', '.join(LAYOUTS)}")
    for images, annotations in LAYOUTS[split]:
        ann = root / "annotations" / annotations
        if ann.is_file():
            if not (root / images).is_dir():
                raise COCODatasetError(f"{ann} exists but its image folder {root / images} does not")
            return root / images, ann
    looked = "; ".join(f"annotations/{a} with {i}/" for i, a in LAYOUTS[split])
    raise COCODatasetError(
        f"no COCO {split} split under {root}: looked for {looked} "
        f"(or give {split}_images= and {split}_annotations= explicitly)"
    )
