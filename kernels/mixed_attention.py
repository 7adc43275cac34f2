"""Attention under a per-query key interval: the fused mixed causal / bidirectional mask.

Query ``i`` of batch row ``b`` attends the keys ``kv_start[b, i] <= j < kv_end[b, i]`` (see
:mod:`mmfuse.kernels.mask_intervals`). The kernels read two int32 per query instead of an L x L mask:

* a (query-block, key-block) tile that no query of the block sees is never loaded;
* a tile that every live query of the block sees whole runs without mask arithmetic;
* only tiles straddling an interval edge are masked.

An empty interval (padding) gives a zero output row and zero gradients. The PyTorch backend on CPU
calls PyTorch's flash kernel per query chunk over the chunk's key window (the same skipping, at
chunk granularity); elsewhere it computes each chunk's scores itself. Layout of this file:
Triton kernels -> launchers -> PyTorch backend -> custom op + autograd -> public function.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    CheckMemo,
    PairFacts,
    as_dtype,
    check_same_device,
    check_tensor,
    check_values_in_range,
    compute_dtype,
    dot_flags,
    eager_autograd,
    is_tracing,
    op_or_body,
    resolve_backend,
    runs_body_directly,
    tensor_metadata,
    triton_interpreting,
)

_LOG2E = 1.4426950408889634
_TRITON_HEAD_DIMS = (32, 64, 72, 80, 96, 128)  # 72: SigLIP so400m (1152 / 16)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptr, stride_m, stride_d, offs_m, offs_d, row_ok, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; rows past the end and padded head-dim columns read as 0."""
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    x = tl.load(ptr + offs_m[:, None] * stride_m + offs_d[None, :] * stride_d, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _query_block_intervals(KV_START, KV_END, b, offs_m, LQ, LK, win_lo, win_hi, BLOCK_N: tl.constexpr):
    """Intervals of a block of queries clipped to the key window [win_lo, win_hi), which rows are
    live (a non-empty interval), and the block's key range [lo, hi) with lo on a tile boundary."""
    row_ok = offs_m < LQ
    s = tl.maximum(tl.load(KV_START + b * LQ + offs_m, mask=row_ok, other=0), win_lo)
    e = tl.minimum(tl.load(KV_END + b * LQ + offs_m, mask=row_ok, other=0), win_hi)
    live = row_ok & (s < e)
    lo = (tl.min(tl.where(live, s, LK)) // BLOCK_N) * BLOCK_N
    hi = tl.max(tl.where(live, e, 0))
    return s, e, live, lo, hi


@triton.jit
def _tile_kind(s, e, live, n0, BLOCK_N: tl.constexpr):
    """0 = no live query sees keys [n0, n0 + BLOCK_N); 1 = some see part of it; 2 = all see it whole."""
    n1 = n0 + BLOCK_N
    all_see = tl.max(tl.where(live, s, 0)) <= n0
    all_see = all_see & (tl.min(tl.where(live, e, n1)) >= n1)
    some_see = tl.max(((s < n1) & (e > n0) & live).to(tl.int32)) > 0
    return tl.where(all_see & some_see, 2, tl.where(some_see, 1, 0))


@triton.jit
def _log2_scores(qk, qk_scale, cap2, SOFTCAP: tl.constexpr):
    """q.k -> base-2 scores. Plain: qk_scale = scale * log2(e). Soft-capped (Gemma 2):
    ``cap * tanh(scale * q.k / cap)`` with qk_scale = scale / cap and cap2 = cap * log2(e)."""
    x = qk * qk_scale
    if SOFTCAP:
        x = (2.0 * tl.sigmoid(2.0 * x) - 1.0) * cap2  # tanh(x), in core Triton ops
    return x


@triton.jit
def _softcap_grad(ds, scores, cap2, SOFTCAP: tl.constexpr):
    """dL/d(scale q.k) from dL/d(score): the cap's tanh contributes 1 - tanh^2 (tanh = score / cap)."""
    if SOFTCAP:
        t = scores / cap2
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_n, offs_d, n0, LK, s, e,
              qk_scale, cap2, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr,
              DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    cols = n0 + offs_n
    col_ok = cols < LK
    k = _load_rows(k_base, stride_kn, stride_kd, cols, offs_d, col_ok, HEAD_DIM, UPCAST)
    v = _load_rows(v_base, stride_vn, stride_vd, cols, offs_d, col_ok, HEAD_DIM, UPCAST)
    qk = _log2_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), qk_scale, cap2, SOFTCAP)
    if MASKED:
        seen = (cols[None, :] >= s[:, None]) & (cols[None, :] < e[:, None])
        qk = tl.where(seen, qk, float("-inf"))
    # m_i starts finite, so a row with nothing seen yet never computes (-inf) - (-inf).
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _mixed_attention_fwd_kernel(
    Q, K, V, O, LSE, KV_START, KV_END, TILE_COUNTS,
    qk_scale, cap2, split_len,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_os, stride_ob, stride_oh, stride_om, stride_od,
    stride_ls, stride_lb, stride_lh,
    H_Q, GROUP, LQ, LK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, COUNT_TILES: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head) against the keys of one split window."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H_Q
    h = pid_bh % H_Q
    hk = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < LQ

    # The split window [win_lo, win_hi) clips every interval (one window when not splitting).
    win_lo = pid_s * split_len
    win_hi = tl.minimum(win_lo + split_len, LK)
    s, e, live, lo, hi = _query_block_intervals(KV_START, KV_END, b, offs_m, LQ, LK, win_lo, win_hi, BLOCK_N)

    q = _load_rows(Q + b * stride_qb + h * stride_qh, stride_qm, stride_qd, offs_m, offs_d, row_ok, HEAD_DIM, UPCAST)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    n_full = 0
    n_masked = 0
    n_skipped = 0
    for n0 in range(lo, hi, BLOCK_N):
        kind = _tile_kind(s, e, live, n0, BLOCK_N)
        if kind == 2:
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_n, offs_d,
                                      n0, LK, s, e, qk_scale, cap2, HEAD_DIM, UPCAST, False, DOT_PRECISION, SOFTCAP)
            n_full += 1
        elif kind == 1:
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_n, offs_d,
                                      n0, LK, s, e, qk_scale, cap2, HEAD_DIM, UPCAST, True, DOT_PRECISION, SOFTCAP)
            n_masked += 1
        else:
            n_skipped += 1

    has_keys = live & (l_i > 0)
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out = tl.where(has_keys[:, None], out, 0.0)
    # Natural-log LSE; an empty row stores -inf (the log-sum-exp of nothing).
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) / 1.4426950408889634, float("-inf"))

    o_ptrs = O + pid_s * stride_os + b * stride_ob + h * stride_oh
    o_ptrs += offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + pid_s * stride_ls + b * stride_lb + h * stride_lh + offs_m, lse, mask=row_ok)
    if COUNT_TILES:
        pid = (pid_s * tl.num_programs(1) + pid_bh) * tl.num_programs(0) + pid_m
        tl.store(TILE_COUNTS + pid * 3 + 0, n_full)
        tl.store(TILE_COUNTS + pid * 3 + 1, n_masked)
        tl.store(TILE_COUNTS + pid * 3 + 2, n_skipped)


@triton.jit
def _load_row_stats(LSE, DELTA, base, offs_m, row_ok):
    """log2-domain LSE (+inf for empty rows, so their probabilities are 0) and delta = rowsum(dO*O)."""
    lse = tl.load(LSE + base + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + base + offs_m, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _bwd_dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, KV_START, KV_END, q_base, do_base, stat_base, int_base,
                   stride_qm, stride_qd, stride_dom, stride_dod, qb, cols, offs_m, offs_d, qk_scale, cap2, LQ,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    rows = qb * BLOCK_M + offs_m
    row_ok = rows < LQ
    q = _load_rows(Q + q_base, stride_qm, stride_qd, rows, offs_d, row_ok, HEAD_DIM, UPCAST)
    do = _load_rows(DO + do_base, stride_dom, stride_dod, rows, offs_d, row_ok, HEAD_DIM, UPCAST)
    lse, delta = _load_row_stats(LSE, DELTA, stat_base, rows, row_ok)
    # Transposed orientation: keys on axis 0, queries on axis 1.
    scores_t = _log2_scores(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION), qk_scale, cap2, SOFTCAP)
    p_t = tl.exp2(scores_t - lse[None, :])
    if MASKED:
        s = tl.load(KV_START + int_base + rows, mask=row_ok, other=0)
        e = tl.load(KV_END + int_base + rows, mask=row_ok, other=0)
        seen = (cols[:, None] >= s[None, :]) & (cols[:, None] < e[None, :])
        p_t = tl.where(seen, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = _softcap_grad(p_t * (dp_t - delta[None, :]), scores_t, cap2, SOFTCAP)
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _mixed_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, KV_START, KV_END, QB_LO, QB_HI, DK, DV,
    qk_scale, cap2, sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H_KV, GROUP, LQ, LK, NUM_KB,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One program: dK, dV of BLOCK_N keys of one KV head, summed over its GQA group (no atomics)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    hk = pid_bh % H_KV
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < LK
    k = _load_rows(K + b * stride_kb + hk * stride_kh, stride_kn, stride_kd, cols, offs_d, col_ok, HEAD_DIM, UPCAST)
    v = _load_rows(V + b * stride_vb + hk * stride_vh, stride_vn, stride_vd, cols, offs_d, col_ok, HEAD_DIM, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query blocks whose block-level key range overlaps this key block (precomputed, O(blocks^2)).
    qb_lo = tl.load(QB_LO + b * NUM_KB + pid_n)
    qb_hi = tl.load(QB_HI + b * NUM_KB + pid_n)
    int_base = b * LQ
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = b * stride_qb + h * stride_qh
        do_base = b * stride_dob + h * stride_doh
        stat_base = (b * H_KV * GROUP + h) * LQ
        for qb in range(qb_lo, qb_hi):
            rows = qb * BLOCK_M + offs_m
            row_ok = rows < LQ
            s = tl.load(KV_START + int_base + rows, mask=row_ok, other=0)
            e = tl.load(KV_END + int_base + rows, mask=row_ok, other=0)
            kind = _tile_kind(s, e, row_ok & (s < e), n0, BLOCK_N)
            if kind == 2:
                dk, dv = _bwd_dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, KV_START, KV_END, q_base, do_base,
                                        stat_base, int_base, stride_qm, stride_qd, stride_dom, stride_dod, qb,
                                        cols, offs_m, offs_d, qk_scale, cap2, LQ, HEAD_DIM, BLOCK_M, UPCAST, False,
                                        DOT_PRECISION, SOFTCAP)
            elif kind == 1:
                dk, dv = _bwd_dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, KV_START, KV_END, q_base, do_base,
                                        stat_base, int_base, stride_qm, stride_qd, stride_dom, stride_dod, qb,
                                        cols, offs_m, offs_d, qk_scale, cap2, LQ, HEAD_DIM, BLOCK_M, UPCAST, True,
                                        DOT_PRECISION, SOFTCAP)
    dk *= sm_scale
    store_mask = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=store_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_n, offs_d,
                 n0, LK, s, e,
                 qk_scale, cap2, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    cols = n0 + offs_n
    col_ok = cols < LK
    k = _load_rows(k_base, stride_kn, stride_kd, cols, offs_d, col_ok, HEAD_DIM, UPCAST)
    v = _load_rows(v_base, stride_vn, stride_vd, cols, offs_d, col_ok, HEAD_DIM, UPCAST)
    scores = _log2_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), qk_scale, cap2, SOFTCAP)
    p = tl.exp2(scores - lse[:, None])
    if MASKED:
        seen = (cols[None, :] >= s[:, None]) & (cols[None, :] < e[:, None])
        p = tl.where(seen, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = _softcap_grad(p * (dp - delta[:, None]), scores, cap2, SOFTCAP)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _mixed_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, KV_START, KV_END, DQ,
    qk_scale, cap2, sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H_Q, GROUP, LQ, LK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One program: dQ of BLOCK_M queries of one head, visiting the same tiles as the forward."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_Q
    h = pid_bh % H_Q
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < LQ
    s, e, live, lo, hi = _query_block_intervals(KV_START, KV_END, b, offs_m, LQ, LK, 0, LK, BLOCK_N)

    q = _load_rows(Q + b * stride_qb + h * stride_qh, stride_qm, stride_qd, offs_m, offs_d, row_ok, HEAD_DIM, UPCAST)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, stride_dom, stride_dod, offs_m, offs_d, row_ok, HEAD_DIM,
                    UPCAST)
    lse, delta = _load_row_stats(LSE, DELTA, pid_bh * LQ, offs_m, row_ok)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        kind = _tile_kind(s, e, live, n0, BLOCK_N)
        if kind == 2:
            dq = _bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_n, offs_d, n0, LK,
                              s, e, qk_scale, cap2, HEAD_DIM, UPCAST, False, DOT_PRECISION, SOFTCAP)
        elif kind == 1:
            dq = _bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_n, offs_d, n0, LK,
                              s, e, qk_scale, cap2, HEAD_DIM, UPCAST, True, DOT_PRECISION, SOFTCAP)
    dq *= sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _block_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this head dim and dtype on this process."""
    if triton_interpreting():
        return 32, 32, 4, 1  # bigger numpy tiles are cheaper than more interpreted iterations
    if dtype == torch.float32:
        # Exact fp32 dots (no tf32) run on FMAs with their operands in registers: ptxas spills
        # 5-400 KB per thread at the bf16 tiles on sm_90 (tests/kernels/gpu_compile.py), ~0.5 KB at 32 x 32.
        return 32, 32, 4, 3
    if head_dim <= 64:
        return 128, 64, 4, 3
    return 64, 64, 4, 3


def _default_num_splits(batch_heads: int, num_q_blocks: int, kv_len: int, block_n: int, device: torch.device) -> int:
    """Split the keys when too few (batch, head, query-block) programs exist to fill the GPU (decode)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch_heads * num_q_blocks
    if programs >= sms:
        return 1
    max_splits = triton.cdiv(kv_len, 4 * block_n)  # keep at least 4 tiles of work per split
    return max(1, min(triton.cdiv(2 * sms, programs), max_splits, 64))


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _score_scales(scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, cap2) for :func:`_log2_scores`; ``softcap`` 0 means none."""
    return (scale / softcap, softcap * _LOG2E) if softcap else (scale * _LOG2E, 0.0)


def _attention_fwd_triton(q, k, v, kv_start, kv_end, scale, num_splits, count_tiles=False, softcap=0.0):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    block_m, block_n, num_warps, num_stages = _block_sizes(D, q.dtype)
    num_q_blocks = triton.cdiv(Lq, block_m)
    if num_splits is None:
        num_splits = _default_num_splits(B * Hq, num_q_blocks, Lk, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(Lk, num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(Lk, split_len))
    grid = (num_q_blocks, B * Hq, num_splits)
    if num_splits == 1:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty((1, B, Hq, Lq), device=q.device, dtype=torch.float32)
        o_strides = (0, *_strides(out))
    else:
        out = torch.empty((num_splits, B, Hq, Lq, D), device=q.device, dtype=torch.float32)
        lse = torch.empty((num_splits, B, Hq, Lq), device=q.device, dtype=torch.float32)
        o_strides = _strides(out)
    counts = torch.zeros((math.prod(grid), 3) if count_tiles else (1,), device=q.device, dtype=torch.int32)
    torch.library.wrap_triton(_mixed_attention_fwd_kernel)[grid](
        q, k, v, out, lse, kv_start, kv_end, counts,
        *_score_scales(scale, softcap), split_len,
        *_strides(q), *_strides(k), *_strides(v), *o_strides, *_strides(lse)[:3],
        Hq, Hq // Hkv, Lq, Lk,
        HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=block_m, BLOCK_N=block_n,
        COUNT_TILES=count_tiles, SOFTCAP=bool(softcap), num_warps=num_warps, num_stages=num_stages,
        **dot_flags(q.dtype),
    )
    if num_splits > 1:
        out, lse = _combine_splits(out, lse, q.dtype)
    else:
        lse = lse[0]
    if count_tiles:
        return out, lse, counts
    return out, lse


def _combine_splits(out_parts: torch.Tensor, lse_parts: torch.Tensor, dtype: torch.dtype):
    """Merge per-split normalised outputs by their log-sum-exp weights; empty rows stay 0 / -inf."""
    lse = torch.logsumexp(lse_parts, dim=0)
    finite = torch.isfinite(lse)
    weights = torch.exp(lse_parts - torch.where(finite, lse, 0.0))
    weights = torch.where(finite, weights, 0.0)
    out = (weights[..., None] * out_parts).sum(0)
    return out.to(dtype), lse


def _blocked_intervals(kv_start, kv_end, block_m):
    """The (B, Lq) intervals as (B, query_blocks, block_m), padded past Lq with empty intervals."""
    B, Lq = kv_start.shape
    nqb = triton.cdiv(Lq, block_m)
    pad = nqb * block_m - Lq
    s = torch.nn.functional.pad(kv_start.long(), (0, pad)).view(B, nqb, block_m)
    e = torch.nn.functional.pad(kv_end.long(), (0, pad)).view(B, nqb, block_m)
    return s, e


def _query_block_ranges(kv_start, kv_end, kv_len, block_m, block_n):
    """For each key block, the [first, last+1) query blocks whose key range can reach it.

    Costs O(B * query_blocks * key_blocks) small integers, never O(L^2).
    """
    s, e = _blocked_intervals(kv_start, kv_end, block_m)
    nqb, nkb = s.shape[1], triton.cdiv(kv_len, block_n)
    live = s < e
    blk_lo = torch.where(live, s, kv_len).amin(-1)
    blk_hi = torch.where(live, e, 0).amax(-1)
    n0 = torch.arange(nkb, device=s.device) * block_n
    reach = (blk_lo[:, :, None] < (n0 + block_n)) & (blk_hi[:, :, None] > n0)  # (B, nqb, nkb)
    qb = torch.arange(nqb, device=s.device)[None, :, None]
    qb_lo = torch.where(reach, qb, nqb).amin(1).to(torch.int32)
    qb_hi = (torch.where(reach, qb, -1).amax(1) + 1).to(torch.int32)
    return qb_lo.contiguous(), qb_hi.contiguous(), nkb


def _attention_bwd_triton(do, q, k, v, out, lse, kv_start, kv_end, scale, softcap=0.0):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    block_m, block_n, num_warps, num_stages = _block_sizes(D, q.dtype)
    delta = (do.float() * out.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    common = dict(HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=block_m, BLOCK_N=block_n,
                  SOFTCAP=bool(softcap), num_warps=num_warps, num_stages=num_stages, **dot_flags(q.dtype))
    qb_lo, qb_hi, nkb = _query_block_ranges(kv_start, kv_end, Lk, block_m, block_n)
    torch.library.wrap_triton(_mixed_attention_bwd_dkdv_kernel)[(nkb, B * Hkv)](
        q, k, v, do, lse, delta, kv_start, kv_end, qb_lo, qb_hi, dk, dv,
        *_score_scales(scale, softcap), scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        Hkv, Hq // Hkv, Lq, Lk, nkb, **common,
    )
    torch.library.wrap_triton(_mixed_attention_bwd_dq_kernel)[(triton.cdiv(Lq, block_m), B * Hq)](
        q, k, v, do, lse, delta, kv_start, kv_end, dq,
        *_score_scales(scale, softcap), scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        Hq, Hq // Hkv, Lq, Lk, **common,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# PyTorch backend: exact, chunked over queries, never B x H x L x L at once
# ----------------------------------------------------------------------------------------------

_REF_CHUNK_ELEMENTS = 1 << 21  # score elements per query chunk (8 MiB in fp32): cache-sized work
_REF_MIN_CHUNK = 32  # queries; fewer would make Python overhead dominate
# Queries per call of PyTorch's CPU flash kernel: it tiles the scores itself, so chunks only bound
# the key window (the skipped tiles) and the mask, against ~20 us of overhead per call.
_SDPA_CHUNK = 256


def _query_chunks(kv_start, kv_end, batch_heads, kv_len):
    """Yield (q0, q1, k0, k1): query chunks and the key window their intervals can reach.

    Small chunks keep the scores cache-sized and let the window shrink to what the chunk's
    documents and spans need (the reference's version of tile skipping).
    """
    Lq = kv_start.shape[1]
    chunk = max(_REF_MIN_CHUNK, _REF_CHUNK_ELEMENTS // max(1, batch_heads * kv_len))
    for q0 in range(0, Lq, chunk):
        q1 = min(Lq, q0 + chunk)
        s, e = kv_start[:, q0:q1], kv_end[:, q0:q1]
        live = s < e
        k0 = int(torch.where(live, s, kv_len).min())
        k1 = int(torch.where(live, e, 0).max())
        if k1 > k0:
            yield q0, q1, k0, k1


def _grouped(t: torch.Tensor, num_kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, Hq, L, D) -> (B, Hkv, G, L, D) in the compute dtype (the GQA group as its own axis)."""
    B, Hq, L, D = t.shape
    return t.to(dtype).reshape(B, num_kv_heads, Hq // num_kv_heads, L, D)


def _chunk(t: torch.Tensor, q0: int, q1: int) -> torch.Tensor:
    """Rows q0:q1 of a grouped (B, Hkv, G, L, X) tensor as (B, Hkv, G * C, X): one matmul per KV head."""
    B, Hkv, G, _, X = t.shape
    return t[:, :, :, q0:q1].reshape(B, Hkv, G * (q1 - q0), X)


def _chunk_seen(kv_start, kv_end, q0, q1, k0, k1):
    """(B, 1, 1, C, W) bool: which keys of the window [k0, k1) each query of the chunk sees."""
    cols = torch.arange(k0, k1, device=kv_start.device)
    seen = (cols >= kv_start[:, q0:q1, None]) & (cols < kv_end[:, q0:q1, None])
    return seen[:, None, None]


def _attention_fwd_torch(q, k, v, kv_start, kv_end, scale, softcap=0.0):
    """PyTorch's own CPU flash-attention kernel (vectorised C++, what SDPA runs) per query chunk, over
    the key window the chunk's intervals reach, with the chunk's mask built from the intervals: the
    skipped tiles of the mixed mask, at SDPA's speed, never an L x L mask. That kernel has no logit
    soft-capping: capped attention takes the plain-PyTorch chunks."""
    if q.device.type != "cpu" or softcap:
        return _attention_fwd_chunked_torch(q, k, v, kv_start, kv_end, scale, softcap)
    B, Hq, Lq, D = q.shape
    ct = compute_dtype(q)
    outs, lses, done = [], [], 0
    for q0, q1, k0, k1, mask, empty in _sdpa_chunks(kv_start, kv_end, k.shape[2], ct):
        if q0 > done:  # queries that see no key at all: output 0, lse -inf
            outs.append(q.new_zeros(B, Hq, q0 - done, D, dtype=ct))
            lses.append(q.new_full((B, Hq, q0 - done), float("-inf"), dtype=torch.float32))
        # The kernel takes GQA's Hkv key / value heads as they are (no repeat, no group sum after).
        k_w, v_w = (t[:, :, k0:k1].to(ct) for t in (k, v))
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[:, :, q0:q1].to(ct), k_w, v_w, 0.0, False, attn_mask=mask, scale=scale)
        outs.append(o)  # the kernel gives rows with no keys 0, and lse 0: theirs is -inf
        lses.append(l if empty is None else l.masked_fill(empty, float("-inf")))
        done = q1
    if done < Lq:
        outs.append(q.new_zeros(B, Hq, Lq - done, D, dtype=ct))
        lses.append(q.new_full((B, Hq, Lq - done), float("-inf"), dtype=torch.float32))
    out, lse = (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2) for pieces in (outs, lses))
    return out.to(q.dtype), lse


def _attention_inference_torch(q, k, v, kv_start, kv_end, scale, softcap=0.0):
    """The forward without its lse (inference: decode, sampling): SDPA itself per chunk of the plan,
    which picks PyTorch's fastest CPU kernel for the shape (a decode step's one query included) and
    reads GQA's shared K / V in place (SDPA has no soft-capping: capped attention takes the chunks)."""
    if softcap or not q.is_cpu:
        return _attention_fwd_torch(q, k, v, kv_start, kv_end, scale, softcap)[0]
    dtype = q.dtype
    ct = compute_dtype(q)
    gqa = k.shape[1] != q.shape[1]
    plan = _sdpa_chunks(kv_start, kv_end, k.shape[2], ct)
    if dtype != ct:  # fp16 / bf16: attend in fp32, as the other paths do
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
    if len(plan) == 1 and plan[0][0] == 0 and plan[0][1] == q.shape[2]:  # one chunk of every query: decode
        _, _, k0, k1, mask, empty = plan[0]
        out = _sdpa_chunk(q, k, v, k0, k1, mask, empty, scale, gqa)
    else:
        out = q.new_zeros(q.shape)
        for q0, q1, k0, k1, mask, empty in plan:
            out[:, :, q0:q1] = _sdpa_chunk(_span(q, q0, q1), k, v, k0, k1, mask, empty, scale, gqa)
    return as_dtype(out, dtype)


def _sdpa_chunk(q, k, v, k0, k1, mask, empty, scale, gqa):
    """One plan chunk through SDPA: these queries over keys k0:k1; rows with no keys give 0, as the
    op does (SDPA's would be NaN)."""
    o = F.scaled_dot_product_attention(q, _span(k, k0, k1), _span(v, k0, k1), mask, 0.0, False, scale=scale,
                                       enable_gqa=gqa)
    return o if empty is None else o.masked_fill(empty[..., None], 0.0)


def _span(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows lo:hi of a (B, H, L, D) tensor; the tensor itself when that is all of it (a decode step's
    one chunk: no view to make)."""
    return t if lo == 0 and hi == t.shape[2] else t.narrow(2, lo, hi - lo)


def _sdpa_chunks(kv_start, kv_end, kv_len, dtype) -> list[tuple]:
    """The chunk plan: (q0, q1, k0, k1, additive mask (B, 1, C, W) or None, empty (B, 1, C) or None)
    for query chunks of ``_SDPA_CHUNK``: the key window each chunk's intervals reach, its mask --
    None where every query sees the whole window -- and which of its queries see no key (None: all
    see one); chunks that see no key at all are left out.

    Every layer of a model (and the backward) attends with the same interval tensors, so the plan is
    built once and kept with them in :data:`_INTERVAL_FACTS` (as a FlexAttention BlockMask is built
    once per batch), while all kept plans' masks fit ``_PLAN_CACHE_BYTES``.
    """
    facts = _INTERVAL_FACTS.of(kv_start, kv_end)
    key = ("plan", kv_len, dtype, _SDPA_CHUNK)
    plan = facts.get(key) if facts is not None else None
    if plan is None:
        plan = _build_sdpa_plan(kv_start, kv_end, kv_len, dtype)
        size = sum(m.numel() * m.element_size() for *_, m, _ in plan if m is not None)
        if facts is not None and _INTERVAL_FACTS.total("plan bytes") + size <= _PLAN_CACHE_BYTES:
            facts[key] = plan
            facts["plan bytes"] = facts.get("plan bytes", 0) + size
    return plan


_PLAN_CACHE_BYTES = 64 << 20  # all kept plans' masks together


# The range check and chunk plans of the latest interval tensors (every layer passes the same ones).
_INTERVAL_FACTS = PairFacts(kept=2)


def _build_sdpa_plan(kv_start, kv_end, kv_len, dtype) -> list[tuple]:
    B, Lq = kv_start.shape
    n = -(-Lq // _SDPA_CHUNK)
    pad = n * _SDPA_CHUNK - Lq

    def per_chunk(t, value, largest: bool):  # (B, Lq) -> (n,): the chunk's max / min, padding rows at ``value``
        t = F.pad(t, (0, pad), value=value).view(B, n, _SDPA_CHUNK)
        return t.amax(dim=(0, 2)) if largest else t.amin(dim=(0, 2))

    live = kv_start < kv_end
    first = per_chunk(torch.where(live, kv_start, kv_len), kv_len, False)  # the window: [first, last)
    last = per_chunk(torch.where(live, kv_end, 0), 0, True)
    latest_start = per_chunk(kv_start, 0, True)  # every query sees [first, last) when its interval covers it
    earliest_end = per_chunk(kv_end, kv_len, False)
    any_empty = per_chunk((~live).to(kv_start.dtype), 0, True)
    cols = torch.arange(kv_len, device=kv_start.device, dtype=kv_start.dtype)
    plan = []
    chunks = torch.stack([first, last, latest_start, earliest_end, any_empty], 1).tolist()
    for c, (k0, k1, s_max, e_min, has_empty) in enumerate(chunks):
        if k1 <= k0:
            continue  # no query of the chunk sees a key
        q0, q1 = c * _SDPA_CHUNK, min(Lq, (c + 1) * _SDPA_CHUNK)
        mask = None
        if not (s_max <= k0 and e_min >= k1):
            w = cols[k0:k1]
            seen = (w >= kv_start[:, q0:q1, None]) & (w < kv_end[:, q0:q1, None])
            mask = torch.where(seen, 0.0, float("-inf")).to(dtype)[:, None]
        plan.append((q0, q1, k0, k1, mask, (~live[:, q0:q1])[:, None] if has_empty else None))
    return plan


def _attention_fwd_chunked_torch(q, k, v, kv_start, kv_end, scale, softcap=0.0):
    """The same in plain PyTorch ops (any device): scores of one query chunk at a time; with
    ``softcap`` the scores are ``softcap * tanh(scores / softcap)`` (Gemma 2)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    ct = compute_dtype(q)
    qg = _grouped(q * scale, Hkv, ct)
    out = torch.zeros(B, Hkv, G, Lq, D, device=q.device, dtype=ct)
    lse = torch.full((B, Hkv, G, Lq, 1), float("-inf"), device=q.device, dtype=ct)
    for q0, q1, k0, k1 in _query_chunks(kv_start, kv_end, B * Hq, Lk):
        C, W = q1 - q0, k1 - k0
        scores = torch.matmul(_chunk(qg, q0, q1), k[:, :, k0:k1].to(ct).transpose(-1, -2))
        if softcap:
            scores.div_(softcap).tanh_().mul_(softcap)
        probs = scores.view(B, Hkv, G, C, W)
        probs.masked_fill_(~_chunk_seen(kv_start, kv_end, q0, q1, k0, k1), float("-inf"))
        m = probs.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, 0.0)
        probs.sub_(m).exp_()  # in place: the chunk's scores become its unnormalised probabilities
        l = probs.sum(-1, keepdim=True)
        has_keys = l > 0
        l = torch.where(has_keys, l, 1.0)
        o = torch.matmul(scores, v[:, :, k0:k1].to(ct)).view(B, Hkv, G, C, D)
        out[:, :, :, q0:q1] = o / l
        lse[:, :, :, q0:q1] = torch.where(has_keys, m + torch.log(l), float("-inf"))
    return out.view(B, Hq, Lq, D).to(q.dtype), lse.view(B, Hq, Lq).to(torch.float32)


# Under torch.compile the PyTorch backend hands at most this many queries (decode, short extend
# chunks) to :func:`_attention_few_queries_torch` instead of the custom op.
_TRACED_FEW_QUERIES = 16


def _attention_few_queries_torch(q, k, v, kv_start, kv_end, scale, softcap=0.0):
    """Plain differentiable PyTorch for a few queries against every key, traced inline under torch.compile.

    The custom op's PyTorch body walks query chunks with data-dependent key windows, which a graph
    cannot hold: compiled, every call would leave the graph to run ~25 small ops in Python. For a
    decode step (Lq = 1) the dense (Lq, Lk) scores are all the work there is anyway, and this form
    lets Inductor fuse it with the rest of the step. Rows with an empty interval give 0, as the op.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    ct = compute_dtype(q)
    # The chunked implementation's steps for one chunk of every query over every key, out of place.
    qg = _chunk(_grouped(q, Hkv, ct) * scale, 0, Lq)
    scores = torch.matmul(qg, k.to(ct).transpose(-1, -2)).view(B, Hkv, G, Lq, Lk)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~_chunk_seen(kv_start, kv_end, 0, Lq, 0, Lk), float("-inf"))
    m = scores.amax(-1, keepdim=True)
    probs = torch.exp(scores - torch.where(torch.isfinite(m), m, 0.0))
    total = probs.sum(-1, keepdim=True)
    out = torch.matmul(probs.view(B, Hkv, G * Lq, Lk), v.to(ct)).view(B, Hkv, G, Lq, D)
    return (out / torch.where(total > 0, total, 1.0)).view(B, Hq, Lq, D).to(q.dtype)


def _attention_bwd_torch(do, q, k, v, out, lse, kv_start, kv_end, scale, softcap=0.0):
    """The backward of :func:`_attention_fwd_torch`: PyTorch's CPU flash-attention backward per chunk."""
    if q.device.type != "cpu" or softcap:
        return _attention_bwd_chunked_torch(do, q, k, v, out, lse, kv_start, kv_end, scale, softcap)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    ct = compute_dtype(q)
    lse = torch.where(torch.isneginf(lse), 0.0, lse)  # rows with no keys: what the kernel wrote (their p is 0)
    plan = _sdpa_chunks(kv_start, kv_end, Lk, ct)
    if len(plan) == 1 and plan[0][:4] == (0, Lq, 0, Lk):  # one chunk over everything: the kernel's own grads
        grads = _flash_bwd_chunk(do, q, k, v, out, lse, plan[0], scale, ct)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))
    dq = torch.zeros(B, Hq, Lq, D, device=q.device, dtype=ct)
    dk = torch.zeros(B, Hkv, Lk, D, device=q.device, dtype=ct)
    dv = torch.zeros_like(dk)
    for chunk in plan:
        q0, q1, k0, k1 = chunk[:4]
        dq[:, :, q0:q1], dk_w, dv_w = _flash_bwd_chunk(do, q, k, v, out, lse, chunk, scale, ct)
        dk[:, :, k0:k1] += dk_w  # (B, Hkv, W, D): the kernel sums each GQA group itself
        dv[:, :, k0:k1] += dv_w
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _flash_bwd_chunk(do, q, k, v, out, lse, chunk, scale, ct):
    """PyTorch's CPU flash-attention backward for one chunk of the plan: (dq rows, dk window, dv window)."""
    q0, q1, k0, k1, mask, _ = chunk
    rows = (slice(None), slice(None), slice(q0, q1))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do[rows].to(ct), q[rows].to(ct), k[:, :, k0:k1].to(ct), v[:, :, k0:k1].to(ct), out[rows].to(ct),
        lse[rows].contiguous(), 0.0, False, attn_mask=mask, scale=scale)


def _attention_bwd_chunked_torch(do, q, k, v, out, lse, kv_start, kv_end, scale, softcap=0.0):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    ct = compute_dtype(q)
    qg, dog = _grouped(q, Hkv, ct), _grouped(do, Hkv, ct)
    delta = (dog * _grouped(out, Hkv, ct)).sum(-1, keepdim=True)
    lse_g = _grouped(lse.unsqueeze(-1), Hkv, ct)
    lse_g = torch.where(torch.isneginf(lse_g), float("inf"), lse_g)  # empty rows: probabilities 0
    dq = torch.zeros_like(qg)
    dk = torch.zeros(B, Hkv, Lk, D, device=q.device, dtype=ct)
    dv = torch.zeros_like(dk)
    for q0, q1, k0, k1 in _query_chunks(kv_start, kv_end, B * Hq, Lk):
        C, W = q1 - q0, k1 - k0
        k_w, v_w = k[:, :, k0:k1].to(ct), v[:, :, k0:k1].to(ct)
        q_c, do_c = _chunk(qg, q0, q1), _chunk(dog, q0, q1)
        probs = torch.matmul(q_c, k_w.transpose(-1, -2)).mul_(scale).view(B, Hkv, G, C, W)
        if softcap:  # the capped scores, and their tanh for the chain rule below
            tanh = probs.div(softcap).tanh_()
            probs = tanh * softcap
        probs.sub_(lse_g[:, :, :, q0:q1]).exp_()
        probs.masked_fill_(~_chunk_seen(kv_start, kv_end, q0, q1, k0, k1), 0.0)
        p = probs.view(B, Hkv, G * C, W)
        dv[:, :, k0:k1] += torch.matmul(p.transpose(-1, -2), do_c)  # sums over the GQA group too
        dp = torch.matmul(do_c, v_w.transpose(-1, -2)).view(B, Hkv, G, C, W)
        ds = probs.mul_(dp.sub_(delta[:, :, :, q0:q1]))
        if softcap:
            ds.mul_(1 - tanh.square_())
        ds = ds.mul_(scale).view(B, Hkv, G * C, W)
        dq[:, :, :, q0:q1] = torch.matmul(ds, k_w).view(B, Hkv, G, C, D)
        dk[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), q_c)
    return dq.view(B, Hq, Lq, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------
# Custom ops + autograd (torch.compile traces through these without graph breaks)
# ----------------------------------------------------------------------------------------------


def _mixed_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor,
    scale: float, backend: str, num_splits: int, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _attention_fwd_triton(q, k, v, kv_start, kv_end, scale, num_splits or None, softcap=softcap)
    return _attention_fwd_torch(q, k, v, kv_start, kv_end, scale, softcap)


_mixed_attention_fwd_op = torch.library.custom_op("mmfuse::mixed_attention_fwd", mutates_args=())(
    _mixed_attention_fwd)


@_mixed_attention_fwd_op.register_fake
def _(q, k, v, kv_start, kv_end, scale, backend, num_splits, softcap):
    B, Hq, Lq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, Hq, Lq), dtype=torch.float32)


def _mixed_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    kv_start: torch.Tensor, kv_end: torch.Tensor, scale: float, backend: str, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _attention_bwd_triton(do, q, k, v, out, lse, kv_start, kv_end, scale, softcap)
    return _attention_bwd_torch(do, q, k, v, out, lse, kv_start, kv_end, scale, softcap)


_mixed_attention_bwd_op = torch.library.custom_op("mmfuse::mixed_attention_bwd", mutates_args=())(
    _mixed_attention_bwd)


@_mixed_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, kv_start, kv_end, scale, backend, softcap):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, kv_start, kv_end, scale, backend, _, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_start, kv_end)
    ctx.scale, ctx.backend, ctx.softcap = scale, backend, softcap
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, kv_start, kv_end = ctx.saved_tensors
    bwd = op_or_body(ctx, _mixed_attention_bwd_op, _mixed_attention_bwd)
    dq, dk, dv = bwd(grad_out, q, k, v, out, lse, kv_start, kv_end, ctx.scale, ctx.backend, ctx.softcap)
    return dq, dk, dv, None, None, None, None, None, None


_mixed_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_mixed_attention_call = eager_autograd(_mixed_attention_fwd_op, _mixed_attention_fwd, _setup_context, _backward)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, kv_start, kv_end, backend) -> None:
    _CHECKED.check((tensor_metadata(q, k, v, kv_start, kv_end), backend), _check_metadata, q, k, v, kv_start, kv_end,
                   backend)
    if not is_tracing():  # the values are data-dependent in a graph
        _check_interval_values(kv_start, kv_end, k.shape[2])


# The ten metadata checks cost as much as a decode step's attention arithmetic at short contexts
# (~9 of ~30 us on CPU): they run when the arguments' metadata changes.
_CHECKED = CheckMemo()


def _check_metadata(q, k, v, kv_start, kv_end, backend) -> None:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES + (torch.float64,))
    B, Hq, Lq, D = q.shape
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,))
    Hkv, Lk = k.shape[1], k.shape[2]
    check_tensor("k", k, shape=(B, None, None, D))
    check_tensor("v", v, dtypes=(q.dtype,), shape=(B, Hkv, Lk, D))
    check_tensor("kv_start", kv_start, dtypes=(torch.int32,), shape=(B, Lq))
    check_tensor("kv_end", kv_end, dtypes=(torch.int32,), shape=(B, Lq))
    check_same_device(q=q, k=k, v=v, kv_start=kv_start, kv_end=kv_end)
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q has {Hq} heads, which is not a multiple of k's {Hkv} heads (GQA needs Hq % Hkv == 0)")
    if min(B, Lq, D) == 0:
        raise ValueError(f"q must have non-zero batch, length and head dim, got shape {tuple(q.shape)}")
    if backend == "triton":
        if q.dtype not in FLOAT_DTYPES:
            raise TypeError(f"q dtype {q.dtype} is not supported by the Triton backend (fp16, bf16, fp32)")
        if D not in _TRITON_HEAD_DIMS:
            raise ValueError(f"q head dim {D} is not supported by the Triton backend (one of {_TRITON_HEAD_DIMS})")


def _check_interval_values(kv_start: torch.Tensor, kv_end: torch.Tensor, kv_len: int) -> None:
    """Both interval tensors within [0, Lk], checked once per tensors (not once per layer: two
    reductions and host reads, a fifth of a decode step's attention call)."""
    facts = _INTERVAL_FACTS.of(kv_start, kv_end)
    if facts is not None and ("in range", kv_len) in facts:
        return
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        check_values_in_range(name, t, 0, kv_len, f"[0, Lk={kv_len}]")
    if facts is not None:
        facts["in range", kv_len] = True


def mixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    scale: float | None = None,
    *,
    softcap: float | None = None,
    backend: str | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Softmax attention where query ``i`` sees keys ``kv_start[b, i] <= j < kv_end[b, i]``.

    Args:
        q: (B, Hq, Lq, D) fp16 / bf16 / fp32 (fp64 on the torch backend).
        k, v: (B, Hkv, Lk, D), same dtype; ``Hq`` a multiple of ``Hkv`` (GQA). ``Lk`` may differ
            from ``Lq``: queries are then a new chunk against a KV cache and the intervals index it.
        kv_start, kv_end: int32 (B, Lq), values in [0, Lk]; see :func:`mask_intervals`. A value
            outside raises ValueError on CPU; on CUDA it fails a device-side assertion instead, so
            the check costs no host sync (every layer of an eager decode step calls this).
        scale: softmax scale, default ``D ** -0.5``.
        softcap: attention-logit soft-capping (Gemma 2): the scaled scores ``s`` become
            ``softcap * tanh(s / softcap)`` before the softmax; None (default) for none.
        backend: None (Triton on CUDA, PyTorch otherwise), "torch" or "triton".
        num_splits: split the keys into this many chunks reduced afterwards (split-KV, for decode);
            None picks from the GPU's occupancy. Triton backend only; the result does not depend on it.

    Returns:
        (B, Hq, Lq, D) in q's dtype; rows with an empty interval are 0 (and get zero gradients).
    """
    backend = resolve_backend(backend, q, k, v)
    _check_inputs(q, k, v, kv_start, kv_end, backend)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1 or None, got {num_splits}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < float("inf")):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    softcap = float(softcap) if softcap else 0.0
    if backend == "torch" and is_tracing() and q.shape[2] <= _TRACED_FEW_QUERIES:
        return _attention_few_queries_torch(q, k, v, kv_start, kv_end, scale, softcap)
    if runs_body_directly(backend, q, k, v):  # inference: no lse to keep, no custom-op dispatch to pay
        return _attention_inference_torch(q, k, v, kv_start, kv_end, scale, softcap)
    out, _ = _mixed_attention_call(q, k, v, kv_start.contiguous(), kv_end.contiguous(), scale, backend,
                                   num_splits or 0, softcap)
    return out


def mixed_attention_tile_counts(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor
) -> dict[str, int]:
    """Run the Triton forward with tile counters: ``{"full", "masked", "skipped"}`` summed over programs.

    ``full`` tiles ran without mask arithmetic, ``masked`` ones straddled an interval edge, and
    ``skipped`` ones lay inside a block's key range but no query saw them (never loaded). Compare
    with :func:`tile_stats`, which gives the minimum the mask needs.
    """
    resolve_backend("triton", q, k, v)
    _check_inputs(q, k, v, kv_start, kv_end, "triton")
    scale = q.shape[-1] ** -0.5
    _, _, counts = _attention_fwd_triton(q, k, v, kv_start.contiguous(), kv_end.contiguous(), scale, 1,
                                         count_tiles=True)
    full, masked, skipped = (int(c) for c in counts.sum(0))
    return {"full": full, "masked": masked, "skipped": skipped}


def tile_stats(kv_start: torch.Tensor, kv_end: torch.Tensor, kv_len: int, num_heads: int = 1,
               block_m: int | None = None, block_n: int | None = None, head_dim: int = 64,
               dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Tile accounting of one forward pass, computed from the intervals alone (no kernel runs).

    Returns ``needed`` (tiles holding at least one unmasked query/key pair: the minimum any
    tile-based kernel must compute), ``full`` (needed tiles every live query sees whole),
    ``masked`` (``needed - full``) and ``dense`` (all tiles, what a dense-mask kernel computes).
    Block sizes default to this process's Triton choice for ``head_dim`` and ``dtype``.
    """
    dm, dn, _, _ = _block_sizes(head_dim, dtype)
    block_m, block_n = block_m or dm, block_n or dn
    s, e = _blocked_intervals(kv_start, kv_end, block_m)
    s, e = s[..., None], e[..., None]  # (B, nqb, block_m, 1) against the key blocks
    B, nqb, nkb = s.shape[0], s.shape[1], triton.cdiv(kv_len, block_n)
    live = s < e
    n0 = torch.arange(nkb, device=s.device) * block_n
    n1 = n0 + block_n
    sees_part = live & (s < n1) & (e > n0)  # (B, nqb, block_m, nkb)
    # Like the kernel, a tile running past kv_len is never "full": its missing keys need the mask.
    sees_all = ~live | ((s <= n0) & (e >= n1))
    needed = sees_part.any(2)
    full = needed & sees_all.all(2)
    return {
        "needed": int(needed.sum()) * num_heads,
        "full": int(full.sum()) * num_heads,
        "masked": int((needed & ~full).sum()) * num_heads,
        "dense": B * nqb * nkb * num_heads,
    }
