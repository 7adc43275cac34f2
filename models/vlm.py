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

from typing import Mapping, Sequence

import torch
from torch import nn

from .decoder import PromptLayout
from .hf_io import CheckpointError
from .llava import LlavaVLM, fill_image_tokens
from .qwen_vl import MODEL_TYPE as QWEN_VL
from .qwen_vl import Qwen25VL
from .vae import LatentImages

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


def layout_pieces(reader: nn.Module, token_embed: nn.Module, rows: Sequence[Sequence[torch.Tensor | dict]],
                  device: torch.device | str) -> PromptLayout:
    """Prompts given as pieces -> their causal layout, left-padded (empty rows allowed: all padding).

    Each row is a sequence of 1-D token-id tensors and pictures, a picture being one dict of what the
    VLM's image processor gives for it (e.g. ``pixel_values`` and ``image_sizes``). The tower runs
    once over every picture; each picture's place becomes as many image tokens as it has features
    (``reader.image_tokens``), filled with them; positions are the reader's (Qwen2.5-VL: 3D).
    """
    pictures = [p for row in rows for p in row if isinstance(p, dict)]
    images = reader.collate([{k: v.to(device) for k, v in p.items()} for p in pictures]) if pictures else {}
    features = reader.features(**images) if pictures else []
    counts = iter(f.shape[0] for f in features)
    id_rows = [[torch.tensor(reader.image_tokens(next(counts))) if isinstance(p, dict) else p.reshape(-1).long().cpu()
                for p in row] for row in rows]
    id_rows = [torch.cat(r) if r else torch.zeros(0, dtype=torch.long) for r in id_rows]
    width = max([1] + [r.numel() for r in id_rows])
    ids = torch.zeros(len(id_rows), width, dtype=torch.long)
    mask = torch.zeros(len(id_rows), width, dtype=torch.long)
    for i, r in enumerate(id_rows):
        if r.numel():
            ids[i, width - r.numel():], mask[i, width - r.numel():] = r, 1
    ids, mask = ids.to(device), mask.to(device)
    slots = (ids == reader.config.image_token_id) & mask.bool()
    embeds = fill_image_tokens(token_embed(ids), slots, (lambda: torch.cat(features)) if features else None, "image")
    return PromptLayout.causal(ids, mask, embeds, reader.rope_positions(ids, mask, **images))


class ReaderImages(LatentImages):
    """A family's image input on a VLM base: target images as latents (:class:`LatentImages`), source
    pictures (``"diffuse": false``) as the reader's image processor gives them (one dict each),
    which :func:`layout_pieces` reads through the tower."""

    def __init__(self, codec, latent_shape: tuple[int, int, int], image_processor):
        super().__init__(codec, latent_shape)
        self.image_processor = image_processor

    def source(self, picture) -> dict[str, torch.Tensor]:
        out = self.image_processor(images=[picture.convert("RGB")], return_tensors="pt")
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}

    def read(self, pictures: list, device: torch.device | str | None = None) -> list[dict[str, torch.Tensor]]:
        """Pictures in a prompt -> the reader's inputs (moved to the device where they are read)."""
        return [self.source(p) for p in pictures]


def freeze(reader: nn.Module | None) -> None:
    if reader is not None:
        reader.requires_grad_(False)
