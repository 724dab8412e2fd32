"""Install script for hicd: hierarchical correlation distillation for change detection."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "hicd_core" / "_version.py").read_text()).group(1)

setup(
    name="hicd",
    version=VERSION,
    description=(
        "Autodiff-free change detection across image quality by hierarchical "
        "correlation distillation (HiCD, Pang et al., IEEE TGRS 2024)"
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["hicd_core", "hicd_core.*"]),
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "h5py>=3.8",
        "array-api-compat>=1.9",
    ],
    entry_points={"console_scripts": ["hicd = hicd_core.cli:main"]},
    extras_require={
        "gpu": ["cupy>=13"],
        "io": ["Pillow>=9"],
        "progress": ["tqdm>=4.60"],
        # hicd_loss(..., threads=N): the parts' window terms on host threads, BLAS at one thread meanwhile
        "cpu": ["threadpoolctl>=3.1"],
        "torch": ["torch>=2.1"],
        "jax": ["jax>=0.4.30"],
        "geo": ["rasterio>=1.3"],
        # mpi4py's wheels run on the MPI of the mpich wheel; with a system MPI, install mpi4py alone
        "mpi": ["mpi4py>=4.0", "mpich; sys_platform != 'win32'"],
        "test": [
            "pytest>=7",
            "hypothesis>=6.80",
            "array-api-strict>=2.2",
            "Pillow>=9",
            "tqdm>=4.60",
            "threadpoolctl>=3.1",
        ],
    },
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
