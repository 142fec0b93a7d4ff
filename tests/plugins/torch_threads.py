"""``one_torch_thread``: one intra-op thread for a test module.

On a shared 2-core machine, OpenMP spinning with 2 threads is 10-40x slower than 1 when other
processes hold the cores; tests of small models are faster and steadier on one thread.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
