"""RoPE: frequencies and tables against transformers, rotation against a float64 complex reference."""
import importlib

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from mmfuse.kernels.rope import apply_rope, rope_cos_sin, rope_frequencies
from tests.helpers import rel_err, triton_devices

rope_mod = importlib.import_module("mmfuse.kernels.rope")

BACKENDS = [("torch", "cpu")] + [("triton", d) for d in triton_devices()]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
LLAMA31 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192)
LLAMA32 = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192)


def _hf_config(head_dim, theta, scaling):
    params = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
    return LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                       max_position_embeddings=131072, rope_parameters=params)


def _packed_positions(B, L, device):
    """Positions as packing and images make them: restarts per document, repeats inside a span."""
    pos = torch.empty(B, L, dtype=torch.long)
    for b in range(B):
        cut = torch.randint(1, max(2, L), ()).item()
        pos[b, :cut] = torch.arange(cut)
        pos[b, cut:] = torch.arange(L - cut) + 3 * b
        pos[b, cut // 2: cut // 2 + 3] = pos[b, cut // 2]  # an image span sharing one position
    return pos.to(device)


def _reference(q, k, pos, inv_freq):
    """Float64 rotation of the pairs (x[i], x[i + D/2]) as complex numbers by angle pos * inv_freq[i]."""
    angle = pos.double()[:, None, :, None] * inv_freq.double()  # (B, 1, L, D/2)
    turn = torch.polar(torch.ones_like(angle), angle)

    def rotate(x):
        x64 = x.detach().double().requires_grad_()
        half = x.shape[-1] // 2
        z = torch.complex(x64[..., :half], x64[..., half:]) * turn
        return torch.cat((z.real, z.imag), -1), x64

    return rotate(q), rotate(k)


def _fused_qkv(B, Hq, Hkv, L, D, dtype, device):
    """q, k as strided views of one fused projection output, like an attention layer makes them."""
    qkv = torch.randn(B, L, (Hq + 2 * Hkv) * D, device=device).to(dtype).requires_grad_()
    q = qkv[..., : Hq * D].view(B, L, Hq, D).transpose(1, 2)
    k = qkv[..., Hq * D: (Hq + Hkv) * D].view(B, L, Hkv, D).transpose(1, 2)
    return qkv, q, k


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("theta,scaling", [(10000.0, None), (500000.0, LLAMA31), (500000.0, LLAMA32)])
def test_frequencies_match_transformers(head_dim, theta, scaling):
    config = _hf_config(head_dim, theta, scaling)
    if scaling is None:
        ref, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        ref, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    assert torch.equal(rope_frequencies(head_dim, theta, scaling), ref)
    assert torch.equal(rope_frequencies(head_dim, theta, config.rope_parameters), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cos_sin_match_transformers(dtype):
    config = _hf_config(64, 500000.0, LLAMA31)
    pos = _packed_positions(3, 40, "cpu")
    pos[0, -1] = 100000  # far past the original context: the scaled frequencies matter
    rotary = LlamaRotaryEmbedding(config)
    # Its angles come from a float32 matmul whose first call in a process has been seen to round
    # differently (one ulp at position 1e5, ~1e-4 in cos) from every later call: the reference is
    # that later, stable value.
    rotary(torch.empty(1, dtype=dtype), pos)
    cos_ref, sin_ref = rotary(torch.empty(1, dtype=dtype), pos)
    cos, sin = rope_cos_sin(pos, rope_frequencies(64, 500000.0, LLAMA31), dtype)
    assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)


# The torch backend has a few-element form (roll) and an in-place form: both run every case.
FORMS = [(b, d, few) for b, d in BACKENDS for few in ([None, 0] if b == "torch" else [None])]


@pytest.mark.parametrize("backend,device,few_elements", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,L,D", [(2, 4, 2, 7, 80), (1, 3, 1, 1, 48), (1, 2, 2, 9, 130)])
def test_apply_rope_matches_float64(backend, device, few_elements, dtype, B, Hq, Hkv, L, D, poisoned_allocations,
                                    monkeypatch):
    if few_elements is not None:
        monkeypatch.setattr(rope_mod, "_FEW_ELEMENTS", few_elements)
    qkv, q, k = _fused_qkv(B, Hq, Hkv, L, D, dtype, device)
    assert L == 1 or not (q.is_contiguous() or k.is_contiguous())  # L == 1 views count as contiguous
    pos = _packed_positions(B, L, device)
    inv_freq = rope_frequencies(D, 10000.0).to(device)
    cos, sin = rope_cos_sin(pos, inv_freq, torch.float32)
    q_rot, k_rot = apply_rope(q, k, cos, sin, backend=backend)
    (q_ref, q64), (k_ref, k64) = _reference(q, k, pos, inv_freq)
    for out, ref in ((q_rot, q_ref), (k_rot, k_ref)):
        assert out.dtype == dtype and out.shape == ref.shape and not torch.isnan(out).any()
        assert rel_err(out, ref) <= TOL[dtype]
    dq, dk = torch.randn_like(q_ref), torch.randn_like(k_ref)
    (dqkv,) = torch.autograd.grad((q_rot, k_rot), qkv, (dq.to(dtype), dk.to(dtype)))
    torch.autograd.backward((q_ref, k_ref), (dq, dk))
    Hqd, Hkd = Hq * D, Hkv * D
    assert rel_err(dqkv[..., :Hqd], q64.grad.transpose(1, 2).reshape(B, L, Hqd)) <= TOL[dtype]
    assert rel_err(dqkv[..., Hqd:Hqd + Hkd], k64.grad.transpose(1, 2).reshape(B, L, Hkd)) <= TOL[dtype]
    assert not dqkv[..., Hqd + Hkd:].any()  # v's slice gets nothing


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("table_shape", ["batch", "shared_2d", "shared_3d"])
def test_apply_rope_matches_transformers(backend, device, table_shape):
    """cos/sin from LlamaRotaryEmbedding, shared by the batch or not, rotated as apply_rotary_pos_emb."""
    config = _hf_config(64, 500000.0, LLAMA31)
    q = torch.randn(2, 4, 11, 64, device=device, requires_grad=True)
    k = torch.randn(2, 2, 11, 64, device=device, requires_grad=True)
    pos = _packed_positions(2, 11, device) if table_shape == "batch" else torch.arange(11, device=device)[None]
    cos, sin = LlamaRotaryEmbedding(config).to(device)(q, pos)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    if table_shape == "shared_2d":
        cos, sin = cos[0], sin[0]
    q_rot, k_rot = apply_rope(q, k, cos, sin, backend=backend)
    torch.testing.assert_close(q_rot, q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_rot, k_ref, rtol=1e-6, atol=1e-6)
    dq, dk = torch.randn_like(q_ref), torch.randn_like(k_ref)
    grads = torch.autograd.grad((q_rot, k_rot), (q, k), (dq, dk))
    grads_ref = torch.autograd.grad((q_ref, k_ref), (q, k), (dq, dk))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_decode_tables_kept_per_step_follow_new_and_changed_tables(mode):
    """A decode step's layers share one cos / sin pair, whose rotation tables are built once and kept
    with it; the next step's tables (new objects, or the same ones changed in place, or inference
    tensors that keep nothing) rotate by their own positions."""
    inv_freq = rope_frequencies(16)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        cos, sin = rope_cos_sin(torch.tensor([[3]]), inv_freq)
        for step, position in enumerate([3, 4, 9]):
            if step == 1:
                cos, sin = rope_cos_sin(torch.tensor([[position]]), inv_freq)  # new objects
            elif step == 2:
                new_cos, new_sin = rope_cos_sin(torch.tensor([[position]]), inv_freq)
                cos.copy_(new_cos), sin.copy_(new_sin)  # the same objects, changed in place
            for layer in range(2):
                q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 1, 16)
                q_rot, k_rot = apply_rope(q, k, cos, sin, backend="torch")
                (q_ref, _), (k_ref, _) = _reference(q, k, torch.full((2, 1), position), inv_freq)
                assert rel_err(q_rot, q_ref) <= 1e-6 and rel_err(k_rot, k_ref) <= 1e-6, (step, layer)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_apply_rope_arbitrary_tables_backward(backend, device, poisoned_allocations):
    """Tables whose halves differ: the backward must be the exact transpose, not rotation by -sin."""
    q = torch.randn(1, 2, 5, 48, device=device, requires_grad=True)
    k = torch.randn(1, 1, 5, 48, device=device, requires_grad=True)
    cos, sin = torch.randn(1, 5, 48, device=device), torch.randn(1, 5, 48, device=device)
    q_rot, k_rot = apply_rope(q, k, cos, sin, backend=backend)
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    q_ref, k_ref = apply_rotary_pos_emb(q64, k64, cos.double(), sin.double())
    assert rel_err(q_rot, q_ref) <= 1e-4 and rel_err(k_rot, k_ref) <= 1e-4
    dq, dk = torch.randn_like(q_ref), torch.randn_like(k_ref)
    grads = torch.autograd.grad((q_rot, k_rot), (q, k), (dq.float(), dk.float()))
    grads_ref = torch.autograd.grad((q_ref, k_ref), (q64, k64), (dq, dk))
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) <= 1e-4


def test_compiles_fullgraph():
    q = torch.randn(2, 4, 7, 32, requires_grad=True)
    k = torch.randn(2, 2, 7, 32, requires_grad=True)
    pos = _packed_positions(2, 7, "cpu")
    inv_freq = rope_frequencies(32, 10000.0, LLAMA31)

    def fn(q, k):
        cos, sin = rope_cos_sin(pos, inv_freq, q.dtype)
        return apply_rope(q, k, cos, sin, backend="torch")

    out, ref = torch.compile(fn, fullgraph=True)(q, k), fn(q, k)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    for a, b in zip(torch.autograd.grad(out, (q, k), (dq, dk)), torch.autograd.grad(ref, (q, k), (dq, dk))):
        torch.testing.assert_close(a, b)


def test_bad_inputs():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = rope_cos_sin(torch.arange(5)[None], rope_frequencies(8))
    with pytest.raises(ValueError, match="head dim"):
        apply_rope(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(TypeError, match="k"):
        apply_rope(q, k.double(), cos, sin)
    with pytest.raises(ValueError, match="k"):
        apply_rope(q, k[:, :, :4], cos, sin)
    with pytest.raises(ValueError, match="cos"):
        apply_rope(q, k, cos[:, :4], sin[:, :4])
    with pytest.raises(TypeError, match="sin"):
        apply_rope(q, k, cos, sin.double())
    with pytest.raises(ValueError, match="sin"):
        apply_rope(q, k, cos, sin[:, :, :6])
    with pytest.raises(ValueError, match="cos"):
        apply_rope(q, k, cos.to("meta"), sin.to("meta"))
    with pytest.raises(ValueError, match="cos"):
        apply_rope(q, k, cos.requires_grad_(), sin)
    with pytest.raises(ValueError, match="q"):
        apply_rope(q[0], k, cos, sin)
    with pytest.raises(TypeError, match="cos"):
        apply_rope(q, k, cos.tolist(), sin)
    with pytest.raises(ValueError, match="head_dim"):
        rope_frequencies(63)
    with pytest.raises(ValueError, match="rope_type"):
        rope_frequencies(64, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="llama3"):
        rope_frequencies(64, rope_scaling={"rope_type": "llama3", "factor": 8.0})


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_positions(backend, device):
    q = torch.randn(2, 4, 0, 8, device=device, requires_grad=True)
    k = torch.randn(2, 2, 0, 8, device=device, requires_grad=True)
    cos, sin = rope_cos_sin(torch.zeros(2, 0, dtype=torch.long, device=device), rope_frequencies(8).to(device))
    q_rot, k_rot = apply_rope(q, k, cos, sin, backend=backend)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    (q_rot.sum() + k_rot.sum()).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
