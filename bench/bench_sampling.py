"""Sampling: text decode vs transformers ``generate``, image generation cached vs recomputing.

* decode: a random Llama saved as a transformers checkpoint, loaded by transformers and by
  ``mmfuse.models.from_pretrained``; greedy continuation of the same prompt by ``mmfuse.engine.generate``
  (static KV cache; "mmfuse": eager decode step, "mmfuse_compiled": ``compile=True``, CUDA graphs on
  CUDA, its one-off compilation left out of the timing and skipped in tiny runs) and by transformers'
  ``model.generate(do_sample=False)``, at batch 1 and 8. ``tokens_match``: the row produced the eager
  mmfuse tokens (``first_mismatch``: the first step where they differ; in bf16 a near-tie may go
  either way).
  ``gbps`` = bytes a decode step must read (weights + the KV cache so far) x steps / time (the
  prompt's prefill inside that time), and ``mbu`` = that over the device's memory bandwidth: the
  spec sheet's on CUDA, on CPU the ``dst.copy_(src)`` bandwidth measured in the same run (reads
  alone may go somewhat faster than a copy, so a CPU ``mbu`` near 1 is at the ceiling).
* image: a random LlamaFusion through ``MMFusePipeline`` (latents out): latency per image against the
  prompt length, with the prompt prefilled once into the KV cache ("cached": each step runs the image
  chunk only, so the cost should stay flat) and with the reference sampler that feeds prompt + image
  every step ("recompute"), classifier-free guidance off and on (scale 3, unconditional prompt =
  BOI), with the model's DDIM scheduler. ``max_diff``: largest difference between the two samplers'
  latents from the same noise.
* e2e: prompt -> PNG-ready pixels per family (LlamaFusion, MetaMorph, MetaQuery; random weights and a
  random VAE of the real downsampling), split by the pipeline's own stage clock into ``prefill_ms``
  (the prompt run once: KV-cache prefill, MetaMorph's visual tokens, MetaQuery's LLM + connector),
  ``denoise_ms`` and ``decode_ms`` (the VAE); "cached" vs "recompute" (nothing cached: the prompt
  runs again at every step).
* understand: image in, text out on a random LLaVA-NeXT (CLIP tower, anyres tiles; the decode
  size's Llama), the same weights through transformers ``generate`` and through mmfuse (the VLM's
  prompt layout, then the static-KV-cache ``generate``); greedy, batch 1, one picture (``prompt_len``
  counts its ``image_tokens``); ``tokens_match`` as for decode.
* edit: image + instruction -> image with LlamaFusion (random weights, random KL VAE), against the
  number of source pictures in the prompt (``prompt_len``: the positions they and the instruction
  take), InstructPix2Pix guidance (full, image-only and unconditional branches in one forward);
  "cached" (the sources' clean latents prefilled once) vs "recompute".

``vs_mmfuse`` = the row's ms / the mmfuse (decode) or cached (image, e2e) ms of the same case.

    python -m mmfuse.bench.bench_sampling [--quick] [--device cpu|cuda] [--out DIR]
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch

from mmfuse.bench.bench_training import (BOI, EOI, LLAMA_3_2_1B, build_model, device_peak, randomise_zero_init,
                                         random_decoder)
from mmfuse.bench.common import (add_ratio, append_results, bench_main, copy_bandwidth_gbps, measure_interleaved,
                                 print_table)
from mmfuse.engine.generate import generate
from mmfuse.engine.pipeline import MMFusePipeline
from mmfuse.models.denoisers import build_denoiser
from mmfuse.models.family import Parts
from mmfuse.models.fusion import FusionConfig, LlamaFusion
from mmfuse.models.loading import from_pretrained
from mmfuse.models.metamorph import MetaMorphConfig
from mmfuse.models.metaquery import MetaQueryConfig
from mmfuse.models.siglip import SiglipVisionConfig, SiglipVisionTower
from mmfuse.models.vae import DiffusersVAE

# Memory bandwidth (GB/s), matched in order against torch.cuda.get_device_name.
PEAK_GBPS = (("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0), ("H200", 4800.0), ("A100", 2039.0))
GUIDANCE = 3.0


@dataclass
class Size:
    label: str
    decoder: dict  # DecoderConfig fields (decode model and the fusion model's base)
    prompt_len: int
    new_tokens: int
    batches: tuple[int, ...]
    latent: tuple[int, int, int]  # channels, size, patch
    image_prompt_lens: tuple[int, ...]
    steps: int
    image_batch: int
    rounds: int
    fusion_layers: int | None = None  # fewer layers for the image model (None: as the decoder)
    vae_channels: tuple[int, ...] = (32, 64, 64, 64)  # the e2e VAEs' blocks (4 levels: 8x, as SD1.5's)
    e2e_prompt_len: int = 32
    edit_sources: tuple[int, ...] = (1, 2, 4)  # source pictures in an editing prompt


def sizes(quick: bool, device: torch.device, tiny: bool = False) -> Size:
    if tiny:
        return Size("tiny", dict(vocab_size=128, dim=64, hidden_dim=96, num_layers=2, num_heads=4, num_kv_heads=2,
                                 head_dim=16, tie_embeddings=True),
                    prompt_len=8, new_tokens=4, batches=(1, 2), latent=(4, 8, 2), image_prompt_lens=(4, 16), steps=2,
                    image_batch=1, rounds=1, vae_channels=(8, 16), e2e_prompt_len=6, edit_sources=(1, 2))
    if device.type == "cuda":
        return Size("llama-3.2-1b-shaped", dict(LLAMA_3_2_1B), prompt_len=128 if quick else 512,
                    new_tokens=64 if quick else 256, batches=(1, 8), latent=(4, 32, 2),
                    image_prompt_lens=(16, 256, 1024) if quick else (16, 64, 256, 1024, 4096),
                    steps=10 if quick else 20, image_batch=1, rounds=3, vae_channels=(128, 256, 512, 512),
                    e2e_prompt_len=128, edit_sources=(1, 4, 16))
    if quick:
        return Size("cpu-quick", dict(vocab_size=32000, dim=256, hidden_dim=768, num_layers=4, num_heads=4,
                                      num_kv_heads=2, head_dim=64, tie_embeddings=True, rope_theta=500000.0),
                    prompt_len=32, new_tokens=24, batches=(1, 8), latent=(4, 16, 2), image_prompt_lens=(16, 64, 256),
                    steps=8, image_batch=1, rounds=3, fusion_layers=2)
    return Size("cpu-100m", dict(vocab_size=32000, dim=768, hidden_dim=2048, num_layers=12, num_heads=12,
                                 num_kv_heads=4, head_dim=64, tie_embeddings=True, rope_theta=500000.0),
                prompt_len=128, new_tokens=128, batches=(1, 8), latent=(4, 32, 2),
                image_prompt_lens=(16, 64, 256, 1024), steps=10, image_batch=1, rounds=3, fusion_layers=8)


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------


def llama_config(fields: dict):
    """transformers' LlamaConfig of these DecoderConfig fields."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", **(fields.get("rope_scaling") or {}),
            "rope_theta": fields.get("rope_theta", 10000.0)}
    return LlamaConfig(vocab_size=fields["vocab_size"], hidden_size=fields["dim"],
                         intermediate_size=fields["hidden_dim"], num_hidden_layers=fields["num_layers"],
                         num_attention_heads=fields["num_heads"], num_key_value_heads=fields["num_kv_heads"],
                         head_dim=fields["head_dim"],
                         rms_norm_eps=fields.get("norm_eps", 1e-6), tie_word_embeddings=fields["tie_embeddings"],
                         rope_parameters=rope, max_position_embeddings=8192)


def save_random_llama(fields: dict, path: str, dtype: torch.dtype) -> None:
    """A random transformers Llama with these DecoderConfig fields, written to ``path``."""
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(llama_config(fields)).to(dtype).save_pretrained(path)


def decode_bytes_per_step(fields: dict, batch: int, prompt_len: int, new_tokens: int, elem: int) -> float:
    """Bytes one decode step must read: every weight once (the LM head, not the embedding rows looked
    up) and, on average over the steps, the KV cache of prompt + half the new tokens."""
    d, v, layers = fields["dim"], fields["vocab_size"], fields["num_layers"]
    hq, hkv, dh, inter = fields["num_heads"], fields["num_kv_heads"], fields["head_dim"], fields["hidden_dim"]
    layer = d * (hq + 2 * hkv) * dh + hq * dh * d + 3 * d * inter + 2 * d
    weights = layers * layer + v * d + d
    kv = 2 * layers * hkv * dh * batch * (prompt_len + new_tokens / 2)
    return (weights + kv) * elem


def _agreement(ours: torch.Tensor, theirs: torch.Tensor, prompt_len: int) -> tuple[bool, int | None]:
    """(whether both produced the same tokens, the first new-token step where any row differs)."""
    differs = (ours.cpu()[:, prompt_len:] != theirs.cpu()[:, prompt_len:]).any(dim=0).nonzero()
    return (True, None) if differs.numel() == 0 else (False, int(differs[0]))


def decode_rows(size: Size, device: torch.device) -> list[dict]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generation-config notices on every call
    dtype = _dtype(device)
    with tempfile.TemporaryDirectory() as path:
        save_random_llama(size.decoder, path, dtype)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        ours = from_pretrained(path, dtype=dtype, device=device).eval()
    # CPU: no spec-sheet figure, so the copy bandwidth measured now is the ceiling.
    peak_gbps = (device_peak(PEAK_GBPS, device) if device.type == "cuda"
                 else copy_bandwidth_gbps(device, 8 if size.label == "tiny" else None))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in size.batches:
        ids = torch.randint(BOI + 2, size.decoder["vocab_size"], (batch, size.prompt_len), generator=gen).to(device)
        outputs = {}

        def run_impl(impl: str) -> Callable[[], None]:
            def call():
                if impl == "transformers":
                    outputs[impl] = hf.generate(ids, max_new_tokens=size.new_tokens, do_sample=False,
                                                pad_token_id=0, eos_token_id=None)
                else:
                    outputs[impl] = generate(ours, ids, size.new_tokens, compile=impl == "mmfuse_compiled")
            return call

        impls = ["mmfuse", "transformers"]
        note = None
        if size.label != "tiny":  # compiling costs seconds (a C++ build on CPU): not in the test runs
            try:
                run_impl("mmfuse_compiled")()  # compiles once; the timed calls reuse it
                impls.insert(1, "mmfuse_compiled")
            except Exception as exc:  # noqa: BLE001 - report the eager rows rather than nothing
                note = f"compile failed ({type(exc).__name__}): {str(exc).splitlines()[0][:120]}"
                print(f"decode: {note}")
        measured = measure_interleaved({impl: run_impl(impl) for impl in impls}, device, size.rounds)
        nbytes = decode_bytes_per_step(size.decoder, batch, size.prompt_len, size.new_tokens, dtype.itemsize)
        for impl, m in measured.items():
            match, first = _agreement(outputs[impl], outputs["mmfuse"], size.prompt_len)
            row = {"kind": "decode", "impl": impl, "batch": batch, "prompt_len": size.prompt_len,
                   "new_tokens": size.new_tokens, **m, "tokens_match": match, "first_mismatch": first}
            if impl == "mmfuse" and note:
                row["note"] = note
            if "ms" in m:
                row["tokens_per_s"] = size.new_tokens * batch / (m["ms"] * 1e-3)
                row["gbps"] = nbytes * size.new_tokens / (m["ms"] * 1e-3) / 1e9
                row["mbu"] = row["gbps"] / peak_gbps if peak_gbps else None
            rows.append(row)
    del hf, ours
    return rows


# ----------------------------------------------------------------------------------------------
# Image generation
# ----------------------------------------------------------------------------------------------


def _ready(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Random zero-initialised layers made non-zero (a zero output layer would make every sampler agree
    trivially), cast to the benchmark dtype with the derived fp32 buffers (RoPE, noise schedule) rebuilt."""
    randomise_zero_init(model)
    model.to(_dtype(device)).eval()
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(device)
    return model


def fusion_model(size: Size, device: torch.device) -> LlamaFusion:
    channels, latent, patch = size.latent
    fields = dict(size.decoder, num_layers=size.fusion_layers or size.decoder["num_layers"])
    config = FusionConfig(latent_channels=channels, latent_size=latent, patch_size=patch, boi_token_id=BOI,
                          eoi_token_id=EOI)
    return _ready(build_model("llamafusion", Parts(random_decoder(fields, device)), config), device)


def metamorph_model(size: Size, device: torch.device):
    from mmfuse.bench.bench_training import sizes as training_sizes

    t = training_sizes(True, device, tiny=size.label == "tiny")
    fields = dict(size.decoder, num_layers=size.fusion_layers or size.decoder["num_layers"])
    channels, latent, _ = size.latent
    unet = build_denoiser("sd15", dict(sample_size=latent, in_channels=channels, out_channels=channels,
                                       layers_per_block=1, block_out_channels=(32, 64),
                                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                       attention_head_dim=8, norm_num_groups=8))
    with torch.device(device):
        vision = SiglipVisionTower(SiglipVisionConfig(**t.siglip))
    config = MetaMorphConfig(num_visual_tokens=t.visual_tokens, boi_token_id=BOI, eoi_token_id=EOI,
                             sd_cross_attention_dim=64)
    return _ready(build_model("metamorph", Parts(random_decoder(fields, device), vision=vision,
                                                 diffusion=unet.to(device)), config), device)


def metaquery_model(size: Size, device: torch.device):
    from mmfuse.bench.bench_training import sizes as training_sizes

    t = training_sizes(True, device, tiny=size.label == "tiny")
    fields = dict(size.decoder, num_layers=size.fusion_layers or size.decoder["num_layers"])
    channels, latent, _ = size.latent
    sana = build_denoiser("sana", dict(t.sana, in_channels=channels, out_channels=channels, sample_size=latent))
    config = MetaQueryConfig(num_queries=t.queries, cond_dim=t.sana["caption_channels"], decoder="sana", **t.connector)
    return _ready(build_model("metaquery", Parts(random_decoder(fields, device), diffusion=sana.to(device)), config),
                  device)


def random_vae(size: Size, kind: str, device: torch.device) -> DiffusersVAE:
    """A random diffusers VAE of the size's blocks: KL (SD1.5-style) or DC (SANA's), 4 latent channels."""
    from diffusers import AutoencoderDC, AutoencoderKL

    blocks = size.vae_channels
    if kind == "kl":
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=size.latent[0], block_out_channels=blocks,
                            down_block_types=("DownEncoderBlock2D",) * len(blocks),
                            up_block_types=("UpDecoderBlock2D",) * len(blocks), norm_num_groups=8)
    else:
        vae = AutoencoderDC(in_channels=3, latent_channels=size.latent[0], attention_head_dim=8,
                            encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                            encoder_block_out_channels=blocks, decoder_block_out_channels=blocks,
                            encoder_layers_per_block=(1,) * len(blocks), decoder_layers_per_block=(1,) * len(blocks),
                            encoder_qkv_multiscales=((),) * len(blocks), decoder_qkv_multiscales=((),) * len(blocks),
                            upsample_block_type="interpolate", downsample_block_type="Conv")
    return DiffusersVAE(vae.to(device) if device.type == "cpu" else vae.to(device, _dtype(device)))


def image_rows(size: Size, device: torch.device) -> list[dict]:
    model = fusion_model(size, device)
    pipe = MMFusePipeline(model)
    c = model.config
    gen = torch.Generator().manual_seed(0)
    B = size.image_batch
    noise = torch.randn(B, c.latent_channels, c.latent_size, c.latent_size, generator=gen).to(device)
    rows = []
    for prompt_len in size.image_prompt_lens:
        prompt = torch.randint(BOI + 2, size.decoder["vocab_size"], (B, prompt_len - 1), generator=gen)  # + BOI
        for cfg in (False, True):
            outputs = {}

            def sampler(recompute: bool, key: str):
                def fn():
                    outputs[key] = pipe(prompt_ids=prompt, num_inference_steps=size.steps, latents=noise,
                                        guidance_scale=GUIDANCE if cfg else 1.0, recompute=recompute,
                                        output_type="latent", progress=False).images
                return fn

            samplers = {"cached": sampler(False, "cached"), "recompute": sampler(True, "recompute")}
            measured = measure_interleaved(samplers, device, size.rounds)
            diff = float((outputs["cached"].float() - outputs["recompute"].float()).abs().max()) \
                if len(outputs) == 2 else None
            for impl, m in measured.items():
                row = {"kind": "image", "impl": impl, "prompt_len": prompt_len, "cfg": cfg, "steps": size.steps,
                       "batch": B, **m, "max_diff": diff}
                if "ms" in m:
                    row["ms_per_image"] = m["ms"] / B
                rows.append(row)
    return rows


E2E_FAMILIES = {"llamafusion": (fusion_model, "kl"), "metamorph": (metamorph_model, "kl"),
                "metaquery": (metaquery_model, "dc")}


def e2e_rows(size: Size, device: torch.device) -> list[dict]:
    """Prompt -> pixels per family, split into prefill / denoise / VAE decode (see the module docstring)."""
    rows = []
    for family, (make, vae_kind) in E2E_FAMILIES.items():
        torch.manual_seed(0)
        pipe = MMFusePipeline(make(size, device), vae=random_vae(size, vae_kind, device))
        prompt = torch.randint(BOI + 2, size.decoder["vocab_size"], (1, size.e2e_prompt_len - 1),
                               generator=torch.Generator().manual_seed(0))
        stages: dict[str, list[dict]] = {"cached": [], "recompute": []}
        pixels = {}

        def sampler(impl: str):
            def fn():
                timings = {}
                pixels[impl] = pipe(prompt_ids=prompt, num_inference_steps=size.steps, guidance_scale=GUIDANCE,
                                    recompute=impl == "recompute", seed=0, output_type="pt", progress=False,
                                    timings=timings).images
                stages[impl].append(timings)
            return fn

        measured = measure_interleaved({impl: sampler(impl) for impl in stages}, device, size.rounds)
        diff = float((pixels["cached"] - pixels["recompute"]).abs().max()) if len(pixels) == 2 else None
        for impl, m in measured.items():
            row = {"kind": "e2e", "family": family, "impl": impl, "prompt_len": size.e2e_prompt_len, "cfg": True,
                   "steps": size.steps, "batch": 1, **m, "max_diff": diff}
            if stages[impl]:
                row["image_px"] = int(pixels[impl].shape[-1])
                for stage in ("prefill_ms", "denoise_ms", "decode_ms"):
                    row[stage] = statistics.median(t[stage] for t in stages[impl])
            rows.append(row)
        pipe = None  # free this family's model before the next is built
        gc.collect()
    return rows


IMAGE_GUIDANCE = 1.5
# The understanding rows' CLIP tower (LLaVA-NeXT-shaped, smaller): 8 x 8 patches a tile, anyres tiling.
VLM_TOWER = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=112,
                 patch_size=14)
VLM_PINS = [[112, 112], [112, 224], [224, 112], [224, 224]]


def understanding_rows(size: Size, device: torch.device) -> list[dict]:
    """Image in, text out on a random LLaVA-NeXT (CLIP tower, anyres tiles, the size's Llama): the same
    weights through transformers ``generate`` and through ``MMFusePipeline``'s path (the VLM's
    layout, then ``mmfuse.engine.generate``); greedy, one picture, ``new_tokens`` tokens."""
    from PIL import Image as PILImage
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    dtype, image_token = _dtype(device), size.decoder["vocab_size"] - 1
    torch.manual_seed(0)
    config = LlavaNextConfig(text_config=llama_config(size.decoder), vision_config=CLIPVisionConfig(**VLM_TOWER),
                             image_token_index=image_token, image_grid_pinpoints=VLM_PINS)
    with tempfile.TemporaryDirectory() as path:
        LlavaNextForConditionalGeneration(config).to(dtype).save_pretrained(path)
        hf = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        ours = from_pretrained(path, dtype=dtype, device=device).eval()
    gen = torch.Generator().manual_seed(0)
    picture = PILImage.fromarray(torch.randint(0, 256, (150, 200, 3), generator=gen, dtype=torch.uint8).numpy())
    processor = LlavaNextImageProcessorPil(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112},
                                           image_grid_pinpoints=VLM_PINS)
    enc = processor(images=[picture], return_tensors="pt")
    pixels, sizes_ = enc["pixel_values"].to(device, dtype), enc["image_sizes"].to(device)
    with torch.no_grad():
        n_image = ours.image_features(pixels, sizes_)[0].shape[0]
    text = torch.randint(BOI + 2, image_token, (1, 8), generator=gen)
    ids = torch.cat([text[:, :1], torch.full((1, n_image), image_token), text[:, 1:]], dim=1).to(device)
    outputs = {}

    def run_impl(impl: str) -> Callable[[], None]:
        def call():
            if impl == "transformers":
                outputs[impl] = hf.generate(input_ids=ids, pixel_values=pixels, image_sizes=sizes_,
                                            max_new_tokens=size.new_tokens, do_sample=False, pad_token_id=0,
                                            eos_token_id=None)[:, ids.shape[1]:]
            else:
                with torch.no_grad():
                    layout = ours.layout(ids, None, pixels, sizes_)
                outputs[impl] = generate(ours.decoder, None, size.new_tokens, layout=layout)[:, ids.shape[1]:]
        return call

    measured = measure_interleaved({impl: run_impl(impl) for impl in ("mmfuse", "transformers")}, device, size.rounds)
    rows = []
    for impl, m in measured.items():
        match, first = _agreement(outputs[impl], outputs["mmfuse"], 0)
        row = {"kind": "understand", "impl": impl, "batch": 1, "prompt_len": int(ids.shape[1]), "image_tokens": n_image,
               "new_tokens": size.new_tokens, **m, "tokens_match": match, "first_mismatch": first}
        if "ms" in m:
            row["tokens_per_s"] = size.new_tokens / (m["ms"] * 1e-3)
        rows.append(row)
    del hf, ours
    return rows


def edit_rows(size: Size, device: torch.device) -> list[dict]:
    """Editing latency against the source length: a random LlamaFusion + random KL VAE, ``k`` source
    pictures (random noise images) and a short instruction, InstructPix2Pix guidance (three branches,
    batched); "cached": the sources' clean latents prefilled once, "recompute": prefix + image every step."""
    torch.manual_seed(0)
    from PIL import Image as PILImage

    pipe = MMFusePipeline(fusion_model(size, device), vae=random_vae(size, "kl", device))
    px = size.latent[1] * pipe.vae.downsample
    gen = torch.Generator().manual_seed(0)
    pictures = [PILImage.fromarray(torch.randint(0, 256, (px, px, 3), generator=gen, dtype=torch.uint8).numpy())
                for _ in range(max(size.edit_sources))]
    instruction = torch.randint(BOI + 2, size.decoder["vocab_size"], (1, 8), generator=gen)
    rows = []
    for k in size.edit_sources:
        stages: dict[str, list[dict]] = {"cached": [], "recompute": []}
        outputs = {}

        def sampler(impl: str):
            def fn():
                timings = {}
                outputs[impl] = pipe(prompt_ids=instruction, images=[pictures[:k]], num_inference_steps=size.steps,
                                     guidance_scale=GUIDANCE, image_guidance_scale=IMAGE_GUIDANCE,
                                     recompute=impl == "recompute", seed=0, output_type="latent", progress=False,
                                     timings=timings).images
                stages[impl].append(timings)
            return fn

        measured = measure_interleaved({impl: sampler(impl) for impl in stages}, device, size.rounds)
        diff = float((outputs["cached"].float() - outputs["recompute"].float()).abs().max()) \
            if len(outputs) == 2 else None
        positions = k * (pipe.model.config.patches_per_image + 2) + instruction.shape[1] + 1
        for impl, m in measured.items():
            row = {"kind": "edit", "impl": impl, "sources": k, "prompt_len": positions, "cfg": True,
                   "steps": size.steps, "batch": 1, **m, "max_diff": diff}
            if stages[impl]:
                for stage in ("prefill_ms", "denoise_ms"):
                    row[stage] = statistics.median(t[stage] for t in stages[impl])
            rows.append(row)
    return rows


def run(quick: bool, device: torch.device, out_dir: str | None, tiny: bool = False) -> list[dict]:
    quick = quick or tiny
    device = torch.device(device)
    size = sizes(quick, device, tiny)
    torch.manual_seed(0)
    rows = decode_rows(size, device)
    gc.collect()
    rows += image_rows(size, device)
    gc.collect()
    rows += e2e_rows(size, device)
    gc.collect()
    rows += edit_rows(size, device)
    gc.collect()
    rows += understanding_rows(size, device)
    add_ratio(rows, ("kind", "family", "batch", "prompt_len", "cfg"), "vs_mmfuse", reference=("mmfuse", "cached"))
    print_table([r for r in rows if r["kind"] == "decode"],
                ["kind", "impl", "batch", "prompt_len", "new_tokens", "ms", "ms_min", "ms_max", "vs_mmfuse",
                 "tokens_per_s", "tokens_match", "gbps", "mbu", "error"])
    print_table([r for r in rows if r["kind"] == "image"],
                ["kind", "impl", "prompt_len", "cfg", "steps", "batch", "ms", "ms_min", "ms_max", "ms_per_image",
                 "vs_mmfuse", "max_diff", "error"])
    print_table([r for r in rows if r["kind"] == "e2e"],
                ["kind", "family", "impl", "prompt_len", "steps", "image_px", "ms", "prefill_ms", "denoise_ms",
                 "decode_ms", "vs_mmfuse", "max_diff", "error"])
    print_table([r for r in rows if r["kind"] == "understand"],
                ["kind", "impl", "prompt_len", "image_tokens", "new_tokens", "ms", "ms_min", "ms_max", "vs_mmfuse",
                 "tokens_per_s", "tokens_match", "error"])
    print_table([r for r in rows if r["kind"] == "edit"],
                ["kind", "impl", "sources", "prompt_len", "steps", "ms", "prefill_ms", "denoise_ms", "vs_mmfuse",
                 "max_diff", "error"])
    config = dict(quick=quick, tiny=tiny, size=dataclasses.asdict(size), dtype=str(_dtype(device)),
                  guidance_scale=GUIDANCE, image_guidance_scale=IMAGE_GUIDANCE, scheduler="each family's default (DDIM; flow-matching Euler for SANA)",
                  backend="triton" if device.type == "cuda" else "torch")
    append_results("sampling", device, config, rows, out_dir)
    return rows


def main(argv: list[str] | None = None) -> None:
    bench_main(run, __doc__, argv, quick_help="small models, few tokens and steps")


if __name__ == "__main__":
    main()
