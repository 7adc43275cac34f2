"""Lean model definitions that load Hugging Face safetensors checkpoints.

``from_pretrained(path)`` dispatches on ``config.json``'s ``model_type``.
"""
if __name__ != "mmfuse.models":  # found under a bare name via sys.path: an empty shadow, see mmfuse/__init__.py
    del __file__, __path__
else:
    from .decoder import Decoder, DecoderConfig
    from .hf_io import CheckpointError
    from .layers import BatchContext, KVCache, MixedAttention, RoutedLinear, RoutedMLP, RoutedRMSNorm
    from .loading import from_pretrained, save_pretrained
    from .metaquery import Connector, MetaQuery, MetaQueryConfig, load_metaquery, save_metaquery
    from .siglip import SiglipVisionConfig, SiglipVisionTower, load_siglip, pool_to_tokens, save_siglip

    __all__ = [
        "BatchContext",
        "CheckpointError",
        "Connector",
        "Decoder",
        "DecoderConfig",
        "KVCache",
        "MetaQuery",
        "MetaQueryConfig",
        "MixedAttention",
        "RoutedLinear",
        "RoutedMLP",
        "RoutedRMSNorm",
        "SiglipVisionConfig",
        "SiglipVisionTower",
        "from_pretrained",
        "load_metaquery",
        "load_siglip",
        "pool_to_tokens",
        "save_metaquery",
        "save_pretrained",
        "save_siglip",
    ]
