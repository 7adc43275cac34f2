import pytest
import torch

from mmfuse.engine.packing import IGNORE_INDEX, Image, pack
from tests.kernels.test_mask_intervals import naive_intervals

BOI, EOI, PAD = 1, 2, 0


def img(value: float, diffuse: bool = True) -> Image:
    return Image(torch.full((4, 2, 2), value), diffuse)


def test_interleaved_documents_fill_rows_greedily():
    docs = [[[10, 11], img(1.0), [12]], [[20, 21, 22]], [img(2.0, diffuse=False)]]
    batch = pack(docs, row_len=12, tokens_per_image=3, boi_token_id=BOI, eoi_token_id=EOI, pad_token_id=PAD)
    # doc 0: 10 11 BOI i i i EOI 12 (8); doc 1 (3) fits the 4 left; doc 2 (5) does not -> new row
    assert batch.input_ids.tolist() == [
        [10, 11, BOI, 0, 0, 0, EOI, 12, 20, 21, 22, PAD],
        [BOI, 0, 0, 0, EOI, PAD, PAD, PAD, PAD, PAD, PAD, PAD],
    ]
    assert batch.modality[0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert batch.doc_ids[0].tolist() == [0] * 8 + [1, 1, 1, -1]
    assert batch.position_ids[0].tolist() == list(range(8)) + [0, 1, 2, 0]
    assert batch.labels[0].tolist() == [IGNORE_INDEX, 11, BOI, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, EOI, 12,
                                        IGNORE_INDEX, 21, 22, IGNORE_INDEX]
    assert batch.labels[1, 0].item() == IGNORE_INDEX  # first token of doc 2
    assert batch.images.shape == (2, 4, 2, 2) and batch.images[:, 0, 0, 0].tolist() == [1.0, 2.0]
    assert batch.image_loss_mask.tolist() == [True, False]
    assert batch.num_text_tokens == (8 + 3 + 5) - 6  # real positions minus image positions


def test_intervals_follow_spans_and_documents():
    docs = [[[5, 6], img(0.0), [7, 8]], [[9]], [[3, 4], img(1.0)]]
    batch = pack(docs, row_len=20, tokens_per_image=4, boi_token_id=BOI, eoi_token_id=EOI)
    want_start, want_end = naive_intervals(batch.span_ids, batch.doc_ids)
    assert torch.equal(batch.kv_start, want_start) and torch.equal(batch.kv_end, want_end)
    assert batch.kv_end[0, 3].item() == 7  # an image position sees its whole span
    assert batch.kv_start[0, 10].item() == 10  # doc 1 starts fresh


def test_document_longer_than_a_row_is_cut_but_images_stay_whole():
    docs = [[list(range(10, 17)), img(0.0), [30]]]
    batch = pack(docs, row_len=8, tokens_per_image=3, boi_token_id=BOI, eoi_token_id=EOI)
    # 7 text tokens fill row 0 (the 5-position image block cannot follow in the 1 left), image moves on
    assert batch.input_ids[0].tolist() == list(range(10, 17)) + [PAD]
    assert batch.input_ids[1].tolist() == [BOI, 0, 0, 0, EOI, 30, PAD, PAD]
    assert batch.doc_ids[1, 0].item() == 0 and batch.position_ids[1, 0].item() == 0
    assert batch.labels[1, 0].item() == IGNORE_INDEX


def test_image_exactly_at_a_row_boundary():
    docs = [[[10, 11, 12], img(0.0)], [[20]]]
    batch = pack(docs, row_len=8, tokens_per_image=3, boi_token_id=BOI, eoi_token_id=EOI)
    assert batch.input_ids.tolist() == [[10, 11, 12, BOI, 0, 0, 0, EOI], [20] + [PAD] * 7]


def test_empty_text_and_empty_documents():
    batch = pack([[[], img(0.0), []], []], row_len=6, tokens_per_image=2, boi_token_id=BOI, eoi_token_id=EOI)
    assert batch.input_ids.tolist() == [[BOI, 0, 0, EOI, PAD, PAD]]
    assert batch.images.shape[0] == 1
    text_only = pack([[[7, 8]]], row_len=4, tokens_per_image=2, boi_token_id=BOI, eoi_token_id=EOI)
    assert text_only.images is None and text_only.image_loss_mask.numel() == 0


def test_rejects_what_cannot_be_packed():
    with pytest.raises(ValueError, match="row_len"):
        pack([[img(0.0)]], row_len=4, tokens_per_image=3, boi_token_id=BOI, eoi_token_id=EOI)
    with pytest.raises(ValueError, match="row_len"):
        pack([[[1]]], row_len=0, tokens_per_image=3, boi_token_id=BOI, eoi_token_id=EOI)


def test_max_rows_gives_a_fixed_batch_shape():
    docs = [[[10, 11, 12, 13]], [[20, 21], img(1.0)], [[30, 31, 32]]]  # 4 + 7 + 3 positions
    batch = pack(docs, row_len=8, tokens_per_image=3, boi_token_id=BOI, eoi_token_id=EOI, max_rows=2)
    # rows fill in order: doc 1 (7) starts row 1, doc 2 (3) would need a third row, so it is left out
    assert batch.input_ids.tolist() == [[10, 11, 12, 13] + [PAD] * 4, [20, 21, BOI, 0, 0, 0, EOI, PAD]]
    one = pack(docs, row_len=8, tokens_per_image=3, boi_token_id=BOI, eoi_token_id=EOI, max_rows=1)
    # one row: doc 1 does not fit and is left out, doc 2 still fills the row's free tail
    assert one.input_ids.tolist() == [[10, 11, 12, 13, 30, 31, 32, PAD]] and one.images is None
    padded = pack(docs[:1], row_len=8, tokens_per_image=3, boi_token_id=BOI, eoi_token_id=EOI, max_rows=3)
    assert padded.input_ids.shape == (3, 8) and (padded.doc_ids[1:] == -1).all()
