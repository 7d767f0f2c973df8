"""``ClassificationModule``: cross-entropy training of any torchvision / timm classifier."""
from __future__ import annotations

from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from gdrq_lightning.export.validate import Top1
from tasks.common import TaskModule, check_finite
from tasks.hub import is_named
from tasks.weights import load_weights, resolve

from .models import build_classifier
from .predictions import ClassPredictionWriter


class ClassificationModule(TaskModule):
    """Image classification with top-1 / top-5 accuracy.

    The network lives in ``self.model``: the quantization callback quantizes it,
    keeping the first conv and the final classifier full precision by default.

    Args:
        model: torchvision name (``resnet18``) or ``timm/<name>``.
        num_classes: number of classes.
        pretrained: local weights file (a state dict or a Lightning checkpoint), or
            ``imagenet`` for the model's published ImageNet weights (torchvision's ``DEFAULT``
            enum, timm's default tag; downloaded once into the hub cache), loaded in ``setup``;
            tensors whose shape differs (e.g. another number of classes) are skipped with a warning.
        small_input: CIFAR-style ResNet stem for 32x32 inputs.
        label_smoothing: cross-entropy label smoothing.
        **kwargs: optimizer, schedule and ``compile`` options of :class:`tasks.common.TaskModule`
            (defaults here: ``lr`` 0.05, ``weight_decay`` 5e-4, ``cosine``).
    """

    optim_defaults: ClassVar[dict[str, Any]] = {"lr": 0.05, "weight_decay": 5e-4, "scheduler": "cosine"}

    def __init__(
        self,
        model: str = "resnet18",
        *,
        num_classes: int = 10,
        pretrained: str | None = None,
        small_input: bool = False,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.model = build_classifier(model, num_classes=num_classes, small_input=small_input)
        top_k = min(5, num_classes)
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.test_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")

    def prepare_data(self) -> None:
        """Download named weights once per node (``setup`` on every rank then reads the cache)."""
        if is_named(self.hparams.pretrained):
            resolve(self.hparams.pretrained, self.hparams.model)

    def load_starting_weights(self) -> None:
        h = self.hparams
        if h.pretrained:
            load_weights(self.model, resolve(h.pretrained, h.model), target=h.model, skip_mismatched=True)

    def export_metric(self, datamodule: object) -> Top1:
        """``gdrq export --validate``'s metric: top-1 of the exported logits."""
        return Top1()

    def configure_callbacks(self) -> list[pl.Callback]:
        return [ClassPredictionWriter()]  # acts in `predict` only: predictions/classes.csv

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        check_finite({"loss": loss}, self.global_step, self.model)
        acc = (logits.argmax(1) == y).float().mean()
        self.log_dict({"train/loss": loss, "train/acc1": acc}, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc1(logits, y)
        self.val_acc5(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), batch_size=len(y), sync_dist=True)
        self.log_dict({"val/acc1": self.val_acc1, "val/acc5": self.val_acc5}, prog_bar=True, batch_size=len(y))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc1(self(x), y)
        self.log("test/acc1", self.test_acc1, batch_size=len(y))

    def predict_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(x), dim=1)
