"""Cosine regression loss: mean over selected rows of ``1 - cos(pred, target)`` (MetaMorph's visual tokens).

The cosine matches ``torch.nn.functional.cosine_similarity`` (eps = 1e-8)::

    cos = <p, t> / (max(|p|, eps) * max(|t|, eps))

so a zero row has cosine 0 (loss 1) and a finite gradient, never NaN. The gradient is the exact
derivative of that value (a norm below ``eps`` is a constant, so it has no gradient of its own).

One pass forward: each program reads its rows once and accumulates ``<p, t>``, ``|p|^2`` and ``|t|^2``
in fp32; those three numbers per row are all the backward needs, so the backward is one pass too
(read p and t, write dp and dt). Rows left out by the mask are never read and get zero gradients;
with every row left out the loss is 0.

Layout of this file: Triton kernels -> launchers -> PyTorch backend -> custom ops + autograd ->
public function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    compute_dtype,
    eager_autograd,
    op_or_body,
    resolve_backend,
    triton_interpreting,
)
from ._loss_common import check_finite_from_sums, check_finite_inputs, chunk_buffer, chunk_store, row_chunks

DEFAULT_EPS = 1e-8


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _selected_rows(MASK, pid, N, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices of this program, whether each exists, and whether each is selected by the mask."""
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_bounds = rows < N
    selected = in_bounds
    if HAS_MASK:
        selected = selected & (tl.load(MASK + rows, mask=in_bounds, other=0) != 0)
    return rows.to(tl.int64), in_bounds, selected  # int64: row * stride may pass 2**31


@triton.jit
def _cosine_loss_fwd_kernel(
    P, T, MASK, ROW_LOSS, STATS,
    N, D, stride_pn, stride_pd, stride_tn, stride_td, eps,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: BLOCK_N rows. Writes 1 - cos per row (0 when not selected) and <p,t>, |p|^2, |t|^2."""
    rows, in_bounds, selected = _selected_rows(MASK, tl.program_id(0), N, HAS_MASK, BLOCK_N)
    # 2-D accumulators, reduced once after the loop: the loop body is pure elementwise work.
    dot = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    pp = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    tt = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = selected[:, None] & (cols[None, :] < D)
        p = tl.load(P + rows[:, None] * stride_pn + cols[None, :] * stride_pd, mask=m, other=0.0).to(tl.float32)
        t = tl.load(T + rows[:, None] * stride_tn + cols[None, :] * stride_td, mask=m, other=0.0).to(tl.float32)
        dot += p * t
        pp += p * p
        tt += t * t
    dot_r = tl.sum(dot, 1)
    pp_r = tl.sum(pp, 1)
    tt_r = tl.sum(tt, 1)
    cos = dot_r / (tl.maximum(tl.sqrt(pp_r), eps) * tl.maximum(tl.sqrt(tt_r), eps))
    tl.store(ROW_LOSS + rows, tl.where(selected, 1.0 - cos, 0.0), mask=in_bounds)
    tl.store(STATS + rows, dot_r, mask=in_bounds)
    tl.store(STATS + N + rows, pp_r, mask=in_bounds)
    tl.store(STATS + 2 * N + rows, tt_r, mask=in_bounds)


@triton.jit
def _cosine_loss_bwd_kernel(
    P, T, MASK, STATS, GRAD_SCALE, DP, DT,
    N, D, stride_pn, stride_pd, stride_tn, stride_td, stride_dpn, stride_dpd, stride_dtn, stride_dtd, eps,
    HAS_MASK: tl.constexpr, COMPUTE_DP: tl.constexpr, COMPUTE_DT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: BLOCK_N rows of dp = g (t/(|p||t|) - cos p/|p|^2), dt likewise; 0 for unselected rows."""
    rows, in_bounds, selected = _selected_rows(MASK, tl.program_id(0), N, HAS_MASK, BLOCK_N)
    dot = tl.load(STATS + rows, mask=in_bounds, other=0.0)
    norm_p = tl.sqrt(tl.load(STATS + N + rows, mask=in_bounds, other=0.0))
    norm_t = tl.sqrt(tl.load(STATS + 2 * N + rows, mask=in_bounds, other=0.0))
    clamped_p = tl.maximum(norm_p, eps)
    clamped_t = tl.maximum(norm_t, eps)
    inv = 1.0 / (clamped_p * clamped_t)
    cos = dot * inv
    # A norm clamped at eps is constant: its row term has no gradient.
    coef_p = tl.where(norm_p > eps, cos / (clamped_p * clamped_p), 0.0)
    coef_t = tl.where(norm_t > eps, cos / (clamped_t * clamped_t), 0.0)
    g = tl.where(selected, tl.load(GRAD_SCALE), 0.0)  # GRAD_SCALE = -grad_loss / selected rows
    inv = (g * inv)[:, None]
    coef_p = (g * coef_p)[:, None]
    coef_t = (g * coef_t)[:, None]
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols[None, :] < D
        m = selected[:, None] & col_ok
        p = tl.load(P + rows[:, None] * stride_pn + cols[None, :] * stride_pd, mask=m, other=0.0).to(tl.float32)
        t = tl.load(T + rows[:, None] * stride_tn + cols[None, :] * stride_td, mask=m, other=0.0).to(tl.float32)
        store_mask = in_bounds[:, None] & col_ok  # unselected rows read 0 and so write 0
        if COMPUTE_DP:
            dp = t * inv - p * coef_p
            tl.store(DP + rows[:, None] * stride_dpn + cols[None, :] * stride_dpd, dp.to(DP.dtype.element_ty),
                     mask=store_mask)
        if COMPUTE_DT:
            dt = p * inv - t * coef_t
            tl.store(DT + rows[:, None] * stride_dtn + cols[None, :] * stride_dtd, dt.to(DT.dtype.element_ty),
                     mask=store_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _block_sizes(dim: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps): about 4K elements per tile on a GPU, bigger tiles interpreted."""
    if triton_interpreting():
        block_d = min(triton.next_power_of_2(dim), 4096)
        return max(1, 16384 // block_d), block_d, 4
    block_d = min(triton.next_power_of_2(dim), 1024)
    return max(1, 4096 // block_d), block_d, 8  # 3 fp32 accumulator tiles: 48 registers a thread


def _mask_arg(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # bool -> uint8 is a free view; the kernel never reads the placeholder when HAS_MASK is False.
    return like if mask is None else mask.view(torch.uint8)


def _cosine_fwd_triton(pred, target, mask, eps):
    N, D = pred.shape
    row_loss = torch.empty(N, device=pred.device, dtype=torch.float32)
    stats = torch.empty(3, N, device=pred.device, dtype=torch.float32)
    if N > 0:
        block_n, block_d, num_warps = _block_sizes(D)
        torch.library.wrap_triton(_cosine_loss_fwd_kernel)[(triton.cdiv(N, block_n),)](
            pred, target, _mask_arg(mask, pred), row_loss, stats,
            N, D, *pred.stride(), *target.stride(), eps,
            HAS_MASK=mask is not None, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
        )
    return _mean_over_selected(row_loss, mask).to(pred.dtype), stats


def _cosine_bwd_triton(grad, pred, target, mask, stats, eps, compute_dp, compute_dt):
    N, D = pred.shape
    dp = torch.empty_like(pred, memory_format=torch.contiguous_format) if compute_dp else pred.new_empty(0)
    dt = torch.empty_like(target, memory_format=torch.contiguous_format) if compute_dt else target.new_empty(0)
    if N > 0:
        grad_scale = (-grad.float() / _selected_count(mask, N)).reshape(1)
        block_n, block_d, num_warps = _block_sizes(D)
        dp_strides = dp.stride() if compute_dp else (0, 0)
        dt_strides = dt.stride() if compute_dt else (0, 0)
        torch.library.wrap_triton(_cosine_loss_bwd_kernel)[(triton.cdiv(N, block_n),)](
            pred, target, _mask_arg(mask, pred), stats, grad_scale, dp, dt,
            N, D, *pred.stride(), *target.stride(), *dp_strides, *dt_strides, eps,
            HAS_MASK=mask is not None, COMPUTE_DP=compute_dp, COMPUTE_DT=compute_dt,
            BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
        )
    return dp, dt


# ----------------------------------------------------------------------------------------------
# PyTorch backend: the same three row statistics, chunked over rows (no (N, D) temporaries)
# ----------------------------------------------------------------------------------------------


def _selected_count(mask: torch.Tensor | None, num_rows: int):
    """Rows that count, at least 1 so that an all-masked batch divides 0 by 1 (no host sync)."""
    return num_rows if mask is None else mask.sum().clamp_min(1)


def _mean_over_selected(row_loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if row_loss.numel() == 0:
        return row_loss.sum()
    return row_loss.sum() / _selected_count(mask, row_loss.shape[0])


def _row_terms(stats: torch.Tensor, eps: float):
    """From (<p,t>, |p|^2, |t|^2): cos, 1/(|p||t|) and the p- and t-coefficients of the gradient."""
    dot, norm_p, norm_t = stats[0], stats[1].sqrt(), stats[2].sqrt()
    clamped_p, clamped_t = norm_p.clamp_min(eps), norm_t.clamp_min(eps)
    inv = 1.0 / (clamped_p * clamped_t)
    cos = dot * inv
    coef_p = torch.where(norm_p > eps, cos / clamped_p.square(), 0.0)
    coef_t = torch.where(norm_t > eps, cos / clamped_t.square(), 0.0)
    return cos, inv, coef_p, coef_t


def _cosine_fwd_torch(pred, target, mask, eps):
    ct = compute_dtype(pred, target)
    N, D = pred.shape
    stats = torch.empty(3, N, device=pred.device, dtype=ct)
    for rows in row_chunks(N, D):  # upcasts stay chunk-sized; bmm / vector_norm need no temporaries
        p, t = pred[rows].to(ct), target[rows].to(ct)
        stats[0, rows] = torch.bmm(p.unsqueeze(1), t.unsqueeze(2)).view(-1)
        stats[1, rows] = torch.linalg.vector_norm(p, dim=1).square()
        stats[2, rows] = torch.linalg.vector_norm(t, dim=1).square()
    row_loss = 1.0 - _row_terms(stats, eps)[0]
    if mask is not None:
        row_loss = torch.where(mask, row_loss, 0.0)
    return _mean_over_selected(row_loss, mask).to(pred.dtype), stats


def _cosine_bwd_torch(grad, pred, target, mask, stats, eps, compute_dp, compute_dt):
    ct = compute_dtype(pred, target)
    N, D = pred.shape
    _, inv, coef_p, coef_t = _row_terms(stats.to(ct), eps)
    g = -grad.to(ct) / _selected_count(mask, N)
    row_g = g.expand(N) if mask is None else torch.where(mask, g, 0.0)
    inv, coef_p, coef_t = ((row_g * c)[:, None] for c in (inv, coef_p, coef_t))
    dp = torch.empty_like(pred, memory_format=torch.contiguous_format) if compute_dp else pred.new_empty(0)
    dt = torch.empty_like(target, memory_format=torch.contiguous_format) if compute_dt else target.new_empty(0)
    for rows in row_chunks(N, D):
        p, t = pred[rows].to(ct), target[rows].to(ct)
        if compute_dp:  # g (t / (|p||t|) - cos p / |p|^2)
            buf = torch.mul(t, inv[rows], out=chunk_buffer(dp, rows, ct)).addcmul_(p, coef_p[rows], value=-1)
            chunk_store(dp, rows, buf)
        if compute_dt:
            buf = torch.mul(p, inv[rows], out=chunk_buffer(dt, rows, ct)).addcmul_(t, coef_t[rows], value=-1)
            chunk_store(dt, rows, buf)
    return dp, dt


# ----------------------------------------------------------------------------------------------
# Custom ops + autograd (torch.compile traces through these without graph breaks)
# ----------------------------------------------------------------------------------------------


def _cosine_loss_fwd(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _cosine_fwd_triton(pred, target, mask, eps)
    return _cosine_fwd_torch(pred, target, mask, eps)


_cosine_loss_fwd_op = torch.library.custom_op("mmfuse::cosine_loss_fwd", mutates_args=())(_cosine_loss_fwd)


@_cosine_loss_fwd_op.register_fake
def _(pred, target, mask, eps, backend):
    stats_dtype = compute_dtype(pred, target) if backend == "torch" else torch.float32
    return pred.new_empty(()), pred.new_empty((3, pred.shape[0]), dtype=stats_dtype)


def _cosine_loss_bwd(
    grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, stats: torch.Tensor,
    eps: float, backend: str, compute_dp: bool, compute_dt: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _cosine_bwd_triton(grad, pred, target, mask, stats, eps, compute_dp, compute_dt)
    return _cosine_bwd_torch(grad, pred, target, mask, stats, eps, compute_dp, compute_dt)


_cosine_loss_bwd_op = torch.library.custom_op("mmfuse::cosine_loss_bwd", mutates_args=())(_cosine_loss_bwd)


@_cosine_loss_bwd_op.register_fake
def _(grad, pred, target, mask, stats, eps, backend, compute_dp, compute_dt):
    dp = torch.empty_like(pred, memory_format=torch.contiguous_format) if compute_dp else pred.new_empty(0)
    dt = torch.empty_like(target, memory_format=torch.contiguous_format) if compute_dt else target.new_empty(0)
    return dp, dt


def _setup_context(ctx, inputs, output):
    pred, target, mask, eps, backend = inputs
    ctx.save_for_backward(pred, target, mask, output[1])
    ctx.eps, ctx.backend = eps, backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _grad_stats):
    pred, target, mask, stats = ctx.saved_tensors
    compute_dp, compute_dt = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    bwd = op_or_body(ctx, _cosine_loss_bwd_op, _cosine_loss_bwd)
    dp, dt = bwd(grad_loss, pred, target, mask, stats, ctx.eps, ctx.backend, compute_dp, compute_dt)
    return (dp if compute_dp else None), (dt if compute_dt else None), None, None, None


_cosine_loss_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_cosine_loss_call = eager_autograd(_cosine_loss_fwd_op, _cosine_loss_fwd, _setup_context, _backward)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def _check_inputs(pred, target, mask, backend) -> None:
    dtypes = FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())
    check_tensor("pred", pred, dtypes=dtypes)
    if pred.dim() < 1 or pred.shape[-1] == 0:
        raise ValueError(f"pred must have shape (..., D) with D >= 1, got {tuple(pred.shape)}")
    check_tensor("target", target, dtypes=dtypes, shape=tuple(pred.shape))
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,), shape=tuple(pred.shape[:-1]))
        check_same_device(pred=pred, target=target, mask=mask)
    else:
        check_same_device(pred=pred, target=target)


def cosine_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    eps: float = DEFAULT_EPS,
    check_finite: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean over the selected rows of ``1 - cosine_similarity(pred, target, dim=-1, eps=eps)``.

    Equals ``(1 - F.cosine_similarity(pred, target, dim=-1))[mask].mean()`` without its (N, D)
    temporaries, in one pass over the rows forward and one backward.

    Args:
        pred: (..., D) fp16 / bf16 / fp32 (fp64 on the torch backend).
        target: (..., D), same shape, any of those dtypes; gets a gradient if it requires one.
        mask: bool (...,) selecting the rows that count, or None for all rows. Rows left out are
            never read by the Triton kernel and get zero gradients; with no row selected (or no rows
            at all) the loss is 0 and the gradients are 0.
        eps: lower bound of each norm, as in ``F.cosine_similarity``: a zero row has cosine 0.
        check_finite: raise ``ValueError`` naming pred or target if it holds NaN/Inf, never
            returning the loss. The PyTorch backend reads every row anyway, so it tests the per-row
            sums it computed (free); the Triton backend tests the inputs before its kernel. None
            (default) checks CPU tensors only: on CUDA the check would cost a host sync per call,
            so there a NaN input is not caught here and comes out as a NaN loss.
        backend: None (Triton on CUDA, PyTorch otherwise), "torch" or "triton".

    Returns:
        A 0-dim tensor in pred's dtype (accumulated in fp32).
    """
    backend = resolve_backend(backend, check_tensor("pred", pred), check_tensor("target", target))
    _check_inputs(pred, target, mask, backend)
    if backend == "triton":  # its kernel skips the rows the mask leaves out: test the inputs themselves
        check_finite_inputs(check_finite, pred=pred, target=target)
    D = pred.shape[-1]
    rows_mask = None if mask is None else mask.reshape(-1).contiguous()
    loss, stats = _cosine_loss_call(pred.reshape(-1, D), target.reshape(-1, D), rows_mask, float(eps), backend)
    if backend == "torch":  # every row's <p, t>, |p|^2, |t|^2
        check_finite_from_sums(check_finite, stats, pred=pred, target=target)
    return loss
