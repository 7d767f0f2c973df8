"""Object detection: Faster R-CNN on COCO-format data, scored with COCOeval.

``DetectionModule`` (LightningModule), ``COCODataModule`` (any COCO-format
dataset), ``COCOEvaluator`` and the embedded default data ``make_digits_coco``.
"""
from .datamodule import COCODataModule
from .dataset import COCOAnnotationWarning, COCODatasetError, COCODetection, detection_collate
from .digits_coco import make_digits_coco
from .evaluator import COCOEvaluator
from .module import DetectionModule

__all__ = [
    "COCOAnnotationWarning", "COCODataModule", "COCODatasetError", "COCODetection", "COCOEvaluator",
    "DetectionModule", "detection_collate", "make_digits_coco",
]
