"""Per-query key intervals for the mixed causal / bidirectional mask of unified multimodal models.

Query ``i`` of row ``b`` attends exactly the keys ``j`` with ``kv_start[b, i] <= j < kv_end[b, i]``.
Two int32 per query replace an L x L mask, and every mask of Transfusion, LlamaFusion, MetaMorph and
MetaQuery is one such interval per query:

* ``span_ids`` (B, L): 0 marks a causal (text) token; tokens sharing a positive id form one
  contiguous bidirectional span (an image) that sees the whole span.
* ``doc_ids`` (B, L) or None: packed documents (contiguous runs of equal ids); a token sees only its
  own document; a negative id is padding and gets an empty interval.

So ``kv_start`` is the first index of the token's document, and ``kv_end`` is ``i + 1`` for a causal
token and the end of its span for a span token.
"""
from __future__ import annotations

import torch

from ._common import check_same_device, check_tensor, is_tracing

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _run_bounds(change: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First index and one-past-last index of the run each position belongs to.

    ``change`` (B, L) bool is True where a new run starts (position 0 included).
    """
    B, L = change.shape
    idx = torch.arange(L, device=change.device).expand(B, L)
    run_start = torch.where(change, idx, 0).cummax(dim=1).values
    # A run ends one before the next run's start; the last run ends at L.
    next_change = torch.ones_like(change)
    next_change[:, :-1] = change[:, 1:]
    ends_here = torch.where(next_change, idx + 1, L)
    run_end = ends_here.flip(1).cummin(dim=1).values.flip(1)
    return run_start, run_end


def _new_run(x: torch.Tensor) -> torch.Tensor:
    change = torch.ones_like(x, dtype=torch.bool)
    change[:, 1:] = x[:, 1:] != x[:, :-1]
    return change


def _check_spans_contiguous(span_ids: torch.Tensor, span_change: torch.Tensor) -> None:
    """A positive span id must form one contiguous run per row (one image = one span)."""
    starts = span_change & (span_ids > 0)
    rows, cols = starts.nonzero(as_tuple=True)
    keys = torch.stack([rows.to(torch.int64), span_ids[rows, cols].to(torch.int64)], dim=1)
    if keys.shape[0] != torch.unique(keys, dim=0).shape[0]:
        raise ValueError("span_ids: each positive span id must form one contiguous run in its row")


def mask_intervals(
    span_ids: torch.Tensor, doc_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build ``(kv_start, kv_end)``, int32 (B, L) each, from image spans and packed documents.

    Args:
        span_ids: integer (B, L); 0 = causal token, equal positive ids = one bidirectional span.
        doc_ids: integer (B, L) or None; equal contiguous ids = one document, negative = padding.

    Returns:
        ``kv_start``, ``kv_end``: int32 (B, L), the half-open key interval of every query.
    """
    check_tensor("span_ids", span_ids, ndim=2, dtypes=_INT_DTYPES)
    if span_ids.shape[1] == 0:
        raise ValueError("span_ids must have at least one position, got shape (B, 0)")
    if doc_ids is None:
        doc_ids = torch.zeros_like(span_ids)
    else:
        check_tensor("doc_ids", doc_ids, dtypes=_INT_DTYPES, shape=tuple(span_ids.shape))
        check_same_device(span_ids=span_ids, doc_ids=doc_ids)

    doc_change = _new_run(doc_ids)
    span_change = doc_change | _new_run(span_ids)  # a span never crosses a document boundary
    if not is_tracing():
        if bool((span_ids < 0).any()):
            raise ValueError("span_ids must be >= 0 (0 = causal token, > 0 = bidirectional span id)")
        _check_spans_contiguous(span_ids, span_change)

    doc_start, _ = _run_bounds(doc_change)
    _, span_end = _run_bounds(span_change)
    L = span_ids.shape[1]
    causal_end = torch.arange(1, L + 1, device=span_ids.device).expand_as(span_end)
    kv_end = torch.where(span_ids > 0, span_end, causal_end)
    kv_start = doc_start
    padding = doc_ids < 0
    kv_start = torch.where(padding, 0, kv_start)
    kv_end = torch.where(padding, 0, kv_end)
    return kv_start.to(torch.int32).contiguous(), kv_end.to(torch.int32).contiguous()


def dense_mask(kv_start: torch.Tensor, kv_end: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The (B, Lq, Lk) bool mask the intervals describe; for baselines and small tests only."""
    j = torch.arange(kv_len, device=kv_start.device)
    return (j >= kv_start[..., None].long()) & (j < kv_end[..., None].long())
