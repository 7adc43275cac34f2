"""A VLM's image side as a part of a family model: the *reader*.

A family built on a VLM checkpoint (LlavaFusion on LLaVA-NeXT, MetaQuery on LLaVA-OneVision or
Qwen2.5-VL) keeps the VLM's way of reading pictures -- its tower, projector (and anyres packing, or
Qwen2.5-VL's 3D positions) -- beside its own language model. The reader is the VLM object without its
language model (:meth:`LlavaVLM.reader`, :meth:`Qwen25VL.reader`); it is frozen, and it lays out a
prompt as the VLM's processor gives it:

    layout = read_prompt(model.reader, model.decoder.embed, processor(images=..., text=..., ...))

A family checkpoint stores the reader's tensors under ``reader.*`` and its config as ``"reader"`` in
``config.json`` (:func:`reader_config` / :func:`build_reader`).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .decoder import PromptLayout
from .hf_io import CheckpointError
from .llava import LlavaVLM
from .qwen_vl import MODEL_TYPE as QWEN_VL
from .qwen_vl import Qwen25VL

READERS: dict[str, type] = {"llava": LlavaVLM, QWEN_VL: Qwen25VL}
VLM_CLASSES = (LlavaVLM, Qwen25VL)


def is_vlm(model: nn.Module) -> bool:
    """A whole VLM (tower + language model), as :func:`mmfuse.models.from_pretrained` gives one."""
    return isinstance(model, VLM_CLASSES) and model.decoder is not None


def reader_config(reader: nn.Module) -> dict:
    """The reader's config, for a family checkpoint's ``config.json``."""
    return reader.reader_config()


def build_reader(cfg: Mapping) -> nn.Module:
    """A reader (random weights; build it on the meta device and load its tensors) from :func:`reader_config`."""
    kind = cfg.get("kind") if isinstance(cfg, Mapping) else None
    if kind not in READERS:
        raise CheckpointError(f"config reader.kind={kind!r} is not a VLM reader ({', '.join(READERS)})")
    return READERS[kind].from_reader_config(dict(cfg))


def read_prompt(reader: nn.Module, token_embed: nn.Module, processed: Mapping[str, torch.Tensor]) -> PromptLayout:
    """A processor's left-padded output (``input_ids``, ``attention_mask`` and the reader's image
    inputs, e.g. ``pixel_values`` / ``image_sizes``) -> the causal prompt layout, token embeddings from
    ``token_embed`` (the family's language model)."""
    images = {k: processed[k] for k in reader.PROCESSOR_INPUTS if k in processed}
    return reader.layout(processed["input_ids"], processed.get("attention_mask"), **images, token_embed=token_embed)


def freeze(reader: nn.Module | None) -> None:
    if reader is not None:
        reader.requires_grad_(False)
