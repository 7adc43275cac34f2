"""Triton kernels with PyTorch references; every op takes ``backend=None | "torch" | "triton"``."""
from .mask_intervals import dense_mask, mask_intervals
from .mixed_attention import mixed_attention, mixed_attention_tile_counts, tile_stats

__all__ = [
    "dense_mask",
    "mask_intervals",
    "mixed_attention",
    "mixed_attention_tile_counts",
    "tile_stats",
]
