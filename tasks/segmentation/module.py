"""``SegmentationModule``: FCN / PSPNet training and evaluation for LightningCLI.

The network lives in ``self.model`` (what the quantization callback swaps);
``quant_skip_default()`` names the layers kept full precision when ``QuantConfig.skip``
is None, and ``export_network()`` is the main map alone (:class:`MainOutput`). Loss:
pixel-wise cross-entropy with ``ignore_index`` (mean over counted pixels, 0 for an
all-ignored batch) plus ``aux_weight`` times the auxiliary head's loss in training.
Validation logs ``val/mIoU``, ``val/pixel_acc`` and ``val/iou_<class>`` from a
torchmetrics confusion matrix, and saves a PNG of a few predictions to the run
directory; ``predict`` writes one palette PNG mask per image (:class:`PaletteMaskWriter`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassConfusionMatrix

from gdrq_lightning.export import OnnxSpec
from gdrq_lightning.export.validate import MeanIoU
from tasks.common import TaskModule, check_finite
from tasks.hub import classifier_label, is_named
from tasks.weights import load_weights, resolve

from .labels import IGNORE_INDEX, default_class_names
from .metrics import iou_per_class, pixel_accuracy
from .models import MainOutput, backbone_weights, build_model, quant_skip
from .predictions import PaletteMaskWriter, PredictBatch
from .transforms import IMAGENET_MEAN, IMAGENET_STD
from .visualize import save_prediction_grid


def _metric_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


class SegmentationModule(TaskModule):
    """Semantic segmentation with FCN or PSPNet.

    Args:
        arch: ``fcn_resnet18``, ``fcn_resnet50``, ``fcn_resnet101``, ``pspnet_resnet18``, ``pspnet_resnet50``,
            or ``fcn_timm/<name>`` / ``pspnet_timm/<name>`` for a timm backbone (output stride 8).
        num_classes: output classes (21 VOC, 19 Cityscapes, 11 digits-VOC).
        ignore_index: mask value excluded from loss and metrics.
        aux_loss: build the auxiliary FCN head on ``layer3``.
        aux_weight: weight of the auxiliary loss (training only).
        pretrained: local file with weights for the whole network (a state dict or a
            Lightning checkpoint; quantizer entries are ignored), loaded in ``setup``.
        pretrained_backbone: local file with the backbone's classifier weights (torchvision
            ResNet or the timm model), or ``imagenet`` for the published ones (downloaded once
            into the hub cache); loaded into the backbone in ``setup`` (before ``pretrained``).
        class_names: names for ``val/iou_<name>``; default: the datamodule's, else by ``num_classes``.
        num_vis: validation samples drawn into the prediction PNG (0 = none).
        **kwargs: optimizer, schedule and ``compile`` options of :class:`tasks.common.TaskModule`
            (defaults here: ``lr`` 0.01, ``weight_decay`` 1e-4, the ``poly`` schedule
            ``(1 - step/total) ** poly_power``).

    Raises:
        ValueError: unknown ``arch`` (lists the known names) or bad argument values.
    """

    optim_defaults: ClassVar[dict[str, Any]] = {"lr": 0.01, "weight_decay": 1e-4, "scheduler": "poly"}

    def __init__(
        self,
        *,
        arch: str = "fcn_resnet18",
        num_classes: int = 21,
        ignore_index: int = IGNORE_INDEX,
        aux_loss: bool = True,
        aux_weight: float = 0.4,
        pretrained: str | None = None,
        pretrained_backbone: str | None = None,
        class_names: list[str] | None = None,
        num_vis: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} collides with a class id (num_classes={num_classes})")
        if aux_weight < 0:
            raise ValueError(f"aux_weight={aux_weight} must be >= 0")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        self.save_hyperparameters()
        self.model = build_model(arch, num_classes=num_classes, aux_loss=aux_loss)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names else default_class_names(num_classes)
        self.val_confmat = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False)
        self.test_confmat = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False)
        self._vis: tuple[Tensor, Tensor, Tensor] | None = None

    def quant_skip_default(self) -> list[str]:
        return quant_skip(self.hparams.arch, self.hparams.aux_loss)

    # PSPNet: the pyramid convs read average-pooled maps, the bottleneck a concatenation of upsampled ones
    PSP_INPUTS = ["classifier.ppm.stages.*.1", "classifier.conv"]
    PSP_FIXED_SIZE = ("PSPNet's pyramid pooling (bins 2, 3, 6) exports as pooling windows computed from the example "
                      "size, so the ONNX file takes that image size only")

    def quant_inputs_default(self) -> list[str]:
        """PSPNet's neck convs read float maps (pooled, concatenated): they quantize their inputs.
        FCN's quantized layers all read quantized activations."""
        return list(self.PSP_INPUTS) if self.hparams.arch.startswith("pspnet") else []

    def export_metric(self, datamodule: object) -> MeanIoU:
        """``gdrq export --validate``'s metric: mIoU and pixel accuracy of the exported main map."""
        return MeanIoU(self.hparams.num_classes, self.hparams.ignore_index)

    def export_network(self) -> nn.Module:
        """The main map; a dynamic image size, except for PSPNet (:attr:`PSP_FIXED_SIZE`)."""
        network = MainOutput(self.model)
        if self.hparams.arch.startswith("pspnet"):
            network.onnx_spec = OnnxSpec(dynamic_size=False, fixed_size_reason=self.PSP_FIXED_SIZE)
        return network

    def load_starting_weights(self) -> None:
        """``pretrained_backbone`` into the backbone, then ``pretrained`` into the whole network.

        Raises:
            FileNotFoundError: a named file does not exist.
            ValueError: the weights do not fit the backbone / ``arch`` with ``num_classes``.
        """
        hp = self.hparams
        if hp.pretrained_backbone is not None:
            net, name, key_map = backbone_weights(hp.arch, self.model)
            load_weights(net, resolve(hp.pretrained_backbone, name, what="pretrained_backbone"),
                         what="pretrained_backbone", target=classifier_label(name), key_map=key_map)
        if hp.pretrained is not None:
            load_weights(self.model, hp.pretrained, target=f"{hp.arch} with num_classes={hp.num_classes}")

    def configure_callbacks(self) -> list[pl.Callback]:
        return [PaletteMaskWriter()]  # acts in `predict` only

    # ----------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        """Download named backbone weights once per node (``setup`` on every rank then reads the cache)."""
        if is_named(self.hparams.pretrained_backbone):
            resolve(self.hparams.pretrained_backbone, backbone_weights(self.hparams.arch, self.model)[1],
                    what="pretrained_backbone")

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dm_classes = getattr(dm, "num_classes", None)
        self.check_num_classes(dm_classes, f"the datamodule has {dm_classes} classes", "; set both the same")
        if self.hparams.class_names is None and getattr(dm, "class_names", None):
            self.class_names = list(dm.class_names)
        super().setup(stage)  # the starting weights, once the data is known to fit

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes, H, W]`` at the input resolution."""
        return self.model(x)["out"]

    def criterion(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy averaged over non-ignored pixels (0, not NaN, when all are ignored)."""
        total = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum")
        return total / (target != self.ignore_index).sum().clamp_min(1)

    # ----------------------------------------------------------------- steps
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch[0], batch[1].long()  # masks travel as uint8
        out = self.model(images)
        losses = {"loss_main": self.criterion(out["out"], targets)}
        if "aux" in out and self.hparams.aux_weight > 0:
            losses["loss_aux"] = self.hparams.aux_weight * self.criterion(out["aux"], targets)
        check_finite(losses, self.global_step)
        loss = sum(losses.values())
        bs = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=bs)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> None:
        images, targets = batch[0], batch[1].long()
        logits = self(images)
        loss = self.criterion(logits, targets)
        preds = logits.argmax(dim=1)
        (self.val_confmat if stage == "val" else self.test_confmat).update(preds, targets)
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=images.shape[0])
        if stage == "val" and batch_idx == 0 and self.hparams.num_vis > 0:
            k = self.hparams.num_vis
            self._vis = (images[:k].cpu(), targets[:k].cpu(), preds[:k].cpu())

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def predict_step(self, batch: PredictBatch, batch_idx: int) -> dict[str, list]:
        """Class-index masks (``uint8``) cropped back to each image's size, with the image ids."""
        images, ids, sizes = batch
        preds = self(images).argmax(dim=1).to(torch.uint8)
        return {"ids": list(ids), "masks": [p[:h, :w] for p, (h, w) in zip(preds, sizes)]}

    # ----------------------------------------------------------------- epoch ends
    def _log_metrics(self, confmat: MulticlassConfusionMatrix, stage: str) -> None:
        cm = confmat.compute()  # summed over DDP ranks
        confmat.reset()
        iou = iou_per_class(cm)
        metrics = {f"{stage}/mIoU": iou.nanmean(), f"{stage}/pixel_acc": pixel_accuracy(cm)}
        for name, value in zip(self.class_names, iou):
            if not torch.isnan(value):
                metrics[f"{stage}/iou_{_metric_name(name)}"] = value
        headline = {k: metrics.pop(k) for k in (f"{stage}/mIoU", f"{stage}/pixel_acc")}
        self.log_dict(headline, prog_bar=True)  # shown by the progress bar / the per-epoch log line
        self.log_dict(metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_confmat, "val")
        if self.trainer.sanity_checking:
            self._vis = None
            return
        if self._vis is not None and self.trainer.is_global_zero:
            self._save_predictions(*self._vis)
        self._vis = None

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_confmat, "test")

    def _save_predictions(self, images: Tensor, targets: Tensor, preds: Tensor) -> Path:
        """The epoch's validation picture, see :meth:`TaskModule.save_val_picture`."""
        dm = getattr(self.trainer, "datamodule", None)
        mean, std = getattr(dm, "mean", IMAGENET_MEAN), getattr(dm, "std", IMAGENET_STD)
        title = f"{self.hparams.arch} epoch {self.current_epoch}"
        return self.save_val_picture(
            lambda path: save_prediction_grid(images, targets, preds, path, mean=mean, std=std, title=title,
                                              class_names=self.class_names))
