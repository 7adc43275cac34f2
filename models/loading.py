"""``from_pretrained`` / ``save_pretrained``: dispatch on ``config.json``'s ``model_type``."""
from __future__ import annotations

import os

import torch

from .decoder import Decoder, DecoderConfig, decoder_state_from_hf, decoder_state_to_hf
from .family import families, family_for_model_type
from .hf_io import (CheckpointError, build_from_state, checkpoint_files, load_tensors, read_config, save_checkpoint,
                    tensor_names)
from .siglip import SiglipVisionTower, load_siglip, save_siglip

VLM_MODEL_TYPES = ("llava", "llava_onevision")
# Where a VLM checkpoint keeps its language model: transformers 4 layout, then transformers 5's own.
_VLM_LM_PREFIXES = (("language_model.model.", "language_model.lm_head."), ("model.language_model.", "lm_head."))


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> torch.nn.Module:
    """Load a Hugging Face checkpoint folder (config.json + safetensors, single or sharded).

    A VLM checkpoint (``llava``, ``llava_onevision``) gives its language model as a :class:`Decoder`;
    an mmfuse checkpoint (``mmfuse_fusion``, ``mmfuse_metamorph``, ``mmfuse_metaquery``, or another
    registered family's) gives that family's model.

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
    if model_type in VLM_MODEL_TYPES:
        return _load_vlm_language_model(path, cfg, device, dtype)
    if model_type in ("siglip", "siglip_vision_model"):
        return load_siglip(path, dtype, device)
    family = family_for_model_type(model_type)
    if family is not None:
        return family.load(path, dtype, device)
    known = ["llama", "qwen2", *VLM_MODEL_TYPES, "siglip", "siglip_vision_model",
             *(f.model_type for f in families().values())]
    raise CheckpointError(f"config model_type {model_type!r} is not supported ({', '.join(known)})")


def decoder_config(path: str | os.PathLike) -> DecoderConfig:
    """The :class:`DecoderConfig` of an LLM checkpoint (or of a VLM's language model), read from its
    ``config.json`` alone -- no weights are loaded."""
    cfg = read_config(path)
    return _vlm_text_config(cfg) if cfg.get("model_type") in VLM_MODEL_TYPES else DecoderConfig.from_hf(cfg)


def _vlm_text_config(cfg: dict) -> DecoderConfig:
    text_cfg = dict(cfg.get("text_config") or {})
    if not text_cfg:
        raise CheckpointError(f"config model_type {cfg.get('model_type')!r} has no text_config")
    text_cfg.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    return DecoderConfig.from_hf(text_cfg)


def _load_vlm_language_model(path, cfg: dict, device, dtype) -> Decoder:
    """The language model of a LLaVA / LLaVA-OneVision checkpoint as a :class:`Decoder` (the base of
    LlavaFusion and of MetaQuery's MLLM); the vision tower and projector stay in the file."""
    config = _vlm_text_config(cfg)
    files = checkpoint_files(path)
    names = tensor_names(files)
    for body, head in _VLM_LM_PREFIXES:
        if any(k.startswith(body) for k in names):
            break
    else:
        raise CheckpointError(f"no language-model tensors (language_model.model.* or model.language_model.*) in {path}")

    def to_decoder_name(key: str) -> str | None:
        if key.startswith(body):
            return "model." + key[len(body):]
        return "lm_head." + key[len(head):] if key.startswith(head) else None

    tensors = load_tensors(files, device, dtype, keep=lambda k: to_decoder_name(k) is not None)
    state = decoder_state_from_hf(config, {to_decoder_name(k): v for k, v in tensors.items()})
    return build_from_state(lambda: Decoder(config), state)


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
