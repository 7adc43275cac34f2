"""Triton kernels with PyTorch references; every op takes ``backend=None | "torch" | "triton"``."""
if __name__ != "mmfuse.kernels":  # found under a bare name via sys.path: an empty shadow, see mmfuse/__init__.py
    del __file__, __path__
else:
    from ._common import default_backend
    from .cosine_loss import cosine_loss
    from .diffusion_loss import ddpm_training_pair, diffusion_loss, flow_matching_pair
    from .linear_cross_entropy import linear_cross_entropy
    from .mask_intervals import dense_mask, mask_intervals
    from .mixed_attention import mixed_attention, mixed_attention_tile_counts, tile_stats
    from .rms_norm import rms_norm, routed_rms_norm
    from .rope import apply_rope, rope_cos_sin, rope_frequencies
    from .objectives import Objective, lm_loss, metamorph_objective, metaquery_objective, transfusion_objective
    from .routed_linear import Routing, build_routing, routed_linear
    from .routed_mlp import routed_qkv_projection, routed_swiglu_mlp
    from .schedules import ddpm_alphas_cumprod, ddpm_betas, sample_sigmas, sample_timesteps, shift_sigmas
    from .swiglu import swiglu

    __all__ = [
        "apply_rope",
        "build_routing",
        "cosine_loss",
        "ddpm_alphas_cumprod",
        "ddpm_betas",
        "ddpm_training_pair",
        "default_backend",
        "dense_mask",
        "diffusion_loss",
        "flow_matching_pair",
        "linear_cross_entropy",
        "lm_loss",
        "mask_intervals",
        "metamorph_objective",
        "metaquery_objective",
        "mixed_attention",
        "mixed_attention_tile_counts",
        "Objective",
        "rms_norm",
        "rope_cos_sin",
        "rope_frequencies",
        "routed_linear",
        "routed_qkv_projection",
        "routed_rms_norm",
        "routed_swiglu_mlp",
        "Routing",
        "sample_sigmas",
        "sample_timesteps",
        "shift_sigmas",
        "swiglu",
        "tile_stats",
        "transfusion_objective",
    ]
