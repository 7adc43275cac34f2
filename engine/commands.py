"""``mmfuse train --config FILE`` and ``mmfuse generate``.

Training config (JSON)::

    {"family": "fusion" | "metamorph" | "metaquery",
     "base": "path/to/llama-or-qwen2",         # HF checkpoint of the LLM, or null with "decoder": {...}
     "decoder": {...DecoderConfig fields...},  # only when "base" is null (an LLM from scratch)
     "fusion": {...FusionConfig fields...},            # family "fusion" (LlamaFusion / Transfusion)
     "metamorph": {...MetaMorphConfig fields...},      # family "metamorph" (VPiT) ...
     "vision": "path/to/siglip",                       # ... its SigLIP tower (HF checkpoint, frozen)
     "metaquery": {...MetaQueryConfig fields...},      # family "metaquery" ...
     "diffusion": "path/to/transformer-or-unet" | {...},  # ... its diffusers SANA / SD1.5 decoder: a
                                                       #     model folder (safetensors) or a config (random init)
     "data": {"path": "docs.jsonl", "row_len": 512, "rows_per_batch": 8},
     "train": {...TrainConfig fields...}}      # out_dir defaults to the config file's folder / "run"

Per family, what trains: fusion the image expert (and the text weights with ``train_text``);
metamorph everything but the SigLIP tower; metaquery the queries, the connector and the diffusion
decoder (the LLM stays frozen). Under ``torchrun``, ``"train": {"data_parallel": "fsdp"}`` shards the
weights with FSDP2 instead of replicating them (DDP).

Data: one JSON document per line, ``{"segments": [{"text": [ids...]}, {"image": "x.safetensors",
"diffuse": true}, ...]}``; an image file (path relative to the JSONL file) holds one tensor: for
fusion and metaquery ``latent`` (C, size, size) VAE latents, for metamorph ``pixels`` (3, H, W)
SigLIP-normalised pixel values. fusion and metamorph pack interleaved documents into rows of
``row_len``; a metaquery document is a prompt (its text) followed by one image, ``rows_per_batch``
of them a batch, prompts of at most ``row_len`` tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from mmfuse.engine.generate import generate
from mmfuse.engine.packing import Image, PackedBatch, pack
from mmfuse.engine.sampling import save_png, sample_images
from mmfuse.engine.train import TrainConfig, Trainer, init_distributed, rank_and_world
from mmfuse.kernels import mask_intervals
from mmfuse.kernels.objectives import Objective
from mmfuse.models import CheckpointError, Decoder, DecoderConfig, from_pretrained
from mmfuse.models.fusion import FusionConfig, LlamaFusion, save_fusion
from mmfuse.models.metamorph import MetaMorph, MetaMorphConfig, save_metamorph
from mmfuse.models.metaquery import MetaQuery, MetaQueryConfig, save_metaquery
from mmfuse.models.siglip import SiglipVisionTower

# The config sections each family reads beside the shared ones.
FAMILY_KEYS = {"fusion": {"fusion"}, "metamorph": {"metamorph", "vision"}, "metaquery": {"metaquery", "diffusion"}}
FAMILIES = tuple(FAMILY_KEYS)
_SHARED_KEYS = {"family", "base", "decoder", "data", "train"}
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
    family = cfg.get("family")
    if family not in FAMILIES:
        raise ConfigError(f"{path}: family {family!r} is not one the train command supports {FAMILIES}")
    known = _SHARED_KEYS | FAMILY_KEYS[family]
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} for family {family!r}; known: {sorted(known)}")
    data = cfg.get("data") or {}
    if set(data) - _DATA_KEYS or "path" not in data:
        raise ConfigError(f"{path}: data needs 'path' (and optional row_len, rows_per_batch), got {sorted(data)}")
    return cfg


def read_documents(path: str | Path, tensor_name: str = "latent") -> list[list]:
    """Interleaved documents from a JSONL file (see the module docstring); images hold ``tensor_name``."""
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
                    tensor = load_file(str(path.parent / seg["image"]))[tensor_name]
                    doc.append(Image(tensor, bool(seg.get("diffuse", True))))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError, OSError) as exc:
            raise ConfigError(f"{path}:{n}: not a document ({type(exc).__name__}: {exc})") from exc
        docs.append(doc)
    if not docs:
        raise ConfigError(f"{path} holds no documents")
    return docs


def build_decoder(cfg: dict, device: torch.device) -> Decoder:
    """The LLM: an HF checkpoint (``base``) or a fresh decoder (``decoder``)."""
    if cfg.get("base"):
        decoder = from_pretrained(cfg["base"], device=device)
        if not isinstance(decoder, Decoder):
            raise ConfigError(f"base {cfg['base']} is a {type(decoder).__name__}, not a decoder (llama / qwen2)")
        return decoder
    if cfg.get("decoder"):
        with torch.device(device):
            return Decoder(_dataclass_from(DecoderConfig, cfg["decoder"], "decoder"))
    raise ConfigError("give 'base' (an HF checkpoint) or 'decoder' (a DecoderConfig for a model from scratch)")


def build_fusion(cfg: dict, device: torch.device) -> LlamaFusion:
    fusion_cfg = _dataclass_from(FusionConfig, cfg.get("fusion") or {}, "fusion")
    return LlamaFusion.from_decoder(build_decoder(cfg, device), fusion_cfg)


def build_metamorph(cfg: dict, device: torch.device) -> MetaMorph:
    mm_cfg = _dataclass_from(MetaMorphConfig, cfg.get("metamorph") or {}, "metamorph")
    if not cfg.get("vision"):
        raise ConfigError("family 'metamorph' needs 'vision': a SigLIP checkpoint folder")
    vision = from_pretrained(cfg["vision"], device=device)
    if not isinstance(vision, SiglipVisionTower):
        raise ConfigError(f"vision {cfg['vision']} is a {type(vision).__name__}, not a SigLIP vision tower")
    decoder = build_decoder(cfg, device)
    with torch.device(device):
        return MetaMorph(decoder, vision, mm_cfg)


def build_metaquery(cfg: dict, device: torch.device) -> MetaQuery:
    mq_cfg = _dataclass_from(MetaQueryConfig, cfg.get("metaquery") or {}, "metaquery")
    diffusion = cfg.get("diffusion")
    if isinstance(diffusion, str):
        diffusion = load_diffusion_decoder(diffusion, mq_cfg.decoder)
    elif not isinstance(diffusion, dict):
        raise ConfigError("family 'metaquery' needs 'diffusion': a diffusers model folder or a config dict")
    try:
        model = MetaQuery(build_decoder(cfg, device), diffusion, mq_cfg)
    except ValueError as exc:  # e.g. cond_dim against the decoder's conditioning width
        raise ConfigError(f"metaquery: {exc}") from exc
    return model.to(device)


def load_diffusion_decoder(path: str, kind: str) -> torch.nn.Module:
    """A diffusers SANA transformer / SD1.5 UNet folder (config.json + safetensors; never a pickle)."""
    from diffusers import SanaTransformer2DModel, UNet2DConditionModel

    cls = SanaTransformer2DModel if kind == "sana" else UNet2DConditionModel
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"diffusion: no diffusers model folder (config.json) at {path}")
    try:
        return cls.from_pretrained(path, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ConfigError(f"diffusion: cannot load a {cls.__name__} from {path}: {exc}") from exc


@dataclass
class Recipe:
    """How one family builds its model, turns documents into a batch, and computes its loss."""

    build: Callable[[dict, torch.device], torch.nn.Module]
    image_tensor: str  # the tensor name inside an image file
    make_batch: Callable[[torch.nn.Module, list, int], object]  # (model, documents, row_len) -> batch
    loss: Callable[[torch.nn.Module, object, torch.Generator], Objective]
    count: Callable[[object], dict[str, int]]
    save: Callable[..., None]  # (model, path, state_dict)
    # (model, document, row_len) -> the positions it takes of a batch of rows_per_batch x row_len
    doc_size: Callable[[torch.nn.Module, list, int], int]
    # (documents, row_len, data path): reject documents the family cannot train on, by number
    check_documents: Callable[[list, int, str], None] = lambda docs, row_len, path: None


def _packed_size(doc: list, tokens_per_image: int) -> int:
    """Positions a document takes in packed rows: its tokens, and BOI + image positions + EOI per image."""
    return sum(tokens_per_image + 2 if isinstance(s, Image) else len(s) for s in doc)


def _pack(model, docs: list, row_len: int, tokens_per_image: int) -> PackedBatch:
    return pack(docs, row_len, tokens_per_image, model.config.boi_token_id, model.config.eoi_token_id)


def _metamorph_batch(model: MetaMorph, docs: list, row_len: int) -> PackedBatch:
    batch = _pack(model, docs, row_len, model.config.num_visual_tokens)
    # MetaMorph is causal over its visual tokens as well: intervals without spans, documents kept.
    batch.kv_start, batch.kv_end = mask_intervals(torch.zeros_like(batch.span_ids), batch.doc_ids)
    return batch


@dataclass
class PromptImageBatch:
    """MetaQuery's batch: left-padded prompts (B, P), their mask, and one latent (B, C, H, W) each."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    latents: torch.Tensor

    def to(self, device) -> "PromptImageBatch":
        return PromptImageBatch(self.prompt_ids.to(device), self.prompt_mask.to(device), self.latents.to(device))


def _metaquery_batch(model: MetaQuery, docs: list, row_len: int) -> PromptImageBatch:
    prompts, latents = [], []
    for doc in docs:
        prompts.append([t for seg in doc[:-1] for t in seg])
        latents.append(doc[-1].latent)
    width = max(1, max(len(p) for p in prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):], mask[row, width - len(prompt):] = torch.tensor(prompt), True
    return PromptImageBatch(ids, mask, torch.stack(latents))


def _check_metaquery_documents(docs: list, row_len: int, path: str) -> None:
    for n, doc in enumerate(docs, 1):
        if not doc or not isinstance(doc[-1], Image) or any(isinstance(s, Image) for s in doc[:-1]):
            raise ConfigError(f"{path}: document {n}: a metaquery document is a prompt followed by exactly one image")
        if sum(len(s) for s in doc[:-1]) > row_len:
            raise ConfigError(f"{path}: document {n}: its prompt is longer than data.row_len ({row_len})")


def _packed_counts(batch: PackedBatch) -> dict[str, int]:
    return {"tokens": batch.num_text_tokens, "images": 0 if batch.images is None else int(batch.images.shape[0])}


RECIPES = {
    "fusion": Recipe(
        build=build_fusion,
        image_tensor="latent",
        make_batch=lambda model, docs, row_len: _pack(model, docs, row_len, model.config.patches_per_image),
        loss=lambda model, b, gen: model.training_loss(b.input_ids, b.modality, b.labels, b.images, b.kv_start,
                                                       b.kv_end, position_ids=b.position_ids,
                                                       image_mask=b.image_loss_mask, generator=gen),
        count=_packed_counts,
        save=save_fusion,
        doc_size=lambda model, doc, row_len: _packed_size(doc, model.config.patches_per_image),
    ),
    "metamorph": Recipe(
        build=build_metamorph,
        image_tensor="pixels",
        make_batch=_metamorph_batch,
        loss=lambda model, b, gen: model.training_loss(b.input_ids, b.modality, b.labels, b.images, b.kv_start,
                                                       b.kv_end, position_ids=b.position_ids),
        count=_packed_counts,
        save=save_metamorph,
        doc_size=lambda model, doc, row_len: _packed_size(doc, model.config.num_visual_tokens),
    ),
    "metaquery": Recipe(
        build=build_metaquery,
        image_tensor="latent",
        make_batch=_metaquery_batch,
        loss=lambda model, b, gen: model.training_loss(b.prompt_ids, b.latents, b.prompt_mask, generator=gen),
        count=lambda b: {"tokens": int(b.prompt_mask.sum()), "images": int(b.latents.shape[0])},
        save=save_metaquery,
        doc_size=lambda model, doc, row_len: row_len,  # a prompt and its image fill one row
        check_documents=_check_metaquery_documents,
    ),
}


def train_from_config(config_path: str | Path, device: str = "cpu", progress: bool | None = None) -> Path:
    """Run a training config; returns the run folder: checkpoints, train_log.jsonl, and ``model/``
    (the trained model, loadable with ``from_pretrained``)."""
    cfg = load_config(config_path)
    recipe = RECIPES[cfg["family"]]
    rank, world = init_distributed()
    dev = torch.device(f"cuda:{torch.cuda.current_device()}" if device == "cuda" and torch.cuda.is_available() else device)
    data = cfg["data"]
    docs = read_documents(Path(config_path).parent / data["path"], recipe.image_tensor)
    row_len, rows = int(data.get("row_len", 512)), int(data.get("rows_per_batch", 8))
    recipe.check_documents(docs, row_len, data["path"])
    train_fields = {"out_dir": str(Path(config_path).parent / "run"), **(cfg.get("train") or {})}
    train_cfg = _dataclass_from(TrainConfig, train_fields, "train")
    model = recipe.build(cfg, dev)
    def get_batch(step: int, micro: int):
        """Documents filling one batch, drawn by a generator seeded from the step (this rank's share)."""
        gen = torch.Generator().manual_seed(train_cfg.seed * 1_000_003 + (step * train_cfg.grad_accum + micro) * world
                                            + rank)
        picked, size = [], 0
        while size < rows * row_len:
            doc = docs[int(torch.randint(0, len(docs), (1,), generator=gen))]
            picked.append(doc)
            size += recipe.doc_size(model, doc, row_len)
        return recipe.make_batch(model, picked, row_len).to(dev)

    trainer = Trainer(model, lambda batch, gen: recipe.loss(model, batch, gen), get_batch, train_cfg,
                      count=recipe.count)
    trainer.train(progress=progress)
    out = Path(train_cfg.out_dir)
    state = trainer.full_state_dict()  # under FSDP a collective: every rank gathers, rank 0 writes
    if rank == 0:
        recipe.save(model, out / "model", state)
    if world > 1:
        torch.distributed.barrier()  # every rank returns (and may exit) only once the model is written
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
