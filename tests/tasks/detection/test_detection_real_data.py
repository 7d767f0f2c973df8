"""Real COCO layouts from ``root`` alone, ``num_classes`` checked before the first step, the
91-label convention, timm backbones, and what ``predict`` / validation write (issue #19)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pycocotools.coco import COCO
from torch import nn

import gdrq_lightning as G
from tasks.detection import COCODataModule, COCODatasetError, DetectionModule, make_digits_coco


def coco_release(tmp_path: Path, year: str) -> Path:
    """A tiny digits-COCO set renamed to COCO's release layout (``train2017/``, ``instances_train2017.json`` ...)."""
    root = make_digits_coco(tmp_path / f"coco{year}", num_train=4, num_val=3, canvas=64, seed=0)
    for split in ("train", "val"):
        (root / split).rename(root / f"{split}{year}")
        (root / "annotations" / f"instances_{split}.json").rename(root / "annotations" / f"instances_{split}{year}.json")
    return root


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=str(tmp_path))
    return pl.Trainer(**{**defaults, **kwargs})


def test_coco2017_root_alone_trains_one_step(tmp_path: Path, tiny_kwargs: dict) -> None:
    root = coco_release(tmp_path, "2017")
    dm = COCODataModule(root=str(root), batch_size=2)
    assert dm.paths("train") == (root / "train2017", root / "annotations" / "instances_train2017.json")
    trainer = _trainer(tmp_path)
    trainer.fit(DetectionModule(**tiny_kwargs), dm)
    assert trainer.global_step == 1 and "val/mAP" in trainer.callback_metrics


def test_coco2014_and_explicit_paths(tmp_path: Path) -> None:
    root = coco_release(tmp_path, "2014")
    dm = COCODataModule(root=str(root))
    assert dm.paths("val") == (root / "val2014", root / "annotations" / "instances_val2014.json")
    other = COCODataModule(root=str(root), val_images=str(root / "train2014"))  # an explicit path wins
    assert other.paths("val")[0] == root / "train2014"


def test_missing_split_names_every_path_looked_for(tmp_path: Path) -> None:
    root = coco_release(tmp_path, "2017")
    (root / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(COCODatasetError, match=r"no COCO val split under .*annotations/instances_val2017\.json with "
                                               r"val2017/; .*instances_val2014\.json.*instances_val\.json"):
        COCODataModule(root=str(root)).setup("fit")
    shutil.rmtree(root / "train2017")
    with pytest.raises(COCODatasetError, match=r"instances_train2017\.json exists but its image folder .*train2017"):
        COCODataModule(root=str(root)).paths("train")


def test_num_classes_mismatch_fails_at_setup_naming_both_numbers(tiny_coco: Path, tiny_kwargs: dict, tmp_path) -> None:
    for wrong, hint in ((91, "category_ids_as_labels: true"), (5, "")):
        trainer = _trainer(tmp_path)
        with pytest.raises(ValueError, match=rf"num_classes={wrong}\) does not match the data: 10 categories "
                                             rf"\+ background = 11.*{hint}"):
            trainer.fit(DetectionModule(**{**tiny_kwargs, "num_classes": wrong}), COCODataModule(root=str(tiny_coco)))
        assert trainer.global_step == 0  # before the first step, not after an epoch


def test_category_ids_as_labels(tiny_coco: Path, tiny_kwargs: dict, tmp_path) -> None:
    """torchvision's COCO convention: the category id is the label (digits-COCO ids 1, 3, ..., 19 -> 20 labels)."""
    dm = COCODataModule(root=str(tiny_coco), batch_size=2, category_ids_as_labels=True)
    dm.setup("fit")
    assert dm.num_classes == 20 and dm.label_to_cat_id[19] == 19
    assert set(torch.cat([dm.train_set[i][1]["labels"] for i in range(len(dm.train_set))]).tolist()) <= set(range(1, 20, 2))
    trainer = _trainer(tmp_path)
    trainer.fit(DetectionModule(**{**tiny_kwargs, "num_classes": 20}), dm)
    assert "val/mAP" in trainer.callback_metrics
    with pytest.raises(ValueError, match=r"largest category id 19 \+ 1"):
        _trainer(tmp_path).fit(DetectionModule(**tiny_kwargs), COCODataModule(root=str(tiny_coco),
                                                                              category_ids_as_labels=True))


def test_timm_fpn_backbone_is_quantized_like_torchvision(tiny_coco: Path, tiny_kwargs: dict, tmp_path) -> None:
    module = DetectionModule(**{**tiny_kwargs, "arch": "fasterrcnn_timm/resnet18_fpn"})
    assert module.quant_skip_default()[-1] == "backbone.body.conv1"
    G.quantize_model(module.model, G.QuantConfig(method="gdrq", groups=4, skip=module.quant_skip_default()))
    names = [n for n, _ in G.quantized_layers(module.model)]
    assert any(n.startswith("backbone.body.layer4") for n in names) and any(n.startswith("backbone.fpn.") for n in names)
    assert type(module.model.backbone.body.conv1) is nn.Conv2d and "rpn.head.conv.0.0" in names
    assert not any(n.startswith(("rpn.head.cls_logits", "roi_heads.box_predictor")) for n in names)
    trainer = _trainer(tmp_path)
    trainer.fit(module, COCODataModule(root=str(tiny_coco), batch_size=2))
    assert trainer.global_step == 1
    with pytest.raises(ValueError, match="trainable_layers=3: timm backbones train all layers"):
        DetectionModule(**{**tiny_kwargs, "arch": "fasterrcnn_timm/resnet18_fpn", "trainable_layers": 3})
    with pytest.raises(ValueError, match=r"fasterrcnn_resnet50_fpn, fasterrcnn_timm/<name>_fpn"):
        DetectionModule(**{**tiny_kwargs, "arch": "fasterrcnn_timm_fpn"})


def test_predict_writes_coco_results_and_drawings(tiny_coco: Path, tiny_kwargs: dict, tmp_path) -> None:
    torch.manual_seed(0)
    module = DetectionModule(**{**tiny_kwargs, "box_score_thresh": 0.0, "draw_score_thresh": 0.0})
    dm = COCODataModule(root=str(tiny_coco), batch_size=2, draw_predictions=True)
    trainer = _trainer(tmp_path, limit_val_batches=2)
    trainer.fit(module, dm)
    val_png = tmp_path / "predictions" / "val_epoch000.png"
    assert val_png.is_file() and val_png.stat().st_size > 1000
    outputs = trainer.predict(module, dm)
    results = json.loads((tmp_path / "predictions" / "detections.json").read_text())
    n = sum(len(o["boxes"]) for batch in outputs for o in batch)
    assert n > 0 and len(results) == n
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    assert {r["category_id"] for r in results} <= set(range(1, 20, 2))  # category ids, not labels
    gt = COCO(str(tiny_coco / "annotations" / "instances_val.json"))
    gt.loadRes(results)  # what COCO's tools read
    drawn = sorted(p.stem for p in (tmp_path / "predictions" / "boxes").glob("*.png"))
    assert drawn == [str(i) for i in sorted(gt.getImgIds())]


def test_predict_on_an_image_info_file_without_boxes(tmp_path: Path, tiny_kwargs: dict) -> None:
    """COCO's test2017 comes with image_info_test2017.json: images, categories, no annotations."""
    root = coco_release(tmp_path, "2017")
    info = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    del info["annotations"]
    (root / "annotations" / "image_info_test2017.json").write_text(json.dumps(info))
    shutil.copytree(root / "val2017", root / "test2017")
    dm = COCODataModule(root=str(root), predict_split="test", batch_size=2)
    module = DetectionModule(**tiny_kwargs)
    _trainer(tmp_path).predict(module, dm)
    assert dm.predict_set.annotation_file.name == "image_info_test2017.json" and len(dm.predict_set) == 3
    assert (tmp_path / "predictions" / "detections.json").is_file()


def test_gdrq_predict_from_a_checkpoint_draws_when_the_data_says_so(tiny_coco: Path, tiny_kwargs: dict,
                                                                     tmp_path: Path) -> None:
    """``gdrq predict --ckpt_path`` takes the model's options from the checkpoint, so drawing is a data option."""
    import sys
    from unittest import mock

    import yaml

    from gdrq_lightning.cli import main

    config = tmp_path / "det.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "tasks.detection.DetectionModule", "init_args": {**tiny_kwargs, "box_score_thresh": 0.0}},
        "data": {"class_path": "tasks.detection.COCODataModule", "init_args": {"root": str(tiny_coco), "batch_size": 2}},
        "checkpoint": {"dirpath": str(tmp_path / "ckpt")},
    }))
    for args in (["fit"], ["predict", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
                           "--data.init_args.draw_predictions", "true"]):
        with mock.patch.object(sys, "argv", ["gdrq", args[0], "--config", str(config), *args[1:]]):
            main()
    assert json.loads((tmp_path / "predictions" / "detections.json").read_text())
    assert len(list((tmp_path / "predictions" / "boxes").glob("*.png"))) == 4
