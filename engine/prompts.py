"""Prompts with images in them: text with ``<image>`` placeholders and pictures -> a prefill layout.

    pipe.generate_text("caption <image>", images=[PIL.Image.open("7.png")])

1. **split**: a prompt's text is cut at its ``<image>`` placeholders, one per image, in order; a
   prompt without placeholders takes its images first, then its text (as LLaVA-style prompts read).
   The pieces are tokenized as training documents' text segments are (BOS first, no EOS).
2. **read**: each picture (a PIL image or an image file's path) is turned into the model's image
   input by the family's image input -- resized and centre-cropped, then VAE latents (the posterior
   mean: the image as it is, not a sample) or SigLIP pixel values -- in one batched call.
3. **lay out**: each prompt is packed alone by the family's ``make_batch`` (``BOI``, the image
   positions, ``EOI``; the image span bidirectional where the family's mask makes it so), the rows
   are left-padded together and the family's ``embed_prompt`` hook fills in the images' positions.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mmfuse.models.decoder import PromptLayout
from mmfuse.engine.packing import Image
from mmfuse.engine.text import text_ids
from mmfuse.models.family import FamilySpec
from mmfuse.models.hf_io import CheckpointError

IMAGE_PLACEHOLDER = "<image>"


def split_prompt(text: str, num_images: int, where: str = "prompt") -> list[str | int]:
    """The prompt's pieces in order: text (stripped, empty pieces dropped) and image indices.

    Raises:
        ValueError: the prompt has placeholders, but not one per image.
    """
    parts = text.split(IMAGE_PLACEHOLDER)
    slots = len(parts) - 1
    if slots == 0:
        return [*range(num_images), *([text.strip()] if text.strip() else [])]
    if slots != num_images:
        raise ValueError(f"{where} has {slots} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s) were "
                         "given for it: give one image per placeholder (or no placeholders: the images go first)")
    pieces: list[str | int] = []
    for i, part in enumerate(parts):
        if part.strip():
            pieces.append(part.strip())
        if i < slots:
            pieces.append(i)
    return pieces


def images_per_prompt(images: Any, num_prompts: int) -> list[list]:
    """``images`` as one list per prompt: one image or a list of them for a single prompt; for several
    prompts, one entry (an image or a list) per prompt."""
    def as_list(entry) -> list:
        return list(entry) if isinstance(entry, (list, tuple)) else [entry]

    if num_prompts == 1 and not (isinstance(images, (list, tuple)) and images and isinstance(images[0], (list, tuple))):
        return [as_list(images)]
    if not isinstance(images, (list, tuple)) or len(images) != num_prompts:
        raise ValueError(f"images: give one entry (an image or a list of images) per prompt ({num_prompts}), got "
                         f"{len(images) if isinstance(images, (list, tuple)) else type(images).__name__}")
    return [as_list(entry) for entry in images]


def open_picture(image: Any, where: str):
    """A PIL image, from a PIL image or an image file's path (decoded now, so a bad file fails by name)."""
    from PIL import Image as PILImage

    if isinstance(image, PILImage.Image):
        return image
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"{where}: give a PIL image or an image file's path, got {type(image).__name__}")
    if not Path(image).is_file():
        raise ValueError(f"{where}: no image file at {image}")
    try:
        with PILImage.open(image) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: cannot read image {image}: {exc}") from exc


def read_images(pictures: list, image_input, device: torch.device) -> list[torch.Tensor]:
    """Pictures -> the model's clean image inputs on ``device``, in one batched encode."""
    if hasattr(image_input, "read"):  # a VLM reader's pictures: its image processor's inputs, read with its tower
        return image_input.read(pictures, device)
    if image_input is None or getattr(image_input, "preprocess", None) is None:
        raise CheckpointError("images: this model folder has nothing to encode pictures with (no vae/ for a "
                              "latent model)")
    pixels = torch.stack([image_input.preprocess(p) for p in pictures]).to(device)
    mean, _ = image_input.moments(pixels)  # the posterior mean: the image itself, not a draw from it
    return list(mean)


def prompt_documents(tokenizer, prompts: Sequence[str] | None, ids: Sequence[Sequence[int]] | None,
                     images: list[list], image_input, device: torch.device) -> list[list]:
    """One document per prompt (BOS, then text pieces and clean images in order), ready for :func:`lay_out`.

    ``prompts`` (strings, with placeholders) or ``ids`` (token ids: their images go first); ``images``:
    one list of pictures per prompt.
    """
    rows = list(prompts) if prompts is not None else list(ids)
    pictures = [open_picture(img, f"images[{r}][{i}]") for r, imgs in enumerate(images) for i, img in enumerate(imgs)]
    pieces = [split_prompt(text, len(imgs), f"prompt {r}") if prompts is not None else [*range(len(imgs)), list(text)]
              for r, (text, imgs) in enumerate(zip(rows, images))]
    encoded = iter(read_images(pictures, image_input, device)) if pictures else iter(())
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    documents = []
    for row in pieces:
        doc: list = [torch.tensor([bos])] if bos is not None else []
        row_images = [next(encoded) for piece in row if isinstance(piece, int)]
        for piece in row:
            if isinstance(piece, int):
                doc.append(Image(row_images[piece], diffuse=False))
            elif isinstance(piece, str):
                if tokenizer is None:
                    raise ValueError("this pipeline has no tokenizer: give prompt_ids instead of prompt")
                doc.append(torch.tensor(text_ids(tokenizer, piece), dtype=torch.long))
            elif piece:
                doc.append(torch.tensor(piece, dtype=torch.long))
        documents.append(doc)
    return documents


def lay_out(spec: FamilySpec, model: nn.Module, documents: list[list], device: torch.device) -> PromptLayout:
    """Documents (token tensors and clean :class:`Image` segments) -> the left-padded prefill layout."""
    if spec.pipeline.layout_prompts is not None:
        return spec.pipeline.layout_prompts(model, documents, device)
    if spec.pipeline.embed_prompt is None:
        raise ValueError(f"images: a {spec.name} model cannot read images in its prompt")
    size = spec.document_size(model, 0)
    batches = [spec.make_batch(model, [doc], size(doc), 1, None) for doc in documents]
    P, B = max(b.input_ids.shape[1] for b in batches), len(batches)
    long = dict(dtype=torch.long, device=device)
    ids, modality, positions = (torch.zeros(B, P, **long) for _ in range(3))
    kv_start, kv_end = (torch.zeros(B, P, dtype=torch.int32, device=device) for _ in range(2))  # padding: empty
    first = torch.tensor([P - b.input_ids.shape[1] for b in batches], dtype=torch.int32, device=device)
    for r, b in enumerate(batches):
        pad = int(first[r])
        ids[r, pad:], modality[r, pad:], positions[r, pad:] = b.input_ids[0], b.modality[0], b.position_ids[0]
        kv_start[r, pad:], kv_end[r, pad:] = b.kv_start[0] + pad, b.kv_end[0] + pad
    stacked = [b.images for b in batches if b.images is not None]
    images = torch.cat(stacked).to(device) if stacked else None
    embeds = spec.pipeline.embed_prompt(model, ids, modality, images)
    return PromptLayout(ids, embeds, modality, kv_start, kv_end, positions, first)
