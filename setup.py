"""usp_megatron: Unified Sequence Parallelism (Ulysses x Ring attention) for Megatron-core."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="usp_megatron",
    version="0.1.0",
    description="Unified Sequence Parallelism (Ulysses x Ring attention) for Megatron-core",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["usp_megatron", "usp_megatron.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "megatron-core>=0.16.1,<0.20", "numpy"],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "te": ["transformer-engine"],
        "test": ["pytest>=8", "ruff==0.17.6", "matplotlib", "psutil"],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
    },
)
