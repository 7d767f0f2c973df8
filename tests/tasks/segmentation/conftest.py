"""Tiny on-disk VOC and Cityscapes layouts for the segmentation tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.segmentation import make_digits_voc
from tasks.segmentation.labels import CITYSCAPES_LABELS


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits-VOC with 4 train / 2 val canvases of 32x32 (a real VOC layout)."""
    return make_digits_voc(tmp_path_factory.mktemp("voc"), num_train=4, num_val=2, canvas=32, min_size=10,
                           max_size=16, seed=0)


def make_tiny_cityscapes(root: Path, *, per_split: int = 2, size: tuple[int, int] = (40, 24), seed: int = 0) -> Path:
    """``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png``.

    Label maps are random blocks of every raw Cityscapes id (0..33), so the
    ``labelId -> trainId`` mapping is exercised on real files.
    """
    rng = np.random.default_rng(seed)
    ids = np.array([label_id for _, label_id, _ in CITYSCAPES_LABELS], dtype=np.uint8)
    w, h = size
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        for i in range(per_split):
            name = f"{city}_{i:06d}_000019"
            img_dir, gt_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_dir / f"{name}_leftImg8bit.png")
            blocks = rng.choice(ids, size=(h // 4, w // 4))
            labels = np.kron(blocks, np.ones((4, 4), dtype=np.uint8))
            labels[:8, :8] = 26  # a car in every image, so train id 13 is always present
            Image.fromarray(labels, "L").save(gt_dir / f"{name}_gtFine_labelIds.png")
    return root


@pytest.fixture(scope="session")
def tiny_cityscapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_cityscapes(tmp_path_factory.mktemp("cityscapes"))
