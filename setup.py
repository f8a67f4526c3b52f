"""Packaging for fastae.

The Triton kernels live in the top-level folder ``kernels/`` (DESIGN section 6) and are installed
as the subpackage ``fastae.kernels``; the ``package_dir`` mapping below does that for both
``pip install .`` and ``pip install -e .``.
"""

from setuptools import setup

setup(
    name="fastae",
    version="0.1.0",
    description="Autoencoders for PyTorch with fused Triton kernels for their penalties",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastae", "fastae.functional", "fastae.kernels"],
    package_dir={"fastae": "fastae", "fastae.kernels": "kernels"},
    install_requires=[
        # Any torch from 2.4 on; `pip install torch==2.13.0` (the CPU build) satisfies it.
        "torch>=2.4",
        "triton>=3.0",
        "numpy>=1.24",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "pytest-benchmark>=4", "ruff>=0.4"],
    },
    entry_points={"console_scripts": ["fastae = fastae.cli:main"]},
)
