"""Markers of the quantization tests."""
from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "compile: torch.compile tests (seconds each on a CPU; deselect with -m 'not compile')")
