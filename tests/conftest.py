"""Every test: a fixed random state and one intra-op thread; the session: a private cache.

The models here are tiny; on a small shared CPU one thread avoids OpenMP
oversubscription and is several times faster. Both settings are restored after each test.
The COCO annotation cache (``GDRQ_CACHE``) goes to a temporary folder, not the user's home.
"""
import os
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    previous = os.environ.get("GDRQ_CACHE")
    os.environ["GDRQ_CACHE"] = str(tmp_path_factory.mktemp("gdrq_cache"))
    yield
    if previous is None:
        del os.environ["GDRQ_CACHE"]
    else:
        os.environ["GDRQ_CACHE"] = previous


@pytest.fixture(autouse=True)
def _seed_and_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
