"""``mmfuse train --config FILE`` and ``mmfuse generate``.

Training config (JSON)::

    {"family": "fusion",                       # LlamaFusion / Transfusion (the families the CLI trains)
     "base": "path/to/llama-or-qwen2",         # HF checkpoint to start from, or null with "decoder": {...}
     "decoder": {...DecoderConfig fields...},  # only when "base" is null (a model from scratch)
     "fusion": {...FusionConfig fields...},
     "data": {"path": "docs.jsonl", "row_len": 512, "rows_per_batch": 8},
     "train": {...TrainConfig fields...}}      # out_dir defaults to the config file's folder / "run"

Data: one JSON document per line, ``{"segments": [{"text": [ids...]}, {"image": "latent.safetensors",
"diffuse": true}, ...]}``; an image file holds one tensor named ``latent`` (C, size, size), its path
relative to the JSONL file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmfuse.engine.generate import generate
from mmfuse.engine.packing import Image, pack
from mmfuse.engine.sampling import save_png, sample_images
from mmfuse.engine.train import TrainConfig, Trainer, init_distributed, rank_and_world
from mmfuse.models import CheckpointError, Decoder, DecoderConfig, from_pretrained
from mmfuse.models.fusion import FusionConfig, LlamaFusion, save_fusion

FAMILIES = ("fusion",)
_TOP_KEYS = {"family", "base", "decoder", "fusion", "data", "train"}
_DATA_KEYS = {"path", "row_len", "rows_per_batch"}


class ConfigError(ValueError):
    """A training config that cannot run: an unknown family or key, a missing field, bad data."""


def _dataclass_from(cls, fields: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def load_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"no config file at {path}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    unknown = sorted(set(cfg) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    if cfg.get("family") not in FAMILIES:
        raise ConfigError(f"{path}: family {cfg.get('family')!r} is not one the train command supports {FAMILIES}")
    data = cfg.get("data") or {}
    if set(data) - _DATA_KEYS or "path" not in data:
        raise ConfigError(f"{path}: data needs 'path' (and optional row_len, rows_per_batch), got {sorted(data)}")
    return cfg


def read_documents(path: str | Path) -> list[list]:
    """Interleaved documents from a JSONL file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no data file at {path}")
    docs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            segments = json.loads(line)["segments"]
            doc = []
            for seg in segments:
                if "text" in seg:
                    doc.append([int(t) for t in seg["text"]])
                else:
                    latent = load_file(str(path.parent / seg["image"]))["latent"]
                    doc.append(Image(latent, bool(seg.get("diffuse", True))))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError, OSError) as exc:
            raise ConfigError(f"{path}:{n}: not a document ({type(exc).__name__}: {exc})") from exc
        docs.append(doc)
    if not docs:
        raise ConfigError(f"{path} holds no documents")
    return docs


def build_fusion(cfg: dict, device: torch.device) -> LlamaFusion:
    fusion_cfg = _dataclass_from(FusionConfig, cfg.get("fusion") or {}, "fusion")
    if cfg.get("base"):
        decoder = from_pretrained(cfg["base"], device=device)
        if not isinstance(decoder, Decoder):
            raise ConfigError(f"base {cfg['base']} is a {type(decoder).__name__}, not a decoder (llama / qwen2)")
    elif cfg.get("decoder"):
        with torch.device(device):
            decoder = Decoder(_dataclass_from(DecoderConfig, cfg["decoder"], "decoder"))
    else:
        raise ConfigError("give 'base' (an HF checkpoint) or 'decoder' (a DecoderConfig for a model from scratch)")
    return LlamaFusion.from_decoder(decoder, fusion_cfg)


def train_from_config(config_path: str | Path, device: str = "cpu", progress: bool | None = None) -> Path:
    """Run a training config; returns the run folder: checkpoints, train_log.jsonl, and ``model/``
    (the trained LlamaFusion, loadable with ``from_pretrained``)."""
    cfg = load_config(config_path)
    rank, world = init_distributed()
    dev = torch.device(f"cuda:{torch.cuda.current_device()}" if device == "cuda" and torch.cuda.is_available() else device)
    data = cfg["data"]
    docs = read_documents(Path(config_path).parent / data["path"])
    train_fields = {"out_dir": str(Path(config_path).parent / "run"), **(cfg.get("train") or {})}
    train_cfg = _dataclass_from(TrainConfig, train_fields, "train")
    model = build_fusion(cfg, dev)
    row_len, rows = int(data.get("row_len", 512)), int(data.get("rows_per_batch", 8))
    tokens_per_image = model.config.patches_per_image

    def get_batch(step: int, micro: int):
        """Enough documents for ``rows`` rows, drawn by a generator seeded from the step (this rank's share)."""
        gen = torch.Generator().manual_seed(train_cfg.seed * 1_000_003 + (step * train_cfg.grad_accum + micro) * world
                                            + rank)
        picked, size = [], 0
        while size < rows * row_len:
            doc = docs[int(torch.randint(0, len(docs), (1,), generator=gen))]
            picked.append(doc)
            size += sum(len(s) if not isinstance(s, Image) else tokens_per_image + 2 for s in doc)
        batch = pack(picked, row_len, tokens_per_image, model.config.boi_token_id, model.config.eoi_token_id)
        return batch.to(dev)

    def loss_fn(batch, generator):
        return model.training_loss(batch.input_ids, batch.modality, batch.labels, batch.images, batch.kv_start,
                                   batch.kv_end, position_ids=batch.position_ids, image_mask=batch.image_loss_mask,
                                   generator=generator)

    counts = lambda b: {"tokens": b.num_text_tokens, "images": 0 if b.images is None else int(b.images.shape[0])}  # noqa: E731
    Trainer(model, loss_fn, get_batch, train_cfg, count=counts).train(progress=progress)
    out = Path(train_cfg.out_dir)
    if rank == 0:
        save_fusion(model, out / "model")
    return out


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config (JSON); see `mmfuse train --help`")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def run_train(args: argparse.Namespace) -> int:
    try:
        out = train_from_config(args.config, args.device)
    except (ConfigError, CheckpointError) as exc:
        raise SystemExit(f"mmfuse train: {exc}") from exc
    if rank_and_world()[0] == 0:
        print(f"trained; checkpoints and train_log.jsonl in {out}")
    return 0


# ----------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="an HF decoder checkpoint, or a fusion checkpoint "
                        "(e.g. the model/ folder of a `mmfuse train` run)")
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids, e.g. 3,5,1")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--image", action="store_true", help="generate an image (fusion checkpoints; the prompt "
                        "must end with BOI)")
    parser.add_argument("--steps", type=int, default=50, help="diffusion steps for --image (default 50)")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance for --image")
    parser.add_argument("--out", default="generated.png", help="PNG for --image (default generated.png)")
    parser.add_argument("--seed", type=int, default=0)


def _parse_ids(text: str) -> torch.Tensor:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise SystemExit(f"mmfuse generate: --prompt-ids must be comma-separated integers, got {text!r}") from exc
    if not ids:
        raise SystemExit("mmfuse generate: --prompt-ids is empty")
    return torch.tensor([ids])


def run_generate(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    if not path.is_dir():
        raise SystemExit(f"mmfuse generate: no checkpoint folder at {path}")
    try:
        model = from_pretrained(path)
    except CheckpointError as exc:
        raise SystemExit(f"mmfuse generate: {exc}") from exc
    ids = _parse_ids(args.prompt_ids)
    if args.image:
        if not isinstance(model, LlamaFusion):
            raise SystemExit(f"mmfuse generate: --image needs a fusion checkpoint; {path} holds a {type(model).__name__}")
        latents = sample_images(model.eval(), ids, num_steps=args.steps, guidance_scale=args.guidance,
                                generator=torch.Generator().manual_seed(args.seed), progress=None)
        images = (latents.clamp(-1, 1) + 1) / 2
        save_png(images if images.shape[1] in (1, 3) else images[:, :1], args.out)
        print(f"wrote {args.out}")
        return 0
    decoder = model.decoder if isinstance(model, LlamaFusion) else model
    if not isinstance(decoder, Decoder):
        raise SystemExit(f"mmfuse generate: {path} holds a {type(model).__name__}, which does not generate text")
    out = generate(decoder.eval(), ids, args.max_new_tokens, temperature=args.temperature,
                   generator=torch.Generator().manual_seed(args.seed))
    print(",".join(str(t) for t in out[0].tolist()))
    return 0
