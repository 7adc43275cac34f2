"""attn_implementation="mmfuse" in transformers vs "sdpa" on tiny random checkpoints."""
import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM

import mmfuse  # noqa: F401  (registers the attention implementation)
from mmfuse.kernels import default_backend
from mmfuse.models.hf_integration import ATTN_IMPLEMENTATION, MaskNotIntervals, mask_to_intervals
from tests.helpers import rel_err, triton_devices
from tests.models.test_decoder import tiny_llama, tiny_qwen2


@pytest.fixture(params=["llama", "qwen2"])
def pair(request, tmp_path):
    (tiny_llama() if request.param == "llama" else tiny_qwen2()).save_pretrained(tmp_path)
    load = lambda impl: AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl).eval()  # noqa: E731
    return load("sdpa"), load(ATTN_IMPLEMENTATION)


def padded_batch():
    ids = torch.randint(5, 90, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 8:] = 0  # right padding
    return ids, mask


def test_registered_on_import():
    assert ATTN_IMPLEMENTATION in AttentionInterface._global_mapping


def test_logits_match_sdpa(pair):
    sdpa, ours = pair
    ids, mask = padded_batch()
    with torch.no_grad():
        assert rel_err(ours(ids).logits, sdpa(ids).logits) <= 1e-4
        real = mask.bool()
        assert rel_err(ours(ids, attention_mask=mask).logits[real], sdpa(ids, attention_mask=mask).logits[real]) <= 1e-4


def test_generate_matches_sdpa(pair):
    sdpa, ours = pair
    ids, mask = padded_batch()
    mask[2] = 1  # generation pads on the left
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), sdpa.generate(ids, **kwargs))


@pytest.mark.skipif(not triton_devices(), reason="needs the Triton interpreter or a GPU")
def test_triton_backend_matches_sdpa(tmp_path):
    tiny_llama().save_pretrained(tmp_path)  # head_dim 32: a Triton head size
    sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTN_IMPLEMENTATION).eval()
    ids, mask = padded_batch()
    with torch.no_grad(), default_backend("triton"):
        got = ours(ids, attention_mask=mask).logits
    with torch.no_grad():
        want = sdpa(ids, attention_mask=mask).logits
    assert rel_err(got[mask.bool()], want[mask.bool()]) <= 1e-4


def test_gradients_match_sdpa(pair):
    sdpa, ours = pair
    ids, _ = padded_batch()
    sdpa(ids).logits.square().mean().backward()
    ours(ids).logits.square().mean().backward()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert rel_err(dict(ours.named_parameters())[name].grad, dict(sdpa.named_parameters())[name].grad) <= 1e-4


def test_mask_to_intervals():
    start, end = mask_to_intervals(None, 2, 3, 5)  # three new queries after two cached keys
    assert start.tolist() == [[0, 0, 0]] * 2 and end.tolist() == [[3, 4, 5]] * 2
    assert mask_to_intervals(None, 1, 2, 4, causal=False)[1].tolist() == [[4, 4]]
    mask = torch.tensor([[[[False, True, True], [False, False, False]]]])
    start, end = mask_to_intervals(mask, 1, 2, 3)
    assert start.tolist() == [[1, 0]] and end.tolist() == [[3, 0]]  # the empty row gets an empty interval
    with pytest.raises(MaskNotIntervals, match="contiguous"):
        mask_to_intervals(torch.tensor([[[[True, False, True]]]]), 1, 1, 3)
    # a float additive mask: 0 attends, -inf (or the dtype's minimum) blocks
    additive = torch.tensor([[[[float("-inf"), 0.0, 0.0], [torch.finfo(torch.float32).min, 0.0, float("-inf")]]]])
    start, end = mask_to_intervals(additive, 1, 2, 3)
    assert start.tolist() == [[1, 1]] and end.tolist() == [[3, 2]]
    with pytest.raises(MaskNotIntervals, match="additive bias"):
        mask_to_intervals(torch.tensor([[[[0.0, -1.5, 0.0]]]]), 1, 1, 3)
    with pytest.raises(ValueError, match="bool or float"):
        mask_to_intervals(torch.ones(1, 1, 1, 3, dtype=torch.long), 1, 1, 3)


def test_a_padded_mask_becomes_intervals_once_per_forward(pair, monkeypatch):
    """transformers passes every layer the same mask: converted (and checked) once, not per layer."""
    from mmfuse.models import hf_integration
    from tests.helpers import count_calls

    sdpa, ours = pair
    ids, mask = padded_batch()
    calls = count_calls(monkeypatch, {"convert": ("mmfuse.models.hf_integration", "mask_to_intervals")})
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        assert calls["convert"] == 1 < ours.config.num_hidden_layers
        mask[1] = 1  # another batch's mask is converted anew, not served from the last one
        again = ours(ids, attention_mask=mask).logits
        want = sdpa(ids, attention_mask=mask).logits
    assert calls["convert"] == 2 and len(hf_integration._last_intervals) == 2
    real = mask.bool()
    assert not torch.allclose(got[1], again[1])  # row 1 lost its padding: the new intervals were used
    assert rel_err(again[real], want[real]) <= 1e-4
