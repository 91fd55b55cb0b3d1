"""usp_megatron: Unified Sequence Parallelism (Ulysses x Ring attention) for Megatron-core."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# The one version string lives in the package.
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "usp_megatron" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="usp_megatron",
    version=VERSION,
    description="Unified Sequence Parallelism (Ulysses x Ring attention) for Megatron-core",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["usp_megatron", "usp_megatron.*"]),
    python_requires=">=3.10",
    # einops: megatron-core needs it for hierarchical context-parallel groups (U x R)
    # without declaring it; psutil: its torch_dist checkpoint writer (--save).
    install_requires=["torch>=2.4", "megatron-core>=0.16.1,<0.20", "numpy", "einops", "psutil"],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        # The cuDNN frontend for backend 'cudnn' (windows, packed documents): 1.28 is the
        # newest without a dependency on nvidia-cutlass-dsl (about 490 MB, required from
        # 1.29), and the one run on an H100 (cuDNN 9.19).
        "cudnn": ["nvidia-cudnn-frontend>=1.28,<1.29"],
        "te": ["transformer-engine"],
        "test": ["pytest>=8", "ruff==0.17.6", "matplotlib"],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
    },
)
