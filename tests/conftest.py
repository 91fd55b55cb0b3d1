import sys
from pathlib import Path

import pytest
import torch

# The shared helpers (helpers/) and the modules run in worker processes (workers/) import
# as packages from here; spawned workers inherit this sys.path, so they import them too.
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA GPUs (run on the GPU machine)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
