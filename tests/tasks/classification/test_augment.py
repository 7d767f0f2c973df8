"""Augmentation you can set (issue #19): presets by image size, explicit options, timm's
``create_transform``, ``uint8`` training batches normalised on the device with the numerics
the workers used before."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from tasks.classification import CIFAR10DataModule, ClassificationModule, ImageFolderDataModule
from tasks.classification.augment import Augmentation, resolve, timm_transforms, train_transform
from tasks.classification.digits_folder import make_digits_folder
from tasks.loaders import IMAGENET_MEAN, IMAGENET_STD, normalize, pin_memory


def test_default_preset_follows_the_image_size() -> None:
    small, large = resolve(32), resolve(224)
    assert small == Augmentation("pad", (0.08, 1.0), 4, False, 1.0)  # CIFAR-style shifts, no mirroring
    assert large == Augmentation("resized", (0.08, 1.0), 28, True, 1.143)  # ImageNet recipe
    assert resolve(64).crop == "pad" and resolve(65).crop == "resized"
    assert resolve(224, "none").crop == "none"


def test_options_replace_parts_of_the_preset() -> None:
    assert resolve(224, crop_scale=(0.35, 1), hflip=False) == Augmentation("resized", (0.35, 1.0), 28, False, 1.143)
    assert resolve(32, "imagenet", resize_ratio=1.0).crop == "resized"
    assert resolve(224, pad=16) == Augmentation("pad", (0.08, 1.0), 16, True, 1.143)
    assert resolve(32, crop_scale=[0.5, 1.0]).crop == "resized"
    for kwargs, match in [({"crop_scale": (0.0, 1.0)}, "crop_scale"), ({"pad": -1}, "pad=-1"),
                          ({"resize_ratio": 0.5}, "resize_ratio=0.5")]:
        with pytest.raises(ValueError, match=match):
            resolve(32, **kwargs)
    with pytest.raises(ValueError, match="augment='cifar' is not one of: auto, small, imagenet, none"):
        resolve(32, "cifar")  # type: ignore[arg-type]


def _glyph() -> Image.Image:
    """A 32 px image that is not mirror-symmetric: bright left half."""
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    a[:, :16] = 255
    return Image.fromarray(a)


def test_small_preset_shifts_but_never_flips() -> None:
    tf = train_transform(32, resolve(32))
    torch.manual_seed(0)
    outs = [tf(_glyph()) for _ in range(40)]
    assert all(o.dtype == torch.uint8 and o.shape == (3, 32, 32) for o in outs)
    assert len({int(o[0].float().mean(0).argmin()) for o in outs}) > 1  # shifted by up to 4 px
    assert all(o[0, :, :8].float().mean() > o[0, :, -8:].float().mean() for o in outs)  # bright side stays left
    flipping = train_transform(32, resolve(32, hflip=True))
    assert any(flipping(_glyph())[0, :, -4:].float().mean() > 200 for _ in range(40))


def test_device_normalisation_equals_the_old_worker_pipeline() -> None:
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    old = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(normalize(x, IMAGENET_MEAN, IMAGENET_STD), old(x), atol=0, rtol=0)
    f = torch.rand(2, 3, 4, 4)
    assert normalize(f, IMAGENET_MEAN, IMAGENET_STD) is f  # float batches pass as they are


def test_evaluation_transform_equals_the_old_fixed_one() -> None:
    """The ``imagenet`` preset's evaluation transform is what ImageFolderDataModule always ran."""
    from tasks.classification.augment import eval_transform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    old = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224), T.ToImage(), T.ToDtype(torch.float32, scale=True),
                     T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(eval_transform(224, resolve(224), IMAGENET_MEAN, IMAGENET_STD)(image), old(image),
                               atol=0, rtol=0)


def test_timm_create_transform_options() -> None:
    train, evaluation = timm_transforms(32, {"scale": (0.5, 1.0), "hflip": 0.0}, IMAGENET_MEAN, IMAGENET_STD)
    assert train(_glyph()).dtype == torch.uint8
    out = evaluation(_glyph())
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="re_prob"):
        timm_transforms(32, {"re_prob": 0.25}, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match=r"\['input_size'\]"):
        timm_transforms(32, {"input_size": 64}, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="timm_transform: .*no_such_option"):
        timm_transforms(32, {"no_such_option": 1}, IMAGENET_MEAN, IMAGENET_STD)


def test_cifar_keeps_its_flips_and_pad_four() -> None:
    dm = CIFAR10DataModule("/nowhere")
    train, _ = dm._transforms()
    assert dm.augmentation == Augmentation("pad", (0.08, 1.0), 4, True, 1.0)
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in train.transforms)


def test_digits_folder_with_options_trains_through_the_device_hook(tmp_path: Path) -> None:
    root = tmp_path / "digits"
    dm = ImageFolderDataModule(root=str(root), make_digits_if_missing=True, image_size=16, batch_size=8, num_workers=0,
                               crop_scale=(0.5, 1.0), hflip=False)
    dm.prepare_data()
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]
    assert sum(1 for _ in (root / "val").rglob("*.png")) == 359  # the embedded digits' own split
    dm.setup("fit")
    assert dm.augmentation.crop == "resized" and not dm.augmentation.hflip
    x, _ = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and not dm.train_dataloader().pin_memory  # CPU: nothing to pin for
    module = ClassificationModule("resnet18", num_classes=10, small_input=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, dm)  # a uint8 batch would fail in the first conv: the hook normalised it
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_pin_memory_follows_the_trainer_device() -> None:
    class Strategy:
        root_device = torch.device("cuda", 0)

    class Trainer:
        strategy = Strategy()

    dm = ImageFolderDataModule("a", "b")
    dm.trainer = Trainer()  # type: ignore[assignment]
    assert pin_memory(dm)
    Strategy.root_device = torch.device("cpu")
    assert not pin_memory(dm)


def test_digits_folder_matches_the_embedded_digits(tmp_path: Path) -> None:
    from tasks.digits import load_digits_arrays, split_indices, upsample_glyph

    root = make_digits_folder(tmp_path / "d", image_size=16)
    images, labels = load_digits_arrays()
    i = int(split_indices(len(images))[1][0])
    png = np.asarray(Image.open(root / "val" / str(labels[i]) / f"{i:04d}.png"))
    np.testing.assert_array_equal(png, upsample_glyph(images[i], 16))
    with pytest.raises(ValueError, match="image_size=4"):
        make_digits_folder(tmp_path / "e", image_size=4)
