"""mIoU and pixel accuracy from a confusion matrix.

The confusion matrix itself is torchmetrics' ``MulticlassConfusionMatrix`` (with
``ignore_index``), whose sum-reduced state is synchronised across DDP ranks in
``compute()``; these functions only read the matrix.
"""
from __future__ import annotations

import torch
from torch import Tensor


def iou_per_class(confmat: Tensor) -> Tensor:
    """IoU per class from ``confmat[target, pred]``; NaN for classes absent from both.

    Example:
        >>> iou_per_class(torch.tensor([[3, 1], [0, 2]]))
        tensor([0.7500, 0.6667])
    """
    cm = confmat.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan"))).float()


def mean_iou(confmat: Tensor) -> Tensor:
    """Mean IoU over the classes that occur (in target or prediction)."""
    return iou_per_class(confmat).nanmean()


def pixel_accuracy(confmat: Tensor) -> Tensor:
    """Correct pixels / all counted (non-ignored) pixels."""
    cm = confmat.double()
    return (cm.diag().sum() / cm.sum().clamp_min(1)).float()
