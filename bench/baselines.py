"""What public reimplementations of the three families run, on the parameters of an mmfuse model.

Each baseline reads the weights of the mmfuse model it is given (no copy), so a benchmark compares
the same work on the same numbers and a test can check that both give the same loss and gradients.
What differs is how the work is done, as in public Transfusion / LlamaFusion / MetaMorph / MetaQuery
code:

* attention: a dense (B, 1, L, L) bool mask through ``F.scaled_dot_product_attention`` (keys and
  values repeated to all query heads, as transformers' ``repeat_kv``), not per-query intervals;
* modality routing (LlamaFusion): both experts run over every token and ``torch.where`` picks one
  (QKV, O, the MLP and every norm), not one expert per token;
* ``F.rms_norm``, RoPE by ``rotate_half`` on (B, 1, L, Dh) cos/sin tables (transformers' Llama);
* losses: materialised logits + ``F.cross_entropy``, eager MSE and ``F.cosine_similarity``.

Left as in mmfuse, because they are not what is being compared: the embeddings, the patchifier and
timestep MLP of LlamaFusion, MetaMorph's frozen SigLIP tower, adapter and vision head, MetaQuery's
noise-level draws and its diffusers decoder (the same module in both), and the mask itself (built
from the same intervals with ``dense_mask``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfuse.kernels import dense_mask, sample_sigmas, sample_timesteps
from mmfuse.kernels.objectives import Objective
from mmfuse.models.decoder import Decoder
from mmfuse.engine.packing import PackedBatch
from mmfuse.models.fusion import LlamaFusion, patchify, timestep_features, unpatchify
from mmfuse.models.layers import MixedAttention, RoutedLinear, RoutedMLP, RoutedRMSNorm
from mmfuse.models.metamorph import MetaMorph
from mmfuse.models.metaquery import Connector, MetaQuery, PromptImageBatch
from mmfuse.models.modality import IMAGE

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------
# Layers: both experts + torch.where, dense-mask SDPA, eager RoPE
# ----------------------------------------------------------------------------------------------


def _where(is_image: torch.Tensor | None, outputs: list[torch.Tensor]) -> torch.Tensor:
    """One expert's output as is; two: ``torch.where`` on the (B, L) image mask."""
    if len(outputs) == 1:
        return outputs[0]
    return torch.where(is_image[..., None], outputs[1], outputs[0])


def linear(layer: RoutedLinear, x: torch.Tensor, is_image: torch.Tensor | None) -> torch.Tensor:
    """(B, L, Din) -> (B, L, Dout): every expert over every token, then select."""
    biases = list(layer.biases) if layer.biases is not None else [None] * len(layer.weights)
    return _where(is_image, [F.linear(x, w, b) for w, b in zip(layer.weights, biases)])


def rms_norm(norm: RoutedRMSNorm, x: torch.Tensor, is_image: torch.Tensor | None) -> torch.Tensor:
    return _where(is_image, [F.rms_norm(x, (x.shape[-1],), w, norm.eps) for w in norm.weights])


def mlp(layer: RoutedMLP, x: torch.Tensor, is_image: torch.Tensor | None) -> torch.Tensor:
    """SwiGLU per expert (the whole MLP, as a per-modality ``nn.Module`` would run it), then select."""
    outs = []
    for gate_up, down in zip(layer.gate_up.weights, layer.down.weights):
        gate, up = F.linear(x, gate_up).split(layer.hidden_dim, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, down))
    return _where(is_image, outs)


def rope_tables(inv_freq: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``LlamaRotaryEmbedding``: position_ids (B, L) -> cos, sin (B, 1, L, Dh) in fp32."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def attention(attn: MixedAttention, x: torch.Tensor, is_image: torch.Tensor | None, cos: torch.Tensor,
              sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, L, dim), mask bool (B, 1, L, L) or None (every key) -> (B, L, dim)."""
    B, L, _ = x.shape
    qkv = linear(attn.qkv, x, is_image).view(B, L, -1, attn.head_dim).transpose(1, 2)
    q, k, v = qkv.split([attn.num_heads, attn.num_kv_heads, attn.num_kv_heads], dim=1)
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    groups = attn.num_heads // attn.num_kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return linear(attn.o, out.transpose(1, 2).reshape(B, L, -1), is_image)


def layers_forward(layers, x: torch.Tensor, mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                   is_image: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-norm decoder layers (``DecoderLayer``'s weights) over x (B, L, dim)."""
    for layer in layers:
        x = x + attention(layer.attn, rms_norm(layer.attn_norm, x, is_image), is_image, cos, sin, mask)
        x = x + mlp(layer.mlp, rms_norm(layer.mlp_norm, x, is_image), is_image)
    return x


def sdpa_mask(kv_start: torch.Tensor, kv_end: torch.Tensor) -> torch.Tensor:
    """The (B, 1, L, L) bool mask of the intervals; a query with no key (padding) sees itself, as
    transformers does for SDPA, so that no row is fully masked (its output is never used)."""
    L = kv_start.shape[1]
    mask = dense_mask(kv_start, kv_end, L)
    empty = (kv_end <= kv_start)[..., None] & torch.eye(L, dtype=torch.bool, device=mask.device)
    return (mask | empty)[:, None]


def decoder_forward(decoder: Decoder, x: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor | None,
                    is_image: torch.Tensor | None = None) -> torch.Tensor:
    """Embeddings x (B, L, dim) -> final hidden states (B, L, dim)."""
    if position_ids is None:
        position_ids = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    cos, sin = rope_tables(decoder.inv_freq, position_ids)
    return rms_norm(decoder.norm, layers_forward(decoder.layers, x, mask, cos, sin, is_image), is_image)


def lm_cross_entropy(decoder: Decoder, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE over materialised (B, L - 1, V) fp32 logits; labels (B, L), -100 where none."""
    logits = F.linear(hidden[:, :-1], decoder.lm_head_weight).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def mse(pred: torch.Tensor, target: torch.Tensor, sample_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the selected samples (all if None; 0 if none) of each sample's mean squared error."""
    per_sample = (pred.float() - target.float()).square().flatten(1).mean(dim=1)
    if sample_mask is None:
        return per_sample.mean()
    return (per_sample * sample_mask).sum() / sample_mask.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------
# The three families
# ----------------------------------------------------------------------------------------------


def fusion_loss(model: LlamaFusion, batch: PackedBatch, *, noise: torch.Tensor, timesteps: torch.Tensor) -> Objective:
    """``LlamaFusion.training_loss`` as public code computes it (same batch; noise (N, C, S, S) and
    timesteps (N,) given, so both draw nothing)."""
    c = model.config
    input_ids, modality, labels, latents = batch.input_ids, batch.modality, batch.labels, batch.images
    kv_start, kv_end, position_ids, image_mask = batch.kv_start, batch.kv_end, batch.position_ids, batch.image_loss_mask
    abar = model.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    target = noise if c.prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
    if image_mask is not None:  # clean conditioning images at t = 0
        timesteps = torch.where(image_mask, timesteps, 0)
        x_t = torch.where(image_mask.view(-1, 1, 1, 1), x_t, latents)
    # Embeddings, timestep MLP and patchifier: mmfuse's own modules (not what is compared).
    x = model.decoder.embed(input_ids)
    is_image = modality == IMAGE
    temb = model.time_mlp(timestep_features(timesteps, c.timestep_dim).to(x.dtype))
    if c.patchify == "unet":
        patches, skips = model.unet.encode(x_t.to(x.dtype), temb)
    else:
        patches = model.patch_in(patchify(x_t.to(x.dtype), c.patch_size))
    x = x.masked_scatter(is_image[..., None], (patches + temb[:, None]).to(x.dtype))
    hidden = decoder_forward(model.decoder, x, sdpa_mask(kv_start, kv_end), position_ids, is_image)
    tokens = hidden[is_image].view(latents.shape[0], c.patches_per_image, -1)
    if c.patchify == "unet":
        pred = model.unet.decode(tokens, temb, skips)
    else:
        pred = unpatchify(model.patch_out(tokens), c.latent_channels, c.latent_size, c.patch_size)
    lm = lm_cross_entropy(model.decoder, hidden, labels)
    diffusion = mse(pred, target, image_mask)
    return Objective(lm + c.lambda_diffusion * diffusion, {"lm": lm, "diffusion": diffusion})


def metamorph_loss(model: MetaMorph, batch: PackedBatch) -> Objective:
    """``MetaMorph.training_loss`` as public code computes it (the same causal batch)."""
    modality, labels = batch.modality, batch.labels
    targets = model.visual_tokens(batch.images)  # the frozen SigLIP tower: mmfuse's in both
    x = model.decoder.embed(batch.input_ids)
    visual = (modality == IMAGE)[..., None]
    x = x.masked_scatter(visual, model.adapter(targets.reshape(-1, targets.shape[-1]).to(x.dtype)).to(x.dtype))
    hidden = decoder_forward(model.decoder, x, sdpa_mask(batch.kv_start, batch.kv_end), batch.position_ids)
    pred = model.vision_head(hidden[:, :-1][modality[:, 1:] == IMAGE])
    per_token = 1 - F.cosine_similarity(pred.float(), targets.reshape(-1, targets.shape[-1]).float(), dim=-1)
    if not model.config.cosine_on_inputs:  # the answer images' tokens only, as the official code
        per_token = per_token[batch.image_loss_mask.repeat_interleave(targets.shape[1]).to(per_token.device)]
    cosine = per_token.mean()
    lm = lm_cross_entropy(model.decoder, hidden, labels)
    return Objective(lm + model.config.lambda_cosine * cosine, {"lm": lm, "cosine": cosine})


def connector_forward(connector: Connector, x: torch.Tensor) -> torch.Tensor:
    """(B, N, in_dim) -> (B, N, cond_dim): bidirectional encoder (SDPA without a mask), projection."""
    x = connector.proj_in(x)
    B, N, _ = x.shape
    cos, sin = rope_tables(connector.inv_freq, torch.arange(N, device=x.device).expand(B, N))
    x = rms_norm(connector.norm, layers_forward(connector.layers, x, None, cos, sin), None)
    return rms_norm(connector.out_norm, connector.proj_out(x), None)


def metaquery_loss(model: MetaQuery, batch: PromptImageBatch, generator: torch.Generator | None = None) -> Objective:
    """``MetaQuery.training_loss`` as public code computes it: padded prompts + queries in place, a
    causal mask with key padding, then the connector and the diffusion decoder. Draws the same random
    numbers in the same order as mmfuse, so equal generators give equal losses."""
    c, llm = model.config, model.llm
    prompt_ids, latents, keep = batch.prompt_ids, batch.images, batch.prompt_mask
    B, P = prompt_ids.shape
    if model.training and c.prompt_dropout > 0:
        dropped = torch.rand(B, generator=generator, device=latents.device) < c.prompt_dropout
        keep = keep & ~dropped[:, None].to(keep.device)
    x = torch.cat([llm.embed(prompt_ids), model.queries.to(llm.embed.weight.dtype).expand(B, -1, -1)], dim=1)
    valid = torch.cat([keep, keep.new_ones(B, c.num_queries)], dim=1)
    L = valid.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    mask = (causal & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=x.device)  # padding sees itself
    position_ids = (valid.cumsum(1) - 1).clamp_min(0)
    hidden = decoder_forward(llm, x, mask[:, None], position_ids)[:, P:]
    cond = connector_forward(model.connector, hidden.to(model.connector.norm.weights[0].dtype))
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if c.decoder == "sana":  # rectified flow
        sigmas = sample_sigmas(B, c.sigma_density, shift=c.flow_shift, generator=generator, device=latents.device)
        s = sigmas.view(-1, 1, 1, 1)
        x_t, target, timesteps = (1 - s) * latents + s * noise, noise - latents, sigmas * c.num_train_timesteps
    else:  # DDPM
        timesteps = sample_timesteps(B, c.num_train_timesteps, generator=generator, device=latents.device)
        abar = model.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        target = noise if c.prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
    diffusion = mse(model.denoise(x_t, timesteps, cond), target)
    return Objective(diffusion, {"diffusion": diffusion})
