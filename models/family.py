"""Model families as declarative specs, and the registry the engine looks them up in.

A family (LlamaFusion / Transfusion, MetaMorph, MetaQuery, ...) is one :class:`FamilySpec`, exported as
``FAMILY`` by its module in ``mmfuse.models``: how it is built from its base parts, what its training
batch is and how documents become one, its loss, which parameters train, how it is saved and loaded,
which blocks FSDP2 shards and activation checkpointing recomputes, and the hooks of its pipeline.
Everything in ``mmfuse.engine`` (training, ``mmfuse train`` / ``generate`` / ``prepare``, the
pipeline) and ``from_pretrained`` works through this spec, so adding a family is adding one module
that defines ``FAMILY``; :func:`register_family` adds one from outside the package.

Documents, as the spec's functions receive them, are lists of segments: 1-D int64 token tensors
(text, already tokenized) and ``mmfuse.engine.packing.Image`` (one image's tensor as the family's
image input makes it, and whether it gets the diffusion loss).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping

import torch
from torch import nn

from mmfuse.kernels.objectives import Objective

from .decoder import Decoder

# (noisy latents (R, C, h, w), timesteps (R,)) -> the model's prediction (R, C, h, w)
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Parts:
    """What a family's model is assembled from (each loaded, or built fresh, by the engine).

    Attributes:
        decoder: the LLM (a one-expert :class:`Decoder`).
        vision: a vision tower (MetaMorph's SigLIP), when the family names ``"vision"`` in its parts.
        diffusion: a diffusers denoiser (SANA transformer, SD1.5 UNet), when it names ``"diffusion"``.
        reader: the image side of a VLM base (its tower and projector, :mod:`mmfuse.models.vlm`), when
            the family keeps it (``FamilySpec.keeps_vlm_reader``); ``decoder`` is then that VLM's LLM.
    """

    decoder: Decoder
    vision: nn.Module | None = None
    diffusion: nn.Module | None = None
    reader: nn.Module | None = None


@dataclass(frozen=True)
class PipelineHooks:
    """What the one pipeline outline (check -> tokenize -> prefill -> guided denoising -> decode) asks
    of a family.

    Attributes:
        latent_shape: model -> (C, h, w) of the latents it generates (what the VAE decodes).
        scheduler: model -> the diffusers scheduler matching its training (betas or flow shift).
        image_prompt: (model, prompt token ids) -> the ids that ask for an image (e.g. + BOI).
        condition: (model, prompts, negatives, recompute) -> a context manager giving a
            :data:`Denoiser` for ``R = len(prompts) + len(negatives)`` rows (prompts first). Entering it
            runs the prompt once (prefill); leaving it releases what it holds (KV caches). With
            ``recompute=True`` nothing is cached: every call runs the prompt again (the reference).
        condition_layout: (model, layout, recompute) -> the same for prompts laid out with images in
            them (a :class:`mmfuse.engine.generate.PromptLayout` of R rows, each ending in the image
            request, see ``image_prompt``); None: the family's prompts cannot hold images.
        text_decoder: model -> the :class:`Decoder` that writes text, or None.
        image_positions: model -> the sequence positions an image takes after its prompt (checked
            against the LLM's context length).
        guidance_scale: the default classifier-free guidance (1.0 = off; what the unconditional branch
            needs, caption dropout, is on by default in training).
        num_inference_steps: default denoising steps.
        embed_prompt: (model, input_ids (B, P), modality (B, P), images (N, ...)) -> the LLM's input
            embeddings (B, P, dim) of prompts with images in them, laid out by the family's
            ``make_batch`` (images as its image input gives them, clean); None: the family's prompts
            cannot hold images.
        image_start: model -> the token after which the model writes an image (BOI), or None; text
            generation stops there.
        image_end: model -> the token that closes an image span (EOI), or None.
        timestep_kwargs: model -> extra arguments of the scheduler's ``set_timesteps`` (e.g. the
            dynamic shift's ``mu`` of a flow-matching model trained with it).
        prompt_image_input: (model, codec, processor) -> how a picture in a prompt becomes the model's
            input, where that differs from the training one (``FamilySpec.image_input``, the default;
            e.g. MetaMorph's visualizer stage trains on (latents, tokens) pairs but reads SigLIP pixels).
        image_span: (model, hidden (R, 1, dim) after BOI, starts (R,) int32, slot, draw) -> the image's
            latents (1, C, h, w), for interleaved generation: with the rows' KV cache open and BOI
            written at ``slot - 1``, write the image span into slots ``slot .. slot + n - 1`` (n =
            ``image_positions - 1``; row r attends from ``starts[r]``: the prompt's start, or the BOI
            itself for the unconditional row), ``draw(denoiser)`` running the pipeline's guided
            denoising loop; None: the family does not interleave.
        layout_prompts: (model, documents, device) -> the :class:`~mmfuse.models.decoder.PromptLayout`
            of prompt documents with pictures, where the family lays them out itself (MetaQuery: through
            its VLM reader); None: packed by ``make_batch`` and filled by ``embed_prompt``.
        reads_images: model -> whether this model can read pictures in its prompt (e.g. MetaQuery
            only on a VLM base).
    """

    latent_shape: Callable[[nn.Module], tuple[int, int, int]]
    scheduler: Callable[[nn.Module], Any]
    image_prompt: Callable[[nn.Module, list[int]], list[int]]
    condition: Callable[[nn.Module, list[torch.Tensor], list[torch.Tensor], bool], ContextManager[Denoiser]]
    text_decoder: Callable[[nn.Module], Decoder | None]
    image_positions: Callable[[nn.Module], int]
    guidance_scale: float = 1.0
    num_inference_steps: int = 50
    embed_prompt: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    image_start: Callable[[nn.Module], int | None] = lambda model: None
    condition_layout: Callable[[nn.Module, Any, bool], ContextManager[Denoiser]] | None = None
    image_end: Callable[[nn.Module], int | None] = lambda model: None
    timestep_kwargs: Callable[[nn.Module], dict] = lambda model: {}
    prompt_image_input: Callable[[nn.Module, Any, Any], Any] | None = None
    image_span: Callable[..., torch.Tensor] | None = None
    layout_prompts: Callable[[nn.Module, list, torch.device], Any] | None = None
    reads_images: Callable[[nn.Module], bool] = lambda model: True


def accept_any_document(document: list, row_len: int) -> None:
    """The default :attr:`FamilySpec.check_document`: every document is one the family trains on."""
    return None


@dataclass(frozen=True)
class FamilySpec:
    """One model family, declaratively (see the module docstring).

    Attributes:
        name: the ``family`` of a training config, and the name of its config section.
        model_type: ``config.json``'s ``model_type`` of its checkpoints.
        config_class: its config dataclass (the training config's section is parsed into it).
        parts: the optional :class:`Parts` it is built from, beside the decoder ("vision", "diffusion"),
            each a key of the run config.
        keeps_vlm_reader: on a VLM base, the family keeps the VLM's image side (``Parts.reader``) and
            reads pictures in prompts with it, through the VLM's processor (saved in the model folder).
        needs_reader: document -> whether only a model with a reader can train on it (MetaQuery:
            source pictures); checked with the data, before weights load.
        description: one line for ``--help``: the model and what trains.
        special_tokens: id field -> text field of its config, for the tokens it adds to the tokenizer
            (BOI / EOI); the engine adds the texts and fills the id fields.
        denoiser_kind: config -> "sana" / "sd15", the diffusers class a "diffusion" config dict builds.
        check_parts: (config, {part name: its config dict}) -> why the parts do not fit the family's
            config (e.g. a conditioning width), or None; run before anything is built or loaded.
        build: (parts, config) -> a fresh model, parameters frozen as the family prescribes.
        load, save: its native checkpoint folder (``load(path, dtype, device)``,
            ``save(model, path, state_dict=None)``).
        set_trainable: freeze / unfreeze the parameters as the family trains them.
        llm: model -> its language model (vocabulary, context length, text generation).
        blocks: model -> the repeated blocks FSDP2 shards one by one and activation checkpointing recomputes.
        image_input: (model, codec, vision processor) -> the image input (``preprocess`` in data-loader
            workers, ``encode`` batched on the training device, ``tensor_name`` of ready tensors).
        document_size: (model, row_len) -> a picklable function: document -> the positions it takes.
        check_document: (document, row_len) -> why the family cannot train on it, or None (picklable:
            data-loader workers run it).
        make_batch: (model, documents, row_len, rows, generator) -> the training batch of ``rows`` rows
            (None: as many as the documents fill), with ``.to(device)``; ``generator`` draws any
            batch-side randomness.
        loss: (model, batch, generator) -> Objective (total and named components).
        count: batch -> {"tokens": ..., "images": ...} for throughput.
        pipeline: its :class:`PipelineHooks`.
    """

    name: str
    model_type: str
    config_class: type
    build: Callable[[Parts, Any], nn.Module]
    load: Callable[..., nn.Module]
    save: Callable[..., None]
    set_trainable: Callable[[nn.Module], None]
    llm: Callable[[nn.Module], Decoder]
    blocks: Callable[[nn.Module], list[nn.Module]]
    image_input: Callable[[nn.Module, Any, Any], Any]
    document_size: Callable[[nn.Module, int], Callable[[list], int]]
    make_batch: Callable[[nn.Module, list, int, int | None, torch.Generator | None], Any]
    loss: Callable[[nn.Module, Any, torch.Generator | None], Objective]
    count: Callable[[Any], dict[str, int]]
    pipeline: PipelineHooks
    parts: tuple[str, ...] = ()
    keeps_vlm_reader: bool = False
    description: str = ""
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    denoiser_kind: Callable[[Any], str] | None = None
    check_parts: Callable[[Any, dict[str, dict]], str | None] = lambda config, parts: None
    check_document: Callable[[list, int], str | None] = accept_any_document
    needs_reader: Callable[[list], bool] = lambda document: False


_REGISTRY: dict[str, FamilySpec] = {}
_discovered = False


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add a family (a name or model_type already taken by another spec is an error)."""
    for other in _REGISTRY.values():
        if other is not spec and (other.name == spec.name or other.model_type == spec.model_type):
            raise ValueError(f"family {spec.name!r} ({spec.model_type}) clashes with registered {other.name!r} "
                             f"({other.model_type})")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_family(name: str) -> None:
    _REGISTRY.pop(name, None)


def _discover() -> None:
    """Register the ``FAMILY`` of every module of this package (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        spec = getattr(importlib.import_module(f"{__package__}.{info.name}"), "FAMILY", None)
        if isinstance(spec, FamilySpec):
            register_family(spec)


def families() -> dict[str, FamilySpec]:
    """Every registered family, by name."""
    _discover()
    return dict(_REGISTRY)


def get_family(name: str) -> FamilySpec:
    """The family called ``name``; a ValueError lists the known ones."""
    known = families()
    if name not in known:
        raise ValueError(f"family {name!r} is not one mmfuse knows; choose from {sorted(known)}")
    return known[name]


def family_for_model_type(model_type: str | None) -> FamilySpec | None:
    """The family whose checkpoints carry this ``model_type``, or None."""
    return next((s for s in families().values() if s.model_type == model_type), None)


def family_of(model: nn.Module) -> FamilySpec | None:
    """The family a model object belongs to (by its config's class), or None (e.g. a plain Decoder)."""
    config = getattr(model, "config", None)
    return next((s for s in families().values() if isinstance(config, s.config_class)), None)
