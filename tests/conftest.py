import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# attnbench.configs (standard library only): the U x R parser the benchmarks use too.
sys.path.insert(1, str(Path(__file__).parents[1] / "benchmarks"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA GPUs (run on the GPU machine)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
