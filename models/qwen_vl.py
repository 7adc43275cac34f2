"""Qwen2.5-VL whole: its ViT (windowed and full attention, 2D RoPE, patch merger) + the Qwen2 language
model with multimodal RoPE (MetaQuery's Large / X-Large base).

1. The processor cuts each image into ``patch_size``-pixel patches (two frames deep, a still image
   repeated) and gives them flattened, (N, 3 * 2 * p * p), with ``image_grid_thw`` (t, h, w) per image.
2. The tower embeds every patch, reorders them window by window (``window_size`` pixels square, in
   blocks of ``spatial_merge_size`` x ``spatial_merge_size`` patches) and runs its blocks: most attend
   within their window, those in ``fullatt_block_indexes`` across the whole image. Both are interval
   masks (each patch sees one contiguous run of the reordered sequence), so they run on
   ``mixed_attention`` without an N x N mask. Queries and keys rotate by the patch's (row, column).
3. The merger concatenates each block of 2 x 2 patches and projects it to the LLM's width; the image's
   tokens go back to raster order and fill the prompt's ``<|image_pad|>`` tokens.
4. The LLM reads them with 3D positions: text advances all three streams together, an image's tokens
   take (t, row, column) from where the text stopped, and the text after it starts past the larger of
   its height and width (transformers' ``get_rope_index``).

Loading is strict (every tensor consumed); videos are not supported.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmfuse.kernels import apply_rope, mixed_attention, rms_norm

from .decoder import Decoder, DecoderConfig, PromptLayout, decoder_state_from_hf
from .decoder import load_language_model as read_language_model
from .llava import fill_image_tokens
from .hf_io import CheckpointError, KeyRule, build_from_state, checkpoint_files, hf_to_native, load_tensors, read_config, rename

MODEL_TYPE = "qwen2_5_vl"
_LM_PREFIXES = ("model.language_model.", "model.")  # transformers 5's layout, then the released files'
_VISION_PREFIXES = ("model.visual.", "visual.")


@dataclass
class QwenVisionConfig:
    dim: int = 1280
    hidden_dim: int = 3420
    depth: int = 32
    num_heads: int = 16
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])
    out_dim: int = 3584
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    @classmethod
    def from_hf(cls, cfg: dict) -> "QwenVisionConfig":
        d = cls()
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"config vision_config.hidden_act={cfg['hidden_act']!r} is not supported (only silu)")
        rope = cfg.get("rope_parameters") or {}
        return cls(dim=cfg.get("hidden_size", d.dim), hidden_dim=cfg.get("intermediate_size", d.hidden_dim),
                   depth=cfg.get("depth", d.depth), num_heads=cfg.get("num_heads", d.num_heads),
                   patch_size=cfg.get("patch_size", d.patch_size),
                   temporal_patch_size=cfg.get("temporal_patch_size", d.temporal_patch_size),
                   in_channels=cfg.get("in_channels", d.in_channels),
                   spatial_merge_size=cfg.get("spatial_merge_size", d.spatial_merge_size),
                   window_size=cfg.get("window_size", d.window_size),
                   fullatt_block_indexes=list(cfg.get("fullatt_block_indexes", d.fullatt_block_indexes)),
                   out_dim=cfg.get("out_hidden_size", d.out_dim), rope_theta=float(rope.get("rope_theta", 10000.0)))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class QwenVisionBlock(nn.Module):
    def __init__(self, c: QwenVisionConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.norm1, self.norm2 = _RMSNorm(c.dim, c.norm_eps), _RMSNorm(c.dim, c.norm_eps)
        self.qkv, self.proj = nn.Linear(c.dim, 3 * c.dim), nn.Linear(c.dim, c.dim)
        self.gate, self.up, self.down = nn.Linear(c.dim, c.hidden_dim), nn.Linear(c.dim, c.hidden_dim), \
            nn.Linear(c.hidden_dim, c.dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_start: torch.Tensor,
                kv_end: torch.Tensor) -> torch.Tensor:
        """x (N, dim) patches in window order; cos / sin (N, head_dim); intervals int32 (N,)."""
        N = x.shape[0]
        q, k, v = self.qkv(self.norm1(x)).view(N, 3, self.num_heads, -1).permute(1, 2, 0, 3)[:, None].unbind(0)
        q, k = apply_rope(q, k, cos[None], sin[None])
        attn = mixed_attention(q, k, v, kv_start[None], kv_end[None])  # (1, H, N, Dh)
        x = x + self.proj(attn[0].transpose(0, 1).reshape(N, -1))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class QwenVisionTower(nn.Module):
    """Flattened patches (N, patch_dim) + ``grid_thw`` (n, 3) -> image tokens (N / merge^2, out_dim), raster order."""

    def __init__(self, config: QwenVisionConfig):
        super().__init__()
        c = self.config = config
        self.patch_embed = nn.Conv3d(c.in_channels, c.dim, kernel_size=(c.temporal_patch_size, c.patch_size, c.patch_size),
                                     stride=(c.temporal_patch_size, c.patch_size, c.patch_size), bias=False)
        self.blocks = nn.ModuleList(QwenVisionBlock(c) for _ in range(c.depth))
        merged = c.dim * c.spatial_merge_size**2
        self.merge_norm = _RMSNorm(c.dim, 1e-6)
        self.merge = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, c.out_dim))
        spatial = c.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / (c.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial)),
                             persistent=False)

    def reset_buffers(self, device: torch.device | str) -> None:
        if torch.device(device).type != "meta":
            spatial = self.config.head_dim // 2
            self.inv_freq = (1.0 / (self.config.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
                             ).to(device)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

        c = self.config
        if pixel_values.dim() != 2 or pixel_values.shape[1] != c.patch_dim:
            raise ValueError(f"pixel_values must be (N, {c.patch_dim}) flattened patches, got {tuple(pixel_values.shape)}")
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or int(grid_thw.prod(dim=1).sum()) != pixel_values.shape[0]:
            raise ValueError(f"image_grid_thw must be (n, 3) with sum(t * h * w) = {pixel_values.shape[0]} patches, got "
                             f"{grid_thw.tolist()}")
        unit = c.spatial_merge_size**2
        window, cu_windows = get_vision_window_index(grid_thw, c.spatial_merge_size, c.window_size, c.patch_size)
        cu_images = get_vision_cu_seqlens(grid_thw)
        order = (window[:, None] * unit + torch.arange(unit, device=window.device)).flatten()  # patch order
        x = self.patch_embed(pixel_values.view(-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
                             .to(self.patch_embed.weight.dtype)).view(-1, c.dim)[order]
        rows_cols = get_vision_position_ids(grid_thw, c.spatial_merge_size).to(x.device)[order]
        freqs = (rows_cols[..., None].float() * self.inv_freq).flatten(1)  # (N, head_dim / 2): rows, then columns
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
        windowed, whole = _intervals(cu_windows.to(x.device), x.shape[0]), _intervals(cu_images.to(x.device), x.shape[0])
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, *(whole if i in c.fullatt_block_indexes else windowed))
        tokens = self.merge(self.merge_norm(x).view(-1, c.dim * unit))
        return tokens[torch.argsort(window)]


def _intervals(cu: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative segment boundaries (S + 1,) -> each position's segment [start, end), int32 (n,) each."""
    segment = torch.searchsorted(cu[1:].long(), torch.arange(n, device=cu.device), right=True)
    return cu[segment].to(torch.int32).contiguous(), cu[segment + 1].to(torch.int32).contiguous()


@dataclass
class QwenVLConfig:
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653


class Qwen25VL(nn.Module):
    """Tower + LLM; :meth:`layout` lays a processor's output out for ``generate``."""

    PROCESSOR_INPUTS = ("pixel_values", "image_grid_thw")

    def __init__(self, config: QwenVLConfig, vision: QwenVisionTower, decoder: Decoder | None):
        """``decoder`` None: the image side alone (a family's reader, see :meth:`reader`)."""
        super().__init__()
        self.config, self.vision, self.decoder = config, vision, decoder

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_grid_thw: torch.Tensor | None = None, token_embed: nn.Module | None = None) -> torch.Tensor:
        """(B, L) ids with expanded image tokens -> (B, L, dim); ``token_embed`` default the VLM's own."""
        if (input_ids == self.config.video_token_id).any():
            raise ValueError("input_ids hold video tokens: videos are not supported")
        features = None if pixel_values is None else (lambda: self.vision(pixel_values, image_grid_thw))
        embed = token_embed if token_embed is not None else self.decoder.embed
        return fill_image_tokens(embed(input_ids), input_ids == self.config.image_token_id, features, "image")

    def reader(self) -> "Qwen25VL":
        """The image side alone (the tower and the 3D positions; no language model), sharing its weights."""
        return Qwen25VL(self.config, self.vision, None)

    def collate(self, pictures: list[dict]) -> dict[str, torch.Tensor]:
        """Single pictures as the image processor gives them (``pixel_values`` (n_i, patch_dim),
        ``image_grid_thw`` (1, 3)) -> one batch of them."""
        return {"pixel_values": torch.cat([p["pixel_values"] for p in pictures]),
                "image_grid_thw": torch.cat([p["image_grid_thw"] for p in pictures])}

    def features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Each picture's tokens (T_i, dim), T_i = t * h * w / merge^2."""
        counts = (image_grid_thw.prod(dim=1) // self.vision.config.spatial_merge_size**2).tolist()
        return list(self.vision(pixel_values, image_grid_thw).split(counts))

    def image_tokens(self, count: int) -> list[int]:
        """The prompt tokens of a picture with ``count`` tokens, as the chat template and processor write it."""
        c = self.config
        return [c.vision_start_token_id, *[c.image_token_id] * count, c.vision_end_token_id]

    def rope_positions(self, input_ids: torch.Tensor, mask: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                       **images) -> torch.Tensor:
        return self.positions(input_ids, mask, image_grid_thw)

    def reader_config(self) -> dict:
        return {"kind": MODEL_TYPE, "qwen_vl": dataclasses.asdict(self.config),
                "vision": dataclasses.asdict(self.vision.config)}

    @classmethod
    def from_reader_config(cls, cfg: dict) -> "Qwen25VL":
        return cls(QwenVLConfig(**cfg["qwen_vl"]), QwenVisionTower(QwenVisionConfig(**cfg["vision"])), None)

    def positions(self, input_ids: torch.Tensor, mask: torch.Tensor, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """(3, B, L) multimodal RoPE positions (padding 0), as transformers' ``get_rope_index`` for images."""
        merge = self.vision.config.spatial_merge_size
        out = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=input_ids.device)
        grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
        for b in range(input_ids.shape[0]):
            real = mask[b].bool()
            kinds = (input_ids[b][real] == self.config.image_token_id).tolist()
            pieces, pos = [], 0
            for is_image, run in itertools.groupby(kinds):
                n = len(list(run))
                if not is_image:
                    pieces.append(torch.arange(pos, pos + n, device=out.device).expand(3, n))
                    pos += n
                    continue
                t, h, w = next(grids)
                tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h // merge), torch.arange(w // merge), indexing="ij")
                pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1).to(out.device) + pos)
                pos += max(h, w) // merge
            out[:, b, real] = torch.cat(pieces, dim=1) if pieces else out[:, b, real]
        return out

    def layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
               token_embed: nn.Module | None = None) -> PromptLayout:
        """Left-padded processor output -> the causal :class:`PromptLayout` (3D positions) ``generate`` prefills."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return PromptLayout.causal(input_ids, attention_mask,
                                   self.embed(input_ids, pixel_values, image_grid_thw, token_embed),
                                   self.positions(input_ids, mask, image_grid_thw))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V), as transformers' ``Qwen2_5_VLForConditionalGeneration(...).logits``."""
        layout = self.layout(input_ids, attention_mask, pixel_values, image_grid_thw)
        hidden = self.decoder(inputs_embeds=layout.inputs_embeds, position_ids=layout.position_ids,
                              kv_start=layout.kv_start, kv_end=layout.kv_end)
        return self.decoder.logits(hidden)


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints
# ----------------------------------------------------------------------------------------------


def text_config(cfg: dict) -> DecoderConfig:
    text = dict(cfg.get("text_config") or {})
    if not text:
        raise CheckpointError("config model_type 'qwen2_5_vl' has no text_config")
    text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    return DecoderConfig.from_hf(text)


def vision_key_map(c: QwenVisionConfig, prefix: str) -> list[KeyRule]:
    rules = [rename("patch_embed.weight", f"{prefix}patch_embed.proj.weight"),
             rename("merge_norm.weight", f"{prefix}merger.ln_q.weight")]
    for i, j in ((0, 0), (2, 2)):
        rules += [rename(f"merge.{i}.{p}", f"{prefix}merger.mlp.{j}.{p}") for p in ("weight", "bias")]
    for b in range(c.depth):
        hf, me = f"{prefix}blocks.{b}", f"blocks.{b}"
        rules += [rename(f"{me}.norm1.weight", f"{hf}.norm1.weight"), rename(f"{me}.norm2.weight", f"{hf}.norm2.weight")]
        for mine, theirs in (("qkv", "attn.qkv"), ("proj", "attn.proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
                             ("down", "mlp.down_proj")):
            rules += [rename(f"{me}.{mine}.{p}", f"{hf}.{theirs}.{p}") for p in ("weight", "bias")]
    return rules


def _language_model_names(names: list[str]) -> dict[str, str]:
    body = next(p for p in _LM_PREFIXES if any(k.startswith(p) and not k.startswith("model.visual.") for k in names))
    out = {}
    for k in names:
        if k.startswith(body) and not k.startswith(_VISION_PREFIXES):
            out[k] = "model." + k[len(body):]
        elif k.startswith("lm_head."):
            out[k] = k
    return out


def load_language_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> Decoder:
    """Only the language model (M-RoPE decoder) of a Qwen2.5-VL checkpoint."""
    return read_language_model(path, text_config(read_config(path)), _language_model_names, dtype, device)


def load_qwen25_vl(path: str | os.PathLike, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> Qwen25VL:
    """The whole Qwen2.5-VL of a checkpoint folder.

    Raises:
        CheckpointError: an unsupported config, a missing, unexpected or mis-shaped tensor (named).
    """
    cfg = read_config(path)
    _configs(cfg)  # a bad config is named before any tensor is read
    return qwen_vl_from_hf(cfg, load_tensors(checkpoint_files(path), torch.device(device or "cpu"), dtype), path)


def _configs(cfg: dict) -> tuple[QwenVLConfig, DecoderConfig, QwenVisionConfig]:
    dec_cfg, vision_cfg = text_config(cfg), QwenVisionConfig.from_hf(cfg.get("vision_config") or {})
    if not dec_cfg.mrope_section:
        raise CheckpointError("config text_config.rope_parameters has no mrope_section")
    d = QwenVLConfig()
    config = QwenVLConfig(**{f: cfg.get(f, getattr(d, f)) for f in ("image_token_id", "video_token_id",
                                                                     "vision_start_token_id", "vision_end_token_id")})
    return config, dec_cfg, vision_cfg


def qwen_vl_from_hf(cfg: dict, tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> Qwen25VL:
    """The VLM from a transformers ``config.json`` dict and its tensors (a file's, or a model's
    ``state_dict()``), mapped strictly; ``path`` names them in errors."""
    config, dec_cfg, vision_cfg = _configs(cfg)
    lm = _language_model_names(list(tensors))
    state = {f"decoder.{k}": v for k, v in decoder_state_from_hf(dec_cfg, {lm[k]: tensors[k] for k in lm}).items()}
    rest = {k: v for k, v in tensors.items() if k not in lm}
    prefix = next((p for p in _VISION_PREFIXES if any(k.startswith(p) for k in rest)), None)
    if prefix is None:
        raise CheckpointError(f"no vision-tower tensors (visual.*) in {path}")
    state.update({f"vision.{k}": v for k, v in hf_to_native(rest, vision_key_map(vision_cfg, prefix)).items()})
    return build_from_state(lambda: Qwen25VL(config, QwenVisionTower(vision_cfg), Decoder(dec_cfg)), state)
