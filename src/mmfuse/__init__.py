"""mmfuse: fast kernels and an engine for unified multimodal transformers.

The public ops live in :mod:`mmfuse.kernels`; see README.md for shapes.
"""
__version__ = "0.1.0"
