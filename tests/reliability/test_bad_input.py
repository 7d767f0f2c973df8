"""Bad input ends in a non-zero exit and one clear line naming the problem (issue: reliability).

Every case goes through ``gdrq``'s ``main()`` in-process (same code path as the console
script, without paying a Python start-up per case).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gdrq_lightning.cli import main

CLASSIFICATION = {
    "seed_everything": 0,
    "trainer": {
        "max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1, "logger": False,
        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
        "callbacks": [{
            "class_path": "gdrq_lightning.GDRQCallback",
            "init_args": {"config": {"method": "gdrq", "weight_bits": 4, "act_bits": 4, "groups": 4},
                          "schedule": {"scale_clip": 0, "quant_weights": 0, "quant_acts": 0, "groups": 0}},
        }],
    },
    "model": {"class_path": "tasks.classification.ClassificationModule", "init_args": {"model": "resnet18", "num_classes": 10}},
    "data": {"class_path": "tasks.classification.DigitsDataModule", "init_args": {"image_size": 16, "batch_size": 8}},
}


def _config(tmp_path: Path, **changes) -> str:
    cfg = json.loads(json.dumps(CLASSIFICATION))
    for dotted, value in changes.items():
        node, keys = cfg, dotted.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[keys[-1]] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _quant(**fields):
    base = {"method": "gdrq", "weight_bits": 4, "act_bits": 4, "groups": 4}
    return base | fields


def run(argv: list[str], capsys, tmp_path: Path, monkeypatch) -> tuple[int, str]:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


def _digits_coco(tmp_path: Path) -> Path:
    from tasks.detection import make_digits_coco

    return make_digits_coco(tmp_path / "coco", num_train=4, num_val=2, seed=0)


def _detection_config(tmp_path: Path, root: Path) -> str:
    cfg = json.loads(json.dumps(CLASSIFICATION))
    cfg["trainer"]["callbacks"] = []
    cfg["model"] = {"class_path": "tasks.detection.DetectionModule",
                    "init_args": {"arch": "fasterrcnn_resnet18_fpn", "num_classes": 11, "min_size": 96, "max_size": 96}}
    cfg["data"] = {"class_path": "tasks.detection.COCODataModule", "init_args": {"root": str(root), "batch_size": 2}}
    path = tmp_path / "det.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _voc_config(tmp_path: Path, root: Path) -> str:
    cfg = json.loads(json.dumps(CLASSIFICATION))
    cfg["trainer"]["callbacks"] = []
    cfg["model"] = {"class_path": "tasks.segmentation.SegmentationModule", "init_args": {"arch": "fcn_resnet18", "num_classes": 21}}
    cfg["data"] = {"class_path": "tasks.segmentation.VOCSegmentationDataModule",
                   "init_args": {"root": str(root), "num_classes": 21, "batch_size": 2, "num_workers": 0, "crop_size": 32}}
    path = tmp_path / "voc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _digits_voc(tmp_path: Path) -> Path:
    from tasks.segmentation import make_digits_voc

    return make_digits_voc(tmp_path / "voc", num_train=3, num_val=2, seed=0)


def _first_mask(root: Path, split: str = "train") -> Path:
    name = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[0]
    return root / "SegmentationClass" / f"{name}.png"


def _write_palette_png(path: Path, array: np.ndarray) -> None:
    img = Image.fromarray(array.astype(np.uint8), mode="P")
    img.putpalette([0] * 768)
    img.save(path)


def _trained_checkpoint(tmp_path: Path, capsys, monkeypatch) -> Path:
    out = tmp_path / "good"
    out.mkdir()
    monkeypatch.chdir(out)
    main(["fit", "--config", _config(out), "--checkpoint.dirpath", str(out / "ckpt")])
    capsys.readouterr()
    return out / "ckpt" / "last.ckpt"


# -- config ------------------------------------------------------------------------------
CONFIG_CASES = {
    "weight bits 0": ({"trainer__callbacks__0__init_args__config": _quant(weight_bits=0)}, "weight_bits=0"),
    "act bits 9": ({"trainer__callbacks__0__init_args__config": _quant(act_bits=9)}, "act_bits=9"),
    "groups not dividing channels": ({"trainer__callbacks__0__init_args__config": _quant(groups=3)}, "groups=3 does not divide"),
    "unknown method": ({"trainer__callbacks__0__init_args__config": _quant(method="gdrqq")}, "gdrqq"),
    "negative k_w": ({"trainer__callbacks__0__init_args__config": _quant(k_w=-1.0)}, "k_w=-1.0"),
    "overrides naming no layer": ({"trainer__callbacks__0__init_args__config": _quant(overrides={"nolayer.*": {"weight_bits": 8}})}, "nolayer"),
    "override bits out of range": ({"trainer__callbacks__0__init_args__config": _quant(overrides={"layer1.*": {"weight_bits": 12}})}, "weight_bits=12"),
    "schedule out of order": ({"trainer__callbacks__0__init_args__schedule": {"scale_clip": 3, "quant_weights": 1}}, "out of order"),
    "unknown model": ({"model__init_args__model": "resnet_does_not_exist"}, "resnet_does_not_exist"),
    "unknown config key": ({"model__init_args__bogus_key": 1}, "bogus_key"),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_config_errors(name, tmp_path, capsys, monkeypatch):
    changes, needle = CONFIG_CASES[name]
    code, err = run(["fit", "--config", _config(tmp_path, **changes)], capsys, tmp_path, monkeypatch)
    assert code != 0
    assert needle in err
    if name != "unknown config key":  # jsonargparse prints its usage before that error line
        assert len(err.splitlines()) <= 3, err


def test_skip_pattern_matching_nothing_warns(tmp_path, capsys, monkeypatch):
    cfg = _config(tmp_path, trainer__callbacks__0__init_args__config=_quant(skip=["conv1", "fc", "no_such_layer"]))
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="no_such_layer"):
        main(["fit", "--config", cfg, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"])


def test_unknown_detection_arch(tmp_path, capsys, monkeypatch):
    cfg = _detection_config(tmp_path, tmp_path / "none")
    code, err = run(["fit", "--config", cfg, "--model.init_args.arch", "fasterrcnn_resnet7_fpn"], capsys, tmp_path, monkeypatch)
    assert code != 0 and "fasterrcnn_resnet7_fpn" in err


# -- data ---------------------------------------------------------------------------------
def test_missing_data_dir(tmp_path, capsys, monkeypatch):
    cfg = _config(tmp_path, data={"class_path": "tasks.classification.ImageFolderDataModule",
                                  "init_args": {"train_dir": str(tmp_path / "nope/train"), "val_dir": str(tmp_path / "nope/val")}})
    code, err = run(["fit", "--config", cfg], capsys, tmp_path, monkeypatch)
    assert code == 2 and "nope/train" in err and len(err.splitlines()) <= 3


def test_image_that_is_not_an_image(tmp_path, capsys, monkeypatch):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / "img" / split / cls
            d.mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "ok.png")
    (tmp_path / "img/train/a/broken.jpg").write_bytes(b"not an image")
    cfg = _config(tmp_path, data={"class_path": "tasks.classification.ImageFolderDataModule",
                                  "init_args": {"train_dir": str(tmp_path / "img/train"), "val_dir": str(tmp_path / "img/val"),
                                                "image_size": 16, "batch_size": 3, "num_workers": 0}})
    code, err = run(["fit", "--config", cfg], capsys, tmp_path, monkeypatch)
    assert code == 2 and "broken.jpg" in err


def test_coco_truncated_json(tmp_path, capsys, monkeypatch):
    root = _digits_coco(tmp_path)
    ann = root / "annotations" / "instances_train.json"
    ann.write_text(ann.read_text()[:200])
    code, err = run(["fit", "--config", _detection_config(tmp_path, root)], capsys, tmp_path, monkeypatch)
    assert code == 2 and "instances_train.json" in err and "json" in err


def test_coco_unknown_category(tmp_path, capsys, monkeypatch):
    root = _digits_coco(tmp_path)
    ann = root / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = 999
    ann.write_text(json.dumps(data))
    code, err = run(["fit", "--config", _detection_config(tmp_path, root)], capsys, tmp_path, monkeypatch)
    assert code == 2 and "999" in err


def test_coco_negative_width_box_warns_and_is_skipped(tmp_path):
    from tasks.detection import COCODataModule

    root = _digits_coco(tmp_path)
    ann = root / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"][2] = -5.0
    image_id = data["annotations"][0]["image_id"]
    ann.write_text(json.dumps(data))
    dm = COCODataModule(root=str(root), batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
        _ = [dm.train_dataset[i] for i in range(len(dm.train_dataset))] if hasattr(dm, "train_dataset") else None
    messages = " ".join(str(w.message) for w in caught)
    assert str(image_id) in messages


def test_coco_missing_image_file(tmp_path, capsys, monkeypatch):
    root = _digits_coco(tmp_path)
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    missing = data["images"][0]["file_name"]
    (root / "train" / missing).unlink()
    code, err = run(["fit", "--config", _detection_config(tmp_path, root)], capsys, tmp_path, monkeypatch)
    assert code == 2 and missing in err


def test_voc_mask_of_wrong_size(tmp_path, capsys, monkeypatch):
    root = _digits_voc(tmp_path)
    mask = _first_mask(root)
    _write_palette_png(mask, np.zeros((5, 7)))
    code, err = run(["fit", "--config", _voc_config(tmp_path, root)], capsys, tmp_path, monkeypatch)
    assert code == 2 and mask.name in err


def test_voc_label_out_of_range(tmp_path, capsys, monkeypatch):
    root = _digits_voc(tmp_path)
    mask = _first_mask(root)
    arr = np.array(Image.open(mask))
    arr[0, 0] = 37
    _write_palette_png(mask, arr)
    code, err = run(["fit", "--config", _voc_config(tmp_path, root)], capsys, tmp_path, monkeypatch)
    assert code == 2 and mask.name in err and "37" in err


# -- checkpoints ---------------------------------------------------------------------------
def test_checkpoint_errors(tmp_path, capsys, monkeypatch):
    good = _trained_checkpoint(tmp_path, capsys, monkeypatch)

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:1000])
    code, err = run(["export", "--ckpt", str(truncated), "--out", str(tmp_path / "e1")], capsys, tmp_path, monkeypatch)
    assert code == 2 and "truncated.ckpt" in err and "truncated" in err

    code, err = run(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "e2")], capsys, tmp_path, monkeypatch)
    assert code == 2 and "missing.ckpt" in err

    other = torch.load(good, map_location="cpu", weights_only=True)
    other["hyper_parameters"]["model"] = "resnet34"  # a checkpoint whose weights belong to another model
    wrong = tmp_path / "other_model.ckpt"
    torch.save(other, wrong)
    code, err = run(["export", "--ckpt", str(wrong), "--out", str(tmp_path / "e3")], capsys, tmp_path, monkeypatch)
    assert code == 2 and "does not match" in err

    code, err = run(["fit", "--config", _config(tmp_path), "--ckpt_path", str(truncated)], capsys, tmp_path, monkeypatch)
    assert code != 0 and "truncated.ckpt" in err
