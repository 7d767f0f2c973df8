"""Semantic segmentation task: FCN and PSPNet on PASCAL VOC, Cityscapes and digits-VOC.

Public names: :class:`SegmentationModule`, :class:`VOCSegmentationDataModule`,
:class:`CityscapesDataModule`, :func:`make_digits_voc`.
"""
from .datamodule import CityscapesDataModule, VOCSegmentationDataModule
from .digits_voc import make_digits_voc
from .module import SegmentationModule

__all__ = ["CityscapesDataModule", "SegmentationModule", "VOCSegmentationDataModule", "make_digits_voc"]
