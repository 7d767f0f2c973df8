"""Classification task: model builders, local pretrained weights, digits / ImageFolder /
CIFAR-10 data modules and the shared optimizer / loss-guard helpers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn
from torch.testing import assert_close

from tasks.classification import (
    CIFAR10DataModule, ClassificationModule, DigitsDataModule, ImageFolderDataModule, build_classifier,
)
from tasks.common import check_finite, param_groups
from tasks.digits import load_digits_arrays, split_indices


# -- models ----------------------------------------------------------------------------
def test_torchvision_and_timm_resnet18() -> None:
    x = torch.randn(2, 3, 32, 32)
    tv = build_classifier("resnet18", num_classes=7).eval()
    assert tv.fc.out_features == 7 and tv(x).shape == (2, 7)
    tm = build_classifier("timm/resnet18", num_classes=7).eval()
    assert type(tm).__module__.startswith("timm.") and tm(x).shape == (2, 7)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("resnet19", r"unknown model 'resnet19'; torchvision classifiers: alexnet, .*timm/<name>"),
        ("timm/not_a_model", r"unknown timm model 'not_a_model'; see timm\.list_models\(\)"),
    ],
)
def test_unknown_model_lists_where_the_names_are(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_classifier(name, num_classes=10)


def test_builders_take_keyword_only_arguments() -> None:
    with pytest.raises(TypeError):
        build_classifier("resnet18", 10)  # type: ignore[misc]


def test_small_input_stem() -> None:
    model = build_classifier("resnet18", num_classes=10, small_input=True).eval()
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    feats = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)(torch.randn(1, 3, 32, 32))
    assert feats.shape == (1, 64, 32, 32)  # no downsampling in the stem
    with pytest.raises(ValueError, match=r"small_input=True supports ResNet-style models .*'mobilenet_v3_small'"):
        build_classifier("mobilenet_v3_small", num_classes=10, small_input=True)


def test_pretrained_from_a_local_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_classifier("resnet18", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "r18.pt")
    module = ClassificationModule("resnet18", num_classes=5, pretrained=str(tmp_path / "r18.pt"))
    with pytest.warns(UserWarning, match=r"skipped 2 tensors .*'fc\.bias', 'fc\.weight'"):
        module.setup("fit")
    model = module.model
    assert_close(model.layer3[1].conv2.weight, source.layer3[1].conv2.weight, atol=0, rtol=0)
    assert_close(model.bn1.running_var, source.bn1.running_var, atol=0, rtol=0)
    assert model.fc.out_features == 5


def test_pretrained_from_a_lightning_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(2)
    source = ClassificationModule("resnet18", num_classes=10)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "run.ckpt")
    module = ClassificationModule("resnet18", num_classes=10, pretrained=str(tmp_path / "run.ckpt"))
    module.load_pretrained()
    for key, value in source.model.state_dict().items():
        assert_close(module.model.state_dict()[key], value, atol=0, rtol=0, msg=key)


def test_pretrained_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    module = ClassificationModule("resnet18", num_classes=10, pretrained=str(missing))  # construction reads no file
    with pytest.raises(FileNotFoundError, match=rf"pretrained weights file not found: {missing}"):
        module.load_pretrained()
    torch.save({"encoder.w": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt shares no tensor names/shapes"):
        ClassificationModule("resnet18", num_classes=10, pretrained=str(tmp_path / "other.pt")).load_pretrained()


# -- digits ------------------------------------------------------------------------------
def test_digits_sizes_and_a_fixed_split() -> None:
    a, b = DigitsDataModule(image_size=16), DigitsDataModule(image_size=16)
    a.setup("fit")
    b.setup("fit")
    assert (len(a.train_set), len(a.val_set)) == (1438, 359)
    assert_close(a.val_set.images, b.val_set.images, atol=0, rtol=0)
    assert torch.equal(a.train_set.labels, b.train_set.labels) and torch.equal(a.val_set.labels, b.val_set.labels)
    assert sorted(a.val_set.labels.unique().tolist()) == list(range(10))
    x, y = a.val_set[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert_close(a.val_set[0][0], x, atol=0, rtol=0)  # validation images are not augmented
    other = DigitsDataModule(image_size=16, split_seed=1)
    other.setup("fit")
    assert not torch.equal(other.val_set.labels, a.val_set.labels)
    # train and val do not overlap: every scan is in exactly one of them
    train_idx, val_idx = split_indices(1797, 0.2, 0)
    assert len(np.intersect1d(train_idx, val_idx)) == 0 and len(np.union1d(train_idx, val_idx)) == 1797
    assert torch.equal(a.val_set.labels, torch.from_numpy(load_digits_arrays()[1][val_idx]))


def test_digits_loaders_batch_and_shuffle_only_training() -> None:
    dm = DigitsDataModule(image_size=32, batch_size=16)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,)
    v1, v2 = next(iter(dm.val_dataloader())), next(iter(dm.val_dataloader()))
    assert torch.equal(v1[0], v2[0]) and torch.equal(v1[1], dm.val_set.labels[:16])


# -- image folders -------------------------------------------------------------------------
def write_image_folder(root: Path, classes: tuple[str, ...] = ("a", "b"), per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_image_folder_trains_one_step(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train")
    write_image_folder(tmp_path / "val", per_class=2)
    dm = ImageFolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), image_size=16, batch_size=4, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.train_set.classes == ["a", "b"] and len(dm.val_set) == 4
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and set(y.tolist()) <= {0, 1}
    module = ClassificationModule("resnet18", num_classes=dm.num_classes, small_input=True)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["val/loss"])


def test_image_folder_smaller_than_a_batch_still_trains(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", per_class=2)
    write_image_folder(tmp_path / "val", per_class=1)
    dm = ImageFolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), image_size=16, batch_size=64, num_workers=0)
    dm.setup("fit")
    assert [len(y) for _, y in dm.train_dataloader()] == [4]  # not zero batches (drop_last)
    dm = ImageFolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), image_size=16, batch_size=3, num_workers=0)
    dm.setup("fit")
    assert [len(y) for _, y in dm.train_dataloader()] == [3]  # larger sets drop the ragged batch


def test_image_folder_errors_name_the_path(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train")
    bad = tmp_path / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"not an image")
    write_image_folder(tmp_path / "val")
    dm = ImageFolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), image_size=16, num_workers=0)
    dm.setup("fit")
    index = [p for p, _ in dm.train_set.samples].index(str(bad))
    with pytest.raises(ValueError, match=rf"cannot read image {bad}: not a valid image file"):
        dm.train_set[index]
    dm.train_set[0]  # the good files still load

    with pytest.raises(FileNotFoundError, match=rf"image folder not found: {tmp_path / 'nowhere'}"):
        ImageFolderDataModule(str(tmp_path / "nowhere"), str(tmp_path / "val")).setup("fit")
    write_image_folder(tmp_path / "val3", classes=("a", "b", "c"), per_class=1)
    with pytest.raises(ValueError, match=r"class folders differ between"):
        ImageFolderDataModule(str(tmp_path / "train"), str(tmp_path / "val3")).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"no class folders with images in {tmp_path / 'empty'}"):
        ImageFolderDataModule(str(tmp_path / "empty"), str(tmp_path / "val")).setup("fit")


def test_cifar10_missing_folder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"CIFAR-10 not found: {tmp_path}/cifar-10-batches-py is missing"):
        CIFAR10DataModule(str(tmp_path)).setup("fit")


# -- shared helpers -------------------------------------------------------------------------
def test_param_groups_keep_norms_biases_and_quantizer_parameters_undecayed() -> None:
    from gdrq_lightning import QuantConfig, quantize_model

    model = quantize_model(build_classifier("resnet18", num_classes=10), QuantConfig(method="pact"))
    decay, no_decay = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert "layer1.0.relu.act_quantizer.alpha" in undecayed and "bn1.weight" in undecayed and "fc.bias" in undecayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_check_finite_names_the_bad_term() -> None:
    check_finite({"loss": torch.tensor(1.0)}, 0)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at global step 7: box=nan"):
        check_finite({"cls": torch.tensor(0.5), "box": torch.tensor(float("nan"))}, 7)
