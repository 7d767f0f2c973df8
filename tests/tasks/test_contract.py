"""Every task implements ``gdrq_lightning.task.QuantTask``, and starting weights load at one
point in every task: once, from ``setup`` (after the quantization swap), never in ``__init__``."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

import tasks.weights
from gdrq_lightning import GDRQCallback, QuantConfig, QuantTask, Schedule, quantized_layers
from gdrq_lightning.checkpoint import load_quantized_module
from tasks.classification import ClassificationModule
from tasks.common import TaskModule
from tasks.detection import DetectionModule
from tasks.segmentation import SegmentationModule
from tasks.weights import load_weights, read_state_dict

DETECTION = dict(arch="fasterrcnn_resnet18_fpn", num_classes=3, min_size=32, max_size=32, anchor_sizes=[8, 16, 32, 64, 128],
                 fpn_channels=16, representation_size=16)
BUILDERS: dict[str, Callable[..., TaskModule]] = {
    "classification": lambda **kw: ClassificationModule("resnet18", num_classes=4, **kw),
    "detection": lambda **kw: DetectionModule(**DETECTION, **kw),
    "segmentation": lambda **kw: SegmentationModule(arch="fcn_resnet18", num_classes=3, **kw),
}


@pytest.fixture
def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths read through the one weight loader (``tasks.weights.read_state_dict``)."""
    reads: list[str] = []

    def counting(path, what="pretrained"):
        reads.append(Path(path).name)
        return read_state_dict(path, what)

    monkeypatch.setattr(tasks.weights, "read_state_dict", counting)
    return reads


@pytest.mark.parametrize("task", sorted(BUILDERS))
def test_each_task_implements_the_contract(task: str) -> None:
    module = BUILDERS[task]()
    assert isinstance(module, QuantTask)
    assert module.quant_network() is module.model
    skip = module.quant_skip_default()
    assert skip is None or all(isinstance(p, str) for p in skip)
    net = module.export_network().eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 32, 32))
    if task == "detection":  # one image -> boxes [K, 4], labels [K], scores [K]
        boxes, labels, scores = out
        assert boxes.shape == (len(labels), 4) and labels.shape == scores.shape
        return
    assert isinstance(out, Tensor) and out.shape[:2] == (1, 4 if task == "classification" else 3)


@pytest.mark.parametrize(("task", "option"), [(t, "pretrained") for t in sorted(BUILDERS)] + [
    ("detection", "pretrained_backbone"), ("segmentation", "pretrained_backbone")])
def test_construction_reads_no_file(task: str, option: str, count_reads: list[str], monkeypatch) -> None:
    def no_load(*args, **kwargs):
        raise AssertionError("torch.load in __init__")

    monkeypatch.setattr(torch, "load", no_load)
    module = BUILDERS[task](**{option: "/nonexistent/weights.pt"})
    assert count_reads == []
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match=r"/nonexistent/weights\.pt"):
        module.load_pretrained()


@pytest.mark.parametrize("task", sorted(BUILDERS))
def test_pretrained_loads_once_from_setup_into_the_quantized_network(task: str, tmp_path: Path, count_reads) -> None:
    torch.manual_seed(1)
    source = BUILDERS[task]().model
    torch.save(source.state_dict(), tmp_path / "float.pt")
    module = BUILDERS[task](pretrained=str(tmp_path / "float.pt"))
    gdrq = GDRQCallback(QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=1), Schedule())
    trainer = pl.Trainer(logger=False, callbacks=[gdrq], enable_progress_bar=False, enable_model_summary=False)
    module.trainer = trainer
    for stage in ("fit", "validate", "test"):
        for cb in trainer.callbacks:
            cb.setup(trainer, module, stage)  # Lightning's order: the callbacks' setup, then the module's
        module.setup(stage)
    assert count_reads == ["float.pt"]
    assert quantized_layers(module.model)  # loaded after the swap, into the quantized network
    for key, value in source.state_dict().items():
        torch.testing.assert_close(module.model.state_dict()[key], value, atol=0, rtol=0, msg=key)


def test_rebuilding_a_segmentation_checkpoint_needs_no_starting_weights(tmp_path: Path, count_reads) -> None:
    torch.save(SegmentationModule(arch="fcn_resnet18", num_classes=3).model.state_dict(), tmp_path / "fp32.pt")
    module = SegmentationModule(arch="fcn_resnet18", num_classes=3, pretrained=str(tmp_path / "fp32.pt"), num_vis=0)
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 24, 24), torch.randint(0, 3, (4, 24, 24)))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    gdrq = GDRQCallback(QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=2), Schedule())
    trainer = pl.Trainer(max_epochs=1, logger=False, callbacks=[gdrq], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    (tmp_path / "fp32.pt").unlink()
    rebuilt = load_quantized_module(str(tmp_path / "run.ckpt"))
    assert count_reads == ["fp32.pt"]  # the training run's setup, nothing since
    module.eval()
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), module(x), atol=0, rtol=0)
    rebuilt.setup("test")  # weights from a checkpoint replace the starting weights: nothing is read
    assert count_reads == ["fp32.pt"]


def test_one_loader_for_state_dicts_and_lightning_checkpoints(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()} | {"other.x": torch.zeros(1)}},
               tmp_path / "run.ckpt")
    assert set(read_state_dict(tmp_path / "run.ckpt")) == set(net.state_dict())  # `model.` stripped once, rest dropped
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    load_weights(target, tmp_path / "run.ckpt")
    torch.testing.assert_close(target[0].weight, net[0].weight, atol=0, rtol=0)
    torch.save({"0.weight": net[0].weight, "0.weight_quantizer.k": torch.ones(1)} | {
        k: v for k, v in net.state_dict().items() if not k.startswith("0.")}, tmp_path / "quantized.pt")
    with pytest.raises(ValueError, match=r"quantized\.pt does not match the model: missing \['0\.bias'\]"):
        load_weights(target, tmp_path / "quantized.pt")  # quantizer entries are ignored, a missing bias is not
    torch.save({"0.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"shape mismatch \['0\.weight \(8, 3, 3, 3\) vs \(4, 3, 3, 3\)'\]"):
        load_weights(target, tmp_path / "shape.pt", target="the model")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pt is truncated or not a PyTorch file"):
        read_state_dict(tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt does not hold a state dict of tensors \(got list\)"):
        read_state_dict(tmp_path / "list.pt")


DATAMODULES = {  # every task datamodule and the smallest arguments it takes
    "tasks.classification.DigitsDataModule": {"batch_size": 16},
    "tasks.classification.ImageFolderDataModule": {"root": "data/x", "batch_size": 4},
    "tasks.classification.CIFAR10DataModule": {"root": "data/cifar", "batch_size": 4},
    "tasks.detection.COCODataModule": {"root": "data/coco", "batch_size": 2},
    "tasks.segmentation.VOCSegmentationDataModule": {"root": "data/voc", "num_classes": 11, "batch_size": 2},
    "tasks.segmentation.CityscapesDataModule": {"root": "data/cityscapes", "batch_size": 2},
}


@pytest.mark.parametrize("class_path", sorted(DATAMODULES))
def test_every_datamodule_records_its_arguments_so_a_checkpoint_can_rebuild_it(class_path: str, tmp_path: Path) -> None:
    """``gdrq export --validate`` rebuilds the run's datamodule from the checkpoint's
    ``datamodule_hyper_parameters`` (what ``save_hyperparameters`` records, plus the class path)."""
    from gdrq_lightning.checkpoint import load_datamodule
    from gdrq_lightning.utils.modules import import_object

    args = DATAMODULES[class_path]
    dm = import_object(class_path)(**args)
    assert {k: dm.hparams[k] for k in args} == args
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {}, "datamodule_hyper_parameters": {"_class_path": class_path, **dm.hparams}}, path)
    rebuilt = load_datamodule(str(path))
    assert type(rebuilt) is type(dm) and dict(rebuilt.hparams) == dict(dm.hparams)
