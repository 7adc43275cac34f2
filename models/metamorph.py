"""MetaMorph (VPiT): an LLM that reads and regresses SigLIP visual tokens, decoded by Stable Diffusion 1.5.

An image becomes ``BOI``, ``num_visual_tokens`` positions, ``EOI`` (the packer's layout, ``modality``
1 on the visual positions). The frozen SigLIP tower's patch features are interpolated to 64 tokens and
L2-normalised; the adapter (Linear-GELU-Linear) maps them into the LLM. Attention is causal everywhere:
visual tokens are generated one after another. The vision head (Linear-GELU-Linear to the SigLIP
width) at position i regresses the visual token at i + 1 with a cosine loss, beside the text CE.
Generated visual tokens condition an SD1.5 ``UNet2DConditionModel`` through a linear projection to its
cross-attention width.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmfuse._progress import progress_bar
from mmfuse.kernels import mask_intervals
from mmfuse.kernels.objectives import Objective, metamorph_objective

from .decoder import Decoder, DecoderConfig
from .hf_io import load_native, save_checkpoint
from .siglip import SiglipVisionConfig, SiglipVisionTower, pool_to_tokens

TEXT, VISUAL = 0, 1


@dataclass
class MetaMorphConfig:
    num_visual_tokens: int = 64
    boi_token_id: int = 0
    eoi_token_id: int = 1
    lambda_cosine: float = 1.0
    sd_cross_attention_dim: int = 768  # SD1.5's text-encoder width


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class MetaMorph(nn.Module):
    def __init__(self, decoder: Decoder, vision: SiglipVisionTower, config: MetaMorphConfig):
        super().__init__()
        self.config = config
        self.decoder = decoder
        self.vision = vision.requires_grad_(False).eval()  # frozen encoder
        width, dim = vision.config.dim, decoder.config.dim
        self.adapter = _mlp(width, dim, dim)
        self.vision_head = _mlp(dim, dim, width)
        self.sd_proj = nn.Linear(width, config.sd_cross_attention_dim)

    @torch.no_grad()
    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, num_visual_tokens, width) L2-normalised SigLIP tokens (the targets)."""
        return pool_to_tokens(self.vision(pixel_values), self.config.num_visual_tokens)

    def forward(self, input_ids: torch.Tensor, modality: torch.Tensor, visual_tokens: torch.Tensor,
                kv_start: torch.Tensor, kv_end: torch.Tensor, position_ids: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, L, dim); ``visual_tokens`` (N, T, width) fill the ``modality == 1`` positions in order."""
        x = self.decoder.embed(input_ids)
        n_visual = visual_tokens.shape[0] * visual_tokens.shape[1]
        if not torch.compiler.is_compiling() and int((modality == VISUAL).sum()) != n_visual:
            raise ValueError(f"modality marks {int((modality == VISUAL).sum())} visual positions but "
                             f"visual_tokens holds {n_visual}")
        if n_visual:
            embeds = self.adapter(visual_tokens.reshape(n_visual, -1).to(x.dtype))
            # under autocast the adapter's output is bf16 while the embeddings stay in the weights' dtype
            x = x.masked_scatter((modality == VISUAL)[..., None], embeds.to(x.dtype))
        return self.decoder(inputs_embeds=x, position_ids=position_ids, kv_start=kv_start, kv_end=kv_end,
                            input_pos=input_pos)

    def training_loss(self, input_ids: torch.Tensor, modality: torch.Tensor, labels: torch.Tensor,
                      pixel_values: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor,
                      position_ids: torch.Tensor | None = None) -> Objective:
        """Text CE (labels (B, L), -100 where none; position i predicts labels[i + 1]) + cosine on visual tokens.

        ``kv_start``/``kv_end`` should be causal (``mask_intervals`` with no spans, documents allowed).
        """
        targets = self.visual_tokens(pixel_values)
        hidden = self(input_ids, modality, targets, kv_start, kv_end, position_ids)
        predicts_visual = modality[:, 1:] == VISUAL  # position i regresses the visual token at i + 1
        pred = self.vision_head(hidden[:, :-1][predicts_visual])
        return metamorph_objective(
            pred, targets.reshape(-1, targets.shape[-1]).to(pred.dtype),
            hidden=hidden[:, :-1].reshape(-1, hidden.shape[-1]), lm_weight=self.decoder.lm_head_weight,
            labels=labels[:, 1:].reshape(-1), lambda_cosine=self.config.lambda_cosine,
        )

    @torch.no_grad()
    def generate_visual_tokens(self, prompt_ids: torch.Tensor, progress: bool | None = False) -> torch.Tensor:
        """Prompt (B, P) ending in BOI -> (B, num_visual_tokens, width) tokens, generated with the KV cache.

        Each step's vision-head output is L2-normalised (the targets live on the unit sphere) and fed
        back through the adapter as the next input.
        """
        c = self.config
        if prompt_ids.dim() != 2 or bool((prompt_ids[:, -1] != c.boi_token_id).any()):
            raise ValueError(f"prompt_ids must be (B, P) with every row ending in BOI ({c.boi_token_id})")
        B, P = prompt_ids.shape
        device = prompt_ids.device
        self.decoder.setup_cache(B, P + c.num_visual_tokens)
        start = torch.zeros(B, 1, dtype=torch.int32, device=device)
        kv_start, kv_end = mask_intervals(torch.zeros_like(prompt_ids))
        hidden = self.decoder(prompt_ids, kv_start=kv_start, kv_end=kv_end, input_pos=torch.arange(P, device=device))
        tokens = []
        for i in progress_bar(range(c.num_visual_tokens), progress, desc="visual tokens"):
            token = F.normalize(self.vision_head(hidden[:, -1]).float(), dim=-1)
            tokens.append(token)
            if i + 1 == c.num_visual_tokens:
                break
            pos = torch.tensor([P + i], device=device)
            hidden = self.decoder(inputs_embeds=self.adapter(token.to(hidden.dtype))[:, None],
                                  position_ids=pos.expand(B, 1), kv_start=start,
                                  kv_end=(pos + 1).to(torch.int32).expand(B, 1), input_pos=pos)
        return torch.stack(tokens, dim=1)

    def sd_condition(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, width) visual tokens -> (B, T, cross_attention_dim) prompt embeddings for an SD1.5 UNet."""
        return self.sd_proj(visual_tokens.to(self.sd_proj.weight.dtype))

    @torch.no_grad()
    def decode_images(self, unet, scheduler, visual_tokens: torch.Tensor, num_steps: int = 50,
                      generator: torch.Generator | None = None, progress: bool | None = False) -> torch.Tensor:
        """Run the SD1.5 denoising loop conditioned on the tokens; returns latents (B, C, h, w)."""
        cond = self.sd_condition(visual_tokens)
        size = unet.config.sample_size
        latents = torch.randn(cond.shape[0], unet.config.in_channels, size, size, generator=generator,
                              device=cond.device) * scheduler.init_noise_sigma
        scheduler.set_timesteps(num_steps, device=cond.device)
        for t in progress_bar(scheduler.timesteps, progress, desc="sd1.5"):
            eps = unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=cond).sample
            latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
        return latents


# ----------------------------------------------------------------------------------------------
# Native checkpoints (safetensors + config.json)
# ----------------------------------------------------------------------------------------------

MODEL_TYPE = "mmfuse_metamorph"


def save_metamorph(model: MetaMorph, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write every tensor (the frozen SigLIP tower included; or ``state_dict``, e.g. a sharded model's
    gathered state) and the three configs to one checkpoint folder."""
    cfg = {"model_type": MODEL_TYPE, "decoder": dataclasses.asdict(model.decoder.config),
           "vision": dataclasses.asdict(model.vision.config), "metamorph": dataclasses.asdict(model.config)}
    save_checkpoint(path, cfg, model.state_dict() if state_dict is None else state_dict)


def load_metamorph(path: str | os.PathLike, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> MetaMorph:
    def builder(cfg: dict):
        dec_cfg, mm_cfg = DecoderConfig(**cfg["decoder"]), MetaMorphConfig(**cfg["metamorph"])
        # the native file holds the tower's native keys, whatever layout it was first read from
        vision_cfg = SiglipVisionConfig(**{**cfg["vision"], "with_text_tower": False})
        return lambda: MetaMorph(Decoder(dec_cfg), SiglipVisionTower(vision_cfg), mm_cfg)

    return load_native(path, MODEL_TYPE, builder, dtype, device)
