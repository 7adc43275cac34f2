"""generate() vs transformers' greedy generate on tiny random checkpoints (fp32)."""
import pytest
import torch

from mmfuse.engine import generate, sample_next
from mmfuse.models import from_pretrained
from tests.models.test_decoder import tiny_llama, tiny_qwen2


@pytest.fixture(params=["llama", "qwen2"])
def pair(request, tmp_path):
    hf = tiny_llama() if request.param == "llama" else tiny_qwen2()
    hf.save_pretrained(tmp_path)
    return hf, from_pretrained(tmp_path)


def test_greedy_equals_transformers(pair):
    hf, ours = pair
    ids = torch.randint(5, 90, (2, 7))
    want = hf.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generate(ours, ids, 16), want)


def test_left_padded_batch_equals_transformers(pair):
    hf, ours = pair
    ids = torch.randint(5, 90, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generate(ours, ids, 8, attention_mask=mask), want)


def test_compiled_decode_step_gives_the_same_tokens(pair):
    _, ours = pair
    ids = torch.randint(5, 90, (1, 5))
    # compile=True traces the step with fullgraph=True: a graph break (a host sync) would raise here.
    assert torch.equal(generate(ours, ids, 6, compile=True), generate(ours, ids, 6))


def test_compiled_sampling_draws_the_same_tokens(pair):
    _, ours = pair
    ids = torch.randint(5, 90, (2, 5))
    kwargs = dict(temperature=0.8, top_k=20, top_p=0.9)
    compiled = generate(ours, ids, 6, compile=True, generator=torch.Generator().manual_seed(1), **kwargs)
    eager = generate(ours, ids, 6, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(compiled, eager)
    assert not torch.equal(eager, generate(ours, ids, 6, generator=torch.Generator().manual_seed(2), **kwargs))


def test_eos_rows_keep_emitting_eos(pair):
    _, ours = pair
    ids = torch.randint(5, 90, (2, 4))
    free = generate(ours, ids, 10)
    eos = int(free[0, 6])  # a token row 0 emits at step 3
    out = generate(ours, ids, 10, eos_token_id=eos)
    hit = (out[0, 4:] == eos).nonzero()[0, 0] + 4
    assert (out[0, hit:] == eos).all()
    assert torch.equal(out[0, :hit], free[0, :hit])


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]]).repeat(200, 1)
    draws = sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2}
    again = sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    nucleus = sample_next(logits, temperature=1.0, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert set(nucleus.tolist()) == {1}  # token 1 alone holds more than half the mass
    assert torch.equal(sample_next(logits[:1]), torch.tensor([1]))


def test_rejects_bad_arguments(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="input_ids"):
        generate(ours, torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(ours, torch.zeros(1, 3, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(ours, torch.zeros(1, 3, dtype=torch.long), 2, attention_mask=torch.ones(1, 4))
    with pytest.raises(TypeError, match="Decoder"):
        generate(torch.nn.Linear(2, 2), torch.zeros(1, 3, dtype=torch.long), 2)


@pytest.mark.cuda
def test_compiled_decode_step_runs_as_a_cuda_graph(tmp_path):
    from torch._dynamo.utils import counters

    tiny_llama().save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, device="cuda")
    ids = torch.randint(5, 90, (2, 5), device="cuda")
    counters.clear()
    compiled = generate(ours, ids, 8, compile=True)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])  # captured, not skipped
    assert torch.equal(compiled, generate(ours, ids, 8))


@pytest.mark.cuda
def test_eager_decode_step_makes_no_host_sync(tmp_path):
    """An uncompiled decode step only queues GPU work: under torch's sync debug mode "error" any
    call in it that waits for the GPU (a host-side input check, a .item()) would raise."""
    tiny_llama().save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, device="cuda")
    B, L = 2, 5
    ours.setup_cache(B, L + 1)
    with torch.no_grad():
        ours(torch.randint(5, 90, (B, L), device="cuda"), input_pos=torch.arange(L, device="cuda"))  # prefill
        tok = torch.randint(5, 90, (B, 1), device="cuda")
        pos = torch.tensor([L], device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            next_tok = sample_next(ours.logits(ours(tok, input_pos=pos)[:, -1]))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert next_tok.shape == (B,)


def test_the_cache_lives_for_the_call_and_the_compiled_step_is_built_once(pair):
    from torch._dynamo.utils import counters

    from mmfuse.engine.generate import compiled_decode_step

    _, ours = pair
    ids = torch.randint(5, 90, (1, 5))
    first = generate(ours, ids, 4, compile=True)
    assert all(layer.attn.kv_cache is None for layer in ours.layers)  # released: the model is left as it was
    graphs = counters["stats"]["unique_graphs"]
    step = compiled_decode_step(ours)
    again = generate(ours, torch.randint(5, 90, (1, 5)), 4, compile=True)  # a new call, a new cache: same step
    assert compiled_decode_step(ours) is step and counters["stats"]["unique_graphs"] == graphs
    assert first.shape == again.shape


def test_prompts_beyond_the_context_or_vocabulary_are_refused(pair):
    _, ours = pair
    limit = ours.config.max_seq_len  # the checkpoint's max_position_embeddings
    assert limit
    with pytest.raises(ValueError, match=f"exceed the model's context of {limit} positions"):
        generate(ours, torch.zeros(1, limit, dtype=torch.long), 1)  # refused before any forward
    with pytest.raises(ValueError, match=r"input_ids values must lie in \[0, "):
        generate(ours, torch.tensor([[5, ours.config.vocab_size]]), 2)
