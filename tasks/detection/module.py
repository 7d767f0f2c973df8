"""``DetectionModule``: torchvision Faster R-CNN as a LightningModule for QAT.

The detector is ``self.model``, which is what the quantization callback swaps.
What gets quantized by default: backbone, FPN and the heads' hidden layers (the RPN head's
3x3 conv, the box head's fc6/fc7). ``quant_skip_default()`` (used by the callback when
``QuantConfig.skip`` is ``None``) keeps in full precision the stem conv, the layers that
output scores and box deltas (RPN ``cls_logits``/``bbox_pred``, the box predictor; small,
their regression outputs sensitive) and the RPN head's ReLU, which the conv shares across
the FPN levels (one module called once per level; the swap gives a module one quantizer).
Layers that read float tensors quantize their input (``quant_inputs_default()``): the FPN's
output convs (lateral + upsampled sums), the RPN head conv (FPN outputs) and fc6 (RoI-pooled
FPN features), so backbone, FPN and heads export as integer kernels. The heads' hidden layers
take 8 bits (``quant_overrides_default()``: :data:`HEAD_OVERRIDES`, measured in
benchmarks/README.md "digits-COCO"); a config's own ``overrides`` for them win. Set ``skip`` explicitly to change what stays float
(the former default, backbone + FPN only: ``[backbone.body.conv1, rpn, roi_heads]``).
``export_network()`` is the whole detector for one image.

Backbone normalisation is ``nn.BatchNorm2d`` by default, not torchvision's
``FrozenBatchNorm2d``: see :mod:`tasks.detection.models` for why.

``num_classes`` must equal what the data's labels need (categories + background, or the
largest category id + 1 with ``category_ids_as_labels``); ``setup`` checks it before the
first step. ``predict`` writes a COCO results json (:mod:`.predictions`); validation draws
a few images with their detections for the run directory and W&B.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytorch_lightning as pl
from torch import Tensor, nn

from gdrq_lightning.export import OnnxSpec
from gdrq_lightning.export.validate import DetectionMetric
from tasks.common import TaskModule, check_finite
from tasks.hub import classifier_label, is_named
from tasks.weights import load_weights, resolve

from .annotations import load_coco_json
from .dataset import to_unit_float
from .evaluator import COCOEvaluator
from .models import backbone_weights, build_faster_rcnn, first_conv_name
from .predictions import COCOResultsWriter, label_names, save_grid

Batch = tuple[tuple[Tensor, ...], tuple[dict[str, Tensor], ...]]

# the heads' hidden layers at 8 bits (weights, inputs and activations): the task's default
# ``QuantConfig.overrides`` (the detection configs spell it out too)
HEAD_OVERRIDES: dict[str, dict[str, int]] = {
    "rpn.head.conv": {"weight_bits": 8, "act_bits": 8},
    "roi_heads.box_head": {"weight_bits": 8, "act_bits": 8},
}


class DetectorExport(nn.Module):
    """The detector as export takes it: one image ``[1, 3, H, W]`` (values in [0, 1], any size)
    -> ``boxes [K, 4]`` (xyxy, in input pixels), ``labels [K]`` (1..K), ``scores [K]``. The ONNX
    file holds all of it: resize and normalisation, backbone, FPN, RPN and RoI heads (quantized as
    configured) and post-processing (NMS); the image size is dynamic, the batch is one image."""

    onnx_spec = OnnxSpec(outputs=("boxes", "labels", "scores"), dynamic_batch=False)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        detections = self.model([images[0]])[0]
        return detections["boxes"], detections["labels"], detections["scores"]


class DetectionModule(TaskModule):
    """Faster R-CNN (ResNet-50/18-FPN, MobileNetV3-Large-FPN) trained and scored COCO-style.

    Args:
        arch: ``fasterrcnn_resnet50_fpn``, ``fasterrcnn_resnet18_fpn``,
            ``fasterrcnn_mobilenet_v3_large_fpn`` or ``fasterrcnn_timm/<name>_fpn`` (any timm CNN).
        num_classes: labels incl. background: categories + 1 (COCO 2017: 81, digits-COCO: 11),
            or the largest category id + 1 with the datamodule's ``category_ids_as_labels`` (COCO: 91).
        min_size: images are resized so the short side is ``min_size`` ...
        max_size: ... and the long side at most ``max_size``.
        anchor_sizes: ResNet-FPN: one size per level (5); MobileNet: sizes used on each of its 3 levels.
        aspect_ratios: anchor aspect ratios (every level).
        trainable_layers: backbone stages left trainable (ResNet 0..5, MobileNet 0..6; 5 from scratch).
        fpn_channels: FPN / RPN width (torchvision: 256).
        representation_size: width of the box head's two FC layers (torchvision: 1024).
        norm: ``batchnorm`` (default, see module docstring) or ``frozen`` (torchvision's FrozenBatchNorm2d).
        rpn_proposals_train: RPN proposals kept per image (pre- and post-NMS) in training.
        rpn_proposals_test: the same at evaluation.
        rpn_batch_size_per_image: anchors sampled per image for the RPN loss.
        box_batch_size_per_image: RoIs sampled per image for the box-head loss.
        box_score_thresh: minimum score of a returned detection.
        box_detections_per_img: detections kept per image (COCO scores 100).
        pretrained: local file with full detector weights (``self.model.state_dict()``
            or a Lightning checkpoint of this module); float weights, loaded in ``setup``
            (see :meth:`load_starting_weights`).
        pretrained_backbone: local file with classification weights of the backbone, or
            ``imagenet`` (torchvision's / timm's published weights, downloaded once into the
            hub cache), loaded in ``setup`` too (before ``pretrained``).
        num_vis: validation images drawn with their detections each epoch (0 = none).
        draw_score_thresh: detections drawn (validation and predict PNGs; the datamodule's
            ``draw_predictions`` turns the predict PNGs on).
        **kwargs: optimizer, schedule and ``compile`` options of :class:`tasks.common.TaskModule`
            (defaults here: ``lr`` 0.02, ``weight_decay`` 1e-4, ``cosine``).

    Raises:
        ValueError: unknown ``arch`` (the message lists the known ones) or bad sizes.
    """

    optim_defaults: ClassVar[dict[str, Any]] = {"lr": 0.02, "weight_decay": 1e-4, "scheduler": "cosine"}

    def __init__(
        self,
        *,
        arch: str = "fasterrcnn_resnet50_fpn",
        num_classes: int = 81,
        min_size: int = 800,
        max_size: int = 1333,
        anchor_sizes: list[int] | None = None,
        aspect_ratios: list[float] | None = None,
        trainable_layers: int = 5,
        fpn_channels: int = 256,
        representation_size: int = 1024,
        norm: Literal["batchnorm", "frozen"] = "batchnorm",
        rpn_proposals_train: int = 2000,
        rpn_proposals_test: int = 1000,
        rpn_batch_size_per_image: int = 256,
        box_batch_size_per_image: int = 512,
        box_score_thresh: float = 0.05,
        box_detections_per_img: int = 100,
        pretrained: str | None = None,
        pretrained_backbone: str | None = None,
        num_vis: int = 4,
        draw_score_thresh: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.model = build_faster_rcnn(
            arch, num_classes=num_classes, min_size=min_size, max_size=max_size,
            anchor_sizes=list(anchor_sizes or [32, 64, 128, 256, 512]),
            aspect_ratios=list(aspect_ratios or [0.5, 1.0, 2.0]),
            trainable_layers=trainable_layers, fpn_channels=fpn_channels, representation_size=representation_size,
            norm=norm,
            rpn_pre_nms_top_n_train=rpn_proposals_train, rpn_post_nms_top_n_train=rpn_proposals_train,
            rpn_pre_nms_top_n_test=rpn_proposals_test, rpn_post_nms_top_n_test=rpn_proposals_test,
            rpn_batch_size_per_image=rpn_batch_size_per_image, box_batch_size_per_image=box_batch_size_per_image,
            box_score_thresh=box_score_thresh, box_detections_per_img=box_detections_per_img,
        )
        for name, value in (("pretrained", pretrained), ("pretrained_backbone", pretrained_backbone)):
            if value is not None and not value:
                raise ValueError(f"{name}='' is not a file; use null for none")
        self.num_classes = num_classes
        self.evaluator: COCOEvaluator | None = None
        self._warned_no_eval = False
        self._vis: tuple[list[Tensor], list[dict[str, Tensor]], list[dict[str, Tensor]]] | None = None

    def quant_skip_default(self) -> list[str]:
        """Full precision: the stem conv, the score / box-delta outputs and the RPN head's shared ReLU."""
        return ["rpn.head.cls_logits", "rpn.head.bbox_pred", "rpn.head.conv.0.1", "roi_heads.box_predictor",
                first_conv_name(self.model)]

    def quant_overrides_default(self) -> dict[str, dict[str, int]]:
        """The heads' hidden layers at 8 bits, whatever the config's bits (a config's own
        ``overrides`` win): measured in benchmarks/README.md "digits-COCO"."""
        return {pattern: dict(fields) for pattern, fields in HEAD_OVERRIDES.items()}

    def quant_inputs_default(self) -> list[str]:
        """Layers reading float tensors quantize their input: the FPN's 3x3 output convs (lateral +
        upsampled sums), the RPN head conv (FPN outputs) and fc6 (RoI-pooled FPN features)."""
        return ["backbone.fpn.layer_blocks", "rpn.head.conv", "roi_heads.box_head.fc6"]

    def export_network(self) -> nn.Module:
        """The whole detector for ONNX: one image ``[1, 3, H, W]`` -> boxes, labels, scores."""
        return DetectorExport(self.model)

    def export_metric(self, datamodule: Any) -> DetectionMetric | None:
        """``gdrq export --validate``'s metric: COCO mAP (pycocotools) of the exported detector."""
        if not hasattr(datamodule, "load_val_coco"):
            return None
        return DetectionMetric(COCOEvaluator(datamodule.load_val_coco, datamodule.label_to_cat_id,
                                             drop_unmapped=_ids_as_labels(datamodule)))

    def quant_forward(self, batch: Batch) -> None:
        """The detector on a training batch: with its targets in train mode (RPN and RoI sampling
        need them, as in a training step), on the images alone in eval mode."""
        images, targets = batch
        images = to_unit_float(images)
        if self.model.training:
            self.model(images, list(targets))
        else:
            self.model(images)

    def load_starting_weights(self) -> None:
        """Load ``pretrained_backbone`` into the backbone body, then ``pretrained`` into the detector.

        Runs from ``setup``, i.e. after the quantization callback's swap (quantized layers
        share their float layers' parameters and keys; quantizer state starts fresh), and
        before Lightning restores a ``ckpt_path``, which then wins.

        Raises:
            FileNotFoundError: a named file does not exist.
            ValueError: the weights do not fit this architecture / ``num_classes``.
        """
        hp = self.hparams
        if hp.pretrained_backbone is not None:
            body = self.model.backbone.body
            name, key_map = backbone_weights(hp.arch, body)
            load_weights(body, resolve(hp.pretrained_backbone, name, what="pretrained_backbone"),
                         what="pretrained_backbone", target=classifier_label(name), key_map=key_map)
        if hp.pretrained is not None:
            load_weights(self.model, hp.pretrained, target=(
                f"{hp.arch} with num_classes={hp.num_classes} (float detector weights expected; "
                f"resume quantized runs with ckpt_path instead)"))

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections (eval mode): per image ``boxes`` xyxy, ``labels`` 1..K, ``scores``.

        Images are float in 0..1 or ``uint8`` (what the loaders send; scaled here, on the device).
        """
        return self.model(list(to_unit_float(images)))

    # ---- setup / evaluation plumbing ------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download named backbone weights once per node (``setup`` on every rank then reads the cache)."""
        if is_named(self.hparams.pretrained_backbone):
            resolve(self.hparams.pretrained_backbone, backbone_weights(self.hparams.arch, self.model.backbone.body)[0],
                    what="pretrained_backbone")

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        needed = getattr(dm, "num_classes", None) if dm is not None and _ready(dm) else None
        if needed is not None:
            by_id = _ids_as_labels(dm)
            data = (f"largest category id {needed - 1} + 1 (category ids as labels)" if by_id else
                    f"{needed - 1} categories + background = {needed}")
            hint = "" if by_id or self.num_classes <= needed else (
                "; for torchvision's 91-label COCO convention set data.category_ids_as_labels: true")
            self.check_num_classes(needed, data, hint)
        super().setup(stage)  # the starting weights, once the data is known to fit

    def configure_callbacks(self) -> list[pl.Callback]:
        hp = self.hparams
        return [COCOResultsWriter(score_thresh=hp.draw_score_thresh)]  # `predict` only

    def _make_evaluator(self) -> COCOEvaluator | None:
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "load_val_coco") and _ready(dm):
            return COCOEvaluator(dm.load_val_coco, dm.label_to_cat_id, drop_unmapped=_ids_as_labels(dm))
        loaders = self.trainer.val_dataloaders if not self.trainer.testing else self.trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "annotation_file") and hasattr(dataset, "label_to_cat_id"):
            return COCOEvaluator(lambda: load_coco_json(dataset.annotation_file), dataset.label_to_cat_id)
        if not self._warned_no_eval:
            warnings.warn(
                "DetectionModule: no COCO ground truth found (use COCODataModule or a COCODetection "
                "validation set); skipping mAP", stacklevel=2,
            )
            self._warned_no_eval = True
        return None

    # ---- steps ----------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, targets = batch
        losses: dict[str, Tensor] = self.model(list(to_unit_float(images)), list(targets))
        check_finite(losses, self.global_step)
        loss = sum(losses.values())
        bs = len(images)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.evaluator = self._make_evaluator()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, targets = batch
        outputs = self(images)
        if self.evaluator is not None:
            self.evaluator.update(outputs, targets)
        k = self.hparams.num_vis
        if batch_idx == 0 and k > 0 and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            self._vis = (list(images[:k]), outputs[:k], list(targets[:k]))

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")
        if self._vis is not None:
            self._save_predictions(*self._vis)
        self._vis = None

    def _save_predictions(self, images: list[Tensor], outputs: list[dict[str, Tensor]],
                          targets: list[dict[str, Tensor]]) -> Path:
        """The epoch's validation picture (ground truth green), see :meth:`TaskModule.save_val_picture`."""
        names = label_names(self.trainer)[1]
        return self.save_val_picture(lambda path: save_grid(images, outputs, targets, names, path,
                                                            score_thresh=self.hparams.draw_score_thresh))

    def on_test_epoch_start(self) -> None:
        self.evaluator = self._make_evaluator()

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Tensor]]:
        images = batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch
        return self(images)

    def _log_metrics(self, prefix: str) -> None:
        if self.evaluator is None or self.trainer.sanity_checking:
            return
        metrics = self.evaluator.compute()
        self.evaluator.reset()
        for name, value in metrics.items():
            # identical on every rank already (rank 0 computed, then broadcast); sync_dist is a no-op mean
            self.log(f"{prefix}/{name}", float(value), prog_bar=name == "mAP", sync_dist=True)


def _ready(dm: Any) -> bool:
    """Whether a COCODataModule-like object has run ``setup`` (its mapping is available)."""
    try:
        dm.label_to_cat_id
    except RuntimeError:
        return False
    return True


def _ids_as_labels(dm: Any) -> bool:
    """Whether the datamodule uses category ids as labels (``COCODataModule(category_ids_as_labels=True)``)."""
    return bool(getattr(getattr(dm, "hparams", None), "category_ids_as_labels", False))
