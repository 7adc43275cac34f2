"""``from_pretrained`` / ``save_pretrained``: dispatch on ``config.json``'s ``model_type``."""
from __future__ import annotations

import os

import torch

from .decoder import Decoder, DecoderConfig, decoder_state_from_hf, decoder_state_to_hf
from .family import families, family_for_model_type
from .hf_io import CheckpointError, build_from_state, checkpoint_files, load_tensors, read_config, save_checkpoint
from .llava import MODEL_TYPES as LLAVA_MODEL_TYPES
from .llava import load_language_model, load_llava, text_config
from .qwen_vl import MODEL_TYPE as QWEN_VL
from . import qwen_vl
from .siglip import SiglipVisionTower, load_siglip, save_siglip

VLM_MODEL_TYPES = (*LLAVA_MODEL_TYPES, QWEN_VL)
LLM_MODEL_TYPES = ("llama", "qwen2", *VLM_MODEL_TYPES)  # what a family can be built on


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> torch.nn.Module:
    """Load a Hugging Face checkpoint folder (config.json + safetensors, single or sharded).

    A VLM checkpoint (``llava``, ``llava_next``, ``llava_onevision``, ``qwen2_5_vl``) gives the whole
    :class:`~mmfuse.models.llava.LlavaVLM` / :class:`~mmfuse.models.qwen_vl.Qwen25VL` (its tower,
    projector and language model; for the language model alone, :func:`language_model`);
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
    if model_type == QWEN_VL:
        return qwen_vl.load_qwen25_vl(path, dtype, device)
    if model_type in VLM_MODEL_TYPES:
        return load_llava(path, dtype, device)
    if model_type in ("siglip", "siglip_vision_model", "clip_vision_model"):
        return load_siglip(path, dtype, device)
    family = family_for_model_type(model_type)
    if family is not None:
        return family.load(path, dtype, device)
    known = ["llama", "qwen2", *VLM_MODEL_TYPES, "siglip", "siglip_vision_model", "clip_vision_model",
             *(f.model_type for f in families().values())]
    raise CheckpointError(f"config model_type {model_type!r} is not supported ({', '.join(known)})")


def decoder_config(path: str | os.PathLike) -> DecoderConfig:
    """The :class:`DecoderConfig` of an LLM checkpoint (or of a VLM's language model), read from its
    ``config.json`` alone -- no weights are loaded."""
    cfg = read_config(path)
    if cfg.get("model_type") == QWEN_VL:
        return qwen_vl.text_config(cfg)
    return text_config(cfg) if cfg.get("model_type") in VLM_MODEL_TYPES else DecoderConfig.from_hf(cfg)


def language_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> Decoder:
    """The LLM of a checkpoint as a :class:`Decoder`: a Llama / Qwen2 one, or a VLM's language model
    (its tower and projector are not read) -- the base a family builds on.

    Raises:
        CheckpointError: the folder holds no LLM, or a broken one.
    """
    model_type = read_config(path).get("model_type")
    if model_type == QWEN_VL:
        return qwen_vl.load_language_model(path, dtype, device)
    if model_type in VLM_MODEL_TYPES:
        return load_language_model(path, dtype, device)
    model = from_pretrained(path, dtype, device)
    if not isinstance(model, Decoder):
        raise CheckpointError(f"{path} holds a {type(model).__name__}, not an LLM (llama / qwen2 / a LLaVA VLM)")
    return model


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
