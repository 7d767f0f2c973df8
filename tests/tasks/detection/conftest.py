"""Shared fixtures for the detection tests: a tiny digits-COCO set and a tiny Faster R-CNN."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.detection import DetectionModule, make_digits_coco

TINY_MODEL = dict(
    arch="fasterrcnn_resnet18_fpn", num_classes=11, min_size=64, max_size=64, anchor_sizes=[8, 16, 32, 64, 128],
    fpn_channels=32, representation_size=64, box_batch_size_per_image=32, rpn_proposals_train=64,
    rpn_proposals_test=64, lr=0.01,
)


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 train + 4 val canvases of 64 px (digits-COCO, category ids 1, 3, ..., 19)."""
    return make_digits_coco(tmp_path_factory.mktemp("digits_coco"), num_train=8, num_val=4, canvas=64, seed=0)


@pytest.fixture
def tiny_kwargs() -> dict:
    """DetectionModule arguments of a tiny ResNet-18-FPN for 64 px images."""
    return dict(TINY_MODEL)


@pytest.fixture
def tiny_module() -> DetectionModule:
    return DetectionModule(**TINY_MODEL)


@pytest.fixture
def write_coco(tmp_path: Path):
    """``write_coco(images, annotations, categories) -> json path``; PNGs go to ``tmp_path/img``."""

    def write(images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
        (tmp_path / "img").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for im in images:
            arr = rng.integers(0, 255, size=(im["height"], im["width"]), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "img" / im["file_name"])
        path = tmp_path / "instances.json"
        path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        return path

    return write
