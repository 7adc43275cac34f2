"""MetaQuery (Pan et al. 2025): a frozen LLM's outputs at learnable query tokens condition a diffusion decoder.

``prompt tokens + N learnable queries`` go through the frozen decoder in one causal pass; its final
hidden states at the N query positions go through the connector (a bidirectional transformer encoder,
then Linear-GELU-Linear-RMSNorm) and become the cross-attention conditioning of a diffusers
``SanaTransformer2DModel`` (rectified flow) or ``UNet2DConditionModel`` (Stable Diffusion 1.5, DDPM).
Only the queries, the connector and the diffusion decoder train. When sampling, the prompt and the
queries go through the LLM and the connector once; only the diffusion decoder runs every step.

On a VLM base (LLaVA-OneVision: the paper's Base model; Qwen2.5-VL: Large / X-Large) the model keeps
the VLM's image side as its frozen ``reader`` (:mod:`mmfuse.models.vlm`), and prompts may hold source
pictures: instruction tuning trains on ``source pictures + instruction -> target`` documents, and
editing samples from them. Each source picture, as the VLM's image processor gives it, becomes as many
image tokens as the tower gives it features (Qwen2.5-VL: between its vision start / end tokens, with
3D positions), and the queries follow the prompt.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from mmfuse.engine.packing import Image, segment_ids
from mmfuse.kernels import rope_cos_sin, rope_frequencies
from mmfuse.kernels.diffusion_loss import ddpm_training_pair, flow_matching_pair
from mmfuse.kernels.objectives import Objective, metaquery_objective
from mmfuse.kernels.schedules import ddpm_alphas_cumprod, ddpm_betas, flow_mu, sample_sigmas, sample_timesteps

from .decoder import Decoder, DecoderConfig, DecoderLayer, PromptLayout
from .denoisers import DENOISER_CLASSES, build_denoiser, denoiser_config
from .family import Denoiser, FamilySpec, Parts, PipelineHooks
from .hf_io import CheckpointError, load_native, save_checkpoint
from .layers import BatchContext, RoutedRMSNorm
from .vae import LatentImages
from .vlm import ReaderImages, build_reader, layout_pieces, reader_config
from .vlm import freeze as freeze_reader

MODEL_TYPE = "mmfuse_metaquery"
DECODER_KINDS = tuple(DENOISER_CLASSES)


@dataclass
class MetaQueryConfig:
    num_queries: int = 64
    connector_layers: int = 24
    connector_dim: int | None = None  # None: the LLM's width, heads and MLP width
    connector_heads: int | None = None
    connector_hidden_dim: int | None = None
    cond_dim: int = 2304  # Sana's caption_channels / SD1.5's cross_attention_dim (768)
    decoder: str = "sana"  # "sana": flow matching; "sd15": DDPM
    num_train_timesteps: int = 1000
    # flow matching (sana): sigma density and SD3/SANA resolution shift, in training and sampling
    sigma_density: str = "logit_normal"
    flow_shift: float = 3.0
    flow_dynamic_shift: bool = False  # sana: the resolution-dependent shift (mu from the latent's token count)
    # DDPM (sd15): Stable Diffusion's schedule
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False  # sd15: rescale the betas to zero terminal SNR (pair with v_prediction)
    prompt_dropout: float = 0.0  # training rows whose prompt is hidden (what classifier-free guidance needs)


def connector_layer_config(llm: DecoderConfig, c: MetaQueryConfig) -> DecoderConfig:
    """The connector's layer shapes: the LLM's (as MetaQuery's Qwen2 encoder) unless the config sets them."""
    if c.connector_dim is None:
        return dataclasses.replace(llm, num_layers=c.connector_layers, num_experts=1, rope_scaling=None, hf_config={})
    if c.connector_heads is None or c.connector_hidden_dim is None or c.connector_dim % c.connector_heads:
        raise ValueError(f"connector_dim={c.connector_dim} needs connector_heads dividing it and connector_hidden_dim")
    return DecoderConfig(vocab_size=0, dim=c.connector_dim, hidden_dim=c.connector_hidden_dim,
                         num_layers=c.connector_layers, num_heads=c.connector_heads, num_kv_heads=c.connector_heads,
                         head_dim=c.connector_dim // c.connector_heads, norm_eps=llm.norm_eps, rope_theta=llm.rope_theta)


class Connector(nn.Module):
    """Bidirectional transformer encoder over the N query states, then the projection to ``cond_dim``.

    Built from the decoder's own :class:`DecoderLayer` with every query attending all N queries
    (intervals ``[0, N)``). Queries are ordered, so they keep RoPE positions 0..N-1 (plain RoPE, no
    long-context scaling: N is small); that lets the encoder tell the queries apart beyond their content.
    """

    def __init__(self, in_dim: int, layer_config: DecoderConfig, cond_dim: int):
        super().__init__()
        c = self.layer_config = layer_config
        self.proj_in = nn.Linear(in_dim, c.dim) if in_dim != c.dim else nn.Identity()
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RoutedRMSNorm(c.dim, c.norm_eps)
        self.proj_out = nn.Sequential(nn.Linear(c.dim, cond_dim), nn.GELU(), nn.Linear(cond_dim, cond_dim))
        self.out_norm = RoutedRMSNorm(cond_dim, c.norm_eps)
        self.register_buffer("inv_freq", torch.empty(c.head_dim // 2), persistent=False)
        self.reset_buffers(self.norm.weights[0].device)

    def reset_buffers(self, device: torch.device | str) -> None:
        if torch.device(device).type != "meta":
            self.inv_freq = rope_frequencies(self.layer_config.head_dim, self.layer_config.rope_theta).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, in_dim) query states -> (B, N, cond_dim) conditioning."""
        x = self.proj_in(x)
        B, N, _ = x.shape
        cos, sin = rope_cos_sin(torch.arange(N, device=x.device).expand(B, N), self.inv_freq)
        kv_start = torch.zeros(B, N, dtype=torch.int32, device=x.device)
        ctx = BatchContext(None, None, cos, sin, kv_start, torch.full_like(kv_start, N))
        for layer in self.layers:
            x = layer(x, ctx)
        return self.out_norm(self.proj_out(self.norm(x)))


@dataclass
class PromptImageBatch:
    """MetaQuery's batch: left-padded prompts (B, P) and their bool mask, one clean latent (B, C, H, W) each.

    ``pieces``: with source pictures (instruction tuning on a VLM base), each row's prompt as pieces --
    token tensors and pictures as the reader's image processor gives them -- which the model lays
    out through its reader (``prompt_ids`` then hold the rows' text alone, for counting)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    images: torch.Tensor
    pieces: list | None = None

    def to(self, device) -> "PromptImageBatch":
        return PromptImageBatch(self.prompt_ids.to(device), self.prompt_mask.to(device), self.images.to(device),
                                self.pieces)


def prompt_batch(prompts: list[torch.Tensor], device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D prompts of any lengths (empty ones too: the unconditional prompt) -> left-padded ids (B, P)
    and their mask (B, P), P >= 1."""
    width = max([1] + [p.numel() for p in prompts])
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        if prompt.numel():
            ids[row, width - prompt.numel():], mask[row, width - prompt.numel():] = prompt, True
    return ids, mask


class MetaQuery(nn.Module):
    def __init__(self, llm: Decoder, diffusion: nn.Module | dict, config: MetaQueryConfig,
                 reader: nn.Module | None = None):
        """``reader``: a VLM base's image side (:mod:`mmfuse.models.vlm`), frozen: the MLLM then reads
        source pictures in its prompts (editing, instruction tuning) through its own tower."""
        super().__init__()
        if llm.config.num_experts != 1:
            raise ValueError(f"MetaQuery needs a one-expert decoder, got num_experts={llm.config.num_experts}")
        if config.decoder not in DECODER_KINDS:
            raise ValueError(f"config.decoder must be one of {DECODER_KINDS}, got {config.decoder!r}")
        self.config = config
        self.llm = llm
        if isinstance(diffusion, dict):
            diffusion = build_denoiser(config.decoder, diffusion)
        self.diffusion = diffusion
        self._check_diffusion_decoder()
        embed = llm.embed.weight
        with torch.device(embed.device):  # the new parts start where the LLM is
            # Queries start at the scale of the token embeddings, so the frozen LLM sees token-like inputs.
            std = embed.detach().float().std() if not embed.is_meta else 0.02
            self.queries = nn.Parameter(torch.randn(config.num_queries, llm.config.dim, dtype=embed.dtype) * std)
            self.connector = Connector(llm.config.dim, connector_layer_config(llm.config, config), config.cond_dim)
        self.register_buffer("alphas_cumprod", torch.empty(config.num_train_timesteps), persistent=False)
        self.reset_buffers(self.queries.device)
        self.reader = reader
        self.freeze_llm()

    def _check_diffusion_decoder(self) -> None:
        problem = check_parts(self.config, {"diffusion": dict(self.diffusion.config)})
        if problem:
            raise ValueError(problem)

    def reset_buffers(self, device: torch.device | str) -> None:
        c = self.config
        if torch.device(device).type != "meta":
            betas = ddpm_betas(c.num_train_timesteps, c.beta_schedule, c.beta_start, c.beta_end, c.rescale_betas_zero_snr)
            self.alphas_cumprod = ddpm_alphas_cumprod(betas).to(device)

    def freeze_llm(self) -> None:
        """The MLLM stays frozen: its language model and its reader."""
        for p in self.llm.parameters():
            p.requires_grad_(False)
        freeze_reader(self.reader)

    # ------------------------------------------------------------------ conditioning

    def query_states(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The LLM's final hidden states (B, N, llm_dim) at the query positions, after one causal pass.

        Args:
            prompt_ids: int (B, P) prompt tokens (P may be 0).
            prompt_mask: bool (B, P), False on padding (left, right or anywhere), or None (no padding).
        """
        mask = self._prompt_mask(prompt_ids, prompt_mask)
        # Stable-move the padding to the front (left padding): then each query's keys -- its row's
        # prompt and the queries before it -- are one contiguous interval, and padding gets none.
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
        ids, keep = prompt_ids.gather(1, order), mask.gather(1, order)
        return self.layout_query_states(PromptLayout.causal(ids, keep, self.llm.embed(ids)))

    def layout_query_states(self, layout: PromptLayout) -> torch.Tensor:
        """The LLM's final hidden states (B, N, llm_dim) at the queries after laid-out prompts (e.g.
        with source pictures read by the reader, :func:`mmfuse.models.vlm.layout_pieces`); the
        queries continue each row's positions (past every stream's largest, for 3D positions)."""
        (B, P), N = layout.input_ids.shape, self.config.num_queries
        pos = layout.position_ids
        if P == 0:
            after = torch.zeros(B, dtype=pos.dtype, device=pos.device)
        else:
            after = (pos.amax(dim=-1) if pos.dim() == 2 else pos.amax(dim=(0, -1))) + 1  # (B,)
            after = torch.where(layout.first < P, after, 0)  # an empty prompt: the queries from 0
        query_pos = after[:, None] + torch.arange(N, device=pos.device)
        if pos.dim() == 3:
            query_pos = query_pos.expand(pos.shape[0], B, N)
        queries = self.queries.to(layout.inputs_embeds.dtype).expand(B, N, -1)
        # The LLM is frozen, so the prompt's keys and values are constants for the queries: the prompt
        # runs once without autograd into a KV cache and only the queries carry a graph (a training
        # step's LLM backward then covers N of the P + N positions). Query j sees its row's real prompt
        # tokens and the queries up to itself: keys [first, P + j + 1) of the cache.
        kv_start = layout.first[:, None].expand(B, N).contiguous()
        kv_end = (P + 1 + torch.arange(N, device=pos.device, dtype=torch.int32)).expand(B, N).contiguous()
        device = layout.inputs_embeds.device.type  # under autocast the keys come in its dtype
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else layout.inputs_embeds.dtype
        with self.llm.kv_cache(B, P + N, dtype):
            if P:
                with torch.no_grad():
                    self.llm.fill_cache(PromptLayout.causal(layout.input_ids, layout.attention_mask,
                                                            layout.inputs_embeds, pos))
            return self.llm(inputs_embeds=queries, position_ids=query_pos, kv_start=kv_start, kv_end=kv_end,
                            input_pos=torch.arange(P, P + N, device=pos.device))

    def condition(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, cond_dim): the diffusion decoder's ``encoder_hidden_states`` for these prompts."""
        return self.connect(self.query_states(prompt_ids, prompt_mask))

    def condition_pieces(self, pieces: list) -> torch.Tensor:
        """(B, N, cond_dim) for prompts given as pieces with source pictures (read by the reader)."""
        return self.connect(self.layout_query_states(self.layout_pieces(pieces, self.queries.device)))

    def layout_pieces(self, pieces: list, device: torch.device | str) -> PromptLayout:
        """Prompts as pieces (token tensors and pictures as the reader's image processor gives them)
        laid out through the reader (:func:`mmfuse.models.vlm.layout_pieces`)."""
        if self.reader is None:
            raise ValueError("source pictures in a MetaQuery prompt need a VLM base (a model with a reader): "
                             "give a LLaVA-OneVision or Qwen2.5-VL folder as 'base'")
        return layout_pieces(self.reader, self.llm.embed, pieces, device)

    def connect(self, hidden: torch.Tensor) -> torch.Tensor:
        # The frozen LLM may run in a lower precision than the trained connector.
        return self.connector(hidden.to(self.connector.norm.weights[0].dtype))

    def _prompt_mask(self, prompt_ids, prompt_mask) -> torch.Tensor:
        """Check the prompt; the mask (all True when None)."""
        if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.is_floating_point():
            raise ValueError(f"prompt_ids must be an integer tensor (B, P), got {getattr(prompt_ids, 'shape', prompt_ids)}")
        if prompt_mask is not None and (prompt_mask.dtype != torch.bool or prompt_mask.shape != prompt_ids.shape):
            raise ValueError(f"prompt_mask must be bool {tuple(prompt_ids.shape)} like prompt_ids, "
                             f"got {prompt_mask.dtype} {tuple(prompt_mask.shape)}")
        return torch.ones_like(prompt_ids, dtype=torch.bool) if prompt_mask is None else prompt_mask

    # ------------------------------------------------------------------ diffusion

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The diffusion decoder's prediction (B, C, H, W); ``timesteps`` (B,) in [0, num_train_timesteps)."""
        if self.config.decoder == "sana":  # as SanaPipeline (1.0 except for Sana-Sprint)
            timesteps = timesteps * self.diffusion.config.get("timestep_scale", 1.0)
        dtype = self.diffusion.dtype
        out = self.diffusion(x_t.to(dtype), timestep=timesteps, encoder_hidden_states=cond.to(dtype), return_dict=False)
        return out[0]

    def training_loss(
        self,
        batch: PromptImageBatch,
        generator: torch.Generator | None = None,
        *,
        image_mask: torch.Tensor | None = None,
    ) -> Objective:
        """Diffusion loss of the decoder conditioned on the prompts.

        "sana": rectified flow, ``x_t = (1 - s) x0 + s eps``, target ``eps - x0``, timestep ``s * 1000``
        (diffusers' SANA / SD3 training scripts); "sd15": DDPM, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``,
        target ``eps`` (or v).

        Args:
            batch: ``prompt_ids``, ``prompt_mask`` (B, P) (see :meth:`query_states`) and ``images``
                (B, C, H, W), the clean VAE latents (scaled as the diffusion decoder expects).
            image_mask: bool (B,) samples that count, or None.
        """
        c = self.config
        prompt_ids, latents = batch.prompt_ids, batch.images
        prompt_mask = self._prompt_mask(prompt_ids, batch.prompt_mask)
        B = prompt_ids.shape[0]
        self._check_latents(latents, B)
        dropped = torch.zeros(B, dtype=torch.bool, device=latents.device)
        if self.training and c.prompt_dropout > 0:
            dropped = torch.rand(B, generator=generator, device=latents.device) < c.prompt_dropout
            prompt_mask = prompt_mask & ~dropped[:, None].to(prompt_mask.device)
        if batch.pieces is not None:  # source pictures: the prompts through the reader (dropped: the queries alone)
            cond = self.condition_pieces([[] if drop else row for row, drop in zip(batch.pieces, dropped.tolist())])
        else:
            cond = self.condition(prompt_ids, prompt_mask)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if c.decoder == "sana":
            sigmas = sample_sigmas(B, c.sigma_density, shift=c.flow_shift, mu=self.dynamic_mu, generator=generator,
                                   device=latents.device)
            x_t, target = flow_matching_pair(latents, noise, sigmas)
            timesteps = sigmas * c.num_train_timesteps
        else:
            timesteps = sample_timesteps(B, c.num_train_timesteps, generator=generator, device=latents.device)
            x_t, target = ddpm_training_pair(latents, noise, self.alphas_cumprod[timesteps], c.prediction_type)
        return metaquery_objective(self.denoise(x_t, timesteps, cond), target, image_mask=image_mask)

    def _check_latents(self, latents, batch: int) -> None:
        channels = self.diffusion.config["in_channels"]
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[:2] != (batch, channels):
            raise ValueError(f"latents must have shape ({batch}, {channels}, H, W), got {getattr(latents, 'shape', latents)}")

    @property
    def dynamic_mu(self) -> float | None:
        """The dynamic shift's ``mu`` for the decoder's latent size (None: the fixed ``flow_shift``)."""
        if not (self.config.flow_dynamic_shift and self.config.decoder == "sana"):
            return None
        c = self.diffusion.config
        return flow_mu((c["sample_size"] // c.get("patch_size", 1)) ** 2)

    def make_scheduler(self):
        """The sampling scheduler: flow-matching Euler (sana) or DDIM with the training schedule (sd15)."""
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        c = self.config
        if c.decoder == "sana":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=c.num_train_timesteps, shift=c.flow_shift,
                                                   use_dynamic_shifting=c.flow_dynamic_shift)
        return DDIMScheduler(num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end,
                             beta_schedule=c.beta_schedule, prediction_type=c.prediction_type, clip_sample=False,
                             rescale_betas_zero_snr=c.rescale_betas_zero_snr,
                             set_alpha_to_one=False, steps_offset=1)


# ----------------------------------------------------------------------------------------------
# Native checkpoints (safetensors + config.json)
# ----------------------------------------------------------------------------------------------


def save_metaquery(model: MetaQuery, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write every tensor (frozen LLM included; or ``state_dict``, e.g. a sharded model's gathered
    state) and the three configs to one checkpoint folder."""
    cfg = {"model_type": MODEL_TYPE, "llm": dataclasses.asdict(model.llm.config),
           "metaquery": dataclasses.asdict(model.config), "diffusion": denoiser_config(model.diffusion)}
    if model.reader is not None:
        cfg["reader"] = reader_config(model.reader)
    save_checkpoint(path, cfg, model.state_dict() if state_dict is None else state_dict)


def load_metaquery(path: str | os.PathLike, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> MetaQuery:
    def builder(cfg: dict):
        llm_cfg, mq_cfg, diffusion_cfg = DecoderConfig(**cfg["llm"]), MetaQueryConfig(**cfg["metaquery"]), dict(cfg["diffusion"])
        reader = cfg.get("reader")
        return lambda: MetaQuery(Decoder(llm_cfg), diffusion_cfg, mq_cfg, None if reader is None else build_reader(reader))

    model = load_native(path, MODEL_TYPE, builder, dtype, device)
    model.freeze_llm()
    return model


# ----------------------------------------------------------------------------------------------
# The family spec
# ----------------------------------------------------------------------------------------------


def check_parts(config: MetaQueryConfig, parts: dict[str, dict]) -> str | None:
    """Whether the diffusion decoder's config fits: its conditioning width is ``cond_dim``, and it
    predicts as many channels as it takes (no learned sigma)."""
    dc = parts.get("diffusion")
    if dc is None:
        return None
    width = dc.get("caption_channels") if config.decoder == "sana" else dc.get("cross_attention_dim")
    if width != config.cond_dim:
        return f"cond_dim={config.cond_dim} but the {config.decoder} decoder's conditioning width is {width}"
    if dc.get("out_channels", dc.get("in_channels")) != dc.get("in_channels"):
        return "a diffusion decoder with out_channels != in_channels (learned sigma) is not supported"
    return None


def build(parts: Parts, config: MetaQueryConfig) -> MetaQuery:
    if parts.diffusion is None:
        raise CheckpointError("family 'metaquery' needs 'diffusion': a diffusers SANA transformer / SD1.5 UNet "
                              "folder, or its config")
    model = MetaQuery(parts.decoder, parts.diffusion, config, parts.reader)
    return model.to(parts.decoder.embed.weight.device)


def make_batch(model: MetaQuery, documents: list, row_len: int, rows: int | None = None,
               generator: torch.Generator | None = None) -> PromptImageBatch:
    """Each document is a prompt and one target image: ``rows`` of them, prompts left-padded, latents
    stacked. A prompt may hold source pictures (instruction tuning, on a VLM base): then its pieces
    go to the batch as they are, for the reader."""
    documents = documents[:rows]
    prompts = [torch.cat([segment_ids(s) for s in doc[:-1] if not isinstance(s, Image)] or
                         [torch.zeros(0, dtype=torch.long)]) for doc in documents]
    ids, mask = prompt_batch(prompts)
    pieces = None
    if any(isinstance(s, Image) for doc in documents for s in doc[:-1]):
        pieces = [_pieces(doc[:-1]) for doc in documents]
    return PromptImageBatch(ids, mask, torch.stack([doc[-1].tensor for doc in documents]), pieces)


def _whole_row(row_len: int, document: list) -> int:
    return row_len


def check_document(document: list, row_len: int) -> str | None:
    """A prompt (text, and source pictures marked ``"diffuse": false``) followed by one target image."""
    if not document or not isinstance(document[-1], Image) or not document[-1].diffuse or \
            any(isinstance(s, Image) and s.diffuse for s in document[:-1]):
        return ("a metaquery document is a prompt (text, and source images with \"diffuse\": false) followed by "
                "exactly one target image")
    if sum(len(s) for s in document[:-1] if not isinstance(s, Image)) > row_len:
        return f"its prompt is longer than data.row_len ({row_len})"
    return None


@contextlib.contextmanager
def condition(model: MetaQuery, prompts: list[torch.Tensor], negatives: list[torch.Tensor],
              recompute: bool = False) -> Iterator[Denoiser]:
    """The prompts and the queries run through the LLM and the connector once (an empty prompt: the
    queries alone, as prompt dropout trains them); then only the diffusion decoder runs per step.
    ``recompute=True`` runs the LLM and the connector again at every step (the reference)."""
    device = model.queries.device
    ids, mask = prompt_batch(list(prompts) + list(negatives), device)
    cond = None if recompute else model.condition(ids, mask)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.denoise(x, t, model.condition(ids, mask) if recompute else cond).float()

    yield denoise


def _latent_shape(model: MetaQuery) -> tuple[int, int, int]:
    c = model.diffusion.config
    return c["in_channels"], c["sample_size"], c["sample_size"]


def _image_input(model: MetaQuery, codec, processor=None) -> LatentImages:
    """Targets as latents; on a VLM base, source pictures through ``processor`` (the VLM's)."""
    if model.reader is None:
        return LatentImages(codec, _latent_shape(model))
    if processor is None:
        raise CheckpointError("a MetaQuery on a VLM base reads source pictures with the VLM's processor, and there is "
                              "none (a model folder keeps it in processor/)")
    return ReaderImages(codec, _latent_shape(model), getattr(processor, "image_processor", processor))


def _pieces(segments: list) -> list:
    """A prompt's segments as the reader lays them out: token tensors, and each picture's inputs."""
    return [s.tensor if isinstance(s, Image) else segment_ids(s) for s in segments]


def _layout_prompts(model: MetaQuery, documents: list, device) -> PromptLayout:
    """Prompts with source pictures (documents of token tensors and clean :class:`Image` pictures) through the reader."""
    return model.layout_pieces([_pieces(doc) for doc in documents], device)


@contextlib.contextmanager
def condition_layout(model: MetaQuery, layout: PromptLayout, recompute: bool = False) -> Iterator[Denoiser]:
    """As :func:`condition`, for prompts laid out with source pictures (editing)."""
    cond = None if recompute else model.connect(model.layout_query_states(layout))

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = model.connect(model.layout_query_states(layout)) if recompute else cond
        return model.denoise(x, t, c).float()

    yield denoise


FAMILY = FamilySpec(
    name="metaquery",
    model_type=MODEL_TYPE,
    description=("MetaQuery: frozen LLM + learnable queries + connector conditioning a SANA / SD1.5 decoder; "
                 "trains the queries, the connector and the decoder"),
    config_class=MetaQueryConfig,
    parts=("diffusion",),
    keeps_vlm_reader=True,
    denoiser_kind=lambda config: config.decoder,
    check_parts=check_parts,
    build=build,
    load=load_metaquery,
    save=save_metaquery,
    set_trainable=lambda model: (model.requires_grad_(True), model.freeze_llm()),
    llm=lambda model: model.llm,
    blocks=lambda model: list(model.llm.layers) + list(model.connector.layers),
    image_input=_image_input,
    document_size=lambda model, row_len: functools.partial(_whole_row, row_len),  # one document per row
    check_document=check_document,
    needs_reader=lambda document: any(isinstance(s, Image) for s in document[:-1]),
    make_batch=make_batch,
    loss=lambda model, batch, generator: model.training_loss(batch, generator),
    count=lambda b: {"tokens": int(b.prompt_mask.sum()), "images": int(b.images.shape[0])},
    pipeline=PipelineHooks(
        latent_shape=_latent_shape,
        scheduler=lambda model: model.make_scheduler(),
        image_prompt=lambda model, ids: list(ids),
        condition=condition,
        condition_layout=condition_layout,
        layout_prompts=_layout_prompts,
        reads_images=lambda model: model.reader is not None,
        text_decoder=lambda model: model.llm,
        image_positions=lambda model: model.config.num_queries,
        timestep_kwargs=lambda model: {} if model.dynamic_mu is None else {"mu": model.dynamic_mu},
        guidance_scale=4.5,  # as SANA's pipeline
        num_inference_steps=20,
    ),
)
