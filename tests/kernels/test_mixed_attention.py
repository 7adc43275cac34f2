"""mixed_attention vs a dense float64 reference, on both backends (Triton through the interpreter on CPU)."""
import importlib

import pytest
import torch

from mmfuse.kernels import mask_intervals, mixed_attention, mixed_attention_tile_counts, tile_stats
from tests.helpers import count_calls, random_layout, rel_err, triton_devices

attn_mod = importlib.import_module("mmfuse.kernels.mixed_attention")  # the package re-exports a same-named function

BACKENDS = [("torch", "cpu")] + [("triton", d) for d in triton_devices()]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def dense_reference(q, k, v, kv_start, kv_end, scale=None, softcap=None):
    """Plain softmax attention over an explicit (B, Lq, Lk) mask, in q's dtype; empty rows give 0.
    ``softcap``: transformers' Gemma 2 eager attention, ``tanh(s / cap) * cap`` of the scaled scores."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    j = torch.arange(Lk, device=q.device)
    mask = (j >= kv_start[..., None].long()) & (j < kv_end[..., None].long())
    scores = (q @ k.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-masked row is NaN -> 0
    return probs @ v


def run_case(q, k, v, kv_start, kv_end, backend, device, scale=None, num_splits=None, softcap=None):
    """Output and (dq, dk, dv) of mmfuse, the float64 reference, and eager attention in q's dtype."""
    q, k, v = (t.to(device).detach().requires_grad_() for t in (q, k, v))
    kv_start, kv_end = kv_start.to(device), kv_end.to(device)
    out = mixed_attention(q, k, v, kv_start, kv_end, scale, softcap=softcap, backend=backend, num_splits=num_splits)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    def reference(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        ref = dense_reference(*leaves, kv_start, kv_end, scale, softcap)
        return ref, torch.autograd.grad(ref, leaves, grad_out.to(dtype))

    return (out, grads), reference(torch.float64), reference(q.dtype)


def assert_close_to_reference(case, dtype):
    (out, grads), (ref, ref_grads), (eager, eager_grads) = case
    for name, got, want, pt in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads),
                                   (eager, *eager_grads)):
        assert not torch.isnan(got).any(), f"{name} has NaN"
        err = rel_err(got, want)
        assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]}"
        if dtype != torch.float32:
            # FlashAttention's rule: no worse than twice PyTorch's own error in the same dtype.
            pt_err = rel_err(pt, want)
            assert err <= 2 * pt_err + 1e-6, f"{name}: error {err:.3g} > 2 x eager {dtype} error {pt_err:.3g}"



def packed_inputs(B, Hq, Hkv, L, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    span, doc = random_layout(B, L, gen)
    kv_start, kv_end = mask_intervals(span, doc)
    q = torch.randn(B, Hq, L, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
    return q, k, v, kv_start, kv_end


# (L, D, Hq, Hkv): awkward lengths, every supported head dim family, GQA ratios 1, 2, 4.
SHAPES = [(1, 32, 2, 2), (45, 64, 4, 2), (97, 80, 4, 1), (130, 128, 2, 2), (70, 96, 2, 1), (33, 72, 2, 2)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,D,Hq,Hkv", SHAPES)
def test_packed_layout_matches_reference(backend, device, dtype, L, D, Hq, Hkv, poisoned_allocations):
    inputs = packed_inputs(2, Hq, Hkv, L, D, dtype, seed=L * D)
    assert_close_to_reference(run_case(*inputs, backend, device), dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fp16_and_custom_scale(backend, device):
    inputs = packed_inputs(1, 4, 4, 64, 64, torch.float16, seed=3)
    assert_close_to_reference(run_case(*inputs, backend, device, scale=0.3), torch.float16)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    B, L, H, D = 2, 50, 2, 64
    gen = torch.Generator().manual_seed(5)
    # (B, L, H, D) storage viewed as (B, H, L, D): the layout a fused QKV projection produces.
    q, k, v = (torch.randn(B, L, H, D, generator=gen).transpose(1, 2) for _ in range(3))
    span, doc = random_layout(B, L, gen)
    kv_start, kv_end = mask_intervals(span, doc)
    assert not q.is_contiguous()
    assert_close_to_reference(run_case(q, k, v, kv_start, kv_end, backend, device), torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_extend_image_chunk_against_cached_prefix(backend, device, poisoned_allocations):
    """Diffusion sampling: a bidirectional image chunk attends itself and a cached text prefix."""
    prefix, chunk, B, Hq, Hkv, D = 37, 24, 2, 4, 2, 64
    Lk = prefix + chunk
    q = torch.randn(B, Hq, chunk, D)
    k, v = torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D)
    kv_start = torch.zeros(B, chunk, dtype=torch.int32)
    kv_start[1] = 5  # row 1's document starts at cache position 5
    kv_end = torch.full((B, chunk), Lk, dtype=torch.int32)
    assert_close_to_reference(run_case(q, k, v, kv_start, kv_end, backend, device), torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,D,Hq,Hkv", [(45, 64, 4, 2), (130, 128, 2, 2), (33, 72, 2, 1)])
def test_softcapped_packed_layout_matches_reference(backend, device, dtype, L, D, Hq, Hkv):
    """Gemma 2's logit soft-capping; 4x the usual scale so that the cap bends the scores."""
    q, k, v, kv_start, kv_end = packed_inputs(2, Hq, Hkv, L, D, dtype, seed=L)
    case = run_case(q, k, v, kv_start, kv_end, backend, device, scale=4 * D**-0.5, softcap=3.0)
    assert_close_to_reference(case, dtype)
    uncapped = dense_reference(q.double(), k.double(), v.double(), kv_start, kv_end, 4 * D**-0.5)
    assert rel_err(case[1][0], uncapped) > 1e-2  # the cap changed the result: this case tests it


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_softcapped_decode_and_inference(backend, device):
    """One query (the decode path) and no-grad inference take the cap too."""
    B, Hq, Hkv, Lk, D = 3, 4, 1, 70, 32
    q, k, v = torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D)
    kv_start = torch.tensor([[0], [17], [0]], dtype=torch.int32)
    kv_end = torch.tensor([[70], [50], [0]], dtype=torch.int32)
    assert_close_to_reference(run_case(q, k, v, kv_start, kv_end, backend, device, scale=1.0, softcap=5.0),
                              torch.float32)
    with torch.no_grad():
        out = mixed_attention(*(t.to(device) for t in (q, k, v, kv_start, kv_end)), 1.0, softcap=5.0, backend=backend)
    ref = dense_reference(q.double(), k.double(), v.double(), kv_start, kv_end, 1.0, 5.0)
    assert rel_err(out, ref) <= TOL[torch.float32]


@pytest.mark.parametrize("Lq", [1, 5])
def test_compiled_softcapped_few_queries_match_the_reference(Lq):
    B, Hq, Hkv, Lk, D = 2, 4, 2, 30, 32
    q, k, v = torch.randn(B, Hq, Lq, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D)
    kv_start = torch.zeros(B, Lq, dtype=torch.int32)
    kv_end = torch.full((B, Lq), Lk, dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    attend = torch.compile(lambda q, k, v: mixed_attention(q, k, v, kv_start, kv_end, 1.0, softcap=4.0,
                                                           backend="torch"), fullgraph=True, backend="aot_eager")
    out = attend(*leaves)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = dense_reference(*ref_leaves, kv_start, kv_end, 1.0, 4.0)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert rel_err(got, want) <= TOL[torch.float32]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("num_splits", [None, 1, 3, 8])
def test_decode_one_query(backend, device, num_splits):
    if backend == "torch" and num_splits not in (None, 1):
        pytest.skip("splits are a Triton launch choice")
    B, Hq, Hkv, Lk, D = 3, 4, 1, 203, 32
    q, k, v = torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D)
    kv_start = torch.tensor([[0], [17], [0]], dtype=torch.int32)
    kv_end = torch.tensor([[203], [150], [0]], dtype=torch.int32)  # row 2: empty interval
    case = run_case(q, k, v, kv_start, kv_end, backend, device, num_splits=num_splits)
    assert_close_to_reference(case, torch.float32)
    out, (dq, dk, dv) = case[0]
    assert out[2].abs().max() == 0 and dq[2].abs().max() == 0 and dk[2].abs().max() == 0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fully_masked_rows_give_zero_output_and_gradients(backend, device):
    B, H, L, D = 2, 2, 40, 32
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    doc = torch.zeros(B, L, dtype=torch.long)
    doc[0, 30:] = -1
    doc[1] = -1  # an all-padding row
    kv_start, kv_end = mask_intervals(torch.zeros(B, L, dtype=torch.long), doc)
    case = run_case(q, k, v, kv_start, kv_end, backend, device)
    assert_close_to_reference(case, torch.float32)
    out, (dq, dk, dv) = case[0]
    assert out[0, :, 30:].abs().max() == 0 and dq[0, :, 30:].abs().max() == 0
    assert out[1].abs().max() == 0 and dk[1].abs().max() == 0 and dv[1].abs().max() == 0


def with_empty_rows(inputs, rows=(0, 40, 41, 300)):
    """Some queries see no key at all (kv_end = kv_start): their output and gradients are 0."""
    q, k, v, kv_start, kv_end = inputs
    kv_end = kv_end.clone()
    kv_end[:, list(rows)] = kv_start[:, list(rows)]
    return q, k, v, kv_start, kv_end


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_chunks_queries_exactly(monkeypatch, dtype):
    """Small query chunks, so the CPU path (PyTorch's flash kernel per chunk, its masks from the
    intervals, chunks that see no key skipped) runs many times, on a long awkward length."""
    monkeypatch.setattr(attn_mod, "_SDPA_CHUNK", 32)
    inputs = with_empty_rows(packed_inputs(2, 4, 2, 1025, 32, dtype, seed=11))
    assert_close_to_reference(run_case(*inputs, "torch", "cpu"), dtype)


def test_the_plain_pytorch_chunks_off_cpu_are_exact(monkeypatch):
    """The torch backend off the CPU (no PyTorch flash kernel there to call): scores chunk by chunk."""
    monkeypatch.setattr(attn_mod, "_REF_CHUNK_ELEMENTS", 4096)
    monkeypatch.setattr(attn_mod, "_attention_fwd_torch", attn_mod._attention_fwd_chunked_torch)
    monkeypatch.setattr(attn_mod, "_attention_bwd_torch", attn_mod._attention_bwd_chunked_torch)
    inputs = with_empty_rows(packed_inputs(1, 2, 1, 1025, 32, torch.float32, seed=11))
    assert_close_to_reference(run_case(*inputs, "torch", "cpu"), torch.float32)


def test_the_chunk_plan_follows_its_interval_tensors(monkeypatch):
    """The plan (windows, masks) is kept for the interval tensors it was built from, and rebuilt when
    they change in place or other tensors come: every result is the reference's."""
    monkeypatch.setattr(attn_mod, "_SDPA_CHUNK", 16)
    q, k, v, kv_start, kv_end = packed_inputs(1, 2, 2, 70, 32, torch.float32, seed=3)
    ref = lambda s, e: dense_reference(*(t.double() for t in (q, k, v)), s, e).float()
    with torch.no_grad():
        assert rel_err(mixed_attention(q, k, v, kv_start, kv_end), ref(kv_start, kv_end)) <= 1e-5
        kv_start.zero_()  # in place: every query now sees from the first key
        assert rel_err(mixed_attention(q, k, v, kv_start, kv_end), ref(kv_start, kv_end)) <= 1e-5
        other = torch.zeros_like(kv_end)  # new tensors: nothing seen, zeros
        assert mixed_attention(q, k, v, kv_start, other).abs().max() == 0


def test_interval_values_are_checked_once_per_tensors_and_again_after_a_change(monkeypatch):
    """Every layer passes the same interval tensors: their range is checked on the first call only, and
    again once they change in place (a bad value then still raises)."""
    checks = count_calls(monkeypatch, {"range": ("mmfuse.kernels.mixed_attention", "check_values_in_range")})
    q, k, v, kv_start, kv_end = packed_inputs(1, 2, 2, 20, 32, torch.float32, seed=5)
    with torch.no_grad():
        for _ in range(3):
            mixed_attention(q, k, v, kv_start, kv_end)
        assert checks["range"] == 2  # kv_start and kv_end, once
        kv_end[0, 3] = 21  # past Lk = 20
        with pytest.raises(ValueError, match=r"kv_end values must lie in \[0, Lk=20\]"):
            mixed_attention(q, k, v, kv_start, kv_end)


def test_arguments_are_checked_after_a_call_that_passed():
    """The checks remember the last arguments' metadata that passed; any change is checked again."""
    q, k, v, kv_start, kv_end = packed_inputs(1, 2, 2, 20, 32, torch.float32, seed=5)
    with torch.no_grad():
        mixed_attention(q, k, v, kv_start, kv_end)
        with pytest.raises(TypeError, match="k must have dtype"):
            mixed_attention(q, k.double(), v, kv_start, kv_end)
        with pytest.raises(ValueError, match="v must have shape"):
            mixed_attention(q, k, v[:, :, :-1], kv_start, kv_end)
        with pytest.raises(TypeError, match="kv_end must be a torch.Tensor"):
            mixed_attention(q, k, v, kv_start, kv_end.tolist())
        mixed_attention(q, k, v, kv_start, kv_end)


def test_two_alternating_interval_pairs_are_each_checked_once(monkeypatch):
    """Layers that alternate two masks (sliding-window / full, as Gemma's) keep both pairs' facts: each
    pair's range is checked once however many layers alternate, and a third pair evicts the oldest."""
    checks = count_calls(monkeypatch, {"range": ("mmfuse.kernels.mixed_attention", "check_values_in_range")})
    q, k, v, kv_start, kv_end = packed_inputs(1, 2, 2, 20, 32, torch.float32, seed=5)
    pairs = [(kv_start, kv_end), (kv_start.clone(), kv_end.clone())]  # other tensors: a pair of its own
    with torch.no_grad():
        for _ in range(3):
            for s, e in pairs:
                mixed_attention(q, k, v, s, e)
        assert checks["range"] == 4  # two tensors per pair, once each
        third = (kv_start.clone(), kv_end.clone())
        mixed_attention(q, k, v, *third)
        mixed_attention(q, k, v, *pairs[0])  # the oldest pair was evicted by the third: checked again
        assert checks["range"] == 8


def test_inference_mode_tensors_are_planned_afresh(monkeypatch):
    """Inference tensors keep no version counter, so their plan is never kept: changed in place, the
    next call still sees the new intervals."""
    monkeypatch.setattr(attn_mod, "_SDPA_CHUNK", 16)
    q, k, v, kv_start, kv_end = packed_inputs(1, 2, 2, 40, 32, torch.float32, seed=4)
    with torch.inference_mode():
        s, e = kv_start.clone(), kv_end.clone()
        first = mixed_attention(q, k, v, s, e)
        e.zero_()
        assert mixed_attention(q, k, v, s, e).abs().max() == 0
    assert rel_err(first, dense_reference(q, k, v, kv_start, kv_end)) <= 1e-5


def test_inference_equals_the_op_on_packed_layouts_with_empty_rows(monkeypatch):
    monkeypatch.setattr(attn_mod, "_SDPA_CHUNK", 32)
    q, k, v, kv_start, kv_end = with_empty_rows(packed_inputs(2, 4, 2, 333, 32, torch.bfloat16, seed=5))
    through_op = mixed_attention(q.requires_grad_(), k, v, kv_start, kv_end).detach()
    with torch.no_grad():
        direct = mixed_attention(q, k, v, kv_start, kv_end)
    assert direct.dtype == torch.bfloat16 and rel_err(direct.float(), through_op.float()) <= 1e-2
    assert direct[:, :, [0, 40, 41, 300]].abs().max() == 0


@pytest.mark.skipif(not triton_devices(), reason="needs the Triton interpreter or a GPU")
def test_tile_counts_match_the_minimum():
    dev = triton_devices()[0]
    gen = torch.Generator().manual_seed(7)
    B, H, L, D = 2, 2, 150, 32
    span, doc = random_layout(B, L, gen)
    kv_start, kv_end = (t.to(dev) for t in mask_intervals(span, doc))
    q, k, v = (torch.randn(B, H, L, D, device=dev) for _ in range(3))
    counts = mixed_attention_tile_counts(q, k, v, kv_start, kv_end)
    stats = tile_stats(kv_start, kv_end, L, num_heads=H, head_dim=D)
    # The kernel computes exactly the tiles holding an unmasked pair, and masks only the edge ones.
    assert counts["full"] + counts["masked"] == stats["needed"]
    assert counts["full"] == stats["full"] and counts["masked"] == stats["masked"]
    assert stats["needed"] < stats["dense"]


@pytest.mark.skipif(not triton_devices(), reason="needs the Triton interpreter or a GPU")
def test_causal_tile_counts():
    dev = triton_devices()[0]
    L, D = 160, 32
    block_m, block_n, _, _ = attn_mod._block_sizes(D, torch.float32)
    kv_start, kv_end = (t.to(dev) for t in mask_intervals(torch.zeros(1, L, dtype=torch.long)))
    q, k, v = (torch.randn(1, 1, L, D, device=dev) for _ in range(3))
    counts = mixed_attention_tile_counts(q, k, v, kv_start, kv_end)
    nb = L // block_m
    assert block_m == block_n and L % block_m == 0
    # Causal with square blocks: the diagonal tiles are masked, the ones below run mask-free.
    assert counts == {"full": nb * (nb - 1) // 2, "masked": nb, "skipped": 0}


def test_tile_stats_counts_by_hand():
    # Two documents of 4 tokens, blocks of 4: each document needs only its own diagonal tile.
    kv_start, kv_end = mask_intervals(torch.zeros(1, 8, dtype=torch.long), torch.tensor([[0] * 4 + [1] * 4]))
    stats = tile_stats(kv_start, kv_end, 8, block_m=4, block_n=4)
    assert stats == {"needed": 2, "full": 0, "masked": 2, "dense": 4}
    bidir = torch.zeros(1, 8, dtype=torch.int32), torch.full((1, 8), 8, dtype=torch.int32)
    assert tile_stats(*bidir, 8, block_m=4, block_n=4) == {"needed": 4, "full": 4, "masked": 0, "dense": 4}


def test_compiles_without_graph_breaks():
    class Block(torch.nn.Module):
        def forward(self, q, k, v, kv_start, kv_end):
            return mixed_attention(q, k, v, kv_start, kv_end, backend="torch").sum(dim=1)

    inputs = packed_inputs(2, 4, 2, 33, 32, torch.float32, seed=1)
    q = inputs[0].requires_grad_()
    compiled = torch.compile(Block(), fullgraph=True, backend="aot_eager")
    out = compiled(q, *inputs[1:])
    out.square().sum().backward()
    q_eager = inputs[0].detach().requires_grad_()
    ref = Block()(q_eager, *inputs[1:])
    ref.square().sum().backward()
    assert rel_err(out, ref) < 1e-6 and rel_err(q.grad, q_eager.grad) < 1e-6


@pytest.mark.parametrize("Lq", [1, 5])
def test_compiled_few_queries_run_inline_and_match_the_reference(monkeypatch, Lq):
    """Under torch.compile a decode-sized call is traced as plain PyTorch, not the custom op's Python body."""
    custom_op_body = count_calls(monkeypatch, {"fwd": ("mmfuse.kernels.mixed_attention", "_attention_fwd_torch")})
    B, Hq, Hkv, Lk, D = 3, 4, 2, 45, 32
    q, k, v = torch.randn(B, Hq, Lq, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D)
    kv_start = torch.tensor([0, 17, 0], dtype=torch.int32)[:, None].expand(B, Lq).contiguous()
    kv_end = torch.tensor([45, 30, 0], dtype=torch.int32)[:, None].expand(B, Lq).contiguous()  # row 2: empty
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    attend = torch.compile(lambda q, k, v: mixed_attention(q, k, v, kv_start, kv_end, backend="torch"),
                           fullgraph=True, backend="aot_eager")
    out = attend(*leaves)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert custom_op_body["fwd"] == 0
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = dense_reference(*ref_leaves, kv_start, kv_end)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert not torch.isnan(got).any() and rel_err(got, want) <= TOL[torch.float32]
    assert out[2].abs().max() == 0 and grads[0][2].abs().max() == 0


def _good():
    q = torch.randn(2, 4, 8, 32)
    k = torch.randn(2, 2, 10, 32)
    s = torch.zeros(2, 8, dtype=torch.int32)
    e = torch.full((2, 8), 10, dtype=torch.int32)
    return dict(q=q, k=k, v=k.clone(), kv_start=s, kv_end=e)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(q=torch.randn(2, 3, 8, 32)), ValueError, "multiple"),
        (dict(k=torch.randn(3, 2, 10, 32)), ValueError, "k must have shape"),
        (dict(v=torch.randn(2, 2, 9, 32)), ValueError, "v must have shape"),
        (dict(k=torch.randn(2, 2, 10, 16)), ValueError, "k must have shape"),
        (dict(q=torch.randn(4, 8, 32)), ValueError, "q must have 4 dimensions"),
        (dict(v=torch.randn(2, 2, 10, 32).half()), TypeError, "v must have dtype"),
        (dict(kv_start=torch.zeros(2, 8, dtype=torch.int64)), TypeError, "kv_start must have dtype"),
        (dict(kv_end=torch.zeros(2, 7, dtype=torch.int32)), ValueError, "kv_end must have shape"),
        (dict(kv_end=torch.full((2, 8), 11, dtype=torch.int32)), ValueError, r"kv_end values must lie in \[0, Lk=10\]"),
        (dict(kv_start=torch.full((2, 8), -1, dtype=torch.int32)), ValueError, "kv_start values"),
        (dict(kv_start=torch.zeros(2, 8, dtype=torch.int32, device="meta")), ValueError, "kv_start is on meta"),
        (dict(q=torch.randn(2, 4, 8, 32).int()), TypeError, "q must have dtype"),
    ],
)
def test_rejects_bad_input(change, error, match):
    args = {**_good(), **change}
    with pytest.raises(error, match=match):
        mixed_attention(**args, backend="torch")


def test_rejects_bad_backend_and_options():
    with pytest.raises(ValueError, match="backend"):
        mixed_attention(**_good(), backend="cuda")
    with pytest.raises(ValueError, match="num_splits"):
        mixed_attention(**_good(), backend="torch", num_splits=0)
    for bad in (0.0, -1.0, float("inf"), "50"):
        with pytest.raises(ValueError, match="softcap"):
            mixed_attention(**_good(), softcap=bad, backend="torch")


@pytest.mark.skipif(not triton_devices(), reason="needs the Triton interpreter or a GPU")
def test_triton_rejects_unsupported_head_dim_before_launch():
    args = _good()
    args.update(q=torch.randn(2, 4, 8, 48), k=torch.randn(2, 2, 10, 48), v=torch.randn(2, 2, 10, 48))
    args = {n: t.to(triton_devices()[0]) for n, t in args.items()}
    with pytest.raises(ValueError, match="head dim 48"):
        mixed_attention(**args, backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L,D,Hq,Hkv", [(1025, 128, 8, 2), (777, 64, 4, 4), (512, 80, 4, 1)])
def test_cuda_large_packed_layouts(dtype, L, D, Hq, Hkv):
    inputs = packed_inputs(2, Hq, Hkv, L, D, dtype, seed=L)
    assert_close_to_reference(run_case(*inputs, "triton", "cuda"), dtype)


@pytest.mark.cuda
def test_cuda_decode_split_kv_default():
    B, Hq, Hkv, Lk, D = 1, 8, 2, 4099, 128
    q = torch.randn(B, Hq, 1, D, dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, Lk, D, dtype=torch.bfloat16) for _ in range(2))
    kv_start = torch.zeros(B, 1, dtype=torch.int32)
    kv_end = torch.full((B, 1), Lk, dtype=torch.int32)
    assert_close_to_reference(run_case(q, k, v, kv_start, kv_end, "triton", "cuda"), torch.bfloat16)
