import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the method files are scripts at the top level, not a package


@pytest.fixture
def one_thread():
    """Tiny models in this process on one thread: on 2 busy cores two threads wait for each other (a probe test:
    95 s with two, 0.6 s with one; DINO's in-process runs: 30 s vs 1.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
