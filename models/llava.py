"""LLaVA-family VLMs, whole: vision tower + projector + language model (LLaVA, LLaVA-NeXT, LLaVA-OneVision).

A VLM is the base of LlavaFusion (LLaVA-NeXT) and of MetaQuery (LLaVA-OneVision). Its prompt holds
``<image>`` placeholder tokens, already expanded by the checkpoint's transformers processor to one
token per image feature; :meth:`LlavaVLM.embed` puts the image features there:

1. the tower (SigLIP or CLIP, :mod:`mmfuse.models.siglip`; bidirectional attention on
   ``mixed_attention``) reads every tile, and ``vision_feature_layer``'s hidden state is taken
   (``"default"`` strategy: without the first, CLS, token);
2. the projector (Linear-GELU-Linear) maps it to the LLM's width;
3. LLaVA-NeXT / OneVision ("anyres"): the tiles of an image are laid back into one grid, the padding
   the processor added is cut away, OneVision shrinks a grid over ``anyres_max_N`` tiles bilinearly,
   a learned ``image_newline`` ends every row, and the base (whole-image) tile's features come first.

Loading is strict: every tensor of the file is consumed (language model, tower, projector, newline).
The forward is transformers' ``*ForConditionalGeneration`` on the same inputs (``input_ids``,
``pixel_values``, ``image_sizes`` as the processor gives them).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import Decoder, DecoderConfig, PromptLayout, decoder_state_from_hf
from .decoder import load_language_model as read_language_model
from .hf_io import (CheckpointError, build_from_state, checkpoint_files, hf_to_native, load_tensors, read_config,
                    rename)
from .siglip import SiglipVisionConfig, SiglipVisionTower, siglip_state_from_hf

MODEL_TYPES = ("llava", "llava_next", "llava_onevision")
_ANYRES = ("llava_next", "llava_onevision")
# Where the parts sit in a checkpoint: transformers 4's layout, then transformers 5's own.
_LM_PREFIXES = (("language_model.model.", "language_model.lm_head."), ("model.language_model.", "lm_head."))
_PART_PREFIXES = ("model.", "")


@dataclass
class LlavaConfig:
    """The VLM's own settings (its tower's and LLM's configs are theirs)."""

    model_type: str = "llava_onevision"
    image_token_id: int = 151646
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "full"  # "default": drop the tower's first (CLS) token
    image_grid_pinpoints: list = field(default_factory=list)  # anyres: the tiled resolutions (height, width)
    vision_aspect_ratio: str | None = "anyres_max_9"  # OneVision: the most tiles a grid keeps unshrunk
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlavaConfig":
        model_type = cfg.get("model_type")
        if model_type not in MODEL_TYPES:
            raise CheckpointError(f"config model_type {model_type!r} is not a LLaVA VLM {MODEL_TYPES}")
        layer = cfg.get("vision_feature_layer", -2 if model_type != "llava_onevision" else -1)
        if not isinstance(layer, int):
            raise CheckpointError(f"config vision_feature_layer={layer!r} is not supported (one layer)")
        strategy = cfg.get("vision_feature_select_strategy", "full" if model_type == "llava_onevision" else "default")
        if strategy not in ("default", "full"):
            raise CheckpointError(f"config vision_feature_select_strategy={strategy!r} is not 'default' or 'full'")
        act = cfg.get("projector_hidden_act", "gelu")
        if act != "gelu":
            raise CheckpointError(f"config projector_hidden_act={act!r} is not supported (only 'gelu')")
        return cls(model_type=model_type, image_token_id=cfg.get("image_token_index", cfg.get("image_token_id")),
                   vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                   image_grid_pinpoints=[list(p) for p in cfg.get("image_grid_pinpoints") or []],
                   vision_aspect_ratio=cfg.get("vision_aspect_ratio") if model_type == "llava_onevision" else None,
                   projector_bias=bool(cfg.get("multimodal_projector_bias", True)))


class LlavaVLM(nn.Module):
    PROCESSOR_INPUTS = ("pixel_values", "image_sizes")  # what :meth:`layout` takes of a processor's output

    def __init__(self, config: LlavaConfig, vision: SiglipVisionTower, decoder: Decoder | None, dim: int | None = None):
        """``decoder`` None: the image side alone (a family's reader, see :meth:`reader`), projecting to ``dim``."""
        super().__init__()
        self.config, self.vision, self.decoder = config, vision, decoder
        width, dim, bias = vision.config.dim, decoder.config.dim if decoder is not None else dim, config.projector_bias
        self.projector = nn.Sequential(nn.Linear(width, dim, bias=bias), nn.GELU(), nn.Linear(dim, dim, bias=bias))
        self.image_newline = nn.Parameter(torch.zeros(dim)) if config.model_type in _ANYRES else None

    # ------------------------------------------------------------------ images

    def tiles_per_image(self, image_sizes: torch.Tensor) -> list[int]:
        """How many tiles the processor made of each image ((N, 2) original (height, width))."""
        if self.config.model_type not in _ANYRES:
            return [1] * len(image_sizes)
        tile = self.vision.config.image_size
        return [math.ceil(h / tile) * math.ceil(w / tile) + 1
                for h, w in (self._best_resolution(s) for s in image_sizes.tolist())]

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The features each image puts in the prompt, (T_i, dim) per image.

        Args:
            pixel_values: (N, 3, S, S) for LLaVA; (N, max_tiles, 3, S, S) for anyres (as the processor
                pads them; the real tiles of each image come first).
            image_sizes: (N, 2) original (height, width) of each image (anyres only).
        """
        c, v = self.config, self.vision.config
        if c.model_type in _ANYRES:
            if image_sizes is None or image_sizes.shape != (pixel_values.shape[0], 2):
                raise ValueError(f"image_sizes must be ({pixel_values.shape[0]}, 2) (height, width per image), got "
                                 f"{None if image_sizes is None else tuple(image_sizes.shape)}")
            counts = self.tiles_per_image(image_sizes)
            tiles = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)]) if pixel_values.dim() == 5 else pixel_values
        else:
            counts, tiles = [1] * pixel_values.shape[0], pixel_values
        hidden = self.vision.features(tiles, c.vision_feature_layer)
        if c.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        features = self.projector(hidden).split(counts)
        if c.model_type not in _ANYRES:
            return [f[0] for f in features]
        return [self._pack(f, size) for f, size in zip(features, image_sizes.tolist())]

    def _best_resolution(self, size: list[int]) -> tuple[int, int]:
        from transformers.image_processing_utils import select_best_resolution

        return select_best_resolution(list(size), self.config.image_grid_pinpoints)

    def _pack(self, features: torch.Tensor, size: list[int]) -> torch.Tensor:
        """(tiles, grid * grid, dim) of one image -> its prompt features: the base tile, then the tiles'
        grid unpadded (and shrunk, OneVision), a newline after every row."""
        newline = self.image_newline
        if features.shape[0] == 1:
            return torch.cat([features[0], newline[None].to(features.dtype)]) if newline is not None else features[0]
        g, tile = self.vision.config.grid, self.vision.config.image_size
        rows, cols = (x // tile for x in self._best_resolution(size))
        grid = features[1:].view(rows, cols, g, g, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        grid = _unpad(grid, size)
        if self.config.vision_aspect_ratio:
            most = int(self.config.vision_aspect_ratio.removeprefix("anyres_max_"))
            ratio = math.sqrt(grid.shape[1] * grid.shape[2] / (most * g**2))
            if ratio > 1.1:
                grid = F.interpolate(grid[None], [int(grid.shape[1] // ratio), int(grid.shape[2] // ratio)],
                                     mode="bilinear")[0]
        grid = torch.cat([grid, newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.dtype)], dim=-1)
        return torch.cat([features[0], grid.flatten(1, 2).transpose(0, 1)])

    # ------------------------------------------------------------------ the language model

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_sizes: torch.Tensor | None = None, token_embed: nn.Module | None = None) -> torch.Tensor:
        """(B, L) ids with expanded ``<image>`` tokens -> (B, L, dim) embeddings, image features in place.
        ``token_embed``: the token embedding (default the VLM's own language model's)."""
        features = None if pixel_values is None else (lambda: torch.cat(self.image_features(pixel_values, image_sizes)))
        embed = token_embed if token_embed is not None else self.decoder.embed
        return fill_image_tokens(embed(input_ids), input_ids == self.config.image_token_id, features, "<image>")

    def layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               pixel_values: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
               token_embed: nn.Module | None = None) -> PromptLayout:
        """Left-padded processor output -> the causal :class:`PromptLayout` that ``generate`` prefills."""
        return PromptLayout.causal(input_ids, attention_mask,
                                   self.embed(input_ids, pixel_values, image_sizes, token_embed))

    # ------------------------------------------------------------------ as a family's reader

    def reader(self) -> "LlavaVLM":
        """The image side alone (tower, projector, newline; no language model), sharing these weights:
        what a family built on this VLM (LlavaFusion, MetaQuery) reads pictures with."""
        with torch.device("meta"):
            part = LlavaVLM(self.config, SiglipVisionTower(self.vision.config), None, self.decoder.config.dim)
        part.vision, part.projector, part.image_newline = self.vision, self.projector, self.image_newline
        return part

    def collate(self, pictures: list[dict]) -> dict[str, torch.Tensor]:
        """Single pictures as the image processor gives them (``pixel_values`` (1, [tiles,] 3, S, S),
        ``image_sizes`` (1, 2)) -> one batch of them (tiles zero-padded, as the processor pads)."""
        pixels = [p["pixel_values"] for p in pictures]
        if pixels[0].dim() == 5:
            most = max(t.shape[1] for t in pixels)
            pixels = [F.pad(t, (0, 0, 0, 0, 0, 0, 0, most - t.shape[1])) for t in pixels]
        out = {"pixel_values": torch.cat(pixels)}
        if self.config.model_type in _ANYRES:
            out["image_sizes"] = torch.cat([p["image_sizes"] for p in pictures])
        return out

    def features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each picture's features (T_i, dim) (see :meth:`image_features`)."""
        return self.image_features(pixel_values, image_sizes)

    def image_tokens(self, count: int) -> list[int]:
        """The prompt tokens of a picture with ``count`` features: that many ``<image>`` tokens."""
        return [self.config.image_token_id] * count

    def rope_positions(self, input_ids: torch.Tensor, mask: torch.Tensor, **images) -> None:
        return None  # one position per token, counted causally

    def reader_config(self) -> dict:
        """What :meth:`from_reader_config` rebuilds the image side from (a family checkpoint's config.json)."""
        return {"kind": "llava", "llava": dataclasses.asdict(self.config),
                "vision": dataclasses.asdict(self.vision.config), "dim": self.projector[-1].out_features}

    @classmethod
    def from_reader_config(cls, cfg: dict) -> "LlavaVLM":
        return cls(LlavaConfig(**cfg["llava"]), SiglipVisionTower(SiglipVisionConfig(**cfg["vision"])), None, cfg["dim"])

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_sizes: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V), as transformers' ``...ForConditionalGeneration(...).logits``."""
        layout = self.layout(input_ids, attention_mask, pixel_values, image_sizes)
        hidden = self.decoder(inputs_embeds=layout.inputs_embeds, position_ids=layout.position_ids,
                              kv_start=layout.kv_start, kv_end=layout.kv_end)
        return self.decoder.logits(hidden)


def fill_image_tokens(embeds: torch.Tensor, slots: torch.Tensor, features, token: str) -> torch.Tensor:
    """A VLM prompt's embeddings (B, L, dim) with its image tokens' slots (B, L) filled, in order, by
    ``features()`` (N, dim) -- None when no pixels were given; the counts must agree."""
    if features is None:
        if slots.any():
            raise ValueError(f"input_ids hold {int(slots.sum())} {token} tokens but no pixel_values were given")
        return embeds
    values = features()
    if int(slots.sum()) != values.shape[0]:
        raise ValueError(f"input_ids hold {int(slots.sum())} {token} tokens but the images give {values.shape[0]} "
                         "features: expand the placeholders with the checkpoint's processor")
    return embeds.masked_scatter(slots[..., None], values.to(embeds.dtype))


def _unpad(grid: torch.Tensor, size: list[int]) -> torch.Tensor:
    """(C, H, W) features of a padded, resized image -> the part that is the original image (h, w)."""
    h, w = size
    H, W = grid.shape[1:]
    if w / h > W / H:
        pad = (H - int(round(h * (W / w), 7))) // 2
        return grid[:, pad:H - pad, :]
    pad = (W - int(round(w * (H / h), 7))) // 2
    return grid[:, :, pad:W - pad]


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints
# ----------------------------------------------------------------------------------------------


def text_config(cfg: dict) -> DecoderConfig:
    """The language model's :class:`DecoderConfig` of a VLM ``config.json``."""
    text_cfg = dict(cfg.get("text_config") or {})
    if not text_cfg:
        raise CheckpointError(f"config model_type {cfg.get('model_type')!r} has no text_config")
    # transformers 5 ties a VLM's LM head by the top-level flag alone (default False), whatever
    # text_config says: a text_config with tie_word_embeddings=true beside an untied head is common
    text_cfg["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    return DecoderConfig.from_hf(text_cfg)


def language_model_names(names: list[str], where) -> dict[str, str]:
    """Checkpoint name -> the decoder's HF name (``model.*`` / ``lm_head.*``) of the language model's tensors."""
    for body, head in _LM_PREFIXES:
        if any(k.startswith(body) for k in names):
            break
    else:
        raise CheckpointError(f"no language-model tensors (language_model.model.* or model.language_model.*) in {where}")
    out = {}
    for k in names:
        if k.startswith(body):
            out[k] = "model." + k[len(body):]
        elif k.startswith(head):
            out[k] = "lm_head." + k[len(head):]
    return out


def load_language_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> Decoder:
    """Only the language model of a VLM checkpoint (the tower and projector stay in the file)."""
    return read_language_model(path, text_config(read_config(path)), lambda names: language_model_names(names, path),
                               dtype, device)


def load_llava(path: str | os.PathLike, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> LlavaVLM:
    """The whole VLM of a LLaVA / LLaVA-NeXT / LLaVA-OneVision checkpoint folder.

    Raises:
        CheckpointError: an unsupported config, a missing, unexpected or mis-shaped tensor (named).
    """
    cfg = read_config(path)
    _configs(cfg)  # a bad config is named before any tensor is read
    return llava_from_hf(cfg, load_tensors(checkpoint_files(path), torch.device(device or "cpu"), dtype), path)


def _configs(cfg: dict) -> tuple[LlavaConfig, DecoderConfig, SiglipVisionConfig]:
    config, dec_cfg = LlavaConfig.from_hf(cfg), text_config(cfg)
    vision_cfg = SiglipVisionConfig.from_hf(cfg.get("vision_config") or {"model_type": "clip_vision_model"})
    if config.model_type in _ANYRES and not config.image_grid_pinpoints:
        raise CheckpointError(f"config model_type {config.model_type!r} needs image_grid_pinpoints")
    return config, dec_cfg, vision_cfg


def llava_from_hf(cfg: dict, tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> LlavaVLM:
    """The VLM from a transformers ``config.json`` dict and its tensors (a file's, or a model's
    ``state_dict()``), mapped strictly; ``path`` names them in errors."""
    config, dec_cfg, vision_cfg = _configs(cfg)
    lm = language_model_names(list(tensors), path)
    state = {f"decoder.{k}": v for k, v in decoder_state_from_hf(dec_cfg, {lm[k]: tensors[k] for k in lm}).items()}
    rest = {k: v for k, v in tensors.items() if k not in lm}
    prefix = next((p for p in _PART_PREFIXES if any(k.startswith(f"{p}vision_tower.") for k in rest)), None)
    if prefix is None:
        raise CheckpointError(f"no vision-tower tensors (vision_tower.*) in {path}")
    tower = {k[len(prefix) + len("vision_tower."):]: v for k, v in rest.items() if k.startswith(f"{prefix}vision_tower.")}
    state.update({f"vision.{k}": v for k, v in siglip_state_from_hf(vision_cfg, tower).items()})
    rules = [rename(f"projector.{i}.{p}", f"{prefix}multi_modal_projector.linear_{j}.{p}")
             for i, j in ((0, 1), (2, 2)) for p in ("weight", "bias") if p == "weight" or config.projector_bias]
    if config.model_type in _ANYRES:
        rules.append(rename("image_newline", f"{prefix}image_newline"))
    others = {k: v for k, v in rest.items() if not k.startswith(f"{prefix}vision_tower.")}
    state.update(hf_to_native(others, rules))
    return build_from_state(lambda: LlavaVLM(config, SiglipVisionTower(vision_cfg), Decoder(dec_cfg)), state)
