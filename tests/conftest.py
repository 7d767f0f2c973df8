"""Every test: a fixed random state and one intra-op thread.

The models here are tiny; on a small shared CPU one thread avoids OpenMP
oversubscription and is several times faster. Both settings are restored after each test.
"""
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
