"""One pipeline for every family: prompt strings in, PIL images (or text) out, as diffusers pipelines read.

    pipe = MMFusePipeline.from_pretrained("run/model")        # a model folder mmfuse wrote
    image = pipe("a red square", num_inference_steps=30, guidance_scale=3.0, seed=0).images[0]
    text = pipe.generate_text("a red", max_new_tokens=8)[0]
    answer = pipe.generate_text("What is this? <image>", images="square.png")[0]   # image in, text out

A call runs the same numbered steps whatever the family; the family supplies only its hooks
(:class:`mmfuse.models.family.PipelineHooks`): how a prompt asks for an image, how the prompt is run
once (prefill into a KV cache that this call owns and releases, or the LLM + connector pass), what the
denoiser is. Classifier-free guidance batches the conditional and unconditional rows in one forward
per step. Schedulers are diffusers', chosen by name.

A model folder holds everything generation needs: ``config.json`` + ``model.safetensors`` (the model),
``tokenizer/``, ``vae/`` (the codec, with ``model_index.json`` recording the channels and scaling the
model was trained with), ``scheduler/``, ``image_processor/`` for MetaMorph (SigLIP's) and for a model
built on a VLM (the VLM's, which its reader reads pictures with), and ``processor/`` for a model built on
a VLM whose transformers processor loads (LlavaFusion: it lays out pictures to understand, chat template
included).
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from mmfuse import __version__
from mmfuse._progress import progress_bar
from mmfuse.engine.atomic import atomic_file, atomic_folder
from mmfuse.engine.generate import generate, sample_next, text_step
from mmfuse.models.decoder import PromptLayout
from mmfuse.engine.prompts import (IMAGE_PLACEHOLDER, images_per_prompt, lay_out, open_picture, prompt_documents,
                                   split_prompt)
from mmfuse.engine.text import TOKENIZER_DIR, has_tokenizer, load_tokenizer, prompt_ids
from mmfuse.kernels._common import check_values_in_range
from mmfuse.models import from_pretrained as load_model
from mmfuse.models.decoder import Decoder, left_pad
from mmfuse.models.family import Denoiser, FamilySpec, family_of
from mmfuse.models.hf_io import CheckpointError, read_config
from mmfuse.models.loading import VLM_MODEL_TYPES
from mmfuse.models.vae import ImageCodec, check_codec, load_codec
from mmfuse.models.vlm import is_vlm, read_prompt

INDEX_FILE = "model_index.json"
VAE_DIR, SCHEDULER_DIR, PROCESSOR_DIR = "vae", "scheduler", "image_processor"
VLM_PROCESSOR_DIR = "processor"  # a VLM base's transformers processor, where the model reads with its tower
# Short names for diffusers schedulers (any diffusers scheduler class name works too).
SCHEDULERS = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler", "lms": "LMSDiscreteScheduler", "flow_euler": "FlowMatchEulerDiscreteScheduler",
    "flow_heun": "FlowMatchHeunDiscreteScheduler",
}
_FLOW = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


@dataclass
class InterleavedOutput:
    """What :meth:`MMFusePipeline.generate_interleaved` wrote, in order: ``segments`` of text (strings;
    token-id lists for ``prompt_ids``) and images; ``text_ids``: every new token (BOI / EOI around each
    image); ``latents`` / ``noise``: each image's final latents (1, C, h, w) and the noise it started from."""

    segments: list
    text_ids: list[int]
    latents: list[torch.Tensor]
    noise: list[torch.Tensor]

    @property
    def images(self) -> list:
        return [s for s in self.segments if not isinstance(s, (str, list))]

    @property
    def text(self) -> str:
        return "".join(s for s in self.segments if isinstance(s, str))


@dataclass
class PipelineOutput:
    """``images``: PIL images (``output_type="pil"``), or a (N, 3, H, W) tensor in [0, 1] ("pt"), or
    the latents ("latent"); ``latents``: (N, C, h, w), what the VAE decoded."""

    images: Any
    latents: torch.Tensor


def resolve_scheduler(name: str | None, default):
    """The scheduler named ``name`` (a short name from :data:`SCHEDULERS` or a diffusers class name),
    configured from ``default`` (the model's training schedule); a fresh copy of ``default`` for None
    (a call's scheduler state never leaks into the next)."""
    import diffusers

    if name is None:
        return type(default).from_config(default.config)

    class_name = SCHEDULERS.get(name, name)
    allowed = {c.__name__ for c in default.compatibles} | ({*_FLOW} if type(default).__name__ in _FLOW else set())
    if class_name not in allowed or not hasattr(diffusers, class_name):
        short = sorted(k for k, v in SCHEDULERS.items() if v in allowed)
        raise ValueError(f"scheduler {name!r} does not fit this model's {type(default).__name__} training schedule; "
                         f"choose from {short} or {sorted(allowed)}")
    return getattr(diffusers, class_name).from_config(default.config)


class MMFusePipeline:
    """Text-to-image (and text-to-text) generation with a model of any registered family.

    Args:
        model: a family's model (LlamaFusion, MetaMorph, MetaQuery, ...) or a plain :class:`Decoder`
            (text only).
        tokenizer: a transformers tokenizer (needed for string prompts; ids work without).
        vae: the :class:`ImageCodec` that decodes the model's latents (needed for pictures).
        scheduler: the default diffusers scheduler (default: the family's, from the model's config).
    """

    def __init__(self, model: nn.Module, tokenizer=None, vae: ImageCodec | None = None, scheduler=None,
                 image_processor=None, processor=None):
        if processor is not None and tokenizer is None:
            tokenizer = processor.tokenizer
        elif processor is not None:
            processor.tokenizer = tokenizer  # one tokenizer: the model's (with the family's BOI / EOI)
        self.model, self.tokenizer, self.vae, self.image_processor = model.eval(), tokenizer, vae, image_processor
        self.processor = processor  # a VLM's transformers processor (placeholders, tiles, chat template)
        self.family: FamilySpec | None = family_of(model)
        self.scheduler = scheduler if scheduler is not None or self.family is None else self.family.pipeline.scheduler(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> "MMFusePipeline":
        """A model folder mmfuse wrote (or a plain HF Llama / Qwen2 folder, for text).

        Raises:
            CheckpointError: not a checkpoint folder, a corrupt one, or a VAE that does not match the model.
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"no checkpoint folder at {path}")
        index = json.loads((path / INDEX_FILE).read_text()) if (path / INDEX_FILE).is_file() else {}
        cfg = read_config(path)  # a missing / broken config.json is reported before any weights load
        if cfg.get("model_type") in VLM_MODEL_TYPES:
            processor = load_vlm_processor(path)
            return cls(load_model(path, dtype=dtype, device=device), processor=processor)
        processor = load_vlm_processor(path / VLM_PROCESSOR_DIR) if (path / VLM_PROCESSOR_DIR).is_dir() else None
        model = load_model(path, dtype=dtype, device=device)
        family = family_of(model)
        tokenizer = load_tokenizer(path) if has_tokenizer(path / TOKENIZER_DIR) or has_tokenizer(path) else None
        vae = None
        if (path / VAE_DIR).is_dir() and family is not None:
            vae = load_codec(path / VAE_DIR, device or "cpu")
            check_codec(vae, family.pipeline.latent_shape(model)[0], index.get("vae"), where=f"{path / VAE_DIR}")
        scheduler = _load_scheduler(path / SCHEDULER_DIR) if (path / SCHEDULER_DIR).is_dir() else None
        return cls(model, tokenizer, vae, scheduler, _load_processor(path / PROCESSOR_DIR), processor)

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the model folder atomically: into a temporary folder beside ``path``, then renamed into
        place (an existing folder is replaced only once the new one is complete). ``state_dict``: the
        model's tensors to write instead of its own (e.g. gathered from FSDP shards)."""
        if self.family is None:
            raise TypeError(f"save_pretrained writes a family's model folder; this pipeline holds a "
                            f"{type(self.model).__name__} (save it with mmfuse.models.save_pretrained)")
        with atomic_folder(path) as tmp:
            self.family.save(self.model, tmp, state_dict)
            index = {"_class_name": type(self).__name__, "_mmfuse_version": __version__, "family": self.family.name,
                     "model_type": self.family.model_type, "tokenizer": None, "vae": None,
                     "scheduler": type(self.scheduler).__name__}
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
                index["tokenizer"] = TOKENIZER_DIR
            if self.vae is not None:
                self.vae.save_pretrained(tmp / VAE_DIR)
                index["vae"] = {"folder": VAE_DIR, **self.vae.describe()}
            self.scheduler.save_pretrained(str(tmp / SCHEDULER_DIR))
            if self.image_processor is not None:
                self.image_processor.save_pretrained(str(tmp / PROCESSOR_DIR))
            if self.processor is not None:
                self.processor.save_pretrained(str(tmp / VLM_PROCESSOR_DIR))
                index["processor"] = VLM_PROCESSOR_DIR
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return Path(path)

    # ------------------------------------------------------------------ text -> image

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        prompt_ids: Sequence[Sequence[int]] | torch.Tensor | None = None,
        images: Any = None,
        negative_prompt: str | Sequence[str] = "",
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        scheduler: str | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        recompute: bool = False,
        progress: bool | None = None,
        timings: dict | None = None,
    ) -> PipelineOutput:
        """Generate images for ``prompt`` (strings; or ``prompt_ids``, token ids without the image marker).

        Args:
            images: source pictures in the prompt (editing: "make it blue" + the picture), given as
                to :meth:`generate_text` (placeholders ``<image>`` in the prompt, or images first).
            negative_prompt: the unconditional prompt of classifier-free guidance ("" = none, as
                caption dropout trains it).
            num_inference_steps, guidance_scale: default the family's (guidance 1.0 = off).
            image_guidance_scale: with ``images``, the guidance towards the source pictures, in the
                InstructPix2Pix form ``uncond + s_I (image - uncond) + s_T (full - image)``, where
                ``image`` is the branch with the pictures and the negative prompt and ``uncond`` has
                neither; all branches run batched in one forward per step. Default
                ``guidance_scale`` (one guided branch against the unconditional one, as caption
                dropout trains it; 1 = no image guidance).
            scheduler: a scheduler name (``"ddim"``, ``"euler"``, ``"dpm++"``, ``"flow_euler"`` ...) or
                diffusers class name; default the model's training schedule.
            generator, seed: where the starting noise (and stochastic scheduler steps) come from.
            latents: (N, C, h, w) starting noise instead of drawing it (N = prompts x num_images_per_prompt).
            output_type: "pil", "pt" ((N, 3, H, W) in [0, 1]) or "latent" (no VAE decode).
            recompute: the reference path, with nothing cached (every step runs the prompt again).
            progress: a progress bar over the steps (None: when stderr is a terminal).
            timings: a dict to fill with the wall time of each stage: ``prefill_ms`` (tokenize and
                run the prompt), ``denoise_ms``, ``decode_ms`` (the device synchronised at each boundary).
        """
        clock = _StageClock(self.device, timings)
        # 1. check inputs
        hooks, model = self._image_hooks(), self.model
        steps = hooks.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = hooks.guidance_scale if guidance_scale is None else guidance_scale
        image_guidance = guidance if image_guidance_scale is None else image_guidance_scale
        _check_call(steps, guidance, num_images_per_prompt, output_type, self.vae is not None)
        if not image_guidance >= 1.0:
            raise ValueError(f"image_guidance_scale must be >= 1 (1 = no image guidance), got {image_guidance!r}")
        # 2. tokenize (and read the source images): every prompt asks for an image, once per image
        #    wanted, beside the rows of its guidance branches
        branches = guidance_branches(images is not None, guidance, image_guidance)
        if images is None:
            rows = self._text_branch_rows(prompt, prompt_ids, negative_prompt, branches, num_images_per_prompt)
            self._check_context(rows)
            conditioned = hooks.condition(model, rows[:len(rows) // len(branches)], rows[len(rows) // len(branches):],
                                          recompute)
        else:
            layout = self._image_branch_layout(prompt, prompt_ids, negative_prompt, images, branches,
                                               num_images_per_prompt)
            conditioned = hooks.condition_layout(model, layout, recompute)
        n = (layout.input_ids.shape[0] if images is not None else len(rows)) // len(branches)
        scheduler_ = resolve_scheduler(scheduler, self.scheduler)
        scheduler_.set_timesteps(steps, device=self.device, **hooks.timestep_kwargs(model))
        generator = generator if generator is not None or seed is None else \
            torch.Generator(self.device).manual_seed(seed)
        x = self._initial_latents(n, latents, generator, scheduler_)
        # 3. prefill once: the family runs the prompts; this block owns what it caches
        with conditioned as denoise:
            clock.lap("prefill_ms")
            # 4. denoising loop, every guidance branch batched in one forward
            x = denoising_loop(denoise, x, scheduler_, branches, guidance, image_guidance, generator, progress)
        clock.lap("denoise_ms")
        # 5. decode with the VAE, postprocess: [-1, 1] -> [0, 1] -> PIL
        return PipelineOutput(self._postprocess(x, output_type, clock), x)

    def _image_hooks(self):
        if self.family is None:
            raise TypeError(f"this checkpoint holds a {type(self.model).__name__}, which does not generate images")
        return self.family.pipeline

    def _text_branch_rows(self, prompt, ids, negative_prompt, branches: list[str], copies: int) -> list[torch.Tensor]:
        """The image-asking id rows of every branch: the prompts (each ``copies`` times), then the negatives."""
        hooks, model = self.family.pipeline, self.model
        prompts = self._prompt_rows(prompt, ids)
        negatives = self._prompt_rows(_broadcast(negative_prompt, len(prompts)), None)
        return [torch.tensor(hooks.image_prompt(model, r), dtype=torch.long, device=self.device)
                for branch in branches for r in (prompts if branch == "full" else negatives) for _ in range(copies)]

    def _image_branch_layout(self, prompt, ids, negative_prompt, images, branches: list[str],
                             copies: int) -> PromptLayout:
        """One layout of every branch's rows: prompts with their source pictures, the negative prompt
        with them, the negative prompt alone (each row ``copies`` times, asking for an image)."""
        family, model = self._image_family(), self.model
        prompts, rows, per_prompt = self._picture_prompts(prompt, ids, images)
        negatives = _broadcast(negative_prompt, len(per_prompt))
        image_input = self._prompt_image_input(family)
        read = functools.partial(prompt_documents, self.tokenizer, images=per_prompt, image_input=image_input,
                                 device=self.device)
        docs = {"full": lambda: read(prompts, rows), "image": lambda: read(negatives, None),
                "uncond": lambda: [[torch.tensor(r, dtype=torch.long)] for r in self._prompt_rows(negatives, None)]}
        ask = torch.tensor(family.pipeline.image_prompt(model, []), dtype=torch.long)
        documents = [doc + [ask] for branch in branches for doc in docs[branch]() for _ in range(copies)]
        layout = lay_out(family, model, documents, self.device)
        self._check_context(list(layout.input_ids))  # every row: its text, source images and BOI
        return layout

    def _prompt_rows(self, prompt, ids) -> list[list[int]]:
        if (prompt is None) == (ids is None):
            raise ValueError("give exactly one of prompt (strings) and prompt_ids (token ids)")
        if ids is not None:
            rows = [list(map(int, r)) for r in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
            if not rows or any(not isinstance(r, list) for r in rows):
                raise ValueError("prompt_ids must be a list of token-id lists (or a (B, P) tensor)")
            return rows
        prompts = _strings(prompt)
        if self.tokenizer is None and any(prompts):  # "" (the unconditional prompt) needs no tokenizer
            raise ValueError("this pipeline has no tokenizer: give prompt_ids instead of prompt")
        return [prompt_ids(self.tokenizer, p) for p in prompts]

    def _check_context(self, rows: list[torch.Tensor]) -> None:
        llm = self.family.llm(self.model)
        vocab, limit = llm.config.vocab_size, llm.config.max_seq_len
        extra = self.family.pipeline.image_positions(self.model)
        for r in rows:
            check_values_in_range("prompt_ids", r, 0, vocab - 1, f"[0, {vocab}) (the vocabulary)")
            if limit and r.numel() + extra > limit:
                raise ValueError(f"prompt: {r.numel()} positions + {extra} image positions exceed the model's "
                                 f"context of {limit} positions")

    def _initial_latents(self, n: int, latents, generator, scheduler) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        shape = (n, *self.family.pipeline.latent_shape(self.model))
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            x = latents.to(self.device, torch.float32)
        else:
            x = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        return x * getattr(scheduler, "init_noise_sigma", 1.0)

    # ------------------------------------------------------------------ text -> text

    @torch.no_grad()
    def generate_text(self, prompt: str | Sequence[str] | None = None, *, images: Any = None,
                      prompt_ids: Sequence[Sequence[int]] | torch.Tensor | None = None, max_new_tokens: int = 64,
                      temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                      generator: torch.Generator | None = None, seed: int | None = None, compile: bool = False,
                      progress: bool | None = False, chat: bool | None = None) -> list[str] | list[list[int]]:
        """Continue each prompt; returns the new text (strings for ``prompt``, token ids for ``prompt_ids``),
        stopping at the tokenizer's EOS or where the model would start an image (BOI). Prompts of
        different lengths are left-padded into one batch.

        Args:
            images: pictures in the prompt (PIL images or image file paths): for one prompt an image
                or a list; for several, one entry per prompt. Each sits at an ``<image>`` placeholder
                of its prompt's text (no placeholders: the images come first), e.g.
                ``pipe.generate_text("What digit is this? <image>", images="7.png")``.
            chat: a VLM checkpoint: wrap each prompt as a user turn with the processor's chat
                template (default: when it has one).
        """
        decoder = self._text_decoder()
        as_ids = prompt_ids is not None
        stops = [t for t in (getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None,
                             self.family.pipeline.image_start(self.model) if self.family else None) if t is not None]
        if generator is None and seed is not None:
            generator = torch.Generator(self.device).manual_seed(seed)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=stops, generator=generator,
                        compile=compile, progress=progress)
        if self.processor is not None and (images is not None or is_vlm(self.model)):
            layout = self._processor_layout(prompt, images, chat)  # read as the VLM reads: its processor
            out = generate(decoder, None, max_new_tokens, layout=layout, **sampling)
        elif images is not None:
            layout = self._image_prompt_layout(prompt, prompt_ids, images)
            out = generate(decoder, None, max_new_tokens, layout=layout, **sampling)
        else:
            rows = [torch.tensor(r, dtype=torch.long, device=self.device)
                    for r in self._prompt_rows(prompt, prompt_ids)]
            if any(r.numel() == 0 for r in rows):
                raise ValueError("prompt: an empty prompt has nothing to continue")
            ids, first = left_pad(rows)
            mask = torch.arange(ids.shape[1], device=self.device)[None] >= first[:, None]
            out = generate(decoder, ids, max_new_tokens, attention_mask=mask.long(), **sampling)
        new = [_until_stop(row, stops) for row in out[:, -max_new_tokens:].tolist()] if max_new_tokens else \
            [[] for _ in range(out.shape[0])]
        if as_ids or self.tokenizer is None:
            return new
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in new]

    @torch.no_grad()
    def generate_interleaved(
        self,
        prompt: str | None = None,
        *,
        prompt_ids: Sequence[int] | None = None,
        images: Any = None,
        max_new_tokens: int = 64,
        max_images: int = 4,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        output_type: str = "pil",
        logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None,
        progress: bool | None = False,
    ) -> "InterleavedOutput":
        """Text and images in one call, against one KV cache: text is decoded until the model samples
        BOI; the image span is then generated in place (LlamaFusion / Transfusion: denoised against the
        cache, its clean K/V written back at t = 0; MetaMorph: visual tokens one by one, drawn by the
        UNet), EOI appended, and the text goes on, until EOS, ``max_new_tokens`` text tokens or
        ``max_images`` images (a BOI after that ends the call).

        Classifier-free guidance adds one unconditional row to the same cache, whose key interval
        restarts at each BOI (the unconditional prompt is BOI alone, as caption dropout trains it);
        both rows run in one forward per step. One prompt per call (``prompt``, or ``prompt_ids``),
        with optional ``images`` in it as in :meth:`generate_text`.

        Args:
            logits_processor: ``(tokens so far, logits (V,)) -> logits`` before each text token is
                chosen (e.g. to forbid or force BOI).
            output_type: the images as "pil", "pt" ((1, 3, H, W) in [0, 1]) or "latent".

        Returns:
            :class:`InterleavedOutput`: ``segments`` (text strings -- token-id lists for
            ``prompt_ids`` -- and images, in order), ``text_ids`` (every new token, BOI / EOI included),
            ``latents`` and ``noise`` (each image's final and starting latents).
        """
        family, hooks, model = self._image_family(), self.family.pipeline, self.model
        if hooks.image_span is None:
            raise ValueError(f"a {family.name} model does not generate interleaved text and images")
        steps = hooks.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = hooks.guidance_scale if guidance_scale is None else guidance_scale
        _check_call(steps, guidance, 1, output_type, self.vae is not None)
        if max_new_tokens < 1 or max_images < 0:
            raise ValueError(f"need max_new_tokens >= 1 and max_images >= 0, got {max_new_tokens}, {max_images}")
        if (prompt is None) == (prompt_ids is None) or (prompt is not None and not isinstance(prompt, str)):
            raise ValueError("give one prompt: a string (prompt) or one token-id list (prompt_ids)")
        # 1. lay out the prompt (its pictures, if any); 2 rows under guidance (conditional, unconditional)
        layout = self._image_prompt_layout(prompt, None if prompt_ids is None else [prompt_ids],
                                           [] if images is None else images)
        rows = 1 if guidance == 1.0 else 2
        layout = layout.repeat(rows)
        decoder, n = hooks.text_decoder(model), hooks.image_positions(model) - 1
        P = layout.input_ids.shape[1]
        capacity = P + max_new_tokens + max_images * (n + 1)  # BOI is a sampled token; n + EOI per image
        if decoder.config.max_seq_len and capacity > decoder.config.max_seq_len:
            raise ValueError(f"prompt ({P} positions) + max_new_tokens ({max_new_tokens}) + max_images ({max_images}) x "
                             f"{n + 1} image positions exceed the model's context of {decoder.config.max_seq_len}")
        boi, eoi = hooks.image_start(model), hooks.image_end(model)
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        if generator is None and seed is not None:
            generator = torch.Generator(self.device).manual_seed(seed)
        scheduler_ = resolve_scheduler(scheduler, self.scheduler)
        branches = ["full", "uncond"] if rows == 2 else ["full"]
        noises: list[torch.Tensor] = []

        def draw(denoise: Denoiser) -> torch.Tensor:
            scheduler_.set_timesteps(steps, device=self.device, **hooks.timestep_kwargs(model))
            noises.append(self._initial_latents(1, None, generator, scheduler_))
            return denoising_loop(denoise, noises[-1], scheduler_, branches, guidance, guidance, generator, progress)

        def choose(logits: torch.Tensor) -> int:
            logits = logits.float() if logits_processor is None else logits_processor(list(new), logits.float())
            return int(sample_next(logits[None], temperature, top_k, top_p, generator)[0])

        first = layout.first
        new: list[int] = []
        segments: list[Any] = []
        latents: list[torch.Tensor] = []
        text_start = 0

        def write(token: int, slot: int, starts: torch.Tensor) -> torch.Tensor:
            tokens = torch.full((rows, 1), token, dtype=torch.long, device=self.device)
            return text_step(decoder, tokens, torch.tensor([slot], device=self.device), (slot - starts.long())[:, None],
                             starts[:, None])

        # 2. prefill, then text tokens; an image wherever the model asks for one
        with decoder.kv_cache(rows, capacity):
            hidden, slot = decoder.prefill(layout), P
            for _ in progress_bar(range(max_new_tokens), progress, desc="interleave"):
                token = choose(decoder.logits(hidden[0, -1]))
                if token == eos or (token == boi and len(latents) == max_images):
                    break
                new.append(token)
                if token != boi:
                    hidden, slot = write(token, slot, first), slot + 1
                    continue
                # 3. the image span: BOI, the family's image in the cache (the unconditional row restarts at BOI)
                starts = first.clone()
                starts[1:] = slot
                hidden = write(boi, slot, starts)
                segments.append(new[text_start:-1])
                latents.append(hooks.image_span(model, hidden, starts, slot + 1, draw))
                segments.append(len(latents) - 1)
                slot += 1 + n
                # 4. EOI closes the image and the text goes on
                new.append(eoi)
                hidden, slot, text_start = write(eoi, slot, first), slot + 1, len(new)
        segments.append(new[text_start:])
        return self._interleaved_output(segments, new, latents, noises, output_type, as_ids=prompt_ids is not None)

    def _interleaved_output(self, segments, new, latents, noises, output_type, as_ids) -> "InterleavedOutput":
        """Text segments decoded (empty ones dropped), images decoded by the VAE, in order."""
        pictures = [self._postprocess(x, output_type) for x in latents]
        pictures = [p[0] if output_type == "pil" else p for p in pictures]
        out: list[Any] = []
        for seg in segments:
            if isinstance(seg, int):
                out.append(pictures[seg])
            elif seg:
                out.append(seg if as_ids or self.tokenizer is None else
                           self.tokenizer.decode(seg, skip_special_tokens=True))
        return InterleavedOutput(out, new, latents, noises)

    def _postprocess(self, x: torch.Tensor, output_type: str, clock: "_StageClock | None" = None):
        """Latents (N, C, h, w) -> N PIL images, (N, 3, H, W) in [0, 1] ("pt") or the latents ("latent")."""
        if output_type == "latent":
            return x
        pixels = self.vae.decode(x)
        if clock is not None:
            clock.lap("decode_ms")
        images = (pixels / 2 + 0.5).clamp(0, 1)
        return to_pil(images) if output_type == "pil" else images

    def _text_decoder(self) -> Decoder:
        if isinstance(self.model, Decoder):
            return self.model
        if is_vlm(self.model):
            return self.model.decoder
        decoder = self.family.pipeline.text_decoder(self.model) if self.family is not None else None
        if decoder is None:
            raise TypeError(f"a {type(self.model).__name__} does not generate text")
        return decoder

    def _processor_layout(self, prompt, images, chat: bool | None) -> PromptLayout:
        """A VLM's prompts through its transformers processor (placeholders expanded to the images'
        features, pixels tiled; the chat template applied), left-padded, embedded by the VLM."""
        if prompt is None:
            raise ValueError("a VLM checkpoint takes prompt strings (its processor tokenizes them), not prompt_ids")
        prompts = _strings(prompt)
        per_prompt = images_per_prompt([] if images is None else images, len(prompts))
        texts = []
        for r, (text, pictures) in enumerate(zip(prompts, per_prompt)):
            pieces = split_prompt(text, len(pictures), f"prompt {r}")  # checks the placeholder count
            if chat if chat is not None else getattr(self.processor, "chat_template", None) is not None:
                content = [{"type": "image"} if isinstance(p, int) else {"type": "text", "text": p} for p in pieces]
                texts.append(self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                                add_generation_prompt=True, tokenize=False))
            else:
                texts.append(" ".join(IMAGE_PLACEHOLDER if isinstance(p, int) else p for p in pieces))
        pictures = [open_picture(img, f"images[{r}][{i}]") for r, imgs in enumerate(per_prompt)
                    for i, img in enumerate(imgs)]
        self.processor.tokenizer.padding_side = "left"  # generation continues every row at the same slot
        enc = self.processor(images=pictures or None, text=texts, return_tensors="pt", padding=True)
        to = {k: v.to(self.device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
        reader = self.model if is_vlm(self.model) else self.model.reader
        return read_prompt(reader, self._text_decoder().embed, to)

    def _image_prompt_layout(self, prompt, ids, images) -> PromptLayout:
        """Check and lay out prompts with pictures in them (see :mod:`mmfuse.engine.prompts`)."""
        family = self._image_family()
        prompts, rows, per_prompt = self._picture_prompts(prompt, ids, images)
        documents = prompt_documents(self.tokenizer, prompts, rows, per_prompt, self._prompt_image_input(family),
                                     self.device)
        return lay_out(family, self.model, documents, self.device)

    def _picture_prompts(self, prompt, ids, images) -> tuple[list[str] | None, list[list[int]] | None, list[list]]:
        """(prompt strings or None, token-id rows or None, one list of pictures per prompt), checked."""
        if (prompt is None) == (ids is None):
            raise ValueError("give exactly one of prompt (strings) and prompt_ids (token ids)")
        prompts = None if prompt is None else _strings(prompt)
        rows = self._prompt_rows(None, ids) if ids is not None else None
        return prompts, rows, images_per_prompt(images, len(prompts if prompts is not None else rows))

    def _prompt_image_input(self, family: FamilySpec):
        """How a picture in a prompt becomes the model's input (the family's training input by default)."""
        make = family.pipeline.prompt_image_input or family.image_input
        return make(self.model, self.vae, self.image_processor)

    def _image_family(self) -> FamilySpec:
        """The family, when its prompts can hold images (a named error otherwise)."""
        hooks = self.family.pipeline if self.family is not None else None
        if hooks is None or (hooks.embed_prompt is None and hooks.layout_prompts is None) or \
                hooks.condition_layout is None or not hooks.reads_images(self.model):
            name = self.family.name if self.family else type(self.model).__name__
            raise ValueError(f"images: this checkpoint's model ({name}) cannot read images in its prompt")
        return self.family


def denoising_loop(denoise: Denoiser, x: torch.Tensor, scheduler, branches: list[str], guidance: float,
                   image_guidance: float, generator: torch.Generator | None, progress: bool | None) -> torch.Tensor:
    """The scheduler's loop from noise ``x`` (N, C, h, w): every step one forward over the guidance
    ``branches`` (N rows each, batched) combined by :func:`guide` -> the final latents."""
    # stochastic schedulers draw from the generator; deterministic ones take no such argument
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in progress_bar(scheduler.timesteps, progress, desc="denoise"):
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x_rows = torch.cat([x_in] * len(branches))
        pred = denoise(x_rows, t.expand(x_rows.shape[0]).to(x.device)).float()
        pred = guide(dict(zip(branches, pred.chunk(len(branches)))), guidance, image_guidance)
        x = scheduler.step(pred, t, x, **step_kwargs, return_dict=False)[0]
    return x


def guidance_branches(with_images: bool, guidance: float, image_guidance: float) -> list[str]:
    """The rows a guided step runs, in batch order: ``full`` (the prompt, and its pictures), ``image``
    (the pictures with the negative prompt) and ``uncond`` (the negative prompt alone), as needed."""
    if not with_images:
        return ["full"] if guidance == 1.0 else ["full", "uncond"]
    if guidance == image_guidance:  # the image term cancels: plain guidance against the unconditional row
        return ["full"] if guidance == 1.0 else ["full", "uncond"]
    return ["full", "image"] if image_guidance == 1.0 else ["full", "image", "uncond"]


def guide(pred: dict[str, torch.Tensor], guidance: float, image_guidance: float) -> torch.Tensor:
    """Combine the branches' predictions: ``uncond + s_I (image - uncond) + s_T (full - image)``,
    reduced to the branches present (InstructPix2Pix's form; plain CFG without ``image``)."""
    full, image, uncond = pred["full"], pred.get("image"), pred.get("uncond")
    if image is not None and uncond is not None:
        return uncond + image_guidance * (image - uncond) + guidance * (full - image)
    base = image if image is not None else uncond
    return full if base is None else base + guidance * (full - base)


def _strings(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a list of strings, got {prompt!r}")
    return prompts


def _until_stop(row: list[int], stops: list[int]) -> list[int]:
    """The tokens before the first stop token."""
    cut = next((i for i, t in enumerate(row) if t in stops), len(row))
    return row[:cut]


class _StageClock:
    """Wall time per pipeline stage into ``timings`` (nothing at all when it is None)."""

    def __init__(self, device: torch.device, timings: dict | None):
        self.device, self.timings = device, timings
        self.last = time.perf_counter() if timings is not None else 0.0

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = (now - self.last) * 1e3
        self.last = now


def _broadcast(value: str | Sequence[str], n: int) -> list[str]:
    values = [value] * n if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ValueError(f"negative_prompt: give one string or one per prompt ({n}), got {len(values)}")
    return values


def _check_call(steps: int, guidance: float, num_images: int, output_type: str, has_vae: bool) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    if not guidance >= 1.0:
        raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {guidance!r}")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images!r}")
    if output_type not in ("pil", "pt", "latent"):
        raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
    if output_type != "latent" and not has_vae:
        raise ValueError("this pipeline has no VAE to decode latents with: use output_type='latent', or train with 'vae'")


def to_pil(images: torch.Tensor) -> list:
    """(N, C, H, W) in [0, 1] (C = 1 or 3) -> N RGB PIL images."""
    from PIL import Image as PILImage

    arrays = (images.float().cpu().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    return [PILImage.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB") for a in arrays]


def image_grid(images: torch.Tensor, nrow: int = 8):
    """(B, C, H, W) images in [0, 1] (C = 1 or 3) -> one PIL grid, ``nrow`` per row, 1-pixel white frames."""
    B, C, H, W = images.shape
    cols = min(nrow, B)
    rows = (B + cols - 1) // cols
    grid = torch.ones(1, C, rows * (H + 1) + 1, cols * (W + 1) + 1)
    for i in range(B):
        r, col = divmod(i, cols)
        grid[0, :, 1 + r * (H + 1):1 + r * (H + 1) + H, 1 + col * (W + 1):1 + col * (W + 1) + W] = images[i].float().cpu()
    return to_pil(grid)[0]


def write_image(image, path: str | os.PathLike) -> Path:
    """Save a PIL image as PNG atomically (a temporary file in the same folder, then renamed)."""
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def _load_scheduler(path: Path):
    import diffusers

    config = json.loads((path / "scheduler_config.json").read_text())
    name = config.get("_class_name")
    if not hasattr(diffusers, str(name)):
        raise CheckpointError(f"{path}: unknown scheduler class {name!r}")
    return getattr(diffusers, name).from_config(config)


def load_vlm_processor(path: Path):
    """A VLM checkpoint's transformers processor (AutoProcessor), before any weights load."""
    from transformers import AutoProcessor

    why = f"{path}: a VLM checkpoint generates through its transformers processor (processor_config.json, the " \
          "tokenizer and the image processor), which AutoProcessor cannot load"
    if not (Path(path) / "processor_config.json").is_file():  # else AutoProcessor may assemble one half-configured
        raise CheckpointError(f"{why}: {Path(path) / 'processor_config.json'} is missing")
    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, AttributeError, ImportError) as exc:
        raise CheckpointError(f"{why}: {exc}") from exc
    if not (hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")):  # a bare tokenizer
        raise CheckpointError(f"{why}: it holds only a {type(processor).__name__}")
    return processor


def _load_processor(path: Path):
    if not (path / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
