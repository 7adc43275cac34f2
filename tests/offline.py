"""Tiny offline assets for the user-path tests: tokenizers trained here, HF / diffusers checkpoints with
random weights, and folders of PNG pictures with captions (nothing is downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (230, 220, 40)}
SHAPES = ("square", "circle")
CAPTIONS = [f"a {c} {s}" for c in COLORS for s in SHAPES]


def tiny_tokenizer(texts=CAPTIONS + ["what is this", "draw me"], vocab_size: int = 300):
    """A byte-level BPE trained on ``texts`` with ``<s>`` / ``</s>`` / ``<pad>`` (a transformers tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def llama_base(path: Path, tokenizer=None, **overrides) -> Path:
    """A tiny random transformers Llama saved with its tokenizer (the vocabulary fits the tokenizer + 8)."""
    from tests.models.test_decoder import tiny_llama

    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(0)
    tiny_llama(vocab_size=len(tokenizer) + 8, **overrides).save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path


def qwen_base(path: Path, tokenizer=None, **overrides) -> Path:
    from tests.models.test_decoder import tiny_qwen2
    from tests.models.test_metaquery import QWEN

    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(0)
    tiny_qwen2(**{**QWEN, "vocab_size": len(tokenizer) + 8, **overrides}).save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path


def kl_vae(path: Path | None = None, scaling_factor: float = 0.5, latent_channels: int = 4):
    """A tiny SD-style AutoencoderKL (downsamples by 2), saved as a diffusers folder when ``path`` is given."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16, scaling_factor=scaling_factor).eval()
    if path is not None:
        vae.save_pretrained(str(path))
    return vae


def dc_vae(path: Path | None = None):
    """A tiny SANA-style AutoencoderDC (deterministic encoder, downsamples by 2)."""
    from diffusers import AutoencoderDC

    torch.manual_seed(2)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=4,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 16),
                        decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), upsample_block_type="interpolate",
                        downsample_block_type="Conv", scaling_factor=0.41).eval()
    if path is not None:
        vae.save_pretrained(str(path))
    return vae


def sd15_unet(path: Path, cross_attention_dim: int = 32) -> Path:
    from diffusers import UNet2DConditionModel

    from tests.models.test_metaquery import UNET

    torch.manual_seed(3)
    UNet2DConditionModel(**{**UNET, "cross_attention_dim": cross_attention_dim}).save_pretrained(str(path))
    return path


def sana(path: Path) -> Path:
    from diffusers import SanaTransformer2DModel

    from tests.models.test_metaquery import SANA

    torch.manual_seed(4)
    SanaTransformer2DModel(**SANA).save_pretrained(str(path))
    return path


def siglip(path: Path) -> Path:
    """A tiny SigLIP vision tower with its image processor (28 x 28 pixels)."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from tests.models.test_siglip import TINY, tiny_vision

    torch.manual_seed(5)
    tiny_vision().save_pretrained(path)
    SiglipImageProcessorPil(size={"height": TINY["image_size"], "width": TINY["image_size"]}).save_pretrained(str(path))
    return path


def picture(color: str, shape: str, size: tuple[int, int] = (24, 20)):
    """An RGB PIL picture of a colored shape on grey, ``size`` (width, height): not square, so that
    resizing and centre-cropping have work to do."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(img)
    box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLORS[color])
    return img


def captioned_pictures(folder: Path, n: int = 8, name: str = "captions.jsonl") -> Path:
    """``folder/img/*.png`` and a JSONL of ``{"text": caption, "image": "img/i.png"}`` pairs."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        caption = CAPTIONS[i % len(CAPTIONS)]
        _, color, shape = caption.split()
        picture(color, shape).save(folder / "img" / f"{i}.png")
        lines.append(json.dumps({"text": caption, "image": f"img/{i}.png"}))
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


def write_config(folder: Path, **config) -> Path:
    config.setdefault("train", {"steps": 2, "lr": 1e-3, "warmup_steps": 1})
    (folder / "run.json").write_text(json.dumps(config, indent=1))
    return folder / "run.json"
