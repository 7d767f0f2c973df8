"""Image classification: any torchvision / timm classifier, digits / ImageFolder / CIFAR-10 data."""
from .datamodule import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule
from .models import build_classifier
from .module import ClassificationModule

__all__ = ["CIFAR10DataModule", "ClassificationModule", "DigitsDataModule", "ImageFolderDataModule", "build_classifier"]
