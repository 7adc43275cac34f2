"""Installs the four code folders under the single import root ``mmfuse``.

The repository keeps ``kernels/ models/ engine/ bench/`` at the top level (and the tiny root package
in ``src/mmfuse`` so that it never shadows the installed one on ``sys.path``); ``package_dir`` maps
them to ``mmfuse.kernels`` etc. so no generic top-level name is claimed in a user's environment.
"""
from setuptools import setup

PACKAGES = {
    "mmfuse": "src/mmfuse",
    "mmfuse.kernels": "kernels",
    "mmfuse.models": "models",
    "mmfuse.engine": "engine",
    "mmfuse.bench": "bench",
}

# Ranges that a CPU machine satisfies with the pre-cached CPU torch 2.13 wheel (an unbounded torch would
# pull a multi-GB CUDA build) and that leave a GPU image's torch 2.11 + triton 3.6 alone.
INSTALL_REQUIRES = [
    "torch>=2.11,<2.14",
    "triton>=3.6,<3.9",
    "numpy>=2.0,<2.4",  # triton's interpreter breaks on numpy >= 2.4
    # 5.25 imports the ``kernels`` distribution when it is installed (it requires it), and run from
    # this checkout's root that name finds the repository's own kernels/ folder first: every
    # transformers model then fails to import. Until the source folders move under one package
    # directory, stay below 5.25.
    "transformers>=5.17,<5.25",
    "diffusers>=0.42,<0.43",
    "safetensors>=0.8",
    "tqdm",
    "pillow",  # PNG output of samples and loss curves
    "scikit-learn>=1.4",  # the demo's handwritten digits ship inside it (no download)
]

setup(
    name="mmfuse",
    version="0.1.0",
    description="Fast kernels and engine for unified multimodal transformers",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "matplotlib>=3.8", "datasets>=3"],
        "data": ["datasets>=3"],  # training data from a Hugging Face `datasets` folder
        "bench": ["matplotlib>=3.8"],  # `mmfuse bench plot`
        "flash": ["flash-attn"],  # CUDA-only benchmark baseline, never a default dependency
    },
    entry_points={"console_scripts": ["mmfuse=mmfuse.cli:main"]},
)
