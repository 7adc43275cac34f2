"""Lean model definitions that load Hugging Face safetensors checkpoints.

``from_pretrained(path)`` dispatches on ``config.json``'s ``model_type``.
"""
if __name__ != "mmfuse.models":  # found under a bare name via sys.path: an empty shadow, see mmfuse/__init__.py
    del __file__, __path__
else:
    import os

    import torch

    from .decoder import Decoder, DecoderConfig, decoder_state_from_hf, decoder_state_to_hf
    from .hf_io import CheckpointError, build_from_state, checkpoint_files, load_tensors, read_config, save_checkpoint
    from .layers import BatchContext, KVCache, MixedAttention, RoutedLinear, RoutedMLP, RoutedRMSNorm
    from .metaquery import Connector, MetaQuery, MetaQueryConfig, load_metaquery, save_metaquery
    from .siglip import SiglipVisionConfig, SiglipVisionTower, load_siglip, pool_to_tokens, save_siglip

    __all__ = [
        "BatchContext", "CheckpointError", "Connector", "Decoder", "DecoderConfig", "KVCache", "MetaQuery", "MetaQueryConfig", "MixedAttention", "RoutedLinear",
        "RoutedMLP", "RoutedRMSNorm", "SiglipVisionConfig", "SiglipVisionTower", "from_pretrained", "load_metaquery", "load_siglip",
        "pool_to_tokens", "save_metaquery", "save_pretrained", "save_siglip",
    ]


    def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> torch.nn.Module:
        """Load a Hugging Face checkpoint folder (config.json + safetensors, single or sharded).

        Args:
            path: folder with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``.
            dtype: cast floating tensors to this dtype (default: as stored).
            device: where the tensors are loaded (default CPU); the model is built on the meta device and
                adopts them, so no random init runs and no second copy exists.

        Raises:
            CheckpointError: unsupported config, missing/unexpected/mis-shaped tensor, unreadable file.
        """
        cfg = read_config(path)
        model_type = cfg.get("model_type")
        device = torch.device(device or "cpu")
        if model_type in ("llama", "qwen2"):
            config = DecoderConfig.from_hf(cfg)
            state = decoder_state_from_hf(config, load_tensors(checkpoint_files(path), device, dtype))
            return build_from_state(lambda: Decoder(config), state)
        if model_type in ("siglip", "siglip_vision_model"):
            return load_siglip(path, dtype, device)
        if model_type == "mmfuse_fusion":
            from .fusion import load_fusion

            return load_fusion(path, dtype, device)
        if model_type == "mmfuse_metaquery":
            return load_metaquery(path, dtype, device)
        raise CheckpointError(f"config model_type {model_type!r} is not supported "
                              "(llama, qwen2, siglip, siglip_vision_model, mmfuse_fusion, mmfuse_metaquery)")


    def save_pretrained(model: torch.nn.Module, path: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
        """Write ``model`` as a Hugging Face checkpoint that transformers (and :func:`from_pretrained`) loads."""
        if isinstance(model, Decoder):
            cfg, tensors = decoder_state_to_hf(model)
            save_checkpoint(path, cfg, tensors, max_shard_bytes)
            return
        if isinstance(model, SiglipVisionTower):
            save_siglip(model, path, max_shard_bytes)
            return
        raise TypeError(f"save_pretrained does not know how to save a {type(model).__name__}")
