import pytest
import torch

from mmfuse.kernels import dense_mask, mask_intervals
from tests.helpers import random_layout


def naive_intervals(span_ids: torch.Tensor, doc_ids: torch.Tensor | None):
    """Scan each row by hand: the interval definition (README, "The mixed mask, as intervals"), one token at a time."""
    B, L = span_ids.shape
    docs = torch.zeros_like(span_ids) if doc_ids is None else doc_ids
    start = torch.zeros(B, L, dtype=torch.int32)
    end = torch.zeros(B, L, dtype=torch.int32)
    for b in range(B):
        for i in range(L):
            d = int(docs[b, i])
            if d < 0:
                continue  # padding: empty interval
            s = i
            while s > 0 and int(docs[b, s - 1]) == d:
                s -= 1
            sid = int(span_ids[b, i])
            if sid == 0:
                e = i + 1
            else:
                e = i + 1
                while e < L and int(span_ids[b, e]) == sid and int(docs[b, e]) == d:
                    e += 1
            start[b, i], end[b, i] = s, e
    return start, end


@pytest.mark.parametrize("L", [1, 2, 45, 130])
def test_matches_naive_scan(L):
    gen = torch.Generator().manual_seed(L)
    for _ in range(3):
        span, doc = random_layout(3, L, gen)
        got = mask_intervals(span, doc)
        want = naive_intervals(span, doc)
        assert got[0].dtype == torch.int32 and got[1].dtype == torch.int32
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_causal_and_image_span_without_documents():
    span = torch.tensor([[0, 0, 7, 7, 7, 0, 2, 2]])
    start, end = mask_intervals(span)
    assert start.tolist() == [[0] * 8]
    assert end.tolist() == [[1, 2, 5, 5, 5, 6, 8, 8]]


def test_padding_and_documents():
    span = torch.tensor([[0, 1, 1, 0, 0, 0]])
    doc = torch.tensor([[0, 0, 0, 1, 1, -1]])
    start, end = mask_intervals(span, doc)
    assert start.tolist() == [[0, 0, 0, 3, 3, 0]]
    assert end.tolist() == [[1, 3, 3, 4, 5, 0]]
    mask = dense_mask(start, end, 6)
    assert not mask[0, 5].any()  # padding sees nothing
    assert mask[0, 1].tolist() == [True, True, True, False, False, False]


def test_span_split_by_document_boundary_is_two_spans():
    # The same span id on both sides of a document boundary never lets a token see across it.
    span = torch.tensor([[3, 3, 0, 0]])
    doc = torch.tensor([[0, 0, 1, 1]])
    start, end = mask_intervals(span, doc)
    assert end.tolist() == [[2, 2, 3, 4]] and start.tolist() == [[0, 0, 2, 2]]


def test_rejects_bad_input():
    with pytest.raises(TypeError, match="span_ids"):
        mask_intervals(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="span_ids"):
        mask_intervals(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="doc_ids"):
        mask_intervals(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="contiguous"):
        mask_intervals(torch.tensor([[1, 1, 0, 1]]))
    with pytest.raises(ValueError, match="span_ids"):
        mask_intervals(torch.tensor([[0, -1, 0]]))
    with pytest.raises(TypeError, match="span_ids"):
        mask_intervals([[0, 1]])
