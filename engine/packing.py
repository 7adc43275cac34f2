"""Pack interleaved text-and-image documents into fixed-length rows for training.

A document is a list of segments: token-id lists (text) and :class:`Image` (a latent tensor, or
anything the model turns into ``tokens_per_image`` positions). An image becomes ``BOI``,
``tokens_per_image`` image positions (one bidirectional span) and ``EOI``.

Rows are filled greedily in document order, so padding is only at the tail of a row. A document that
does not fit the rest of a row starts a new row; one longer than a whole row is cut at row ends, each
piece becoming its own document — but never inside an image block, which moves whole to the next row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

from mmfuse.kernels import mask_intervals

IGNORE_INDEX = -100


@dataclass
class Image:
    """One image of a document: ``latent`` (e.g. VAE latents (C, H, W)); ``diffuse``: gets the diffusion loss."""

    latent: torch.Tensor
    diffuse: bool = True


Segment = Union[Sequence[int], torch.Tensor, Image]


@dataclass
class PackedBatch:
    """Rows of packed documents; all (B, L) tensors except ``images`` and ``image_loss_mask``.

    ``labels[b, i]`` is the token at position i where position i - 1 should predict it, else -100
    (image positions, padding, the first token of each document); models shift by one.
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


@dataclass
class _Block:
    """An unbreakable run: a text token (length 1) or BOI + image positions + EOI."""

    ids: list[int]
    image: Image | None = None


def _blocks(document: Sequence[Segment], tokens_per_image: int, boi: int, eoi: int) -> list[_Block]:
    blocks: list[_Block] = []
    for seg in document:
        if isinstance(seg, Image):
            blocks.append(_Block([boi] + [0] * tokens_per_image + [eoi], seg))
        else:
            ids = seg.tolist() if isinstance(seg, torch.Tensor) else list(seg)
            blocks.extend(_Block([int(t)]) for t in ids)
    return blocks


def _pieces(blocks: list[_Block], row_len: int) -> list[list[_Block]]:
    """Cut a document's blocks into pieces of at most ``row_len`` positions, never inside a block."""
    pieces: list[list[_Block]] = [[]]
    size = 0
    for block in blocks:
        if len(block.ids) > row_len:
            raise ValueError(f"an image block needs {len(block.ids)} positions but row_len is {row_len}")
        if size + len(block.ids) > row_len:
            pieces.append([])
            size = 0
        pieces[-1].append(block)
        size += len(block.ids)
    return [p for p in pieces if p]


def pack(
    documents: Sequence[Sequence[Segment]],
    row_len: int,
    tokens_per_image: int,
    boi_token_id: int,
    eoi_token_id: int,
    pad_token_id: int = 0,
) -> PackedBatch:
    """Pack ``documents`` into as many rows of ``row_len`` positions as they need."""
    if row_len < 1 or tokens_per_image < 1:
        raise ValueError(f"row_len and tokens_per_image must be >= 1, got {row_len} and {tokens_per_image}")
    rows: list[list[list[_Block]]] = [[]]  # row -> pieces (documents) -> blocks
    free = row_len
    for doc in documents:
        for piece in _pieces(_blocks(doc, tokens_per_image, boi_token_id, eoi_token_id), row_len):
            size = sum(len(b.ids) for b in piece)
            if size > free:
                rows.append([])
                free = row_len
            rows[-1].append(piece)
            free -= size
    rows = [r for r in rows if r] or [[]]
    return _tensorize(rows, row_len, pad_token_id)


def _tensorize(rows, row_len: int, pad_token_id: int) -> PackedBatch:
    B = len(rows)
    input_ids = torch.full((B, row_len), pad_token_id, dtype=torch.long)
    modality = torch.zeros(B, row_len, dtype=torch.long)
    span_ids = torch.zeros(B, row_len, dtype=torch.long)
    doc_ids = torch.full((B, row_len), -1, dtype=torch.long)
    position_ids = torch.zeros(B, row_len, dtype=torch.long)
    labels = torch.full((B, row_len), IGNORE_INDEX, dtype=torch.long)
    images: list[Image] = []
    for b, pieces in enumerate(rows):
        i, span = 0, 0
        for d, piece in enumerate(pieces):
            start = i
            for block in piece:
                n = len(block.ids)
                input_ids[b, i:i + n] = torch.tensor(block.ids)
                labels[b, i:i + n] = torch.tensor(block.ids)
                if block.image is not None:
                    span += 1
                    span_ids[b, i + 1:i + n - 1] = span
                    modality[b, i + 1:i + n - 1] = 1
                    labels[b, i + 1:i + n - 1] = IGNORE_INDEX
                    images.append(block.image)
                i += n
            doc_ids[b, start:i] = d
            position_ids[b, start:i] = torch.arange(i - start)
            labels[b, start] = IGNORE_INDEX  # nothing before a document predicts its first token
    kv_start, kv_end = mask_intervals(span_ids, doc_ids)
    stacked = torch.stack([im.latent for im in images]) if images else None
    return PackedBatch(
        input_ids=input_ids, modality=modality, span_ids=span_ids, doc_ids=doc_ids, position_ids=position_ids,
        labels=labels, kv_start=kv_start, kv_end=kv_end, images=stacked,
        image_loss_mask=torch.tensor([im.diffuse for im in images], dtype=torch.bool),
        num_text_tokens=int(((modality == 0) & (doc_ids >= 0)).sum()),
    )
