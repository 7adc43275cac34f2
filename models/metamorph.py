"""MetaMorph (VPiT): an LLM that reads and regresses SigLIP visual tokens, decoded by Stable Diffusion 1.5.

An image becomes ``BOI``, ``num_visual_tokens`` positions, ``EOI`` (the packer's layout, ``modality``
IMAGE on the visual positions). The frozen SigLIP tower's patch features are interpolated to 64 tokens
and L2-normalised; the adapter (Linear-GELU-Linear) maps them into the LLM. Attention is causal
everywhere: visual tokens are generated one after another. The vision head (linear to the SigLIP
width, as the paper starts; Linear-GELU-Linear with ``vision_head="mlp"``) at position i regresses
the visual token at i + 1 with a cosine loss -- on the answer images' tokens, not the input images'
-- beside the text CE on the response (a prompt's ``PromptText`` is not trained on).
Generated visual tokens condition a frozen SD1.5 ``UNet2DConditionModel`` (``diffusion``) through a
linear projection to its cross-attention width.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mmfuse._progress import progress_bar
from mmfuse.engine.packing import Image, PackedBatch, pack, packed_size
from mmfuse.kernels import mask_intervals
from mmfuse.kernels import diffusion_loss
from mmfuse.kernels.diffusion_loss import ddpm_training_pair
from mmfuse.kernels.objectives import Objective, metamorph_objective
from mmfuse.kernels.schedules import ddpm_alphas_cumprod, ddpm_betas, sample_timesteps

from .decoder import Decoder, DecoderConfig, PromptLayout
from .denoisers import build_denoiser, denoiser_config, denoiser_kind
from .family import Denoiser, FamilySpec, Parts, PipelineHooks
from .hf_io import CheckpointError, load_native, save_checkpoint
from .modality import IMAGE
from .siglip import SiglipPixels, SiglipVisionConfig, SiglipVisionTower, pool_to_tokens

MODEL_TYPE = "mmfuse_metamorph"
# Stable Diffusion 1.5's noise schedule (what its UNet was trained with), for the sampling scheduler.
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     prediction_type="epsilon")


@dataclass
class MetaMorphConfig:
    num_visual_tokens: int = 64
    boi_token_id: int = 0  # filled from the tokenizer when there is one (the id of ``boi_token``)
    eoi_token_id: int = 1
    lambda_cosine: float = 1.0
    sd_cross_attention_dim: int = 768  # SD1.5's text-encoder width
    boi_token: str = "<boi>"
    eoi_token: str = "<eoi>"
    vision_head: str = "linear"  # the paper's start; "mlp": Linear-GELU-Linear
    cosine_on_inputs: bool = False  # regress input images' visual tokens too (the official code: answers only)
    stage: str = "llm"  # "llm": CE + cosine; "visualizer": SigLIP tokens -> sd_proj -> the SD1.5 UNet, DDPM
    condition_dropout: float = 0.1  # visualizer: share of images trained unconditionally (zero tokens), for CFG
    train_unet: bool = False  # visualizer: train the UNet too (else only the projection)

    def __post_init__(self):
        if self.vision_head not in ("linear", "mlp"):
            raise ValueError(f"vision_head must be 'linear' or 'mlp', got {self.vision_head!r}")
        if self.stage not in ("llm", "visualizer"):
            raise ValueError(f"stage must be 'llm' or 'visualizer', got {self.stage!r}")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must lie in [0, 1), got {self.condition_dropout}")


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class MetaMorph(nn.Module):
    def __init__(self, decoder: Decoder, vision: SiglipVisionTower, config: MetaMorphConfig,
                 diffusion: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.decoder = decoder
        self.vision = vision.requires_grad_(False).eval()  # frozen encoder
        width, dim = vision.config.dim, decoder.config.dim
        self.adapter = _mlp(width, dim, dim)
        self.vision_head = _mlp(dim, dim, width) if config.vision_head == "mlp" else nn.Linear(dim, width)
        self.sd_proj = nn.Linear(width, config.sd_cross_attention_dim)
        if diffusion is not None:
            if denoiser_kind(diffusion) != "sd15":
                raise ValueError(f"MetaMorph decodes with an SD1.5 UNet2DConditionModel, got {type(diffusion).__name__}")
            problem = check_parts(config, {"diffusion": dict(diffusion.config)})
            if problem:
                raise ValueError(problem)
            diffusion.requires_grad_(False)
        self.diffusion = diffusion  # frozen SD1.5 UNet (None: a model that does not draw)

    @torch.no_grad()
    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, num_visual_tokens, width) L2-normalised SigLIP tokens (the targets)."""
        return pool_to_tokens(self.vision(pixel_values), self.config.num_visual_tokens)

    def forward(self, input_ids: torch.Tensor, modality: torch.Tensor, visual_tokens: torch.Tensor,
                kv_start: torch.Tensor, kv_end: torch.Tensor, position_ids: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, L, dim); ``visual_tokens`` (N, T, width) fill the IMAGE positions in order."""
        x = self.embed_inputs(input_ids, modality, visual_tokens)
        return self.decoder(inputs_embeds=x, position_ids=position_ids, kv_start=kv_start, kv_end=kv_end,
                            input_pos=input_pos)

    def embed_inputs(self, input_ids: torch.Tensor, modality: torch.Tensor, visual_tokens: torch.Tensor) -> torch.Tensor:
        """The LLM's input (B, L, dim): token embeddings, the IMAGE positions replaced (in order) by the
        adapter's image of ``visual_tokens`` (N, T, width)."""
        x = self.decoder.embed(input_ids)
        n_visual = visual_tokens.shape[0] * visual_tokens.shape[1]
        if not torch.compiler.is_compiling() and int((modality == IMAGE).sum()) != n_visual:
            raise ValueError(f"modality marks {int((modality == IMAGE).sum())} visual positions but "
                             f"visual_tokens holds {n_visual}")
        if n_visual:
            embeds = self.adapter(visual_tokens.reshape(n_visual, -1).to(x.dtype))
            # under autocast the adapter's output is bf16 while the embeddings stay in the weights' dtype
            x = x.masked_scatter((modality == IMAGE)[..., None], embeds.to(x.dtype))
        return x

    def training_loss(self, batch: PackedBatch, generator: torch.Generator | None = None) -> Objective:
        """Text CE + cosine on the visual tokens of one packed batch (:func:`make_batch`: causal intervals).

        The batch's ``labels`` (B, L) are -100 where there is no LM loss (position i predicts
        labels[i + 1]: the response text, not a prompt's); its ``images`` (N, 3, H, W) are SigLIP
        pixel values in span order. The cosine covers the visual tokens of the answer images
        (``image_loss_mask``, ``diffuse`` in the data) -- input images only condition, as in the
        official code -- unless ``cosine_on_inputs``.
        """
        if batch.images is None:  # a text-only batch: the LM term alone
            empty = torch.zeros(0, self.config.num_visual_tokens, self.vision.config.dim, device=batch.input_ids.device)
            hidden = self(batch.input_ids, batch.modality, empty, batch.kv_start, batch.kv_end, batch.position_ids)
            lm = self.decoder.next_token_loss(hidden, batch.labels)
            return Objective(lm, {"lm": lm, "cosine": torch.zeros((), device=lm.device)})
        targets = self.visual_tokens(batch.images)
        hidden = self(batch.input_ids, batch.modality, targets, batch.kv_start, batch.kv_end, batch.position_ids)
        predicts_visual = batch.modality[:, 1:] == IMAGE  # position i regresses the visual token at i + 1
        pred = self.vision_head(hidden[:, :-1][predicts_visual])
        answers = None if self.config.cosine_on_inputs else \
            batch.image_loss_mask.to(pred.device).repeat_interleave(targets.shape[1])
        return metamorph_objective(pred, targets.reshape(-1, targets.shape[-1]).to(pred.dtype),
                                   ce=self.decoder.next_token_loss(hidden, batch.labels), vision_mask=answers,
                                   lambda_cosine=self.config.lambda_cosine)

    @torch.no_grad()
    def generate_visual_tokens(self, prompts: list[torch.Tensor] | PromptLayout, *, recompute: bool = False,
                               progress: bool | None = False) -> torch.Tensor:
        """Prompts ending in BOI -> (R, num_visual_tokens, width).

        ``prompts``: 1-D id tensors (any lengths; left-padded together), or a :class:`PromptLayout`
        (prompts with images in them, as the pipeline lays them out). Each step's vision-head output
        is L2-normalised (the targets live on the unit sphere) and fed back through the adapter as
        the next input. The KV cache lives for this call only; ``recompute=True`` feeds the whole
        sequence every step instead (the reference).
        """
        c = self.config
        if not isinstance(prompts, PromptLayout):
            if not prompts or any(p.dim() != 1 or p.numel() == 0 or int(p[-1]) != c.boi_token_id for p in prompts):
                raise ValueError(f"prompts must be non-empty 1-D id tensors, each ending in BOI ({c.boi_token_id})")
            prompts = PromptLayout.of_tokens(prompts, self.decoder.embed)
        layout = prompts
        (R, P), T, first = layout.input_ids.shape, c.num_visual_tokens, layout.first
        steps = progress_bar(range(T), progress, desc="visual tokens")
        if recompute:
            return self._visual_tokens_recomputed(layout, steps)
        with self.decoder.kv_cache(R, P + T):
            hidden = self.decoder.prefill(layout)
            return self.visual_token_loop(hidden[:, -1], first, P, steps, feed_last=False)

    def visual_token_loop(self, hidden: torch.Tensor, starts: torch.Tensor, slot: int, steps,
                          feed_last: bool = True) -> torch.Tensor:
        """With the KV cache open: from the hidden state (R, dim) before the first visual token, each
        token predicted, L2-normalised and fed back through the adapter into cache slots ``slot``,
        ``slot + 1``, ... (row r attends from ``starts[r]``) -> (R, T, width). ``feed_last``: write the
        last token into the cache too (for text that follows it)."""
        R, T, tokens = hidden.shape[0], self.config.num_visual_tokens, []
        for i in steps:
            token = F.normalize(self.vision_head(hidden).float(), dim=-1)
            tokens.append(token)
            if i + 1 == T and not feed_last:
                break
            pos = torch.tensor([slot + i], device=hidden.device)
            hidden = self.decoder(inputs_embeds=self.adapter(token.to(hidden.dtype))[:, None],
                                  position_ids=(pos - starts.long())[:, None], kv_start=starts[:, None],
                                  kv_end=(pos + 1).to(torch.int32).expand(R, 1), input_pos=pos)[:, -1]
        return torch.stack(tokens, dim=1)

    def _visual_tokens_recomputed(self, layout: PromptLayout, steps) -> torch.Tensor:
        (R, P), first = layout.input_ids.shape, layout.first
        embeds, kv_start, kv_end, positions = layout.inputs_embeds, layout.kv_start, layout.kv_end, layout.position_ids
        tokens = []
        for i in steps:
            hidden = self.decoder(inputs_embeds=embeds, position_ids=positions, kv_start=kv_start, kv_end=kv_end)
            token = F.normalize(self.vision_head(hidden[:, -1]).float(), dim=-1)
            tokens.append(token)
            L = P + i  # the new visual token's position: it sees the row from its first real position, causally
            embeds = torch.cat([embeds, self.adapter(token.to(embeds.dtype))[:, None]], dim=1)
            kv_start = torch.cat([kv_start, first[:, None]], dim=1)
            kv_end = torch.cat([kv_end, torch.full((R, 1), L + 1, dtype=torch.int32, device=first.device)], dim=1)
            positions = torch.cat([positions, (L - first.long())[:, None]], dim=1)
        return torch.stack(tokens, dim=1)

    def visualizer_loss(self, batch: "VisualizerBatch", generator: torch.Generator | None = None) -> Objective:
        """The visualizer stage: each image's SigLIP tokens (zeros where the condition is dropped)
        through ``sd_proj`` condition the SD1.5 UNet, trained with SD1.5's DDPM noise-prediction loss
        on the image's VAE latents."""
        unet, latents = _unet(self), batch.latents
        betas = ddpm_betas(SD15_SCHEDULE["num_train_timesteps"], SD15_SCHEDULE["beta_schedule"],
                           SD15_SCHEDULE["beta_start"], SD15_SCHEDULE["beta_end"])
        abar = ddpm_alphas_cumprod(betas).to(latents.device)
        t = sample_timesteps(latents.shape[0], len(abar), generator=generator, device=latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        x_t, target = ddpm_training_pair(latents, noise, abar[t], "epsilon")
        tokens = batch.tokens * batch.keep[:, None, None].to(batch.tokens.dtype)
        cond = self.sd_condition(tokens)
        pred = unet(x_t.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype)).sample
        loss = diffusion_loss(pred.float(), target.float())
        return Objective(loss, {"diffusion": loss})

    def sd_condition(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, width) visual tokens -> (B, T, cross_attention_dim) prompt embeddings for the SD1.5 UNet."""
        return self.sd_proj(visual_tokens.to(self.sd_proj.weight.dtype))


@dataclass
class VisualizerBatch:
    """The visualizer stage's batch: VAE latents (B, C, h, w), SigLIP tokens (B, T, width) of the same
    images, and ``keep`` (B,) bool (False: the condition is dropped)."""

    latents: torch.Tensor
    tokens: torch.Tensor
    keep: torch.Tensor

    def to(self, device) -> "VisualizerBatch":
        return VisualizerBatch(self.latents.to(device), self.tokens.to(device), self.keep.to(device))


class VisualizerImages:
    """The visualizer stage's image input: a picture at the UNet's resolution becomes its VAE latents
    and its SigLIP tokens (the frozen tower's, on the picture resized to the tower's resolution with
    the processor's normalisation), carried as one flat tensor per image (:func:`split_pair`)."""

    tensor_name = "visualizer"  # no ready-tensor fast path: the pair is computed from the picture

    def __init__(self, model: MetaMorph, codec, processor):
        from .vae import ResizeCrop, check_codec

        if codec is None:
            raise CheckpointError("the MetaMorph visualizer stage trains on VAE latents: give 'vae' (the SD1.5 VAE)")
        C, h, w = _latent_shape(model)
        check_codec(codec, C)
        self.model, self.codec, self.processor = model, codec, processor
        self.preprocess = ResizeCrop(h * codec.downsample, w * codec.downsample, 3)
        self.ready_shape = None

    def moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.encode(pixels), None

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, 3, H, W) pictures in [-1, 1] -> (N, C * h * w + T * width): latents (posterior mean), then tokens."""
        latents = self.codec.moments(pixels)[0]
        size, mean, std = self.processor.size, self.processor.image_mean, self.processor.image_std
        small = F.interpolate((pixels + 1) / 2, size=(size["height"], size["width"]), mode="bicubic", antialias=True,
                              align_corners=False)
        siglip = (small - torch.tensor(mean, device=small.device)[:, None, None]) / \
            torch.tensor(std, device=small.device)[:, None, None]
        tokens = self.model.visual_tokens(siglip)
        return torch.cat([latents.flatten(1), tokens.flatten(1).to(latents.dtype)], dim=1)

    def fingerprint(self) -> dict:
        return {"codec": self.codec.describe(), "preprocess": self.preprocess.describe(), "tokens": "siglip"}


def split_pair(model: MetaMorph, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) flat pairs of :class:`VisualizerImages` -> latents (N, C, h, w), tokens (N, T, width)."""
    C, h, w = _latent_shape(model)
    T, width = model.config.num_visual_tokens, model.vision.config.dim
    latents, tokens = packed.split([C * h * w, T * width], dim=1)
    return latents.reshape(-1, C, h, w), tokens.reshape(-1, T, width)


# ----------------------------------------------------------------------------------------------
# Native checkpoints (safetensors + config.json)
# ----------------------------------------------------------------------------------------------


def save_metamorph(model: MetaMorph, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write every tensor (the frozen SigLIP tower and UNet included; or ``state_dict``, e.g. a sharded
    model's gathered state) and the configs to one checkpoint folder."""
    cfg = {"model_type": MODEL_TYPE, "decoder": dataclasses.asdict(model.decoder.config),
           "vision": dataclasses.asdict(model.vision.config), "metamorph": dataclasses.asdict(model.config),
           "diffusion": None if model.diffusion is None else denoiser_config(model.diffusion)}
    save_checkpoint(path, cfg, model.state_dict() if state_dict is None else state_dict)


def load_metamorph(path: str | os.PathLike, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> MetaMorph:
    def builder(cfg: dict):
        # checkpoints from before the linear head was the default have the MLP one
        dec_cfg, mm_cfg = DecoderConfig(**cfg["decoder"]), MetaMorphConfig(**{"vision_head": "mlp", **cfg["metamorph"]})
        # the native file holds the tower's native keys, whatever layout it was first read from
        vision_cfg = SiglipVisionConfig(**{**cfg["vision"], "with_text_tower": False})
        unet_cfg = cfg.get("diffusion")

        def make() -> MetaMorph:
            unet = build_denoiser("sd15", unet_cfg) if unet_cfg else None
            return MetaMorph(Decoder(dec_cfg), SiglipVisionTower(vision_cfg), mm_cfg, unet)

        return make

    model = load_native(path, MODEL_TYPE, builder, dtype, device)
    set_trainable(model)
    return model


# ----------------------------------------------------------------------------------------------
# The family spec
# ----------------------------------------------------------------------------------------------


def check_parts(config: MetaMorphConfig, parts: dict[str, dict]) -> str | None:
    """Whether the UNet's config fits: its cross-attention width is ``sd_cross_attention_dim``."""
    unet = parts.get("diffusion")
    if unet is not None and unet.get("cross_attention_dim") != config.sd_cross_attention_dim:
        return (f"sd_cross_attention_dim={config.sd_cross_attention_dim} but the UNet's cross_attention_dim is "
                f"{unet.get('cross_attention_dim')}")
    return None


def build(parts: Parts, config: MetaMorphConfig) -> MetaMorph:
    if not isinstance(parts.vision, SiglipVisionTower):
        raise CheckpointError("family 'metamorph' needs 'vision': a SigLIP checkpoint folder")
    with torch.device(parts.decoder.embed.weight.device):
        return MetaMorph(parts.decoder, parts.vision, config, parts.diffusion)


def set_trainable(model: MetaMorph) -> None:
    """The LLM stage: everything but the SigLIP tower and the SD1.5 UNet. The visualizer stage: only
    the projection to the UNet's conditioning (and the UNet with ``train_unet``)."""
    visualizer = model.config.stage == "visualizer"
    model.requires_grad_(not visualizer)
    model.vision.requires_grad_(False)
    model.sd_proj.requires_grad_(True)
    if model.diffusion is not None:
        model.diffusion.requires_grad_(visualizer and model.config.train_unet)


def make_batch(model: MetaMorph, documents: list, row_len: int, rows: int | None = None,
               generator: torch.Generator | None = None) -> PackedBatch | VisualizerBatch:
    """Interleaved documents packed into ``rows`` rows (images: SigLIP pixels); causal over visual tokens too.
    The visualizer stage: the documents' generated (``diffuse``) images, conditions dropped by ``generator``."""
    c = model.config
    pairs = [s.tensor for doc in documents for s in doc if isinstance(s, Image) and s.diffuse]
    if c.stage == "visualizer" and pairs:  # (a prompt to lay out for generation holds no image to generate)
        latents, tokens = split_pair(model, torch.stack(pairs))
        keep = torch.rand(len(pairs), generator=generator, device=generator.device if generator else None) \
            >= c.condition_dropout
        return VisualizerBatch(latents, tokens, keep.to(latents.device))
    batch = pack(documents, row_len, c.num_visual_tokens, c.boi_token_id, c.eoi_token_id, max_rows=rows)
    batch.kv_start, batch.kv_end = mask_intervals(torch.zeros_like(batch.span_ids), batch.doc_ids)
    return batch


def _unet(model: MetaMorph) -> nn.Module:
    if model.diffusion is None:
        raise ValueError("this MetaMorph has no SD1.5 UNet to draw with (train it with 'diffusion': a UNet folder)")
    return model.diffusion


def image_prompt(model: MetaMorph, ids: list[int]) -> list[int]:
    boi = model.config.boi_token_id
    return list(ids) if ids and ids[-1] == boi else [*ids, boi]


@contextlib.contextmanager
def condition(model: MetaMorph, prompts: list[torch.Tensor], negatives: list[torch.Tensor],
              recompute: bool = False) -> Iterator[Denoiser]:
    """Text prompts (each ending in BOI; left-padded together): :func:`condition_layout` of their tokens."""
    rows, boi = list(prompts) + list(negatives), model.config.boi_token_id
    if not rows or any(r.dim() != 1 or r.numel() == 0 or int(r[-1]) != boi for r in rows):
        raise ValueError(f"prompts must be non-empty 1-D id tensors, each ending in BOI ({boi})")
    with condition_layout(model, PromptLayout.of_tokens(rows, model.decoder.embed), recompute) as denoise:
        yield denoise


@contextlib.contextmanager
def condition_layout(model: MetaMorph, layout: PromptLayout, recompute: bool = False) -> Iterator[Denoiser]:
    """Visual tokens generated once for every row (KV-cached), projected to the UNet's conditioning;
    then only the UNet runs per step. ``recompute=True``: tokens by full recomputation, projection per step."""
    unet = _unet(model)
    tokens = model.generate_visual_tokens(layout, recompute=recompute)
    tokens = _unconditional_as_zeros(tokens, layout.attention_mask.sum(dim=1) == 1)  # rows that are BOI alone
    cond = model.sd_condition(tokens)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        states = model.sd_condition(tokens) if recompute else cond
        return unet(x.to(unet.dtype), t, encoder_hidden_states=states.to(unet.dtype)).sample

    yield denoise


def _unconditional_as_zeros(tokens: torch.Tensor, unconditional: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance's unconditional rows (a prompt of BOI alone) condition the UNet with
    zero tokens: what the visualizer's condition dropout trains."""
    return tokens.masked_fill(unconditional[:, None, None].to(tokens.device), 0.0)


def _document_size(row_len: int, tokens_per_image: int, visualizer: bool, document: list) -> int:
    """The positions a document takes; the visualizer stage: a whole row per document with an image to generate."""
    if visualizer and any(isinstance(s, Image) and s.diffuse for s in document):
        return row_len
    return packed_size(document, tokens_per_image)


def _loss(model: MetaMorph, batch, generator) -> Objective:
    if isinstance(batch, VisualizerBatch):
        return model.visualizer_loss(batch, generator)
    if model.config.stage == "visualizer":
        raise ValueError("the visualizer stage trains on images to generate: a micro-batch held none")
    return model.training_loss(batch, generator)


def image_span(model: MetaMorph, hidden: torch.Tensor, starts: torch.Tensor, slot: int,
               draw: Callable[[Denoiser], torch.Tensor]) -> torch.Tensor:
    """Interleaved generation: after a BOI at ``slot - 1``, the visual tokens written one by one into
    the open KV cache (the text after them reads them), then drawn by the UNet conditioned on them."""
    tokens = model.visual_token_loop(hidden[:, -1], starts, slot, range(model.config.num_visual_tokens))
    tokens = _unconditional_as_zeros(tokens, starts == slot - 1)  # a row that restarted at this BOI
    cond, unet = model.sd_condition(tokens), _unet(model)
    return draw(lambda x, t: unet(x.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype)).sample)


def embed_prompt(model: MetaMorph, input_ids: torch.Tensor, modality: torch.Tensor,
                 pixels: torch.Tensor | None) -> torch.Tensor:
    """A prompt's images enter as their SigLIP tokens through the adapter (as in training)."""
    width = model.vision.config.dim
    tokens = model.visual_tokens(pixels) if pixels is not None else \
        torch.zeros(0, model.config.num_visual_tokens, width, device=input_ids.device)
    return model.embed_inputs(input_ids, modality, tokens)


def _image_input(model: MetaMorph, codec, processor) -> SiglipPixels:
    if processor is None:
        raise CheckpointError("MetaMorph reads images through its SigLIP image processor: the model folder has no "
                              "image_processor/ (preprocessor_config.json)")
    return SiglipPixels(processor)


def default_scheduler(model: MetaMorph):
    """DDIM with Stable Diffusion 1.5's schedule (the UNet's)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD15_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _latent_shape(model: MetaMorph) -> tuple[int, int, int]:
    c = _unet(model).config
    return c["in_channels"], c["sample_size"], c["sample_size"]


FAMILY = FamilySpec(
    name="metamorph",
    model_type=MODEL_TYPE,
    description=("MetaMorph (VPiT): LLM + frozen SigLIP tower, regresses visual tokens, draws through a frozen SD1.5 UNet; "
                 "trains all but the tower and the UNet"),
    config_class=MetaMorphConfig,
    parts=("vision", "diffusion"),
    special_tokens={"boi_token_id": "boi_token", "eoi_token_id": "eoi_token"},
    denoiser_kind=lambda config: "sd15",
    check_parts=check_parts,
    build=build,
    load=load_metamorph,
    save=save_metamorph,
    set_trainable=set_trainable,
    llm=lambda model: model.decoder,
    blocks=lambda model: list(model.decoder.layers),
    image_input=lambda model, codec, processor: VisualizerImages(model, codec, _image_input(model, codec, processor)
                                                                 .processor) if model.config.stage == "visualizer"
    else _image_input(model, codec, processor),
    document_size=lambda model, row_len: functools.partial(_document_size, row_len, model.config.num_visual_tokens,
                                                           model.config.stage == "visualizer"),
    make_batch=make_batch,
    loss=lambda model, batch, generator: _loss(model, batch, generator),
    count=lambda b: {"tokens": 0, "images": int(b.latents.shape[0])} if isinstance(b, VisualizerBatch) else
    {"tokens": b.num_text_tokens, "images": 0 if b.images is None else int(b.images.shape[0])},
    pipeline=PipelineHooks(
        latent_shape=_latent_shape,
        scheduler=default_scheduler,
        image_prompt=image_prompt,
        condition=condition,
        condition_layout=condition_layout,
        text_decoder=lambda model: model.decoder,
        image_positions=lambda model: model.config.num_visual_tokens + 1,
        embed_prompt=embed_prompt,
        image_start=lambda model: model.config.boi_token_id,
        image_end=lambda model: model.config.eoi_token_id,
        image_span=image_span,
        prompt_image_input=_image_input,  # SigLIP pixels, whatever stage the model was trained in
    ),
)
