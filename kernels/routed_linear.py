"""Modality-routed linear layer: every token through its own modality's weights, at one dense layer's cost.

LlamaFusion gives each layer one set of weights per modality (frozen text, trainable image) and sends
each token to its modality's set: ``y[i] = x[i] @ weights[m[i]].T + biases[m[i]]``. Running every
expert on every token and picking with ``torch.where`` costs E times the FLOPs; here each token meets
exactly one weight matrix, so the layer costs what one dense layer over all tokens costs.

How: :func:`build_routing` sorts the tokens by modality ONCE per batch (a stable permutation plus
per-expert offsets, see :class:`Routing`) and every routed layer of the model reuses it.

* torch backend: gather ``x`` in sorted order, one ``mm`` per expert over its contiguous rows, scatter
  back. ``torch._grouped_mm`` would do the E products in one call, but it wants the weights stacked
  into one (E, Din, Dout) tensor, a full weight copy per call (the experts are separate Parameters
  so that the text one can be frozen), so E plain ``mm`` calls (E is 2 or 3) are cheaper.
* Triton backend: one grouped GEMM launch. Each program owns one (row tile, column tile) of one
  expert's group: it loads its x rows through the permutation (the gather is fused into the load)
  and stores its y rows at their original positions (the scatter is fused into the store); the bias
  add is fused into the epilogue. A small on-device table (expert, row_start, row_end) per row tile,
  built with the routing, maps programs to experts without any host synchronisation; the grid is
  sized by an upper bound and programs past the end exit at once.
* Backward: dX is the same grouped GEMM against the transposed weights; dW (and dbias) is computed
  only for experts whose weight (bias) requires grad, each over its own rows only (Triton: a grouped
  ``x_e^T @ dy_e`` kernel that gathers through the permutation; torch: ``mm`` over the sorted rows).
  A frozen expert costs no dW work at all.

Layout of this file: Triton kernels -> launchers -> PyTorch backend -> custom op + autograd ->
routing metadata -> public function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    check_values_in_range,
    dot_flags,
    eager_autograd,
    op_or_body,
    resolve_backend,
    runs_body_directly,
    triton_interpreting,
)
from .mask_intervals import _INT_DTYPES

# The Triton kernels pick an expert's weight pointer from up to this many pointer arguments.
MAX_TRITON_EXPERTS = 4


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pick(expert, P0, P1, P2, P3, NUM_EXPERTS: tl.constexpr):
    """The pointer argument of this expert (constexpr NUM_EXPERTS prunes the unused branches)."""
    p = P0
    if NUM_EXPERTS > 1:
        if expert == 1:
            p = P1
    if NUM_EXPERTS > 2:
        if expert == 2:
            p = P2
    if NUM_EXPERTS > 3:
        if expert == 3:
            p = P3
    return p


@triton.jit
def _routed_linear_fwd_kernel(
    X, Y, PRE, ORDER, TILES,
    W0, W1, W2, W3, B0, B1, B2, B3,
    stride_xm, stride_xk, stride_ym, stride_yn, stride_pm, stride_pn, stride_wn, stride_wk,
    N_OUT, K_IN,
    NUM_EXPERTS: tl.constexpr, HAS_BIAS: tl.constexpr, SORTED_IN: tl.constexpr, SORTED_OUT: tl.constexpr,
    SWIGLU: tl.constexpr, STORE_PREACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: y[rows, cols] = x[rows] @ W_e[cols].T (+ b_e[cols]) for one row tile of expert e.

    ``rows`` are original token positions read through the sort permutation, so the gather of x and
    the scatter of y cost nothing beyond the loads and stores the GEMM does anyway (SORTED_IN /
    SORTED_OUT: x / y is already in sorted row order). W_e is addressed as
    W_e[n, k] = W + n * stride_wn + k * stride_wk, so the dX pass reuses this kernel on W_e.T.

    SWIGLU: W_e is a fused (2 * N_OUT, K) gate/up weight; the tile accumulates the gate columns and
    the matching up columns in the same pass over K and the epilogue writes silu(gate) * up, so the
    (N, 2 * N_OUT) pre-activations never make a round trip through memory. STORE_PREACT also writes
    them to PRE (gate | up), for the backward.
    """
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    expert = tl.load(TILES + pid_t * 3)
    if expert < 0:  # the grid is an upper bound on the tile count
        return
    row_start = tl.load(TILES + pid_t * 3 + 1)
    row_end = tl.load(TILES + pid_t * 3 + 2)
    w_ptr = _pick(expert, W0, W1, W2, W3, NUM_EXPERTS)

    sorted_rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = sorted_rows < row_end
    rows = tl.load(ORDER + sorted_rows, mask=row_ok, other=0)
    x_rows = sorted_rows if SORTED_IN else rows
    y_rows = sorted_rows if SORTED_OUT else rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_OUT
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SWIGLU:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K_IN, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K_IN
        a = tl.load(X + x_rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=DOT_PRECISION)
        if SWIGLU:
            b_up = tl.load(w_ptr + (cols + N_OUT)[None, :] * stride_wn + ks[:, None] * stride_wk,
                           mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                b_up = b_up.to(tl.float32)
            acc_up += tl.dot(a, b_up, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b_ptr = _pick(expert, B0, B1, B2, B3, NUM_EXPERTS)
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    if SWIGLU:
        if STORE_PREACT:
            pre_ptrs = PRE + y_rows[:, None] * stride_pm + cols[None, :] * stride_pn
            tl.store(pre_ptrs, acc.to(PRE.dtype.element_ty), mask=out_mask)
            tl.store(pre_ptrs + N_OUT * stride_pn, acc_up.to(PRE.dtype.element_ty), mask=out_mask)
        # Round gate and up to the activation dtype first, as the unfused path does.
        gate = acc.to(Y.dtype.element_ty).to(tl.float32)
        acc = gate * tl.sigmoid(gate) * acc_up.to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + y_rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=out_mask)


@triton.jit
def _routed_linear_dw_kernel(
    X, DY, ORDER, OFFSETS, DW, DB, expert,
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_dwn, stride_dwk,
    N_OUT, K_IN,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, X_SORTED: tl.constexpr, DY_SORTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dW_e[cols, ks] = dy_e[:, cols].T @ x_e[:, ks] over expert e's rows only.

    The expert's rows are the sorted positions [offsets[e], offsets[e+1]), read through the
    permutation (X_SORTED / DY_SORTED: that tensor is already in sorted row order). Programs of
    the first k-block also sum dy_e's columns into db_e.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    lo = tl.load(OFFSETS + expert)
    hi = tl.load(OFFSETS + expert + 1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_OUT
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K_IN
    do_db = COMPUTE_DB & (pid_k == 0)

    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        sorted_rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = sorted_rows < hi
        rows = tl.load(ORDER + sorted_rows, mask=row_ok, other=0)
        dy_rows = sorted_rows if DY_SORTED else rows
        x_rows = sorted_rows if X_SORTED else rows
        dy = tl.load(DY + dy_rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
        if COMPUTE_DW:
            x = tl.load(X + x_rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
            acc += tl.dot(tl.trans(dy), x, input_precision=DOT_PRECISION)
        if do_db:
            db += tl.sum(dy.to(tl.float32), 0)
    if COMPUTE_DW:
        tl.store(DW + cols[:, None] * stride_dwn + ks[None, :] * stride_dwk, acc.to(DW.dtype.element_ty),
                 mask=col_ok[:, None] & k_ok[None, :])
    if do_db:
        tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _gemm_config(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) of the grouped GEMMs; BLOCK_M is :func:`routing_block_m`."""
    if triton_interpreting():
        return 64, 64, 4, 1  # bigger numpy tiles are cheaper than more interpreted iterations
    if dtype == torch.float32:
        return 128, 32, 8, 3
    return 128, 64, 8, 3


def routing_block_m() -> int:
    """Rows per tile of the grouped GEMM: each expert's group is cut into tiles of this many rows."""
    return 32 if triton_interpreting() else 128


def _padded(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Fill the MAX_TRITON_EXPERTS pointer slots; slots past the last expert are never read."""
    return list(tensors) + [tensors[0]] * (MAX_TRITON_EXPERTS - len(tensors))


def _grouped_gemm_triton(x, order, tiles, weights, biases, *, transpose_weights: bool, sorted_in: bool,
                         sorted_out: bool, swiglu: bool = False, store_preact: bool = False):
    """y[r] = x[r] @ op(W_e) (+ b_e) for every row r of expert e, rows gathered/scattered in the kernel.

    op(W_e) is W_e.T (forward, y has Dout columns) or W_e (dX pass, y has Din columns). With
    ``swiglu`` the weights are fused (2I, Din) gate/up, y = silu(gate) * up has I columns, and the
    result is (y, pre), pre being the (N, 2I) pre-activations when ``store_preact`` (else empty).
    """
    n_tokens = x.shape[0]
    w = weights[0]
    n_out, k_in = (w.shape[1], w.shape[0]) if transpose_weights else (w.shape[0], w.shape[1])
    if swiglu:
        n_out //= 2
    y = x.new_empty((n_tokens, n_out))
    pre = x.new_empty((n_tokens, 2 * n_out) if store_preact else (0, 0))
    if n_tokens:
        stride_wn, stride_wk = (w.stride(1), w.stride(0)) if transpose_weights else (w.stride(0), w.stride(1))
        block_n, block_k, num_warps, num_stages = _gemm_config(x.dtype)
        grid = (triton.cdiv(n_out, block_n), tiles.shape[0])
        pre_arg = pre if store_preact else y  # an unused pointer slot otherwise
        torch.library.wrap_triton(_routed_linear_fwd_kernel)[grid](
            x, y, pre_arg, order, tiles, *_padded(weights), *_padded(biases or weights),
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), pre_arg.stride(0), pre_arg.stride(1),
            stride_wn, stride_wk, n_out, k_in,
            NUM_EXPERTS=len(weights), HAS_BIAS=bool(biases), SORTED_IN=sorted_in, SORTED_OUT=sorted_out,
            SWIGLU=swiglu, STORE_PREACT=store_preact,
            BLOCK_M=routing_block_m(), BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=num_warps, num_stages=num_stages, **dot_flags(x.dtype),
        )
    return (y, pre) if swiglu else y


def _expert_grads_triton(dy, x, order, offsets, weight, *, expert: int, want_dw: bool, want_db: bool,
                         x_sorted: bool, dy_sorted: bool):
    """(dW_e or None, db_e or None) from expert e's rows; fp32 accumulation, weight's dtype out."""
    n_out, k_in = weight.shape
    dw = weight.new_empty((n_out, k_in)) if want_dw else None
    db = weight.new_empty((n_out,)) if want_db else None
    block_n, block_k, num_warps, num_stages = _gemm_config(x.dtype)
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(k_in, block_k) if want_dw else 1)
    dw_arg = dw if dw is not None else weight  # unused pointer slot when not computing
    db_arg = db if db is not None else weight
    torch.library.wrap_triton(_routed_linear_dw_kernel)[grid](
        x, dy, order, offsets, dw_arg, db_arg, expert,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw_arg.stride(0), dw_arg.stride(-1),
        n_out, k_in,
        COMPUTE_DW=want_dw, COMPUTE_DB=want_db, X_SORTED=x_sorted, DY_SORTED=dy_sorted,
        # The reduction runs over rows here, so a shorter row tile leaves room for wider n/k tiles.
        BLOCK_M=routing_block_m() if triton_interpreting() else 64, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages, **dot_flags(x.dtype),
    )
    return dw, db


# ----------------------------------------------------------------------------------------------
# PyTorch backend: one gather, E matmuls over contiguous row ranges, one scatter
# ----------------------------------------------------------------------------------------------


def _row_ranges(host_offsets: torch.Tensor | None, offsets: torch.Tensor) -> list[tuple[int, int]]:
    """Per-expert [lo, hi) sorted-row ranges as Python ints (a device sync only if no host copy)."""
    bounds = (host_offsets if host_offsets is not None else offsets).tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _to_sorted(t: torch.Tensor, order: torch.Tensor, is_sorted: bool) -> torch.Tensor:
    return t if is_sorted else t.index_select(0, order)


def _from_sorted(t_sorted: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor | None,
                 keep_sorted: bool) -> torch.Tensor:
    """Back to token order, t[order[r]] = t_sorted[r] (or left sorted for the next routed layer).

    With the inverse permutation that is a gather, ``t_sorted[inverse]``: on CPU ``index_select``
    runs ~4.5x faster than the scatter ``index_copy_`` ((512, 768) fp32: 20 vs 95 us).
    """
    if keep_sorted:
        return t_sorted
    if inverse is not None:
        return t_sorted.index_select(0, inverse)
    return torch.empty_like(t_sorted).index_copy_(0, order, t_sorted)


def _grouped_gemm_torch(x_sorted, ranges, weights, biases, *, transpose_weights: bool) -> torch.Tensor:
    """y_sorted[lo:hi] = x_sorted[lo:hi] @ op(W_e) (+ b_e), written in place, one mm per expert."""
    n_out = weights[0].shape[1] if transpose_weights else weights[0].shape[0]
    y_sorted = x_sorted.new_empty((x_sorted.shape[0], n_out))
    for e, (lo, hi) in enumerate(ranges):
        if hi == lo:
            continue
        w = weights[e] if transpose_weights else weights[e].t()
        if biases:
            torch.addmm(biases[e], x_sorted[lo:hi], w, out=y_sorted[lo:hi])
        else:
            torch.mm(x_sorted[lo:hi], w, out=y_sorted[lo:hi])
    return y_sorted


def _expert_grads_torch(dy_sorted, x_sorted, ranges, *, expert: int, want_dw: bool, want_db: bool):
    """(dW_e or None, db_e or None) from expert e's contiguous sorted rows only."""
    lo, hi = ranges[expert]
    dw = torch.mm(dy_sorted[lo:hi].t(), x_sorted[lo:hi]) if want_dw else None
    db = dy_sorted[lo:hi].sum(0) if want_db else None  # reduced-precision sums accumulate in fp32
    return dw, db


# ----------------------------------------------------------------------------------------------
# Custom ops + autograd (torch.compile traces through these without graph breaks)
# ----------------------------------------------------------------------------------------------


def _routed_linear_fwd(
    x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor | None, offsets: torch.Tensor, tiles: torch.Tensor,
    host_offsets: torch.Tensor | None, weights: list[torch.Tensor], biases: list[torch.Tensor],
    sorted_in: bool, sorted_out: bool, backend: str,
) -> torch.Tensor:
    if backend == "triton":
        return _grouped_gemm_triton(x, order, tiles, weights, biases, transpose_weights=False,
                                    sorted_in=sorted_in, sorted_out=sorted_out)
    y_sorted = _grouped_gemm_torch(_to_sorted(x, order, sorted_in), _row_ranges(host_offsets, offsets), weights,
                                   biases, transpose_weights=False)
    return _from_sorted(y_sorted, order, inverse, sorted_out)


_routed_linear_fwd_op = torch.library.custom_op("mmfuse::routed_linear_fwd", mutates_args=())(_routed_linear_fwd)


@_routed_linear_fwd_op.register_fake
def _(x, order, inverse, offsets, tiles, host_offsets, weights, biases, sorted_in, sorted_out, backend):
    return x.new_empty((x.shape[0], weights[0].shape[0]))


def _routed_linear_bwd(
    dy: torch.Tensor, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor | None, offsets: torch.Tensor,
    tiles: torch.Tensor,
    host_offsets: torch.Tensor | None, weights: list[torch.Tensor], sorted_in: bool, sorted_out: bool,
    need_dx: bool, weight_needs_grad: list[bool], bias_needs_grad: list[bool], backend: str,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(dx or an empty tensor, dW of the experts flagged in weight_needs_grad, db of those in bias_needs_grad).

    dy is laid out like the forward's y (sorted when sorted_out), dx like its x (sorted when sorted_in).
    """
    wanted = [e for e, (dw, db) in enumerate(zip(weight_needs_grad, bias_needs_grad)) if dw or db]
    dw_list, db_list = [], []
    if backend == "triton":
        dx = (_grouped_gemm_triton(dy, order, tiles, weights, [], transpose_weights=True, sorted_in=sorted_out,
                                   sorted_out=sorted_in) if need_dx else dy.new_empty(0))
        for e in wanted:
            dw, db = _expert_grads_triton(dy, x, order, offsets, weights[e], expert=e, want_dw=weight_needs_grad[e],
                                          want_db=bias_needs_grad[e], x_sorted=sorted_in, dy_sorted=sorted_out)
            dw_list += [dw] if dw is not None else []
            db_list += [db] if db is not None else []
        return dx, dw_list, db_list

    ranges = _row_ranges(host_offsets, offsets)
    dy_sorted = _to_sorted(dy, order, sorted_out)  # gathered once for dX and every dW
    dx = dy.new_empty(0)
    if need_dx:
        dx_sorted = _grouped_gemm_torch(dy_sorted, ranges, weights, [], transpose_weights=True)
        dx = _from_sorted(dx_sorted, order, inverse, sorted_in)
    x_sorted = _to_sorted(x, order, sorted_in) if any(weight_needs_grad) else None
    for e in wanted:
        dw, db = _expert_grads_torch(dy_sorted, x_sorted, ranges, expert=e, want_dw=weight_needs_grad[e],
                                     want_db=bias_needs_grad[e])
        dw_list += [dw] if dw is not None else []
        db_list += [db] if db is not None else []
    return dx, dw_list, db_list


_routed_linear_bwd_op = torch.library.custom_op("mmfuse::routed_linear_bwd", mutates_args=())(_routed_linear_bwd)


@_routed_linear_bwd_op.register_fake
def _(dy, x, order, inverse, offsets, tiles, host_offsets, weights, sorted_in, sorted_out, need_dx,
      weight_needs_grad, bias_needs_grad, backend):
    dx = x.new_empty(x.shape) if need_dx else dy.new_empty(0)
    dws = [w.new_empty(w.shape) for w, want in zip(weights, weight_needs_grad) if want]
    dbs = [w.new_empty(w.shape[0]) for w, want in zip(weights, bias_needs_grad) if want]
    return dx, dws, dbs


def _setup_context(ctx, inputs, output):
    x, order, inverse, offsets, tiles, host_offsets, weights, biases, sorted_in, sorted_out, backend = inputs
    ctx.save_for_backward(x, order, inverse, offsets, tiles, host_offsets, *weights)
    ctx.sorted_in, ctx.sorted_out, ctx.backend = sorted_in, sorted_out, backend
    # Which parameters want a gradient is read here, from the tensors themselves, so a frozen
    # expert never reaches the backward kernels.
    ctx.weight_needs_grad = [w.requires_grad for w in weights]
    ctx.bias_needs_grad = [b.requires_grad for b in biases] if biases else [False] * len(weights)
    ctx.has_bias = bool(biases)


def _backward(ctx, grad_y):
    x, order, inverse, offsets, tiles, host_offsets, *weights = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    bwd = op_or_body(ctx, _routed_linear_bwd_op, _routed_linear_bwd)
    dx, dws, dbs = bwd(grad_y.contiguous(), x, order, inverse, offsets, tiles, host_offsets,
                                         weights, ctx.sorted_in, ctx.sorted_out, need_dx, ctx.weight_needs_grad,
                                         ctx.bias_needs_grad, ctx.backend)
    dws, dbs = iter(dws), iter(dbs)
    grad_w = [next(dws) if want else None for want in ctx.weight_needs_grad]
    grad_b = [next(dbs) if want else None for want in ctx.bias_needs_grad] if ctx.has_bias else []
    return dx if need_dx else None, None, None, None, None, None, grad_w, grad_b, None, None, None


_routed_linear_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_routed_linear_call = eager_autograd(_routed_linear_fwd_op, _routed_linear_fwd, _setup_context, _backward)


# ----------------------------------------------------------------------------------------------
# Routing metadata: built once per batch, shared by every routed layer
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Routing:
    """Tokens sorted by modality, computed once per batch from the modality ids.

    Attributes:
        order: int64 (N,), a stable permutation: sorted row ``r`` is token ``order[r]``.
        inverse: int64 (N,), its inverse: token ``i`` is sorted row ``inverse[i]`` (the torch
            backend un-sorts with a gather, far cheaper on CPU than a scatter), or None when built
            for the Triton backend (whose kernels read ``order`` only).
        offsets: int32 (E + 1,); expert ``e`` owns sorted rows ``offsets[e]:offsets[e + 1]``.
        tiles: int32 (T, 3), one row per grouped-GEMM row tile: (expert, row_start, row_end) in
            sorted rows, expert ``-1`` past the last tile. ``T = cdiv(N, block_m) + E`` bounds the
            number of tiles, so it is known without reading the counts back from the device.
        host_offsets: CPU copy of ``offsets`` for the torch backend (which slices row ranges on the
            host), or None when built for the Triton backend (which never reads them on the host).
        num_experts: E.
    """

    order: torch.Tensor
    offsets: torch.Tensor
    tiles: torch.Tensor
    host_offsets: torch.Tensor | None
    num_experts: int
    inverse: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.order.shape[0]


def _check_modality(modality: torch.Tensor, num_experts: int) -> None:
    check_tensor("modality", modality, dtypes=_INT_DTYPES)
    check_values_in_range("modality", modality, 0, num_experts - 1, f"[0, num_experts={num_experts})")


def _tile_table(counts: torch.Tensor, offsets: torch.Tensor, num_tokens: int, block_m: int) -> torch.Tensor:
    """(expert, row_start, row_end) per row tile, on device, from the counts (no host sync)."""
    num_experts = counts.shape[0]
    tiles_per_expert = (counts + block_m - 1) // block_m
    tile_end = tiles_per_expert.cumsum(0)                       # first tile past expert e
    bound = triton.cdiv(num_tokens, block_m) + num_experts     # >= sum_e cdiv(count_e, block_m)
    t = torch.arange(bound, device=counts.device, dtype=torch.int64)
    expert = torch.searchsorted(tile_end, t, right=True)        # E past the last tile
    valid = expert < num_experts
    e = expert.clamp(max=num_experts - 1)
    first_tile = tile_end[e] - tiles_per_expert[e]
    row_start = offsets[e].long() + (t - first_tile) * block_m
    row_end = offsets[e + 1].long()
    table = torch.stack([torch.where(valid, e, -1), row_start, row_end], dim=1)
    return table.to(torch.int32).contiguous()


def build_routing(modality: torch.Tensor, num_experts: int, *, backend: str | None = None) -> Routing:
    """Sort the batch's tokens by modality once; pass the result to every routed layer as ``routing=``.

    Args:
        modality: integer tensor of any shape (flattened), values in ``[0, num_experts)``.
            On CPU an out-of-range id raises ValueError; on CUDA it is checked asynchronously
            (``torch._assert_async``, no host sync); under torch.compile it is not checked.
        num_experts: E >= 1.
        backend: the backend the layers will use (resolved like theirs). For "torch" on CUDA the
            offsets are copied to the host here, the one device sync of the batch; for "triton"
            nothing is read back.

    Returns:
        :class:`Routing`.
    """
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    backend = resolve_backend(backend, modality) if isinstance(modality, torch.Tensor) else backend
    _check_modality(modality, num_experts)
    ids = modality.reshape(-1).long()
    order = torch.argsort(ids, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add(0, ids, torch.ones_like(ids))
    offsets = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    tiles = _tile_table(counts, offsets, ids.shape[0], routing_block_m())
    host_offsets, inverse = None, None
    if backend == "torch":
        host_offsets = offsets.cpu()
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    return Routing(order=order, offsets=offsets, tiles=tiles, host_offsets=host_offsets, num_experts=num_experts,
                   inverse=inverse)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def _check_experts(name: str, tensors, num_experts: int | None, ndim: int, x: torch.Tensor) -> list[torch.Tensor]:
    """A sequence of same-shape, same-dtype, same-device tensors (one per expert)."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors (one per expert), got {type(tensors).__name__}")
    if num_experts is not None and len(tensors) != num_experts:
        raise ValueError(f"{name} must hold {num_experts} tensors (one per expert), got {len(tensors)}")
    for e, t in enumerate(tensors):
        check_tensor(f"{name}[{e}]", t, ndim=ndim, dtypes=(x.dtype,))
        check_tensor(f"{name}[{e}]", t, shape=tuple(tensors[0].shape))
        check_same_device(x=x, **{f"{name}[{e}]": t})
    return list(tensors)


def _check_inputs(x, modality, weights, biases, routing, backend, *, weights_name: str = "weights",
                  biases_name: str = "biases") -> None:
    """Every argument of a routed layer; ``weights_name``/``biases_name`` are the caller's argument names."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES + (torch.float64,))
    if x.dim() < 1:
        raise ValueError("x must have shape (..., Din), got a 0-d tensor")
    weights = _check_experts(weights_name, weights, None, 2, x)
    if len(weights) < 2:
        raise ValueError(f"{weights_name} must hold at least 2 experts, got {len(weights)}")
    num_experts = len(weights)
    if weights[0].shape[1] != x.shape[-1]:
        raise ValueError(f"{weights_name}[e] must have shape (Dout, Din={x.shape[-1]}), got {tuple(weights[0].shape)}")
    if biases is not None:
        _check_experts(biases_name, biases, num_experts, 1, x)
        if biases[0].shape[0] != weights[0].shape[0]:
            raise ValueError(f"{biases_name}[e] must have shape (Dout={weights[0].shape[0]},), "
                             f"got {tuple(biases[0].shape)}")
    check_tensor("modality", modality, dtypes=_INT_DTYPES, shape=tuple(x.shape[:-1]))
    check_same_device(x=x, modality=modality)
    if routing is not None:
        if not isinstance(routing, Routing):
            raise TypeError(f"routing must be a Routing from build_routing, got {type(routing).__name__}")
        if routing.num_experts != num_experts or routing.num_tokens != modality.numel():
            raise ValueError(f"routing was built for {routing.num_tokens} tokens and {routing.num_experts} experts, "
                             f"but x has {modality.numel()} tokens and {weights_name} {num_experts} experts")
        check_same_device(x=x, routing_order=routing.order)
    if backend == "triton":
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"x dtype {x.dtype} is not supported by the Triton backend (fp16, bf16, fp32)")
        if num_experts > MAX_TRITON_EXPERTS:
            raise ValueError(f"{weights_name} holds {num_experts} experts; the Triton backend supports up to "
                             f"{MAX_TRITON_EXPERTS} (use backend='torch')")


def _unstacked(experts, stacked_dim: int):
    """A stacked (E, ...) tensor as the list of its E experts; a list (or None) as it is."""
    if isinstance(experts, torch.Tensor) and experts.dim() == stacked_dim:
        return list(experts.unbind(0))
    return experts


def routed_linear(
    x: torch.Tensor,
    modality: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor] | None = None,
    *,
    routing: Routing | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``y[i] = x[i] @ weights[m[i]].T + biases[m[i]]``: each token through its modality's expert.

    Args:
        x: (..., Din) fp16 / bf16 / fp32 (fp64 on the torch backend); may be non-contiguous.
        modality: integer tensor of shape ``x.shape[:-1]``, values in ``[0, E)``.
        weights: a list of E >= 2 tensors (Dout, Din), x's dtype and device; each its own Parameter
            so that an expert can be frozen: no dW is computed for a weight that does not require
            grad. One stacked (E, Dout, Din) tensor is taken too (its experts then train together).
        biases: None, or E tensors (Dout,) (all experts have a bias or none does; freeze a
            bias by turning its requires_grad off); or one stacked (E, Dout) tensor.
        routing: :func:`build_routing` of this batch's modality ids, shared by every layer; built
            here when None. It must describe ``modality`` (only its sizes are checked).
        backend: None (Triton on CUDA, PyTorch otherwise), "torch" or "triton".

    Returns:
        (..., Dout) in x's dtype.
    """
    backend = resolve_backend(backend, x)
    weights = _unstacked(weights, 3)
    biases = _unstacked(biases, 2)
    _check_inputs(x, modality, weights, biases, routing, backend)
    if routing is None:
        routing = build_routing(modality, len(weights), backend=backend)
    y = apply_routed_linear(x.reshape(-1, x.shape[-1]), routing, weights, biases, backend)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def apply_routed_linear(
    x: torch.Tensor,
    routing: Routing,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor] | None,
    backend: str,
    *,
    sorted_input: bool = False,
    sorted_output: bool = False,
) -> torch.Tensor:
    """The routed GEMM on already-checked arguments: the building block of every routed layer.

    Args:
        x: (N, Din), rows in token order, or in routing order (row ``r`` is token
            ``routing.order[r]``) when ``sorted_input``.
        routing, weights, biases: as :func:`routed_linear`; backend already resolved.
        sorted_output: leave y in routing order, so that a following routed layer (the down
            projection of an MLP) reads it without a gather and the token-order scatter happens once.

    Returns:
        (N, Dout).
    """
    weights, biases = list(weights), list(biases) if biases is not None else []
    # inference (no grad) runs the body itself, as the other ops do: no autograd to set up
    fwd = _routed_linear_fwd if runs_body_directly(backend, x, *weights, *biases) else _routed_linear_call
    return fwd(x, routing.order, routing.inverse, routing.offsets, routing.tiles, routing.host_offsets, weights,
               biases, sorted_input, sorted_output, backend)
