"""Loading for scale (issue #17, part 3): annotations parsed once into arrays and cached, no
``COCO`` object in the datasets, ``uint8`` images scaled on the device, COCOeval split over
processes with pycocotools' own numbers."""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tasks.detection import COCOAnnotationWarning, COCODataModule, COCODetection
from tasks.detection import annotations
from tasks.detection.cocoeval import evaluate
from tasks.detection.dataset import to_unit_float
from tasks.detection.evaluator import METRICS

COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def test_datasets_hold_arrays_not_a_coco_index(tiny_coco: Path) -> None:
    dm = COCODataModule(root=str(tiny_coco), batch_size=2)
    dm.setup("fit")
    for ds in (dm.train_set, dm.val_set):
        assert not any(isinstance(v, (COCO, dict, list)) and k not in ("cat_id_to_label", "label_to_cat_id",
                                                                       "class_names", "cat_ids")
                       for k, v in vars(ds).items()), sorted(vars(ds))
        assert isinstance(ds.arrays.boxes, np.ndarray) and ds.arrays.files.dtype.kind == "S"
    assert dm._val_coco is None  # the evaluation index is built only when rank 0 scores
    assert isinstance(dm.val_coco, COCO) and dm.load_val_coco() is dm.val_coco


def test_images_travel_as_uint8_and_are_scaled_by_the_module(tiny_coco: Path, tiny_module) -> None:
    dm = COCODataModule(root=str(tiny_coco), batch_size=2, hflip_prob=0.0)
    dm.setup("fit")
    images, _ = next(iter(dm.val_dataloader()))
    assert all(x.dtype == torch.uint8 for x in images)
    scaled = to_unit_float(images)
    for x, y in zip(images, scaled):
        torch.testing.assert_close(y, x.float().div(255.0), atol=0, rtol=0)  # the worker's old conversion
    assert to_unit_float(scaled)[0] is scaled[0]  # float input is kept
    tiny_module.eval()
    with torch.no_grad():
        from_uint8, from_float = tiny_module(images), tiny_module(scaled)
    for a, b in zip(from_uint8, from_float):
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=0, rtol=0)


def test_parsed_annotations_are_cached_once_and_reread(write_coco, tmp_path: Path, monkeypatch) -> None:
    cats = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    images = [{"id": i, "file_name": f"{i}.png", "width": 20, "height": 10} for i in (1, 2)]
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [1, 1, -5, 5], "iscrowd": 0}]
    path = write_coco(images, anns, cats)
    cache = tmp_path / "cache"
    with pytest.warns(COCOAnnotationWarning, match="annotation id 2"):
        first = COCODetection(path.parent / "img", path, cache_dir=cache)
    assert len(list(cache.glob("instances-*.npz"))) == 1

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed again")

    monkeypatch.setattr(annotations, "parse_coco", no_parsing)
    with pytest.warns(COCOAnnotationWarning, match="annotation id 2"):  # the warning comes with the cache
        again = COCODetection(path.parent / "img", path, cache_dir=cache)
    assert again.skipped_boxes == first.skipped_boxes == 1
    torch.testing.assert_close(again[0][1]["boxes"], first[0][1]["boxes"], atol=0, rtol=0)
    assert again.class_names == ["cat", "dog"]
    data = json.loads(path.read_text())
    data["annotations"] = data["annotations"][:1]
    path.write_text(json.dumps(data))  # another file (size and time): the cache does not apply
    os.utime(path, ns=(1, 1))
    with pytest.raises(AssertionError, match="parsed again"):
        COCODetection(path.parent / "img", path, cache_dir=cache)


def test_prepare_data_fills_the_cache_setup_reads(tiny_coco: Path, tmp_path: Path, monkeypatch) -> None:
    dm = COCODataModule(root=str(tiny_coco), annotation_cache=str(tmp_path / "c"))
    dm.prepare_data()  # once per node
    assert len(list((tmp_path / "c").glob("*.npz"))) == 2
    monkeypatch.setattr(annotations, "parse_coco", lambda *a, **k: pytest.fail("setup parsed the json"))
    dm.setup("fit")
    assert len(dm.train_set) == 8


def _synthetic(n_images: int, dets_per_image: int, seed: int = 0) -> tuple[COCO, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    images, anns, rows = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480})
        for _ in range(int(rng.integers(0, 6))):
            w, h = rng.uniform(4, 300, 2)
            x, y, c = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), int(rng.choice(COCO_IDS[:8]))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h,
                         "iscrowd": int(rng.random() < 0.05)})
            rows.append([i, x + rng.normal(0, 4), y + rng.normal(0, 4), w, h, rng.uniform(0.3, 1.0), c])
        k = dets_per_image - sum(1 for r in rows if r[0] == i)
        w, h = rng.uniform(4, 300, (2, k))
        rows += np.stack([np.full(k, i), rng.uniform(0, 340, k), rng.uniform(0, 180, k), w, h, rng.uniform(0.05, 0.6, k),
                          rng.choice(COCO_IDS[:8], k)], 1).tolist()
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in COCO_IDS[:8]]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, np.asarray(rows), [im["id"] for im in images]


@pytest.mark.parametrize("workers", [1, 2])
def test_split_evaluation_equals_pycocotools(workers: int) -> None:
    gt, rows, ids = _synthetic(520, 12)  # two chunks of 260 images with workers=2
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCOeval(gt, gt.loadRes(rows), "bbox")
        reference.params.imgIds = ids[:-20]  # a subset, as after limit_val_batches
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    stats, summary = evaluate(gt, rows, ids[:-20], workers=workers)
    np.testing.assert_array_equal(stats, reference.stats)
    assert "Average Precision" in summary and 0.1 < stats[METRICS["AP50"]] < 1.0


def test_no_detection_rows_for_some_images_still_count_them_as_misses() -> None:
    gt, rows, ids = _synthetic(60, 5, seed=1)
    kept = rows[rows[:, 0] > 30]  # images 1..30 have no detections at all
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = COCOeval(gt, gt.loadRes(kept), "bbox")
        reference.params.imgIds = ids
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    np.testing.assert_array_equal(evaluate(gt, kept, ids)[0], reference.stats)
