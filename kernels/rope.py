"""Rotary position embedding (RoPE) in the rotate-half convention of transformers' Llama / Qwen2.

* :func:`rope_frequencies` gives ``inv_freq`` (plain, or with Llama-3's frequency scaling);
* :func:`rope_cos_sin` turns arbitrary position ids (packed documents restart them, an image span may
  share one) into the ``cos, sin`` tables of ``LlamaRotaryEmbedding``;
* :func:`apply_rope` rotates q and k with them, as ``apply_rotary_pos_emb``.

For a head vector ``x = [x1, x2]`` (halves) and ``cos = [c1, c2]``, ``sin = [s1, s2]``:
``y1 = x1 * c1 - x2 * s1`` and ``y2 = x2 * c2 + x1 * s2``. The backward is the transposed map, i.e. the
same kernel with ``(s1, s2) -> (-s2, -s1)`` (for the usual ``c1 == c2``, ``s1 == s2``: rotation by
``-sin``). The Triton kernel rotates q and k in one launch and reads cos/sin once per position block.
No gradient flows into cos/sin (they come from position ids). Layout of this file: Triton kernel ->
launcher -> PyTorch backend -> custom ops + autograd -> public functions.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    CheckMemo,
    PairFacts,
    as_dtype,
    check_same_device,
    check_tensor,
    compute_dtype,
    eager_autograd,
    is_tracing,
    op_or_body,
    resolve_backend,
    runs_plain_form,
    tensor_metadata,
)

_TILE_ELEMENTS = 2048  # positions per program chosen so one half-tile holds about this many elements


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rotate_heads(
    X, Y, b, pos, cols, mask, c1, c2, s1, s2, num_heads,
    stride_xb, stride_xh, stride_xl, stride_xd, stride_yb, stride_yh, stride_yl,
    HALF: tl.constexpr,
):
    """Rotate every head of batch row b at positions ``pos``; Y is contiguous in its last dim."""
    for h in range(num_heads):
        x_ptrs = X + b * stride_xb + h * stride_xh + pos[:, None] * stride_xl + cols[None, :] * stride_xd
        x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptrs + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
        y_ptrs = Y + b * stride_yb + h * stride_yh + pos[:, None] * stride_yl + cols[None, :]
        tl.store(y_ptrs, (x1 * c1 - x2 * s1).to(Y.dtype.element_ty), mask=mask)
        tl.store(y_ptrs + HALF, (x2 * c2 + x1 * s2).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, COS, SIN, QO, KO,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_cb, stride_cl, stride_cd,
    stride_sb, stride_sl, stride_sd,
    stride_qob, stride_qoh, stride_qol,
    stride_kob, stride_koh, stride_kol,
    H_Q, H_KV, L,
    HALF: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_HALF: tl.constexpr, TRANSPOSE: tl.constexpr,
):
    """One program: BLOCK_L positions of one batch row, all q heads then all k heads."""
    pos = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (pos[:, None] < L) & (cols[None, :] < HALF)
    c_ptrs = COS + b * stride_cb + pos[:, None] * stride_cl + cols[None, :] * stride_cd
    s_ptrs = SIN + b * stride_sb + pos[:, None] * stride_sl + cols[None, :] * stride_sd
    c1 = tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptrs + HALF * stride_cd, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptrs + HALF * stride_sd, mask=mask, other=0.0).to(tl.float32)
    if TRANSPOSE:  # backward: the transposed rotation
        s1, s2 = -s2, -s1
    _rotate_heads(Q, QO, b, pos, cols, mask, c1, c2, s1, s2, H_Q,
                  stride_qb, stride_qh, stride_ql, stride_qd, stride_qob, stride_qoh, stride_qol, HALF)
    _rotate_heads(K, KO, b, pos, cols, mask, c1, c2, s1, s2, H_KV,
                  stride_kb, stride_kh, stride_kl, stride_kd, stride_kob, stride_koh, stride_kol, HALF)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _rope_triton(q, k, cos, sin, transpose):
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    half = D // 2
    block_half = triton.next_power_of_2(half)
    block_l = max(1, min(64, _TILE_ELEMENTS // block_half))
    qo = torch.empty((B, Hq, L, D), device=q.device, dtype=q.dtype)
    ko = torch.empty((B, Hkv, L, D), device=k.device, dtype=k.dtype)
    if B * L == 0:
        return qo, ko
    # cos/sin shared by the batch arrive with a batch stride of 0 (expanded, never copied).
    torch.library.wrap_triton(_rope_kernel)[(triton.cdiv(L, block_l), B)](
        q, k, cos, sin, qo, ko,
        *q.stride(), *k.stride(), *cos.stride(), *sin.stride(),
        *qo.stride()[:3], *ko.stride()[:3],
        Hq, Hkv, L,
        HALF=half, BLOCK_L=block_l, BLOCK_HALF=block_half, TRANSPOSE=transpose, num_warps=4,
    )
    return qo, ko


# ----------------------------------------------------------------------------------------------
# PyTorch backend
# ----------------------------------------------------------------------------------------------


# Up to this many q + k elements (decode, a short chunk) the rotation is built from ``roll``: 4 ops a
# tensor, half the Python time of the in-place form (17 vs 35 us at one token); ``roll`` copies
# through an index, so from about 1e5 elements on the in-place form is faster (10x at 2.6M).
_FEW_ELEMENTS = 1 << 16


def _rope_torch(q, k, cos, sin, transpose):
    """q (B, Hq, L, D), k (B, Hkv, L, D); cos, sin (B or 1, L, D)."""
    ct = compute_dtype(q)
    half = q.shape[-1] // 2
    if q.numel() + k.numel() <= _FEW_ELEMENTS:
        # rotate_half(x) * sin == roll(x, half) * [-s1, s2]
        c, signed_sin = _few_element_tables(cos, sin, ct, transpose)

        def rotate(x):
            return as_dtype(torch.mul(x.roll(half, -1), signed_sin).addcmul_(x, c), x.dtype)

        return rotate(q), rotate(k)
    c1, c2, s1, s2 = _half_tables(cos, sin, ct, transpose)

    def rotate(x):
        # Written into the halves of one output buffer: no temporaries of q/k's size.
        out = torch.empty(x.shape, device=x.device, dtype=ct)
        (x1, x2), (o1, o2) = x.split(half, dim=-1), out.split(half, dim=-1)
        torch.mul(x1, c1, out=o1).addcmul_(x2, s1, value=-1)
        torch.mul(x2, c2, out=o2).addcmul_(x1, s2)
        return out.to(x.dtype)

    return rotate(q), rotate(k)


def _rope_traced(q, k, cos, sin):
    """The rotation as transformers writes it, for a compiled inference graph (Inductor fuses it into
    one pass over q and one over k; the eager forms' kept tables and ``out=`` halves are Python-side
    savings that a graph does not need). q (B, Hq, L, D), k (B, Hkv, L, D); cos, sin (B or 1, L, D)."""
    ct = compute_dtype(q)
    c, s = cos.unsqueeze(1).to(ct), sin.unsqueeze(1).to(ct)

    def rotate(x):
        xf = x.to(ct)
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype)

    return rotate(q), rotate(k)


def _half_tables(cos, sin, ct, transpose):
    """(c1, c2, s1, s2): the halves of cos and sin as (B, 1, L, D / 2) in ``ct``; for R^T the
    rotation (x1 c1 + x2 s2, x2 c2 - x1 s1) is R's with the sines swapped and negated.

    The (B, L, D) tables are H times smaller than q/k: upcasting them is cheap and makes every
    product run in float32 (a bf16 x bf16 product would round before the sum)."""
    half = cos.shape[-1] // 2
    c1, c2 = cos.unsqueeze(1).to(ct).split(half, dim=-1)
    s1, s2 = sin.unsqueeze(1).to(ct).split(half, dim=-1)
    return (c1, c2, -s2, -s1) if transpose else (c1, c2, s1, s2)


def _few_element_tables(cos, sin, ct, transpose):
    """(c, signed_sin) of the roll form: cos as (B, 1, L, D) and [-s1, s2] (R^T: [s2, -s1]), in ``ct``.

    Every layer of a decode step rotates by the same cos / sin objects: the tables are built once
    per step and kept with them."""
    facts = _TABLE_FACTS.of(cos, sin)
    key = (ct, transpose)
    tables = facts.get(key) if facts is not None else None
    if tables is None:
        s = as_dtype(sin.unsqueeze(1), ct)
        sign = _half_signs(s.shape[-1], ct, s.device, transpose)
        tables = as_dtype(cos.unsqueeze(1), ct), (s.roll(s.shape[-1] // 2, -1) if transpose else s) * sign
        if facts is not None:
            facts[key] = tables
    return tables


def _half_signs(dim: int, dtype: torch.dtype, device: torch.device, transpose: bool) -> torch.Tensor:
    """(dim,) of -1 then +1 (R^T: +1 then -1): one multiply signs the halves of a sine table."""
    key = (dim, dtype, device, transpose)
    sign = _SIGNS.get(key)
    if sign is None:
        sign = torch.ones(dim, dtype=dtype, device=device)
        sign[dim // 2:].neg_() if transpose else sign[:dim // 2].neg_()
        _SIGNS[key] = sign
    return sign


_SIGNS: dict[tuple, torch.Tensor] = {}  # (dim, dtype, device, transpose) -> constant signs: a handful


# The roll form's tables of the latest cos / sin pairs (decode-sized: held tables are small).
_TABLE_FACTS = PairFacts(kept=2)


# ----------------------------------------------------------------------------------------------
# Custom op + autograd
# ----------------------------------------------------------------------------------------------


def _rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _rope_triton(q, k, cos, sin, transpose)
    return _rope_torch(q, k, cos, sin, transpose)


_rope_op = torch.library.custom_op("mmfuse::rope", mutates_args=())(_rope)


@_rope_op.register_fake
def _(q, k, cos, sin, transpose, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, transpose, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.transpose, ctx.backend = transpose, backend


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq_in, dk_in = op_or_body(ctx, _rope_op, _rope)(dq, dk, cos, sin, not ctx.transpose, ctx.backend)
    return dq_in, dk_in, None, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)
_rope_call = eager_autograd(_rope_op, _rope, _setup_context, _backward)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def rope_frequencies(head_dim: int, base: float = 10000.0, rope_scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies ``inv_freq`` (head_dim // 2,) float32, as transformers computes them.

    Args:
        head_dim: rotated head dimension (even).
        base: ``rope_theta``.
        rope_scaling: None / ``{"rope_type": "default"}`` for plain RoPE, or Llama-3.1's
            ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}`` (the ``rope_parameters`` of a transformers 5 config;
            its other keys, such as ``rope_theta``, are ignored here: pass ``base``).
    """
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling rope_type must be 'default' or 'llama3', got {rope_type!r}")
    missing = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} - set(rope_scaling)
    if missing:
        raise ValueError(f"rope_scaling of type 'llama3' lacks {sorted(missing)}")
    return _llama3_scaled(inv_freq, rope_scaling)


def _llama3_scaled(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama-3.1: long wavelengths slowed by ``factor``, short ones kept, a smooth ramp between."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context_len = p["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` tables (..., L, 2 * len(inv_freq)) in ``dtype``, as ``LlamaRotaryEmbedding``.

    Args:
        position_ids: integer (..., L), typically (B, L); any values (restarting per packed document,
            repeated inside an image span).
        inv_freq: (head_dim // 2,) from :func:`rope_frequencies`.
        dtype: dtype of the returned tables (transformers uses the activations' dtype; float32 keeps
            the angles exact and :func:`apply_rope` accepts either).
    """
    check_tensor("position_ids", position_ids, dtypes=(torch.int32, torch.int64, torch.float32))
    check_tensor("inv_freq", inv_freq, ndim=1)
    check_same_device(position_ids=position_ids, inv_freq=inv_freq)
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, sections: tuple[int, ...],
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimodal RoPE (Qwen2-VL / Qwen2.5-VL): ``cos, sin`` (B, L, 2 * len(inv_freq)) from three
    position streams (temporal, height, width), as ``Qwen2_5_VLRotaryEmbedding``.

    Args:
        position_ids: integer (3, B, L); text tokens carry the same position in all three.
        inv_freq: (head_dim // 2,) from :func:`rope_frequencies`.
        sections: frequencies taken from each stream in turn (e.g. (16, 24, 24)), summing to
            ``len(inv_freq)``.
    """
    check_tensor("position_ids", position_ids, ndim=3, dtypes=(torch.int32, torch.int64))
    if position_ids.shape[0] != 3 or sum(sections) != inv_freq.numel():
        raise ValueError(f"position_ids must be (3, B, L) and sum(sections) = {inv_freq.numel()}; got "
                         f"{tuple(position_ids.shape)} and {tuple(sections)}")
    freqs = position_ids[..., None].float() * inv_freq.float()  # (3, B, L, D/2)
    freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(freqs.split(list(sections), dim=-1))], dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _check_rope_inputs(q, k, cos, sin, backend) -> None:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ()))
    B, _, L, D = q.shape
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,))
    check_tensor("k", k, shape=(B, None, L, D))
    if D == 0 or D % 2:
        raise ValueError(f"q's head dim must be even and positive for rotate-half RoPE, got {D}")
    check_tensor("cos", cos, dtypes=(q.dtype, torch.float32))
    check_tensor("sin", sin, dtypes=(cos.dtype,))
    table = cos.unsqueeze(0) if cos.dim() == 2 else cos  # (L, D): one table shared by the batch
    if table.dim() != 3 or table.shape[0] not in (1, B) or tuple(table.shape[1:]) != (L, D):
        raise ValueError(f"cos must have shape ({B} or 1, {L}, {D}) or ({L}, {D}), got {tuple(cos.shape)}")
    check_tensor("sin", sin, dtypes=(cos.dtype,), shape=tuple(cos.shape))
    check_same_device(q=q, k=k, cos=cos, sin=sin)
    for name, t in (("cos", cos), ("sin", sin)):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad, but apply_rope does not differentiate through cos/sin")


# The argument checks cost ~6 us, a quarter of a decode step's rope call: they run when the
# arguments' metadata changes.
_CHECKED = CheckMemo()


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by position, as transformers' ``apply_rotary_pos_emb`` (rotate-half, not interleaved).

    Args:
        q: (B, Hq, L, D) fp16 / bf16 / fp32 (fp64 on the torch backend), D even; any strides, e.g. a
            ``view(...).transpose(1, 2)`` of a fused qkv projection (read in place, never copied).
        k: (B, Hkv, L, D), q's dtype.
        cos, sin: (B, L, D), (1, L, D) or (L, D) from :func:`rope_cos_sin`, in q's dtype or float32.
        backend: None (Triton on CUDA, PyTorch otherwise), "torch" or "triton".

    Returns:
        ``(q_rot, k_rot)``, contiguous, in q's dtype; differentiable in q and k (math in float32).
    """
    meta = tensor_metadata(q, k, cos, sin)
    if meta is None:
        for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
            check_tensor(name, t)
    backend = resolve_backend(backend, q, k, cos, sin)
    key = (meta, backend, torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))
    _CHECKED.check(key, _check_rope_inputs, q, k, cos, sin, backend)
    if cos.dim() == 2:  # one table shared by the batch
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if runs_plain_form(backend, q, k):  # a graph takes the traceable form, without the kept tables
        return _rope_traced(q, k, cos, sin) if is_tracing() else _rope_torch(q, k, cos, sin, False)
    # The op's kernels read cos / sin with the batch stride 0 (expanded, never copied).
    B, _, L, D = q.shape
    return _rope_call(q, k, cos.expand(B, L, D), sin.expand(B, L, D), False, backend)
