"""Shared builders for the export tests: small calibrated fake-quant models (CPU, no weights)."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from gdrq_lightning import QuantConfig, quantize_model


class TinyNet(nn.Module):
    """conv-bn-relu x3 -> pool -> linear; every layer has 8 output channels."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 8)  # 8 outputs so G = 4, 8 divide every layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def calibrate(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Random BN affine params, one train-mode pass (BN + activation statistics), then eval.

    Negative gammas are included on purpose: ONNX folding must flip codes, not scales.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.empty_like(m.weight).uniform_(-1.5, 1.5, generator=gen))
                m.bias.copy_(torch.empty_like(m.bias).uniform_(-0.3, 0.3, generator=gen))
        model.train()(torch.randn(shape, generator=gen))
    return model.eval()


class Models:
    """Memoized builders; export never changes the model it is given, so tests may share them."""

    # resnet18 ``overrides`` for G = C_out (one group per output channel) in every stage
    PER_CHANNEL = {f"layer{i}.*": {"groups": 64 * 2 ** (i - 1)} for i in range(1, 5)}

    def __init__(self) -> None:
        self._cache: dict[str, nn.Module] = {}

    def _get(self, key: str, make: Callable[[], nn.Module]) -> nn.Module:
        if key not in self._cache:
            torch.manual_seed(0)
            self._cache[key] = make()
        return self._cache[key]

    def tiny(self, bias: bool = False, **cfg) -> nn.Module:
        """TinyNet with everything quantized (``skip=[]``) unless ``cfg`` says otherwise."""
        cfg.setdefault("skip", [])
        def make() -> nn.Module:
            return calibrate(quantize_model(TinyNet(bias), QuantConfig(**cfg)), (4, 3, 16, 16))

        return self._get(f"tiny{bias}{sorted(cfg.items(), key=str)}", make)

    def resnet18(self, **cfg) -> nn.Module:
        """torchvision resnet18, 10 classes, default skip (first conv and fc float), 32x32 input."""
        import torchvision

        def make() -> nn.Module:
            model = quantize_model(torchvision.models.resnet18(num_classes=10), QuantConfig(**cfg))
            return calibrate(model, (2, 3, 32, 32))

        return self._get(f"resnet18{sorted(cfg.items(), key=str)}", make)


@pytest.fixture(scope="session")
def models() -> Models:
    return Models()
