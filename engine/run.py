"""A run config made concrete: its parts loaded, its family's model built, its data ready to stream.

:func:`set_up` is shared by ``mmfuse train`` (:func:`train_from_config`) and ``mmfuse prepare``.
Nothing here knows a family: the spec says which parts to load, how to build, batch and save.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from mmfuse.engine.config import ConfigError, RunConfig, load_run_config, parse_section
from mmfuse.engine.data import (BatchStream, DocumentReader, MicroBatches, Source, check_structure, encode_images,
                                read_sources)
from mmfuse.engine.pipeline import MMFusePipeline, load_vlm_processor
from mmfuse.engine.text import add_family_tokens, fit_vocabulary, has_tokenizer, load_tokenizer
from mmfuse.engine.train import Trainer, init_distributed, rank_and_world
from mmfuse.models import Decoder, DecoderConfig, from_pretrained
from mmfuse.models.denoisers import build_denoiser, load_denoiser
from mmfuse.models.family import FamilySpec, Parts
from mmfuse.models.hf_io import CheckpointError, read_config
from mmfuse.models.loading import LLM_MODEL_TYPES, VLM_MODEL_TYPES, decoder_config, language_model
from mmfuse.models.siglip import SiglipVisionConfig, SiglipVisionTower, load_siglip_processor
from mmfuse.models.vae import PIXEL_SPACE, ImageCodec, load_codec


@dataclass
class Run:
    """Everything a run needs, loaded: the model (on its device), tokenizer, codec, data."""

    config: RunConfig
    spec: FamilySpec
    model: nn.Module
    tokenizer: Any
    codec: ImageCodec | None
    vision_processor: Any
    image_input: Any
    sources: list[Source]  # the data: one source, or a weighted mixture
    device: torch.device
    vlm_processor: Any = None  # a VLM base's transformers processor, when the model keeps its reader

    def pipeline(self) -> MMFusePipeline:
        return MMFusePipeline(self.model, self.tokenizer, self.codec, image_processor=self.vision_processor,
                              processor=self.vlm_processor)


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; CUDA without a GPU is a ConfigError, not a crash later."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device: {device!r} is not a device (cpu, cuda, cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is available on this machine")
        return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    if dev.type != "cpu":
        raise ConfigError(f"--device: {device!r} is not supported (cpu, cuda, cuda:N)")
    return dev


def _tokenizer(cfg: RunConfig):
    source = cfg.tokenizer or cfg.base
    if source is None:
        return None
    if cfg.tokenizer is None and not has_tokenizer(source):
        return None  # a base without a tokenizer: fine while the data are token ids (checked with the data)
    return load_tokenizer(source, where="tokenizer" if cfg.tokenizer else "base")


def _keeps_reader(cfg: RunConfig, spec: FamilySpec) -> bool:
    """Whether the family is built on a whole VLM (its image side kept as the reader)."""
    return bool(cfg.base) and spec.keeps_vlm_reader and read_config(cfg.base).get("model_type") in VLM_MODEL_TYPES


def document_check(spec: FamilySpec, has_reader: bool) -> Callable[[list, int], str | None]:
    """The family's document check, and whether the model can read the document's pictures."""
    def check(document: list, row_len: int) -> str | None:
        problem = spec.check_document(document, row_len)
        if problem is None and not has_reader and spec.needs_reader(document):
            return (f"a {spec.name} document with source images (\"diffuse\": false) needs a VLM base, whose tower "
                    "reads them: give a VLM folder (e.g. LLaVA-OneVision, Qwen2.5-VL) as 'base'")
        return problem

    return check


def _vlm_processors(cfg: RunConfig, spec: FamilySpec) -> tuple[Any, Any]:
    """A VLM base's transformers processor (None where AutoProcessor cannot load it, e.g. without
    torchvision) and its image processor, which the reader reads source pictures with."""
    if not _keeps_reader(cfg, spec):
        return None, None
    try:
        processor = load_vlm_processor(cfg.base)
        return processor, processor.image_processor
    except CheckpointError as exc:
        from transformers import AutoImageProcessor

        try:
            return None, AutoImageProcessor.from_pretrained(str(cfg.base), local_files_only=True)
        except (OSError, ValueError, KeyError, ImportError) as again:
            raise ConfigError(f"base: {exc}; nor does its image processor load: {again}") from again


def _base_parts(cfg: RunConfig, spec: FamilySpec, device: torch.device) -> Parts:
    """The base: its LLM, and a VLM base's image side where the family keeps it."""
    if _keeps_reader(cfg, spec):
        vlm = from_pretrained(cfg.base, device=device)
        return Parts(vlm.decoder, reader=vlm.reader())
    return Parts(_decoder(cfg, device))


def _decoder(cfg: RunConfig, device: torch.device) -> Decoder:
    if cfg.base:
        if read_config(cfg.base).get("model_type") not in LLM_MODEL_TYPES:
            raise ConfigError(f"base: {cfg.base} holds a {read_config(cfg.base).get('model_type')!r} model, not an LLM "
                              f"({', '.join(LLM_MODEL_TYPES)})")
        return language_model(cfg.base, device=device)
    with torch.device(device):
        decoder = Decoder(cfg.decoder)
    nn.init.normal_(decoder.embed.weight, std=0.02)  # as transformers initialises embeddings
    return decoder


def load_parts(cfg: RunConfig, spec: FamilySpec, device: torch.device) -> tuple[Parts, Any]:
    """The decoder and the optional parts the family names (``vision``, ``diffusion``), and the vision
    tower's image processor."""
    parts, processor = _base_parts(cfg, spec, device), None
    if "vision" in spec.parts and isinstance(cfg.vision, dict):  # a fresh tower (random init), e.g. a tiny run
        config = parse_section(SiglipVisionConfig, cfg.vision, "vision")
        with torch.device(device):
            parts.vision = SiglipVisionTower(config)
        processor = load_siglip_processor(None, config)
    elif "vision" in spec.parts and cfg.vision:
        vision = from_pretrained(cfg.vision, device=device)
        if not isinstance(vision, SiglipVisionTower):
            raise ConfigError(f"vision: {cfg.vision} holds a {type(vision).__name__}, not a SigLIP vision tower")
        parts.vision, processor = vision, load_siglip_processor(cfg.vision, vision.config)
    if "diffusion" in spec.parts and cfg.diffusion is not None:
        kind = spec.denoiser_kind(cfg.family_config)
        if isinstance(cfg.diffusion, str):
            parts.diffusion = load_denoiser(cfg.diffusion, kind)
        else:
            try:
                parts.diffusion = build_denoiser(kind, cfg.diffusion)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"diffusion: not a {kind} config: {exc}") from exc
        parts.diffusion.to(device)
    return parts, processor


def _part_configs(cfg: RunConfig, spec: FamilySpec) -> dict[str, dict]:
    """The configs of the parts the family names, as given or as their folders' config.json states them."""
    configs = {}
    for name in spec.parts:
        value = getattr(cfg, name)
        if isinstance(value, dict):
            configs[name] = value
        elif isinstance(value, str) and (Path(value) / "config.json").is_file():
            configs[name] = read_config(value)
    return configs


def _declared_llm(cfg: RunConfig) -> DecoderConfig:
    """The LLM's config as the run states it: the base's config.json, or ``decoder`` (no weights read)."""
    return decoder_config(cfg.base) if cfg.base else cfg.decoder


def set_up(cfg: RunConfig, device: torch.device) -> Run:
    """Read and check the records and the VAE, then load the parts and build the family's model
    (seeded by ``train.seed``): bad data or a bad VAE is reported before any LLM weights load."""
    if cfg.init:
        return _set_up_from_model_folder(cfg, device)
    spec = cfg.spec
    tokenizer = _tokenizer(cfg)
    llm = _declared_llm(cfg)
    if llm.max_seq_len and cfg.data.row_len > llm.max_seq_len:
        raise ConfigError(f"data.row_len={cfg.data.row_len} exceeds the LLM's context of {llm.max_seq_len}")
    vocab = max(llm.vocab_size, len(tokenizer) if tokenizer is not None else 0)
    sources = read_sources(cfg.data, vocab_size=vocab, root=cfg.path.parent if cfg.path else None)
    check_structure(sources, document_check(spec, _keeps_reader(cfg, spec)))
    if tokenizer is None and any(isinstance(s, str) for src in sources for r in _sample(src.records) for s in r.segments):
        raise ConfigError("the data hold text but the run has no tokenizer: give 'tokenizer', or a 'base' that has one")
    codec = None if cfg.vae in (None, PIXEL_SPACE) else load_codec(cfg.vae, device)
    problem = spec.check_parts(cfg.family_config, _part_configs(cfg, spec))
    if problem:
        raise ConfigError(f"{spec.name}: {problem}")
    # a VLM base's processor (its placeholders, tiling, chat template) is read before any weights
    vlm_processor, reader_processor = _vlm_processors(cfg, spec)
    torch.manual_seed(cfg.train.seed)  # a fresh decoder and the family's new layers: a function of the seed
    parts, processor = load_parts(cfg, spec, device)
    family_config = cfg.family_config
    if tokenizer is not None:
        family_config = add_family_tokens(tokenizer, spec, family_config, explicit=cfg.family_keys)
        fit_vocabulary(parts.decoder, tokenizer)
    try:
        model = spec.build(parts, family_config)
    except ValueError as exc:  # e.g. a conditioning width that does not match the diffusion decoder
        raise ConfigError(f"{spec.name}: {exc}") from exc
    model.to(device)
    spec.set_trainable(model)
    if cfg.vae == PIXEL_SPACE:
        codec = load_codec(PIXEL_SPACE, pixel_channels=_latent_channels(spec, model))
    processor = processor if processor is not None else reader_processor
    image_input = spec.image_input(model, codec, processor)
    return Run(cfg, spec, model, tokenizer, codec, processor, image_input, sources, device, vlm_processor)


def _set_up_from_model_folder(cfg: RunConfig, device: torch.device) -> Run:
    """A later stage: the model, tokenizer, VAE and image processor of ``init`` (a model folder of the
    family), its config overridden by the keys the run's family section sets (e.g. the stage)."""
    spec = cfg.spec
    index = read_config(cfg.init)
    if index.get("model_type") != spec.model_type:
        raise ConfigError(f"init: {cfg.init} holds a {index.get('model_type')!r} model, not a {spec.name} one "
                          f"({spec.model_type})")
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    pipe = MMFusePipeline.from_pretrained(cfg.init, device=device)
    tokenizer = tokenizer or pipe.tokenizer
    sources = read_sources(cfg.data, vocab_size=len(tokenizer) if tokenizer is not None else None,
                           root=cfg.path.parent if cfg.path else None)
    check_structure(sources, document_check(spec, getattr(pipe.model, "reader", None) is not None))
    model = pipe.model
    try:
        model.config = dataclasses.replace(model.config, **{k: getattr(cfg.family_config, k) for k in cfg.family_keys})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{spec.name}: {exc}") from exc
    spec.set_trainable(model)
    codec = load_codec(cfg.vae, device) if cfg.vae not in (None, PIXEL_SPACE) else pipe.vae
    image_input = spec.image_input(model, codec, pipe.image_processor)
    return Run(cfg, spec, model, tokenizer, codec, pipe.image_processor, image_input, sources, device, pipe.processor)


def _latent_channels(spec: FamilySpec, model: nn.Module) -> int | None:
    try:
        return spec.pipeline.latent_shape(model)[0]
    except ValueError:  # a model that does not draw (e.g. MetaMorph without a UNet)
        return None


def _sample(records: Sequence, n: int = 64) -> list:
    return [records[i] for i in range(min(n, len(records)))]


def batch_stream(run: Run, cache=None) -> BatchStream:
    """The training batches of a run: documents drawn and read by workers, encoded and packed here."""
    cfg, spec, model, device = run.config, run.spec, run.model, run.device
    rank, world = rank_and_world()
    data = cfg.data
    reader = DocumentReader(run.tokenizer, run.image_input, cache)
    batches = MicroBatches(run.sources, reader, spec.document_size(model, data.row_len), spec.check_document,
                           data.row_len, data.rows_per_batch, seed=cfg.train.seed, rank=rank, world=world,
                           caption_dropout=data.caption_dropout, length=cfg.train.steps * cfg.train.grad_accum)

    def finish(documents: list, index: int):
        seed = batches.generator(index).initial_seed()
        gen = torch.Generator(device=device).manual_seed(seed + 1)  # image posterior draws, on the device
        counts = getattr(documents, "counts", {})  # a mixture's per-source documents and tokens, for the log
        documents = encode_images(documents, run.image_input, device, gen)
        batch = spec.make_batch(model, documents, data.row_len, data.rows_per_batch, gen).to(device)
        batch.source_counts = counts
        return batch

    return BatchStream(batches, finish, cfg.train.grad_accum, data.num_workers)


def _resume_point(out: Path, resume: bool | str | None) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; an existing run without ``--resume`` is refused."""
    log = out / "train_log.jsonl"
    started = (out / "latest").is_file() or (log.is_file() and log.stat().st_size > 0)  # a step was taken
    if not resume:
        if started:
            raise ConfigError(f"{out} already holds a run; continue it with --resume, or set train.out_dir to a new "
                              "folder (nothing was overwritten)")
        return None
    path = out if resume is True else Path(resume)
    if (path / "latest").is_file() or (path / "trainer.json").is_file():
        return path
    if resume is True:
        return None  # --resume on a run that never reached a checkpoint: it starts again from step 0
    raise ConfigError(f"--resume: no checkpoint at {path} (a run folder with 'latest', or a step_* folder)")


def train_from_config(config_path: str | Path, device: str = "cpu", progress: bool | None = None,
                      resume: bool | str | None = None) -> Path:
    """Run a training config; returns the run folder: checkpoints, ``train_log.jsonl`` and ``model/``
    (the trained model folder: ``MMFusePipeline.from_pretrained`` and ``mmfuse generate`` read it).

    Args:
        resume: True: continue from the run folder's latest checkpoint; a path: from that checkpoint.
    """
    cfg = load_run_config(config_path)
    rank, world = init_distributed()
    dev = resolve_device(device)
    out = Path(cfg.train.out_dir)
    checkpoint = _resume_point(out, resume)
    run = set_up(cfg, dev)
    from mmfuse.engine.prepare import open_cache

    stream = batch_stream(run, open_cache(cfg.data, run.image_input))
    spec, model = run.spec, run.model
    def count(batch) -> dict[str, int]:
        return {**spec.count(batch), **getattr(batch, "source_counts", {})}

    trainer = Trainer(model, lambda batch, gen: spec.loss(model, batch, gen), stream, cfg.train, count=count,
                      blocks=spec.blocks(model), meta={"family": spec.name, "model_type": spec.model_type})
    if checkpoint is not None:
        try:
            trainer.load_checkpoint(checkpoint)
        except (ValueError, RuntimeError, FileNotFoundError) as exc:
            raise CheckpointError(f"--resume: {exc}") from exc
    if rank == 0:
        for tmp in out.glob(".tmp-step_*"):  # a checkpoint a killed run was writing
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        trainer.train(progress=progress)
    finally:
        stream.close()
    # The model folder gets the EMA weights when the run keeps them (what diffusion models sample with).
    # Under FSDP a collective: every rank gathers, rank 0 writes.
    state = trainer.ema_state_dict() if cfg.train.ema_decay > 0 else trainer.full_state_dict()
    if rank == 0:
        run.pipeline().save_pretrained(out / "model", state)
    if world > 1:
        torch.distributed.barrier()  # every rank returns (and may exit) only once the model is written
    return out


__all__ = ["Run", "batch_stream", "load_parts", "resolve_device", "set_up", "train_from_config"]
