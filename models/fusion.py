"""LlamaFusion / Transfusion: one decoder over text tokens and VAE-latent image patches.

Built from a decoder checkpoint: every layer gets a second, image expert (QKV/O, FFN, both norms and
the final norm) initialised as a copy of the text weights; tokens are routed by modality. LlamaFusion
keeps the text expert, the embeddings and the LM head frozen (``train_text=False``); with
``train_text`` everything trains. ``shared_weights`` is the Transfusion paper's own model: one set of
weights for text and image tokens, everything trained. The image objective is DDPM noise prediction
(``objective="ddpm"``) or rectified flow (``"flow"``: ``x_t = (1 - s) x0 + s eps``, the model predicts
``eps - x0`` at timestep ``s * num_train_timesteps``, sampled with diffusers' flow-matching schedulers).
Images enter as noised VAE latents (:func:`encode_latents`), are patchified with a
timestep embedding -- linearly, or by U-Net down blocks as in Transfusion (``patchify="unet"``, whose
up blocks take the skip connections across the transformer) -- attend bidirectionally within their
span (the mixed mask), and leave as a noise prediction.

LlavaFusion: built on a VLM base (LLaVA / LLaVA-NeXT / LLaVA-OneVision, Qwen2.5-VL), the VLM's language
model gets the image expert and its tower + projector become the frozen ``reader``
(:mod:`mmfuse.models.vlm`): a picture to *understand* is read as that VLM reads it (its processor's
placeholders filled with the tower's features, through the frozen text path), so captioning and VQA
stay the VLM's own; pictures to *generate* (and source pictures in an image prompt, as in training)
are VAE latents through the image expert.

Sequence layout (built by the packer): ``... BOI [patches of image 0] EOI ... BOI [image 1] EOI``,
``modality`` 1 on patch positions, 0 elsewhere; images appear in ``latents`` in the order of their
spans (row by row).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from mmfuse.engine.packing import PackedBatch, pack, packed_size
from mmfuse.kernels.diffusion_loss import PREDICTION_TYPES, ddpm_training_pair, flow_matching_pair
from mmfuse.kernels.objectives import Objective, transfusion_objective
from mmfuse.kernels.schedules import ddpm_alphas_cumprod, ddpm_betas, flow_mu, sample_sigmas

from .decoder import Decoder, DecoderConfig, PromptLayout, padded_positions
from .family import Denoiser, FamilySpec, Parts, PipelineHooks
from .hf_io import build_from_state, load_native, save_checkpoint
from .modality import IMAGE
from .vae import LatentImages
from .vlm import build_reader, reader_config
from .vlm import freeze as freeze_reader

MODEL_TYPE = "mmfuse_fusion"


@dataclass
class FusionConfig:
    latent_channels: int = 4
    latent_size: int = 32  # latent height = width
    patch_size: int = 2
    boi_token_id: int = 0  # filled from the tokenizer when there is one (the id of ``boi_token``)
    eoi_token_id: int = 1
    boi_token: str = "<boi>"  # the special tokens added to the base tokenizer around every image
    eoi_token: str = "<eoi>"
    train_text: bool = False  # False: LlamaFusion (text frozen); True: everything trains
    shared_weights: bool = False  # True: Transfusion, one expert for text and images (everything trains)
    objective: str = "ddpm"  # "ddpm" (noise prediction) or "flow" (rectified flow, velocity prediction)
    sigma_density: str = "uniform"  # flow: how training noise levels are drawn ("uniform", "logit_normal")
    flow_shift: float = 1.0  # flow: the SD3 resolution shift, in training and sampling
    flow_dynamic_shift: bool = False  # flow: the resolution-dependent shift (mu from the image's patch count)
    rescale_betas_zero_snr: bool = False  # ddpm: rescale the betas to zero terminal SNR (pair with v_prediction)
    lambda_diffusion: float = 5.0
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    timestep_dim: int = 256
    patchify: str = "linear"  # "linear" or "unet" (Transfusion's U-Net down / up blocks)
    unet_width: int = 64
    unet_groups: int = 8

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.objective not in ("ddpm", "flow"):
            raise ValueError(f"objective must be 'ddpm' or 'flow', got {self.objective!r}")
        if self.sigma_density not in ("uniform", "logit_normal"):
            raise ValueError(f"sigma_density must be 'uniform' or 'logit_normal', got {self.sigma_density!r}")
        if self.patchify not in ("linear", "unet"):
            raise ValueError(f"patchify must be 'linear' or 'unet', got {self.patchify!r}")
        if self.latent_size % self.patch_size:
            raise ValueError(f"latent_size {self.latent_size} must be a multiple of patch_size {self.patch_size}")
        if self.patchify == "unet" and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"patchify='unet' halves the resolution per level: patch_size must be a power of 2, "
                             f"got {self.patch_size}")

    @property
    def dynamic_mu(self) -> float | None:
        """The dynamic shift's ``mu`` for this image size (None: the fixed ``flow_shift``)."""
        return flow_mu(self.patches_per_image) if self.flow_dynamic_shift else None

    @property
    def num_experts(self) -> int:
        """Experts per layer: 1 with shared weights (Transfusion), else text + image (LlamaFusion)."""
        return 1 if self.shared_weights else 2

    @property
    def patches_per_image(self) -> int:
        return (self.latent_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size**2


def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, (H/p) * (W/p), C * p * p), patches in row-major order."""
    N, C, H, W = latents.shape
    x = latents.reshape(N, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(N, (H // p) * (W // p), C * p * p)


def unpatchify(patches: torch.Tensor, channels: int, size: int, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (N, (size/p)^2, C * p * p) -> (N, C, size, size)."""
    N, g = patches.shape[0], size // p
    x = patches.reshape(N, g, g, channels, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(N, channels, size, size)


def timestep_features(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features (N, dim) of diffusion timesteps (cos half first, as DiT / diffusers flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half, dtype=torch.float32) / half)
    angles = timesteps.float()[:, None] * freqs.to(timesteps.device)[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class UNetPatcher(nn.Module):
    """Transfusion's patchifier: U-Net down blocks (ResNet + stride-2 downsample, conditioned on the
    timestep) from latents to one token per patch, and up blocks back, with skip connections."""

    def __init__(self, channels: int, dim: int, patch_size: int, width: int, groups: int):
        super().__init__()
        from diffusers.models.downsampling import Downsample2D
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.upsampling import Upsample2D

        levels = patch_size.bit_length() - 1
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.down_res = nn.ModuleList(ResnetBlock2D(in_channels=width, out_channels=width, temb_channels=dim,
                                                    groups=groups) for _ in range(levels))
        self.down_sample = nn.ModuleList(Downsample2D(width, use_conv=True) for _ in range(levels))
        self.to_tokens = nn.Linear(width, dim)
        self.from_tokens = nn.Linear(dim, width)
        self.up_sample = nn.ModuleList(Upsample2D(width, use_conv=True) for _ in range(levels))
        self.up_res = nn.ModuleList(ResnetBlock2D(in_channels=2 * width, out_channels=width, temb_channels=dim,
                                                  groups=groups) for _ in range(levels))
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def encode(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(N, C, S, S), temb (N, dim) -> tokens (N, (S/p)^2, dim), skips for :meth:`decode`."""
        h, skips = self.conv_in(x), []
        for res, down in zip(self.down_res, self.down_sample):
            h = res(h, temb)
            skips.append(h)
            h = down(h)
        return self.to_tokens(h.flatten(2).transpose(1, 2)), skips

    def decode(self, tokens: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """tokens (N, g * g, dim) -> (N, C, S, S)."""
        N, n, _ = tokens.shape
        g = int(round(n**0.5))
        h = self.from_tokens(tokens).transpose(1, 2).reshape(N, -1, g, g)
        for up, res, skip in zip(self.up_sample, self.up_res, reversed(skips)):
            h = res(torch.cat([up(h), skip], dim=1), temb)
        return self.conv_out(h)


class LlamaFusion(nn.Module):
    def __init__(self, decoder_config: DecoderConfig, config: FusionConfig, reader: nn.Module | None = None):
        """``reader``: a VLM base's image side (LlavaFusion, :mod:`mmfuse.models.vlm`), frozen: the
        model reads pictures for understanding as that VLM does, through its text path."""
        super().__init__()
        if decoder_config.num_experts != config.num_experts:
            raise ValueError(f"this fusion model needs a decoder with num_experts={config.num_experts} "
                             f"(shared_weights={config.shared_weights}), got {decoder_config.num_experts}")
        self.config = config
        dim = decoder_config.dim
        self.decoder = Decoder(decoder_config)
        self.time_mlp = nn.Sequential(nn.Linear(config.timestep_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        if config.patchify == "unet":
            self.unet = UNetPatcher(config.latent_channels, dim, config.patch_size, config.unet_width,
                                    config.unet_groups)
        else:
            self.patch_in = nn.Linear(config.patch_dim, dim)
            self.patch_out = nn.Linear(dim, config.patch_dim)
        betas = ddpm_betas(config.num_train_timesteps, config.beta_schedule, config.beta_start, config.beta_end,
                           config.rescale_betas_zero_snr)
        self.register_buffer("alphas_cumprod", ddpm_alphas_cumprod(betas), persistent=False)
        self.reader = reader

    def reset_buffers(self, device: torch.device | str) -> None:
        c = self.config
        if torch.device(device).type != "meta":
            betas = ddpm_betas(c.num_train_timesteps, c.beta_schedule, c.beta_start, c.beta_end, c.rescale_betas_zero_snr)
            self.alphas_cumprod = ddpm_alphas_cumprod(betas).to(device)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_decoder(cls, decoder: Decoder, config: FusionConfig, reader: nn.Module | None = None) -> "LlamaFusion":
        """Add the image expert to a one-expert decoder (a copy of every text weight) and freeze per
        config; with ``shared_weights`` the decoder's own weights serve both modalities. ``reader``:
        the image side of the VLM the decoder comes from (LlavaFusion), kept frozen as it is."""
        if decoder.config.num_experts != 1:
            raise ValueError(f"from_decoder needs a one-expert decoder, got num_experts={decoder.config.num_experts}")
        dec_cfg = dataclasses.replace(decoder.config, num_experts=config.num_experts)
        state = {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
        if not config.shared_weights:
            for key in [k for k in state if k.endswith((".weights.0", ".biases.0"))]:
                state[key[:-1] + "1"] = state[key].clone()
        with torch.device("meta"):
            model = cls(dec_cfg, config)
        device = decoder.embed.weight.device
        fresh = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}
        for name, t in fresh.items():  # the new image-path layers: default init, on the decoder's device
            state[name] = torch.empty_like(t, device=device, dtype=decoder.embed.weight.dtype)
        model = build_from_state(lambda: cls(dec_cfg, config), state)
        model._init_image_path()
        model.reader = reader
        model.freeze_text(not model.trains_text)
        return model

    @classmethod
    def from_vlm(cls, vlm: nn.Module, config: FusionConfig) -> "LlamaFusion":
        """LlavaFusion: a whole VLM's language model gets the image expert; its tower and projector
        become the frozen reader (understanding stays the VLM's own)."""
        return cls.from_decoder(vlm.decoder, config, vlm.reader())

    @property
    def trains_text(self) -> bool:
        """Whether the text weights train: always with shared weights (they are the image weights too)."""
        return self.config.train_text or self.config.shared_weights

    def _init_image_path(self) -> None:
        """Default init for every layer outside the decoder (they were built on the meta device)."""
        for name, module in self.named_modules():
            if not name.startswith(("decoder", "reader")) and hasattr(module, "reset_parameters") and module is not self:
                module.reset_parameters()
        out = self.unet.conv_out if self.config.patchify == "unet" else self.patch_out
        nn.init.zeros_(out.weight)  # start by predicting zero noise, as DiT does
        nn.init.zeros_(out.bias)

    def freeze_text(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the text expert of every layer, the embeddings and the LM head; the
        reader (a VLM's tower and projector) stays frozen either way."""
        for name, p in self.decoder.named_parameters():
            is_text = name.endswith((".weights.0", ".biases.0")) or name.startswith(("embed.", "lm_head."))
            if is_text:
                p.requires_grad_(not frozen)
        freeze_reader(self.reader)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        modality: torch.Tensor,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        kv_start: torch.Tensor,
        kv_end: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, L, dim) and the noise prediction (N, C, size, size) of the N images.

        Args:
            input_ids: int (B, L); values at image positions are ignored.
            modality: int (B, L), 1 on image-patch positions (N * patches_per_image of them).
            noisy_latents: (N, C, size, size) noised latents x_t, in span order; timesteps (N,).
            kv_start, kv_end: int32 (B, L) mask intervals (``mask_intervals`` of the image spans).
        """
        c = self.config
        x, temb, skips = self.embed_inputs(input_ids, modality, noisy_latents, timesteps)
        hidden = self.decoder(inputs_embeds=x, position_ids=position_ids, kv_start=kv_start, kv_end=kv_end,
                              modality=modality, input_pos=input_pos)
        tokens = hidden[modality == IMAGE].view(noisy_latents.shape[0], c.patches_per_image, hidden.shape[-1])
        return hidden, self.predict_noise(tokens, temb, skips)

    def predict_noise(self, tokens: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """The output side: the decoder's (N, patches_per_image, dim) image tokens -> (N, C, size, size)."""
        c = self.config
        if c.patchify == "unet":
            if not tokens.shape[0]:
                return tokens.new_zeros(0, c.latent_channels, c.latent_size, c.latent_size)
            return self.unet.decode(tokens, temb, skips)
        return unpatchify(self.patch_out(tokens), c.latent_channels, c.latent_size, c.patch_size)

    def embed_inputs(self, input_ids: torch.Tensor, modality: torch.Tensor, latents: torch.Tensor,
                     timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The decoder's input (B, L, dim): token embeddings, the image positions replaced by the
        patches of ``latents`` (N, C, size, size) at ``timesteps`` (N,) plus their timestep embedding;
        also that embedding (N, dim) and the U-Net patcher's skips (for the output side)."""
        c = self.config
        self._check_images(modality, latents, timesteps)
        x = self.decoder.embed(input_ids)
        latents = latents.to(x.dtype)
        temb = self.time_mlp(timestep_features(timesteps, c.timestep_dim).to(x.dtype))
        skips: list[torch.Tensor] = []
        if latents.shape[0]:
            if c.patchify == "unet":
                patches, skips = self.unet.encode(latents, temb)
            else:
                patches = self.patch_in(patchify(latents, c.patch_size))
            x = x.masked_scatter((modality == IMAGE)[..., None], (patches + temb[:, None]).to(x.dtype))
        return x, temb, skips

    def _check_images(self, modality, latents, timesteps) -> None:
        c = self.config
        want = (c.latent_channels, c.latent_size, c.latent_size)
        if latents.dim() != 4 or tuple(latents.shape[1:]) != want:
            raise ValueError(f"noisy_latents must have shape (N, {', '.join(map(str, want))}), got {tuple(latents.shape)}")
        if timesteps.shape != (latents.shape[0],):
            raise ValueError(f"timesteps must have shape ({latents.shape[0]},), got {tuple(timesteps.shape)}")
        if not torch.compiler.is_compiling():
            patches = int((modality == IMAGE).sum())
            if patches != latents.shape[0] * c.patches_per_image:
                raise ValueError(f"modality marks {patches} image positions but {latents.shape[0]} images need "
                                 f"{latents.shape[0] * c.patches_per_image}")

    def training_loss(
        self,
        batch: PackedBatch,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> Objective:
        """Transfusion's ``LM CE + lambda * DDPM MSE`` for one packed batch (:func:`mmfuse.engine.packing.pack`).

        The batch's ``labels`` (B, L) hold the token at each position (-100 where no LM loss: image
        patches, padding, document starts; position i predicts labels[i + 1]); its ``images``
        (N, C, size, size) are the clean VAE latents in span order; ``image_loss_mask`` (N,) marks the
        images that get the diffusion loss -- the others are conditioning images (e.g. to caption) and
        enter clean, at timestep 0.

        Args:
            noise, timesteps: (N, C, size, size) and (N,) to use instead of drawing them from
                ``generator`` (e.g. so that data-parallel shards reproduce a single-process run);
                default ``batch.extra["noise"]`` / ``["timesteps"]`` when the batch carries them.
        """
        c = self.config
        latents, image_mask, labels = batch.images, batch.image_loss_mask, batch.labels
        noise = batch.extra.get("noise") if noise is None else noise
        timesteps = batch.extra.get("timesteps") if timesteps is None else timesteps
        if latents is None:  # a text-only batch: the LM term alone
            return self._text_only_loss(batch)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        t = timesteps
        if t is None and c.objective == "ddpm":
            t = torch.randint(0, c.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
        x_t, target, t = self._noised(latents, noise, t, generator, draw=timesteps is None)
        if image_mask is not None:  # images outside the mask condition the text (captioning): clean, t = 0
            t = torch.where(image_mask, t, 0)
            x_t = torch.where(image_mask.view(-1, *[1] * (latents.dim() - 1)), x_t, latents)
        hidden, pred = self(batch.input_ids, batch.modality, x_t, t, batch.kv_start, batch.kv_end, batch.position_ids)
        return transfusion_objective(pred, target, ce=self.decoder.next_token_loss(hidden, labels),
                                     image_mask=image_mask, lambda_diffusion=c.lambda_diffusion)

    def _noised(self, latents, noise, t, generator, draw: bool):
        """(x_t, target, timesteps) of the objective. DDPM: at timesteps ``t``; flow: noise levels
        drawn (``draw``) or read from ``t`` (timesteps are ``s * num_train_timesteps``)."""
        c = self.config
        if c.objective == "ddpm":
            return (*ddpm_training_pair(latents, noise, self.alphas_cumprod[t], c.prediction_type), t)
        sigmas = sample_sigmas(latents.shape[0], c.sigma_density, shift=c.flow_shift, mu=c.dynamic_mu, generator=generator,
                               device=latents.device) if draw else t.float() / c.num_train_timesteps
        x_t, target = flow_matching_pair(latents, noise, sigmas)
        return x_t, target, sigmas * c.num_train_timesteps

    def _text_only_loss(self, batch: PackedBatch) -> Objective:
        no_images = torch.zeros(0, dtype=torch.long, device=batch.input_ids.device)
        empty = torch.zeros(0, self.config.latent_channels, self.config.latent_size, self.config.latent_size,
                            device=batch.input_ids.device)
        hidden, _ = self(batch.input_ids, batch.modality, empty, no_images, batch.kv_start, batch.kv_end,
                         batch.position_ids)
        lm = self.decoder.next_token_loss(hidden, batch.labels)
        return Objective(lm, {"lm": lm, "diffusion": torch.zeros((), device=lm.device)})


# ----------------------------------------------------------------------------------------------
# Native checkpoints (safetensors + config.json)
# ----------------------------------------------------------------------------------------------


def save_fusion(model: LlamaFusion, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model`` (or ``state_dict``, e.g. a sharded model's gathered state) and its configs."""
    dec = dataclasses.asdict(model.decoder.config)
    cfg = {"model_type": MODEL_TYPE, "decoder": dec, "fusion": dataclasses.asdict(model.config)}
    if model.reader is not None:
        cfg["reader"] = reader_config(model.reader)
    save_checkpoint(path, cfg, model.state_dict() if state_dict is None else state_dict)


def load_fusion(path: str | os.PathLike, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> LlamaFusion:
    def builder(cfg: dict):
        dec_cfg, fusion_cfg = DecoderConfig(**cfg["decoder"]), FusionConfig(**cfg["fusion"])
        reader = cfg.get("reader")
        return lambda: LlamaFusion(dec_cfg, fusion_cfg, None if reader is None else build_reader(reader))

    model = load_native(path, MODEL_TYPE, builder, dtype, device)
    model.freeze_text(not model.trains_text)
    return model


# ----------------------------------------------------------------------------------------------
# The family spec: batches, sampling, everything the engine needs
# ----------------------------------------------------------------------------------------------


def build(parts: Parts, config: FusionConfig) -> LlamaFusion:
    """LlamaFusion from a one-expert base decoder (its weights copied into the image expert); on a VLM
    base, with the VLM's image side as the frozen reader (LlavaFusion)."""
    return LlamaFusion.from_decoder(parts.decoder, config, parts.reader)


def make_batch(model: LlamaFusion, documents: list, row_len: int, rows: int | None = None,
               generator: torch.Generator | None = None) -> PackedBatch:
    """Interleaved documents packed into ``rows`` rows of ``row_len`` (images: clean latents (C, size, size))."""
    c = model.config
    return pack(documents, row_len, c.patches_per_image, c.boi_token_id, c.eoi_token_id, max_rows=rows)


def image_prompt(model: LlamaFusion, ids: list[int]) -> list[int]:
    """A prompt asks for an image by ending in BOI."""
    boi = model.config.boi_token_id
    return list(ids) if ids and ids[-1] == boi else [*ids, boi]


def default_scheduler(model: LlamaFusion):
    """A diffusers DDIM scheduler with the betas and prediction type the model was trained with
    (flow: the flow-matching Euler scheduler with its shift)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    c = model.config
    if c.objective == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=c.num_train_timesteps, shift=c.flow_shift,
                                               use_dynamic_shifting=c.flow_dynamic_shift)
    return DDIMScheduler(num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                         beta_start=c.beta_start, beta_end=c.beta_end, prediction_type=c.prediction_type,
                         rescale_betas_zero_snr=c.rescale_betas_zero_snr,
                         clip_sample=False, set_alpha_to_one=False)


@contextlib.contextmanager
def condition(model: LlamaFusion, prompts: list[torch.Tensor], negatives: list[torch.Tensor],
              recompute: bool = False) -> Iterator[Denoiser]:
    """Text prompts (each ending in BOI; left-padded together): :func:`condition_layout` of their tokens."""
    rows = list(prompts) + list(negatives)
    boi = model.config.boi_token_id
    if any(r.dim() != 1 or r.numel() == 0 or int(r[-1]) != boi for r in rows):
        raise ValueError(f"every prompt must be a non-empty 1-D id tensor ending in BOI ({boi})")
    with condition_layout(model, PromptLayout.of_tokens(rows, model.decoder.embed), recompute) as denoise:
        yield denoise


@contextlib.contextmanager
def condition_layout(model: LlamaFusion, layout: PromptLayout, recompute: bool = False) -> Iterator[Denoiser]:
    """Prompts laid out (text, and clean source images at t = 0, ending in BOI) prefilled once into a
    KV cache owned by this block; each denoising step then runs only the image chunk, whose queries
    see the cached prefix and the whole chunk (extend attention), so a step costs the same whatever
    the prompt length. ``recompute=True``: no cache, every step feeds prefix + image (the reference)."""
    (R, P), n = layout.input_ids.shape, model.config.patches_per_image
    chunk = _ImageChunk(layout.first, P, n, layout.input_ids.device)
    if recompute:
        yield _recomputing_denoiser(model, layout, chunk)
        return
    with model.decoder.kv_cache(R, P + n):
        model.decoder.fill_cache(layout)
        yield chunk.denoiser(model)


@dataclass
class _ImageChunk:
    """The image span after a prompt of ``P`` positions: ``n`` image positions that see the prompt
    (from each row's first real position) and the whole span."""

    first: torch.Tensor
    P: int
    n: int
    device: torch.device

    def __post_init__(self):
        R, P, n, device = self.first.shape[0], self.P, self.n, self.device
        self.ids = torch.zeros(R, n, dtype=torch.long, device=device)
        self.modality = torch.full((R, n), IMAGE, dtype=torch.long, device=device)
        self.kv_start = self.first[:, None].expand(R, n).contiguous()
        self.kv_end = torch.full((R, n), P + n, dtype=torch.int32, device=device)
        self.positions = padded_positions(self.first, P + n)[:, P:]
        self.slots = torch.arange(P, P + n, device=device)

    def denoiser(self, model: LlamaFusion) -> Denoiser:
        """One step over the cached prefix: the chunk's noised K/V written into its slots, the noise predicted."""
        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(self.ids, self.modality, x, t, self.kv_start, self.kv_end, position_ids=self.positions,
                         input_pos=self.slots)[1]

        return denoise


def _recomputing_denoiser(model: LlamaFusion, layout: PromptLayout, chunk: _ImageChunk) -> Denoiser:
    """The whole sequence (prefix embeddings + the noised image) through the decoder at every step."""
    cat = functools.partial(torch.cat, dim=1)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        image, temb, skips = model.embed_inputs(chunk.ids, chunk.modality, x, t)
        hidden = model.decoder(inputs_embeds=cat([layout.inputs_embeds, image]),
                               modality=cat([layout.modality, chunk.modality]),
                               kv_start=cat([layout.kv_start, chunk.kv_start]), kv_end=cat([layout.kv_end, chunk.kv_end]),
                               position_ids=cat([layout.position_ids, chunk.positions]))
        return model.predict_noise(hidden[:, chunk.P:], temb, skips)

    return denoise


def image_span(model: LlamaFusion, hidden: torch.Tensor, starts: torch.Tensor, slot: int,
               draw: Callable[[Denoiser], torch.Tensor]) -> torch.Tensor:
    """Interleaved generation: the image after a BOI at ``slot - 1``, denoised against the open KV
    cache (each step writes the noised image's K/V into its slots), then its clean K/V (t = 0) written
    over them, as Transfusion's inference does, so the text after it reads the finished image."""
    chunk = _ImageChunk(starts, slot, model.config.patches_per_image, starts.device)
    x0 = draw(chunk.denoiser(model))
    rows = starts.shape[0]
    clean = torch.zeros(rows, dtype=torch.long, device=starts.device)
    model(chunk.ids, chunk.modality, x0.expand(rows, *x0.shape[1:]), clean, chunk.kv_start, chunk.kv_end,
          position_ids=chunk.positions, input_pos=chunk.slots)
    return x0


def embed_prompt(model: LlamaFusion, input_ids: torch.Tensor, modality: torch.Tensor,
                 latents: torch.Tensor | None) -> torch.Tensor:
    """A prompt's images enter as their clean latents, at timestep 0 (as Transfusion reads an image)."""
    c = model.config
    if latents is None:
        latents = torch.zeros(0, c.latent_channels, c.latent_size, c.latent_size, device=input_ids.device)
    clean = torch.zeros(latents.shape[0], dtype=torch.long, device=input_ids.device)
    return model.embed_inputs(input_ids, modality, latents, clean)[0]


def _image_input(model: LlamaFusion, codec, vision_processor=None) -> LatentImages:
    c = model.config
    return LatentImages(codec, (c.latent_channels, c.latent_size, c.latent_size))


FAMILY = FamilySpec(
    name="fusion",
    model_type=MODEL_TYPE,
    description=("LlamaFusion / Transfusion: text + VAE-latent image patches in one decoder; "
                 "trains the image expert (and the text weights with train_text; one shared set of "
                 "weights, all trained, with shared_weights), DDPM or flow matching"),
    config_class=FusionConfig,
    special_tokens={"boi_token_id": "boi_token", "eoi_token_id": "eoi_token"},
    keeps_vlm_reader=True,
    build=build,
    load=load_fusion,
    save=save_fusion,
    set_trainable=lambda model: model.freeze_text(not model.trains_text),
    llm=lambda model: model.decoder,
    blocks=lambda model: list(model.decoder.layers),
    image_input=_image_input,
    document_size=lambda model, row_len: functools.partial(packed_size, tokens_per_image=model.config.patches_per_image),
    make_batch=make_batch,
    loss=lambda model, batch, generator: model.training_loss(batch, generator),
    count=lambda b: {"tokens": b.num_text_tokens, "images": 0 if b.images is None else int(b.images.shape[0])},
    pipeline=PipelineHooks(
        latent_shape=lambda model: (model.config.latent_channels, model.config.latent_size, model.config.latent_size),
        scheduler=default_scheduler,
        image_prompt=image_prompt,
        condition=condition,
        condition_layout=condition_layout,
        text_decoder=lambda model: model.decoder,
        guidance_scale=3.0,
        image_positions=lambda model: model.config.patches_per_image + 1,
        embed_prompt=embed_prompt,
        image_start=lambda model: model.config.boi_token_id,
        image_end=lambda model: model.config.eoi_token_id,
        image_span=image_span,
        timestep_kwargs=lambda model: {} if model.config.dynamic_mu is None else {"mu": model.config.dynamic_mu},
    ),
)
