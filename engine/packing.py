"""Pack interleaved text-and-image documents into fixed-length rows for training.

A document is a list of segments: token-id runs (1-D tensors or lists: text), :class:`PromptText`
(text that conditions but is not trained on: a question, a user turn) and :class:`Image` (one image's
tensor: VAE latents, or anything the model turns into ``tokens_per_image`` positions). An image
becomes ``BOI``, ``tokens_per_image`` image positions (one bidirectional span) and ``EOI``; the LM
loss covers the text, and the BOI / EOI of the generated images (``diffuse``), never a prompt's text
or an input image's markers.

Rows are filled greedily in document order, so padding is only at the tail of a row. A document that
does not fit the rest of a row starts a new row; one longer than a whole row is cut at row ends, each
piece becoming its own document -- but never inside an image block, which moves whole to the next row.
With ``max_rows`` the batch has exactly that many rows (a fixed shape): what does not fit is left out.
Text is handled in runs (tensor slices), never one Python object per token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

from mmfuse.kernels import mask_intervals
from mmfuse.models.modality import IMAGE

IGNORE_INDEX = -100


@dataclass
class Image:
    """One image of a document: ``tensor`` as the model takes it (e.g. VAE latents (C, h, w), or
    SigLIP pixels (3, H, W)); ``diffuse``: it gets the diffusion loss (False: a clean conditioning
    image, e.g. one to caption)."""

    tensor: torch.Tensor
    diffuse: bool = True


@dataclass
class PromptText:
    """Token ids (1-D) that the model reads but is not trained to write: no LM loss on them."""

    ids: torch.Tensor

    def __len__(self) -> int:
        return self.ids.numel()


Segment = Union[Sequence[int], torch.Tensor, PromptText, Image]


def segment_ids(segment: Sequence[int] | torch.Tensor | PromptText) -> torch.Tensor:
    """The 1-D int64 ids of a text segment (trained or not)."""
    if isinstance(segment, PromptText):
        segment = segment.ids
    return segment.long().reshape(-1) if isinstance(segment, torch.Tensor) else torch.tensor(list(segment), dtype=torch.long)


@dataclass
class PackedBatch:
    """Rows of packed documents; all (B, L) tensors except ``images`` and ``image_loss_mask``.

    ``labels[b, i]`` is the token at position i where position i - 1 should predict it, else -100
    (image positions, padding, the first token of each document, prompt text and input images' BOI /
    EOI); models shift by one.
    ``images`` (N, ...) are stacked in span order (row by row, left to right).
    """

    input_ids: torch.Tensor
    modality: torch.Tensor
    span_ids: torch.Tensor
    doc_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    kv_start: torch.Tensor
    kv_end: torch.Tensor
    images: torch.Tensor | None
    image_loss_mask: torch.Tensor
    num_text_tokens: int = 0
    extra: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "PackedBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return PackedBatch(**moved)


def packed_size(document: Sequence[Segment], tokens_per_image: int) -> int:
    """Positions a document takes in packed rows: its tokens, and BOI + image positions + EOI per image."""
    return sum(tokens_per_image + 2 if isinstance(s, Image) else len(s) for s in document)


def _pieces(document: Sequence[Segment], row_len: int, block: int) -> list[list[torch.Tensor | PromptText | Image]]:
    """Cut a document into pieces of at most ``row_len`` positions: text runs split anywhere, an image
    block (``block`` positions) never."""
    if block > row_len and any(isinstance(s, Image) for s in document):
        raise ValueError(f"an image block needs {block} positions but row_len is {row_len}")
    pieces: list[list[torch.Tensor | PromptText | Image]] = [[]]
    free = row_len
    for seg in document:
        if isinstance(seg, Image):
            if block > free:
                pieces.append([])
                free = row_len
            pieces[-1].append(seg)
            free -= block
            continue
        untrained, ids = isinstance(seg, PromptText), segment_ids(seg)
        while ids.numel():
            if free == 0:
                pieces.append([])
                free = row_len
            pieces[-1].append(PromptText(ids[:free]) if untrained else ids[:free])
            taken = min(free, ids.numel())
            ids, free = ids[taken:], free - taken
    return [p for p in pieces if p]


def pack(
    documents: Sequence[Sequence[Segment]],
    row_len: int,
    tokens_per_image: int,
    boi_token_id: int,
    eoi_token_id: int,
    pad_token_id: int = 0,
    max_rows: int | None = None,
) -> PackedBatch:
    """Pack ``documents`` into as many rows of ``row_len`` positions as they need, or into exactly
    ``max_rows`` rows (the pieces that would need more are left out; missing rows are padding)."""
    if row_len < 1 or tokens_per_image < 1:
        raise ValueError(f"row_len and tokens_per_image must be >= 1, got {row_len} and {tokens_per_image}")
    block = tokens_per_image + 2
    rows: list[list[list[torch.Tensor | PromptText | Image]]] = [[]]  # row -> pieces (documents) -> chunks
    free = row_len
    for doc in documents:
        for piece in _pieces(doc, row_len, block):
            size = sum(block if isinstance(c, Image) else len(c) for c in piece)
            if size > free:
                if max_rows is not None and len(rows) == max_rows:
                    break
                rows.append([])
                free = row_len
            rows[-1].append(piece)
            free -= size
    rows = [r for r in rows if r] or [[]]
    if max_rows is not None:
        rows += [[]] * (max_rows - len(rows))
    return _tensorize(rows, row_len, tokens_per_image, boi_token_id, eoi_token_id, pad_token_id)


def _piece_tensors(piece, n: int, boi: int, eoi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Image]]:
    """(ids, modality, trained) of one piece, image blocks laid out as BOI + n zeros + EOI; its images
    in order. ``trained``: the positions whose token is an LM target (not a prompt's text, not an
    input image's BOI / EOI)."""
    ids, modality, trained, images = [], [], [], []
    for chunk in piece:
        if isinstance(chunk, Image):
            block = torch.zeros(n + 2, dtype=torch.long)
            block[0], block[-1] = boi, eoi
            kind = torch.full((n + 2,), IMAGE, dtype=torch.long)
            kind[0] = kind[-1] = 0
            ids.append(block)
            modality.append(kind)
            trained.append(torch.full((n + 2,), chunk.diffuse))
            images.append(chunk)
        else:
            tokens = segment_ids(chunk)
            ids.append(tokens)
            modality.append(torch.zeros_like(tokens))
            trained.append(torch.full(tokens.shape, not isinstance(chunk, PromptText)))
    return torch.cat(ids), torch.cat(modality), torch.cat(trained), images


def _tensorize(rows, row_len: int, n: int, boi: int, eoi: int, pad_token_id: int) -> PackedBatch:
    B = len(rows)
    input_ids = torch.full((B, row_len), pad_token_id, dtype=torch.long)
    modality = torch.zeros(B, row_len, dtype=torch.long)
    doc_ids = torch.full((B, row_len), -1, dtype=torch.long)
    position_ids = torch.zeros(B, row_len, dtype=torch.long)
    trained = torch.zeros(B, row_len, dtype=torch.bool)
    images: list[Image] = []
    for b, pieces in enumerate(rows):
        i = 0
        for d, piece in enumerate(pieces):
            ids, kind, target, piece_images = _piece_tensors(piece, n, boi, eoi)
            j = i + ids.numel()
            input_ids[b, i:j], modality[b, i:j], doc_ids[b, i:j], trained[b, i:j] = ids, kind, d, target
            position_ids[b, i:j] = torch.arange(j - i)
            images += piece_images
            i = j
    is_image = modality == IMAGE
    # One span per image block: a new id wherever an image run starts (runs never touch: BOI/EOI between).
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    span_ids = torch.where(is_image, starts.long().cumsum(dim=1), 0)
    labels = input_ids.masked_fill(is_image | ~trained | (doc_ids < 0) | (position_ids == 0), IGNORE_INDEX)
    kv_start, kv_end = mask_intervals(span_ids, doc_ids)
    stacked = torch.stack([im.tensor for im in images]) if images else None
    return PackedBatch(
        input_ids=input_ids, modality=modality, span_ids=span_ids, doc_ids=doc_ids, position_ids=position_ids,
        labels=labels, kv_start=kv_start, kv_end=kv_end, images=stacked,
        image_loss_mask=torch.tensor([im.diffuse for im in images], dtype=torch.bool),
        num_text_tokens=int(((modality == 0) & (doc_ids >= 0)).sum()),
    )
