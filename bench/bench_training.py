"""One optimizer step of each family, mmfuse vs what public reimplementations run, side by side.

Per family (LlamaFusion, MetaMorph, MetaQuery), one model with random weights and one packed batch
(text documents, caption -> image and image -> caption documents, packed into rows); the same
``Trainer.train_step`` (forward, backward, gradient clipping, AdamW; bf16 autocast on CUDA, frozen
parts frozen as the family prescribes) runs the model's ``training_loss`` ("mmfuse") and the loss of
:mod:`mmfuse.bench.baselines` on the same parameters ("baseline": dense L x L mask through SDPA, both
experts + ``torch.where``, materialised logits, eager losses). Steps alternate between the two so that
load from other processes drifts over both alike.

Rows: ms (one optimizer step; median, min, max), tokens/s and images/s, peak extra memory,
``vs_mmfuse`` (baseline ms / mmfuse ms; > 1: mmfuse faster), and on CUDA ``tflops`` (useful model
FLOPs per second, see :func:`step_flops`) and ``mfu`` (over the device's dense bf16 peak).

Sizes: CPU quick ~10-30M parameters, CPU full ~100M; CUDA full Llama-3.2-1B-shaped (hidden 2048, 16
layers, 32 heads / 8 KV heads, vocab 128256) with an so400m-shaped SigLIP and a SANA-600M-shaped decoder.

    python -m mmfuse.bench.bench_training [--quick] [--device cpu|cuda] [--out DIR]
"""
from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from mmfuse.bench import baselines
from mmfuse.engine.profile import PEAK_BF16_TFLOPS, device_peak
from mmfuse.bench.common import add_ratio, append_results, bench_main, measure_interleaved, print_table
from mmfuse.engine.packing import Image, PackedBatch
from mmfuse.engine.train import Trainer, TrainConfig
from mmfuse.models.decoder import Decoder, DecoderConfig
from mmfuse.models.denoisers import build_denoiser
from mmfuse.models.family import Parts, get_family
from mmfuse.models.fusion import FusionConfig
from mmfuse.models.metamorph import MetaMorphConfig
from mmfuse.models.metaquery import MetaQuery, MetaQueryConfig, connector_layer_config
from mmfuse.models.siglip import SiglipVisionConfig, SiglipVisionTower

FAMILIES = ("llamafusion", "metamorph", "metaquery")  # the rows' labels; the registry names the first "fusion"
SPEC_NAMES = {"llamafusion": "fusion", "metamorph": "metamorph", "metaquery": "metaquery"}
BOI, EOI = 3, 4  # token ids of the image markers; text tokens are drawn above them

# Dense bf16 tensor-core peaks (TFLOP/s), matched in order against torch.cuda.get_device_name.

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
LLAMA_3_2_1B = dict(vocab_size=128256, dim=2048, hidden_dim=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                    head_dim=64, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_embeddings=True)
SO400M = dict(dim=1152, hidden_dim=4304, num_layers=27, num_heads=16, image_size=384, patch_size=14)
SANA_600M = dict(in_channels=32, out_channels=32, num_attention_heads=16, attention_head_dim=72, num_layers=28,
                 num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152,
                 caption_channels=2304, sample_size=16, patch_size=1)


@dataclass
class Size:
    """Every shape of one benchmark size (all three families)."""

    label: str
    decoder: dict  # DecoderConfig fields
    batch: int  # packed rows (LlamaFusion, MetaMorph)
    row_len: int
    latent: tuple[int, int, int]  # LlamaFusion latent channels, size, patch size
    siglip: dict  # SiglipVisionConfig fields
    visual_tokens: int
    connector: dict  # MetaQueryConfig connector fields
    sana: dict  # SanaTransformer2DModel config
    queries: int
    prompt_len: int
    mq_batch: int
    rounds: int  # interleaved timing rounds


def sizes(quick: bool, device: torch.device, tiny: bool = False) -> Size:
    if tiny:
        rope = dict(LLAMA3_ROPE, original_max_position_embeddings=32)  # scaling active within the toy lengths
        return Size("tiny", dict(vocab_size=128, dim=64, hidden_dim=96, num_layers=2, num_heads=4, num_kv_heads=2,
                                 head_dim=16, tie_embeddings=True, rope_scaling=rope),
                    batch=2, row_len=64, latent=(4, 8, 2),
                    siglip=dict(dim=32, hidden_dim=64, num_layers=1, num_heads=2, image_size=28, patch_size=7),
                    visual_tokens=4,
                    connector=dict(connector_layers=1, connector_dim=32, connector_heads=2, connector_hidden_dim=64),
                    sana=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                              num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                              caption_channels=24, sample_size=8, patch_size=1),
                    queries=4, prompt_len=8, mq_batch=3, rounds=1)
    if device.type == "cuda":
        layers = 4 if quick else 16
        return Size(f"llama-3.2-1b-shaped ({layers} layers)", dict(LLAMA_3_2_1B, num_layers=layers),
                    batch=2, row_len=2048 if quick else 4096, latent=(4, 32, 2), siglip=dict(SO400M), visual_tokens=64,
                    connector=dict(connector_layers=6 if quick else 24, connector_dim=1024, connector_heads=16,
                                   connector_hidden_dim=4096),
                    sana=dict(SANA_600M, num_layers=4 if quick else 28), queries=64, prompt_len=128,
                    mq_batch=16 if quick else 32, rounds=3)
    if quick:  # ~11M parameters of which 8M the (tied) embeddings: the LM head weighs as in real models
        return Size("cpu-quick", dict(vocab_size=32000, dim=256, hidden_dim=768, num_layers=4, num_heads=4,
                                      num_kv_heads=2, head_dim=64, tie_embeddings=True, rope_theta=500000.0),
                    batch=1, row_len=512, latent=(4, 16, 2),
                    siglip=dict(dim=128, hidden_dim=512, num_layers=2, num_heads=2, image_size=112, patch_size=14),
                    visual_tokens=64,
                    connector=dict(connector_layers=2, connector_dim=256, connector_heads=4, connector_hidden_dim=768),
                    sana=dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=32, num_layers=2,
                              num_cross_attention_heads=4, cross_attention_head_dim=32, cross_attention_dim=128,
                              caption_channels=256, sample_size=16, patch_size=2),
                    queries=64, prompt_len=48, mq_batch=4, rounds=3)
    return Size("cpu-100m", dict(vocab_size=32000, dim=768, hidden_dim=2048, num_layers=8, num_heads=12, num_kv_heads=4,
                                 head_dim=64, tie_embeddings=True, rope_theta=500000.0),
                batch=2, row_len=1024, latent=(4, 32, 2),
                siglip=dict(dim=384, hidden_dim=1536, num_layers=4, num_heads=6, image_size=224, patch_size=14),
                visual_tokens=64,
                connector=dict(connector_layers=4, connector_dim=512, connector_heads=8, connector_hidden_dim=1536),
                sana=dict(in_channels=4, out_channels=4, num_attention_heads=6, attention_head_dim=64, num_layers=4,
                          num_cross_attention_heads=6, cross_attention_head_dim=64, cross_attention_dim=384,
                          caption_channels=768, sample_size=32, patch_size=2),
                queries=64, prompt_len=128, mq_batch=8, rounds=5)


# ----------------------------------------------------------------------------------------------
# Models (random weights) and batches
# ----------------------------------------------------------------------------------------------


def random_decoder(fields: dict, device: torch.device) -> Decoder:
    """A one-expert decoder with random weights (embeddings at std 0.02, as transformers initialises)."""
    with torch.device(device):
        decoder = Decoder(DecoderConfig(**fields))
    with torch.no_grad():
        decoder.embed.weight.normal_(0.0, 0.02)
    return decoder


def randomise_zero_init(module: nn.Module) -> None:
    """Layers that start at zero (LlamaFusion's output patch layer) get small random weights, so that
    every gradient path carries signal (a zero layer would hide a wrong gradient upstream)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.02)


def _documents(size: Size, tokens_per_image: int, make_image: Callable[[], torch.Tensor],
               gen: torch.Generator) -> list[list]:
    """Random documents filling exactly ``size.batch`` rows as :func:`pack` lays them out.

    Mix: 40 % caption -> image (the image gets the diffusion loss), 40 % image -> caption (a clean
    conditioning image), 20 % text only; captions 8-64 tokens, text documents up to half a row; the
    first two documents are one caption -> image and one image -> caption.
    """
    def text(n):
        return torch.randint(BOI + 2, size.decoder["vocab_size"], (n,), generator=gen).tolist()

    block = tokens_per_image + 2
    docs, rows, free = [], 1, size.row_len
    while True:
        # The first two documents are one of each image kind, so that every batch has both.
        kind = (0.0, 0.5)[len(docs)] if len(docs) < 2 else float(torch.rand((), generator=gen))
        caption = min(int(torch.randint(8, 65, (), generator=gen)), size.row_len - block)
        if kind < 0.4:
            doc, n = [text(caption), Image(make_image(), diffuse=True)], caption + block
        elif kind < 0.8:
            doc, n = [Image(make_image(), diffuse=False), text(caption)], caption + block
        else:
            n = int(torch.randint(16, max(17, size.row_len // 2), (), generator=gen))
            doc = [text(n)]
        if n > free:
            if rows == size.batch:
                if free >= 2:
                    docs.append([text(free)])  # top up the last row with a text document
                return docs
            rows, free = rows + 1, size.row_len
        docs.append(doc)
        free -= n


def packed_batch(model: nn.Module, family: str, size: Size, tokens_per_image: int, image_shape: tuple[int, ...],
                 seed: int = 0) -> PackedBatch:
    """The family's batch (its ``make_batch``) of documents filling exactly ``size.batch`` rows."""
    gen = torch.Generator().manual_seed(seed)
    docs = _documents(size, tokens_per_image, lambda: torch.randn(image_shape, generator=gen), gen)
    batch = get_family(family).make_batch(model, docs, size.row_len, None, None)
    if batch.input_ids.shape[0] != size.batch:
        raise RuntimeError(f"the document planner filled {size.batch} rows but packing made {batch.input_ids.shape[0]}")
    return batch


@dataclass
class Case:
    """One family at one size: the model, its batch, and the loss of each implementation."""

    family: str
    model: nn.Module
    batch: object
    losses: dict[str, Callable]  # impl -> loss_fn(batch, generator) -> Objective
    tokens: int  # sequence positions processed per step (padding excluded)
    images: int
    seq_len: int
    rows: int
    details: dict = field(default_factory=dict)


def build_model(family: str, parts: Parts, config) -> nn.Module:
    """The family's model through the registry, as ``mmfuse train`` builds it."""
    spec = get_family(SPEC_NAMES[family])
    model = spec.build(parts, config)
    spec.set_trainable(model)
    return model


def fusion_case(size: Size, device: torch.device) -> Case:
    channels, latent, patch = size.latent
    fusion = FusionConfig(latent_channels=channels, latent_size=latent, patch_size=patch, boi_token_id=BOI,
                          eoi_token_id=EOI)
    model = build_model("llamafusion", Parts(random_decoder(size.decoder, device)), fusion)
    randomise_zero_init(model)
    b = packed_batch(model, "fusion", size, fusion.patches_per_image, (channels, latent, latent)).to(device)
    gen = torch.Generator().manual_seed(1)
    # Both implementations take the same noise and timesteps from the batch, so neither draws any.
    b.extra = {"noise": torch.randn(b.images.shape, generator=gen).to(device),
               "timesteps": torch.randint(0, fusion.num_train_timesteps, (b.images.shape[0],), generator=gen).to(device)}
    spec = get_family("fusion")
    losses = {"mmfuse": lambda batch, g: spec.loss(model, batch, g),
              "baseline": lambda batch, g: baselines.fusion_loss(model, batch, **batch.extra)}
    return Case("llamafusion", model, b, losses, _real_tokens(b), b.images.shape[0], size.row_len, size.batch,
                dict(patches_per_image=fusion.patches_per_image, image_token_fraction=_image_fraction(b)))


def metamorph_case(size: Size, device: torch.device) -> Case:
    vision_cfg = SiglipVisionConfig(**size.siglip)
    config = MetaMorphConfig(num_visual_tokens=size.visual_tokens, boi_token_id=BOI, eoi_token_id=EOI)
    with torch.device(device):
        vision = SiglipVisionTower(vision_cfg)
    model = build_model("metamorph", Parts(random_decoder(size.decoder, device), vision=vision), config)
    img = vision_cfg.image_size
    b = packed_batch(model, "metamorph", size, size.visual_tokens, (3, img, img)).to(device)  # causal intervals
    spec = get_family("metamorph")
    losses = {"mmfuse": lambda batch, g: spec.loss(model, batch, g),
              "baseline": lambda batch, g: baselines.metamorph_loss(model, batch)}
    return Case("metamorph", model, b, losses, _real_tokens(b), b.images.shape[0], size.row_len, size.batch,
                dict(visual_tokens=size.visual_tokens, siglip_patches=vision_cfg.num_patches,
                     image_token_fraction=_image_fraction(b)))


def metaquery_case(size: Size, device: torch.device) -> Case:
    config = MetaQueryConfig(num_queries=size.queries, cond_dim=size.sana["caption_channels"], decoder="sana",
                             **size.connector)
    with torch.device(device):
        sana = build_denoiser("sana", size.sana)
    model = build_model("metaquery", Parts(random_decoder(size.decoder, device), diffusion=sana), config)
    gen = torch.Generator().manual_seed(0)
    B, P = size.mq_batch, size.prompt_len
    lengths = torch.randint(P // 4, P + 1, (B,), generator=gen)
    lengths[0] = P
    s, c = size.sana["sample_size"], size.sana["in_channels"]
    docs = [[torch.randint(BOI + 2, size.decoder["vocab_size"], (int(n),), generator=gen),
             Image(torch.randn(c, s, s, generator=gen))] for n in lengths]
    spec = get_family("metaquery")
    batch = spec.make_batch(model, docs, P, None, None).to(device)  # prompts left-padded, one image each
    losses = {"mmfuse": lambda batch, g: spec.loss(model, batch, g),
              "baseline": lambda batch, g: baselines.metaquery_loss(model, batch, generator=g)}
    return Case("metaquery", model, batch, losses, int(lengths.sum()) + B * size.queries, B, P + size.queries, B,
                dict(queries=size.queries, prompt_len=P, connector_layers=config.connector_layers,
                     diffusion_tokens=(s // size.sana["patch_size"]) ** 2))


CASES = {"llamafusion": fusion_case, "metamorph": metamorph_case, "metaquery": metaquery_case}


def _real_tokens(b: PackedBatch) -> int:
    return int((b.doc_ids >= 0).sum())


def _image_fraction(b: PackedBatch) -> float:
    return round(float((b.modality > 0).sum()) / max(1, _real_tokens(b)), 3)


# ----------------------------------------------------------------------------------------------
# Useful FLOPs (for TFLOP/s and MFU)
# ----------------------------------------------------------------------------------------------


def _layer_params(c: DecoderConfig) -> int:
    """Weights one token passes through in one layer (one expert)."""
    return c.dim * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * c.dim \
        + 3 * c.dim * c.hidden_dim


def stack_flops(c: DecoderConfig, tokens: float, pairs: float, trainable: float, backward: bool = True) -> float:
    """FLOPs of ``c.num_layers`` transformer layers over ``tokens`` tokens.

    GEMMs: 2 per weight and token forward; backward 2 more for the input gradient and 2 for the weight
    gradient of the ``trainable`` tokens (those whose expert trains). Attention: 4 * Dh * Hq per visible
    (query, key) pair forward (QK^T and PV), twice that backward; ``pairs`` counts only unmasked ones.
    """
    p = _layer_params(c)
    gemm = 2 * p * tokens + (2 * p * tokens + 2 * p * trainable if backward else 0)
    attn = 4 * c.head_dim * c.num_heads * pairs * (3 if backward else 1)
    return c.num_layers * (gemm + attn)


def _pairs(kv_start: torch.Tensor, kv_end: torch.Tensor) -> float:
    return float((kv_end.long() - kv_start.long()).clamp_min(0).sum())


def _lm_head_flops(c: DecoderConfig, rows: int, trainable: bool) -> float:
    return 2 * c.vocab_size * c.dim * rows * (3 if trainable else 2)


def step_flops(case: Case) -> float:
    """Useful FLOPs of one training step: the transformer stacks (decoder, connector, SigLIP tower
    forward), the LM head over the labelled rows and the diffusion decoder (measured by
    ``FlopCounterMode``, forward x 3); the small MLPs around them (patchifier, timestep MLP, adapter,
    vision head) are left out (< 1 %)."""
    m, b = case.model, case.batch
    if case.family == "llamafusion":
        c = m.decoder.config
        image = float((b.modality == 1).sum())
        text = case.tokens - image
        frozen_text = not m.config.train_text
        flops = stack_flops(c, case.tokens, _pairs(b.kv_start, b.kv_end), image + (0 if frozen_text else text))
        return flops + _lm_head_flops(c, int((b.labels[:, 1:] != -100).sum()), not frozen_text)
    if case.family == "metamorph":
        c, v = m.decoder.config, m.vision.config
        flops = stack_flops(c, case.tokens, _pairs(b.kv_start, b.kv_end), case.tokens)  # causal intervals
        flops += _lm_head_flops(c, int((b.labels[:, 1:] != -100).sum()), True)
        n = b.images.shape[0] * v.num_patches  # frozen tower, forward only: GEMMs + attention over all patches
        gemm_params = 4 * v.dim * v.dim + 2 * v.dim * v.hidden_dim
        return flops + v.num_layers * (2 * gemm_params * n + 4 * v.dim * n * v.num_patches)
    latents, prompt_mask = b.images, b.prompt_mask
    c, B, N = m.llm.config, latents.shape[0], m.config.num_queries
    lengths = prompt_mask.sum(1).double()
    llm_pairs = float((lengths * (lengths + 1) / 2 + N * lengths + N * (N + 1) / 2).sum())
    flops = stack_flops(c, case.tokens, llm_pairs, 0)
    flops += stack_flops(connector_layer_config(c, m.config), B * N, B * N * N, B * N)
    return flops + 3 * _diffusion_forward_flops(m, latents)


def _diffusion_forward_flops(model: MetaQuery, latents: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    B = latents.shape[0]
    cond = torch.zeros(B, model.config.num_queries, model.config.cond_dim, device=latents.device)
    t = torch.full((B,), 500.0, device=latents.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.denoise(latents, t, cond)
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def train_config() -> TrainConfig:
    # A tiny constant-ish learning rate keeps random weights finite over the benchmark's steps;
    # AdamW costs the same whatever the rate.
    return TrainConfig(steps=10**9, lr=1e-6, warmup_steps=0, grad_clip=1.0, autocast="auto")


def measure_case(case: Case, device: torch.device, rounds: int, size_label: str) -> list[dict]:
    trainer = Trainer(case.model, case.losses["mmfuse"], lambda step, micro: case.batch, train_config())

    def step_with(loss_fn):
        def step():
            trainer.loss_fn = loss_fn  # one trainer, one optimizer: both implementations pay the same AdamW
            trainer.train_step()
        return step

    measured = measure_interleaved({impl: step_with(fn) for impl, fn in case.losses.items()}, device, rounds)
    params = sum(p.numel() for p in case.model.parameters())
    trainable = sum(p.numel() for p in case.model.parameters() if p.requires_grad)
    flops, peak = (step_flops(case), device_peak(PEAK_BF16_TFLOPS, device)) if device.type == "cuda" else (None, None)
    rows = []
    for impl, m in measured.items():
        row = {"family": case.family, "impl": impl, "size": size_label, "params": params, "trainable_params": trainable,
               "seq_len": case.seq_len, "batch": case.rows, **m}
        if "ms" in m:
            row["tokens_per_s"] = case.tokens / (m["ms"] * 1e-3)
            row["images_per_s"] = case.images / (m["ms"] * 1e-3)
            if flops is not None:
                row["tflops"] = flops / (m["ms"] * 1e-3) / 1e12
                row["mfu"] = row["tflops"] / peak if peak else None
        rows.append(row)
    return rows


def run(quick: bool, device: torch.device, out_dir: str | None, tiny: bool = False,
        families: tuple[str, ...] = FAMILIES) -> list[dict]:
    quick = quick or tiny
    device = torch.device(device)
    size = sizes(quick, device, tiny)
    rows, details = [], {}
    for family in families:
        torch.manual_seed(0)
        case = CASES[family](size, device)
        print(f"{family}: {sum(p.numel() for p in case.model.parameters()) / 1e6:.1f}M parameters, "
              f"{case.tokens} tokens, {case.images} images per step", flush=True)
        rows += measure_case(case, device, size.rounds, size.label)
        details[family] = dict(tokens=case.tokens, images=case.images, **case.details)
        del case
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_ratio(rows, ("family", "size"), "vs_mmfuse")
    print_table(rows, ["family", "impl", "size", "params", "seq_len", "batch", "ms", "ms_min", "ms_max", "vs_mmfuse",
                       "tokens_per_s", "images_per_s", "peak_mib", "tflops", "mfu", "error"])
    config = dict(quick=quick, tiny=tiny, size=dataclasses.asdict(size),
                  autocast="bf16" if device.type == "cuda" else "off", optimizer="AdamW (Trainer.train_step)",
                  backend="triton" if device.type == "cuda" else "torch", families=details)
    append_results("training", device, config, rows, out_dir)
    return rows


def main(argv: list[str] | None = None) -> None:
    bench_main(run, __doc__, argv, quick_help="CPU ~10-30M parameters (CUDA: 4 layers of the 1B shape)")


if __name__ == "__main__":
    main()
