"""The SigLIP vision tower (MetaMorph's image encoder, so400m-14@384; LLaVA-OneVision's), and the CLIP
one (LLaVA / LLaVA-NeXT's), loading Hugging Face safetensors.

Patch embedding -> learned position embeddings -> pre-norm encoder layers (bidirectional attention
through :func:`mixed_attention`, GELU MLP) -> post LayerNorm. The output is transformers'
``SiglipVisionModel(...).last_hidden_state``; the attention-pooling head (``head.*``) is not built:
MetaMorph reads the patch features, so a checkpoint's head tensors are accepted and ignored. CLIP
(``kind="clip"``) differs only in a class token before the patches, a LayerNorm before the first
layer, no patch-embedding bias and quick-GELU; ``features(pixels, layer=-2)`` gives a hidden state
as VLMs read it (transformers' ``hidden_states[layer]``, running only the layers it needs).

Three checkpoint layouts load: a transformers 5 ``SiglipVisionModel`` (unprefixed tensors), a
transformers 4 one (``vision_model.`` prefix) and a full ``SiglipModel`` (``vision_model.`` prefix,
``vision_config`` in config.json; its text tower and ``logit_scale``/``logit_bias`` are ignored).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmfuse.kernels import mixed_attention
from mmfuse.kernels._common import FLOAT_DTYPES, check_tensor

from .hf_io import (CheckpointError, KeyRule, build_from_state, checkpoint_files, fuse, hf_to_native, load_tensors,
                    native_to_hf, read_config, rename, save_checkpoint)

# transformers' activation names -> F.gelu's ``approximate``
_GELU_APPROXIMATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none", "quick_gelu": "quick"}
_HEAD_TENSORS = ("probe", "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight",
                 "attention.out_proj.bias", "layernorm.weight", "layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias")
_FULL_MODEL_EXTRAS = ("logit_scale", "logit_bias")


@dataclass
class SiglipVisionConfig:
    """Defaults are transformers' ``SiglipVisionConfig`` defaults (released config.json files omit some)."""

    dim: int = 768
    hidden_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    use_head: bool = True  # whether the checkpoint may carry ``head.*`` (ignored either way)
    with_text_tower: bool = False  # read from a full ``siglip`` checkpoint
    kind: str = "siglip"  # or "clip": a class token, a pre-LayerNorm, no patch-embedding bias

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def num_positions(self) -> int:
        """Position embeddings: one per patch, and CLIP's class token first."""
        return self.num_patches + (self.kind == "clip")

    @classmethod
    def from_hf(cls, cfg: dict) -> "SiglipVisionConfig":
        """Read a ``siglip_vision_model`` / ``clip_vision_model`` config.json, or a full ``siglip`` one
        (its ``vision_config``)."""
        model_type = cfg.get("model_type")
        if model_type not in ("siglip", "siglip_vision_model", "clip_vision_model"):
            raise CheckpointError(f"config model_type {model_type!r} is not a SigLIP / CLIP vision tower "
                                  "('siglip_vision_model', 'clip_vision_model', or 'siglip' with a vision_config)")
        full, clip = model_type == "siglip", model_type == "clip_vision_model"
        vision, where = (cfg.get("vision_config") or {}, "vision_config.") if full else (cfg, "")
        d = cls()
        act = vision.get("hidden_act", "quick_gelu" if clip else d.hidden_act)
        if act not in _GELU_APPROXIMATIONS:
            raise CheckpointError(f"config {where}hidden_act={act!r} is not supported {tuple(_GELU_APPROXIMATIONS)}")
        if vision.get("attention_dropout", 0.0):
            raise CheckpointError(f"config {where}attention_dropout={vision['attention_dropout']!r} is not supported (only 0)")
        for key in ("image_size", "patch_size"):
            if not isinstance(vision.get(key, 0), int):
                raise CheckpointError(f"config {where}{key}={vision[key]!r} is not supported (square images: one int)")
        config = cls(
            dim=vision.get("hidden_size", d.dim),
            hidden_dim=vision.get("intermediate_size", d.hidden_dim),
            num_layers=vision.get("num_hidden_layers", d.num_layers),
            num_heads=vision.get("num_attention_heads", d.num_heads),
            num_channels=vision.get("num_channels", d.num_channels),
            image_size=vision.get("image_size", d.image_size),
            patch_size=vision.get("patch_size", 32 if clip else d.patch_size),
            norm_eps=vision.get("layer_norm_eps", 1e-5 if clip else d.norm_eps),
            hidden_act=act,
            use_head=bool(vision.get("vision_use_head", d.use_head)) and not clip,
            with_text_tower=full,
            kind="clip" if clip else "siglip",
        )
        if config.dim % config.num_heads:
            raise CheckpointError(f"config {where}hidden_size={config.dim} is not a multiple of "
                                  f"num_attention_heads={config.num_heads}")
        return config


class SiglipAttention(nn.Module):
    """Bidirectional multi-head self-attention; q, k and v fused into one (3 * dim, dim) projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim) -> (B, L, dim)."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # Every patch sees every patch: one interval [0, L) per query.
        kv_start = torch.zeros(B, L, dtype=torch.int32, device=x.device)
        kv_end = torch.full((B, L), L, dtype=torch.int32, device=x.device)
        out = mixed_attention(q, k, v, kv_start, kv_end)
        return self.out(out.transpose(1, 2).reshape(B, L, -1))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.attn = SiglipAttention(c.dim, c.num_heads)
        self.norm2 = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.fc1 = nn.Linear(c.dim, c.hidden_dim)
        self.fc2 = nn.Linear(c.hidden_dim, c.dim)
        self.approximate = _GELU_APPROXIMATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.fc1(self.norm2(x))
        h = h * torch.sigmoid(1.702 * h) if self.approximate == "quick" else F.gelu(h, approximate=self.approximate)
        return x + self.fc2(h)


class SiglipVisionTower(nn.Module):
    """pixel_values (B, C, H, W) -> patch features (B, num_patches, dim), post-LayerNorm'd (SigLIP or CLIP)."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        c = self.config = config
        clip = c.kind == "clip"
        self.patch_embed = nn.Conv2d(c.num_channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size,
                                     bias=not clip)
        self.pos_embed = nn.Parameter(torch.randn(c.num_positions, c.dim) * c.dim**-0.5)
        self.class_embed = nn.Parameter(torch.randn(c.dim) * c.dim**-0.5) if clip else None
        self.pre_norm = nn.LayerNorm(c.dim, eps=c.norm_eps) if clip else None
        self.layers = nn.ModuleList(SiglipEncoderLayer(c) for _ in range(c.num_layers))
        self.post_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Args: pixel_values (B, num_channels, H, W) with ``H // patch_size == W // patch_size == grid``
        (the checkpoint's resolution; position embeddings are not interpolated).

        Returns: transformers' ``last_hidden_state``: (B, grid * grid, dim) in the model's dtype, patches
        in row-major order, post-LayerNorm'd (CLIP: the class token first, (B, 1 + grid * grid, dim),
        and no post-LayerNorm, which CLIP applies to its pooled output only).
        """
        x = self.features(pixel_values, None)
        return x if self.config.kind == "clip" else self.post_norm(x)

    def features(self, pixel_values: torch.Tensor, layer: int | None) -> torch.Tensor:
        """The hidden state after ``layer`` encoder layers, as transformers' ``hidden_states[layer]``
        (0: the embeddings, -1: the last layer's output, -2: the one before; no post-LayerNorm);
        None: after every layer. Only the layers needed run."""
        c = self.config
        check_tensor("pixel_values", pixel_values, dtypes=FLOAT_DTYPES + (torch.float64,),
                     shape=(None, c.num_channels, None, None))
        H, W = pixel_values.shape[-2:]
        if H // c.patch_size != c.grid or W // c.patch_size != c.grid:
            raise ValueError(f"pixel_values must be {c.image_size}x{c.image_size} images (a {c.grid}x{c.grid} "
                             f"patch grid of {c.patch_size}-pixel patches), got {H}x{W}")
        depth = c.num_layers if layer is None else range(c.num_layers + 1)[layer]
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        if self.class_embed is not None:
            x = torch.cat([self.class_embed.expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self.pos_embed
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for block in self.layers[:depth]:
            x = block(x)
        return x


def pool_to_tokens(features: torch.Tensor, num_tokens: int = 64) -> torch.Tensor:
    """MetaMorph's visual tokens: the patch grid resized bilinearly, then L2-normalised per token.

    Args:
        features: (B, N, C) with N a square (so400m@384: 729 = 27 x 27), patches row-major.
        num_tokens: a square (default 64 = 8 x 8).

    Returns:
        (B, num_tokens, C) in ``features``' dtype, each row of unit L2 norm (computed in fp32 at least).
    """
    check_tensor("features", features, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,))
    B, N, C = features.shape
    if N == 0 or math.isqrt(N) ** 2 != N:
        raise ValueError(f"features must have a square number of patches (B, N, C), got N={N}")
    if num_tokens <= 0 or math.isqrt(num_tokens) ** 2 != num_tokens:
        raise ValueError(f"num_tokens must be a positive square, got {num_tokens}")
    side, out_side = math.isqrt(N), math.isqrt(num_tokens)
    grid = features.transpose(1, 2).reshape(B, C, side, side)
    grid = grid.float() if grid.dtype != torch.float64 else grid
    pooled = F.interpolate(grid, size=(out_side, out_side), mode="bilinear", align_corners=False)
    return F.normalize(pooled.flatten(2).transpose(1, 2), dim=-1).to(features.dtype)


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints
# ----------------------------------------------------------------------------------------------


def hf_key_map(c: SiglipVisionConfig, prefix: str = "") -> list[KeyRule]:
    """Native <-> transformers names (q/k/v fused on our side); ``prefix`` is ``"vision_model."`` or ``""``."""
    clip = c.kind == "clip"
    rules = [rename("patch_embed.weight", f"{prefix}embeddings.patch_embedding.weight"),
             rename("pos_embed", f"{prefix}embeddings.position_embedding.weight")]
    if clip:
        rules.append(rename("class_embed", f"{prefix}embeddings.class_embedding"))
    else:
        rules.append(rename("patch_embed.bias", f"{prefix}embeddings.patch_embedding.bias"))
    for p in ("weight", "bias"):
        rules.append(rename(f"post_norm.{p}", f"{prefix}post_layernorm.{p}"))
        if clip:
            rules.append(rename(f"pre_norm.{p}", f"{prefix}pre_layrnorm.{p}"))
        for i in range(c.num_layers):
            hf, me = f"{prefix}encoder.layers.{i}", f"layers.{i}"
            attn = f"{hf}.self_attn"
            rules += [
                rename(f"{me}.norm1.{p}", f"{hf}.layer_norm1.{p}"),
                fuse(f"{me}.attn.qkv.{p}", f"{attn}.q_proj.{p}", f"{attn}.k_proj.{p}", f"{attn}.v_proj.{p}"),
                rename(f"{me}.attn.out.{p}", f"{attn}.out_proj.{p}"),
                rename(f"{me}.norm2.{p}", f"{hf}.layer_norm2.{p}"),
                rename(f"{me}.fc1.{p}", f"{hf}.mlp.fc1.{p}"),
                rename(f"{me}.fc2.{p}", f"{hf}.mlp.fc2.{p}"),
            ]
    return rules


def siglip_state_from_hf(c: SiglipVisionConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native tensors from HF-named ones; only the pooling head and a full checkpoint's text side may go unused."""
    prefix = "vision_model." if c.with_text_tower or any(k.startswith("vision_model.") for k in hf) else ""
    ignored = [f"{prefix}head.{k}" for k in _HEAD_TENSORS] if c.use_head else []
    if c.with_text_tower:
        ignored += [k for k in hf if k.startswith("text_model.")] + list(_FULL_MODEL_EXTRAS)
    return hf_to_native(hf, hf_key_map(c, prefix), optional_hf=ignored)


def siglip_state_to_hf(model: SiglipVisionTower) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, HF-named tensors) of a transformers 5 ``SiglipVisionModel`` without the head
    (a ``CLIPVisionModel`` for a CLIP tower)."""
    c = model.config
    clip = c.kind == "clip"
    cfg = {
        "model_type": "clip_vision_model" if clip else "siglip_vision_model",
        "architectures": ["CLIPVisionModel" if clip else "SiglipVisionModel"], "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_channels": c.num_channels, "image_size": c.image_size, "patch_size": c.patch_size,
        "layer_norm_eps": c.norm_eps, "hidden_act": c.hidden_act, "attention_dropout": 0.0,
        "vision_use_head": False, "dtype": str(model.pos_embed.dtype).removeprefix("torch."),
    }
    tensors = native_to_hf(model.state_dict(), hf_key_map(c, "vision_model." if clip else ""), lambda rule: [c.dim] * 3)
    return cfg, tensors


def load_siglip(path: str | os.PathLike, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> SiglipVisionTower:
    """Load a SigLIP vision tower from a checkpoint folder (any of the three layouts; see the module doc).

    Raises:
        CheckpointError: unsupported config, missing/unexpected/mis-shaped tensor, unreadable file.
    """
    config = SiglipVisionConfig.from_hf(read_config(path))
    # A full SigLIP file also holds the text tower: skip it unread rather than load and drop it.
    text_side = ("text_model.",) + tuple(_FULL_MODEL_EXTRAS) if config.with_text_tower else ()
    tensors = load_tensors(checkpoint_files(path), torch.device(device or "cpu"), dtype,
                           keep=lambda key: not key.startswith(text_side) if text_side else True)
    state = siglip_state_from_hf(config, tensors)
    return build_from_state(lambda: SiglipVisionTower(config), state)


def save_siglip(model: SiglipVisionTower, path: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
    """Write a checkpoint that ``transformers.SiglipVisionModel.from_pretrained`` (and :func:`load_siglip`) loads."""
    cfg, tensors = siglip_state_to_hf(model)
    save_checkpoint(path, cfg, tensors, max_shard_bytes)


# ----------------------------------------------------------------------------------------------
# Image input: the checkpoint's own preprocessing
# ----------------------------------------------------------------------------------------------

PROCESSOR_FILE = "preprocessor_config.json"


def load_siglip_processor(path: str | os.PathLike | None, config: SiglipVisionConfig):
    """transformers' SigLIP image processor of a checkpoint folder (its ``preprocessor_config.json``:
    size, mean, std, resampling), or SigLIP's defaults at the tower's resolution when it has none."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    if path is not None and (Path(path) / PROCESSOR_FILE).is_file():
        processor = SiglipImageProcessorPil.from_pretrained(str(path))
    else:
        processor = SiglipImageProcessorPil(size={"height": config.image_size, "width": config.image_size})
    size = processor.size
    if (size.get("height"), size.get("width")) != (config.image_size, config.image_size):
        raise CheckpointError(f"{PROCESSOR_FILE} of {path} resizes to {size.get('height')}x{size.get('width')} but the "
                              f"vision tower takes {config.image_size}x{config.image_size} images")
    return processor


class SiglipPreprocess:
    """PIL image -> (3, S, S) SigLIP pixel values, by the checkpoint's processor (picklable, for workers)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0].float()

    def describe(self) -> dict:
        return {k: v for k, v in self.processor.to_dict().items() if not k.startswith("_")}


class SiglipPixels:
    """MetaMorph's image input: preprocessed pixels; the frozen tower inside the model encodes them."""

    tensor_name = "pixels"  # the fast path: a .safetensors image file holding ready pixel values

    def __init__(self, processor):
        self.processor = processor
        self.preprocess = SiglipPreprocess(processor)
        self.ready_shape = (3, processor.size["height"], processor.size["width"])

    def moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        return pixels, None

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return pixels

    def fingerprint(self) -> dict:
        return {"preprocess": self.preprocess.describe()}
