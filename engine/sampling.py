"""Image generation for LlamaFusion / Transfusion by diffusion over a cached prompt.

The prompt (ending in BOI) is prefilled once into the static KV cache. Each denoising step runs only
the image chunk: its queries attend bidirectionally to themselves and to the cached prefix (extend
attention), so a step costs the same whatever the prompt length. Classifier-free guidance batches an
unconditional prefix beside the conditional one, both cached. ``recompute=True`` runs the reference
sampler instead, which feeds the whole sequence every step; both give the same image.
"""
from __future__ import annotations

import torch

from mmfuse._progress import progress_bar
from mmfuse.kernels import mask_intervals
from mmfuse.models.fusion import IMAGE, LlamaFusion


def default_scheduler(model: LlamaFusion):
    """A diffusers DDIM scheduler with the betas the model was trained with."""
    from diffusers import DDIMScheduler

    c = model.config
    return DDIMScheduler(num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                         beta_start=c.beta_start, beta_end=c.beta_end, prediction_type=c.prediction_type,
                         clip_sample=False, set_alpha_to_one=False)


def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D prompts left-padded to one length; returns (ids (R, P), first real index per row (R,))."""
    length = max(r.shape[0] for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long, device=rows[0].device)
    first = torch.empty(len(rows), dtype=torch.int32, device=rows[0].device)
    for i, r in enumerate(rows):
        ids[i, length - r.shape[0]:] = r
        first[i] = length - r.shape[0]
    return ids, first


@torch.no_grad()
def sample_images(
    model: LlamaFusion,
    prompt_ids: torch.Tensor | list[torch.Tensor],
    num_steps: int = 50,
    *,
    guidance_scale: float = 1.0,
    uncond_ids: torch.Tensor | None = None,
    scheduler=None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    recompute: bool = False,
    progress: bool | None = False,
) -> torch.Tensor:
    """Generate one image per prompt; returns latents (B, C, size, size).

    Args:
        prompt_ids: int (B, P), or a list of B 1-D prompts of any lengths (left-padded here);
            each ends with the BOI token.
        guidance_scale: classifier-free guidance weight (1.0 = off). The unconditional prompt is
            ``uncond_ids`` (B, P') or, by default, the BOI token alone.
        scheduler: a diffusers scheduler (DDPM / DDIM ...); default :func:`default_scheduler`.
        noise: (B, C, size, size) starting noise (default: drawn from ``generator``).
        recompute: run the reference sampler that feeds prompt + image every step (no cache).
    """
    c = model.config
    prompts = list(prompt_ids)
    if not prompts or any(p.dim() != 1 or p.numel() == 0 or int(p[-1]) != c.boi_token_id for p in prompts):
        raise ValueError(f"prompt_ids must be (B, P) or a list of 1-D prompts, each ending in BOI ({c.boi_token_id})")
    B, device = len(prompts), prompts[0].device
    cfg = guidance_scale != 1.0
    if cfg and uncond_ids is None:
        uncond_ids = torch.full((B, 1), c.boi_token_id, dtype=torch.long, device=device)
    ids, first = _left_pad(prompts + (list(uncond_ids) if cfg else []))
    rows, P, n = ids.shape[0], ids.shape[1], c.patches_per_image
    scheduler = scheduler or default_scheduler(model)
    scheduler.set_timesteps(num_steps, device=device)
    shape = (B, c.latent_channels, c.latent_size, c.latent_size)
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    x = noise if noise is not None else torch.randn(shape, generator=generator, device=device)
    x = x * scheduler.init_noise_sigma
    step_fn = _recomputing_step(model, ids, first, n) if recompute else _cached_step(model, ids, first, n)
    for t in progress_bar(scheduler.timesteps, progress, desc="diffusion"):
        x_in = scheduler.scale_model_input(x, t)
        x_rows = torch.cat([x_in, x_in]) if cfg else x_in
        eps = step_fn(x_rows, t.expand(rows).to(device))
        if cfg:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x


def _positions(first: torch.Tensor, length: int) -> torch.Tensor:
    """RoPE positions of a left-padded row: 0 at its first real token."""
    return (torch.arange(length, device=first.device)[None] - first[:, None].long()).clamp(min=0)


def _cached_step(model: LlamaFusion, ids: torch.Tensor, first: torch.Tensor, n: int):
    rows, P = ids.shape
    device = ids.device
    model.decoder.setup_cache(rows, P + n)
    no_images = torch.zeros(0, model.config.latent_channels, model.config.latent_size, model.config.latent_size,
                            device=device)
    prefix_end = (torch.arange(P, device=device) + 1).to(torch.int32).expand(rows, P)
    model(ids, torch.zeros_like(ids), no_images, torch.zeros(0, dtype=torch.long, device=device),
          first[:, None].expand(rows, P).contiguous(), prefix_end.contiguous(),
          position_ids=_positions(first, P), input_pos=torch.arange(P, device=device))
    chunk_ids = torch.zeros(rows, n, dtype=torch.long, device=device)
    chunk_modality = torch.full((rows, n), IMAGE, dtype=torch.long, device=device)
    kv_start = first[:, None].expand(rows, n).contiguous()
    kv_end = torch.full((rows, n), P + n, dtype=torch.int32, device=device)  # prefix + the whole chunk
    positions = _positions(first, P + n)[:, P:]
    slots = torch.arange(P, P + n, device=device)

    def step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, eps = model(chunk_ids, chunk_modality, x, t, kv_start, kv_end, position_ids=positions, input_pos=slots)
        return eps

    return step


def _recomputing_step(model: LlamaFusion, ids: torch.Tensor, first: torch.Tensor, n: int):
    rows, P = ids.shape
    device = ids.device
    for layer in model.decoder.layers:
        layer.attn.kv_cache = None
    full_ids = torch.cat([ids, torch.zeros(rows, n, dtype=torch.long, device=device)], dim=1)
    modality = torch.zeros_like(full_ids)
    modality[:, P:] = IMAGE
    doc_ids = (torch.arange(P + n, device=device)[None] < first[:, None]).long().neg()  # -1 on left padding
    kv_start, kv_end = mask_intervals(modality, doc_ids)
    positions = _positions(first, P + n)

    def step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, eps = model(full_ids, modality, x, t, kv_start, kv_end, position_ids=positions)
        return eps

    return step


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """diffusers ``AutoencoderKL`` latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1]."""
    scale = getattr(vae.config, "scaling_factor", 1.0)
    images = vae.decode(latents / scale).sample
    return (images / 2 + 0.5).clamp(0, 1)


def save_png(images: torch.Tensor, path, nrow: int = 8) -> None:
    """Save (B, C, H, W) images in [0, 1] as one grid PNG (C = 1 or 3)."""
    from PIL import Image as PILImage

    B, C, H, W = images.shape
    cols = min(nrow, B)
    grid_rows = (B + cols - 1) // cols
    grid = torch.ones(C, grid_rows * (H + 1) + 1, cols * (W + 1) + 1)
    for i in range(B):
        r, col = divmod(i, cols)
        grid[:, 1 + r * (H + 1):1 + r * (H + 1) + H, 1 + col * (W + 1):1 + col * (W + 1) + W] = images[i].float().cpu()
    array = (grid.permute(1, 2, 0).squeeze(-1).numpy() * 255).round().astype("uint8")
    PILImage.fromarray(array).save(path)
