"""RMSNorm, plain and routed by modality (LlamaFusion keeps one norm weight per modality).

``y = cast(x / sqrt(mean(x**2, -1) + eps)) * weight[modality]``, with the casting order of
transformers' ``LlamaRMSNorm``: the row is normalised in float32, cast back to the input dtype, and
only then multiplied by the weight (in the input dtype). For bf16/fp16 that is two roundings, and
the Triton kernel reproduces both, so it matches transformers bit for bit up to the order of the
float32 sum of squares.

One kernel serves both ops: :func:`rms_norm` is the routed norm with a single expert and no modality
tensor (``ROUTED=False`` skips the per-row weight gather). The backward writes ``dx`` and per-program
partial sums of ``dweight`` for every expert, reduced afterwards by ``torch.sum`` (deterministic, no
atomics). Layout of this file: Triton kernels -> launchers -> PyTorch backend -> custom ops +
autograd -> public functions.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    CheckMemo,
    as_dtype,
    check_same_device,
    check_tensor,
    check_values_in_range,
    compute_dtype,
    eager_autograd,
    op_or_body,
    resolve_backend,
    runs_plain_form,
    tensor_metadata,
)

_MAX_TRITON_DIM = 32768  # one row lives in registers; wider rows would spill
_TILE_ELEMENTS = 4096  # rows per program chosen so a tile holds about this many elements


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptr, stride_row, rows, cols, mask):
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_weights(W, MODALITY, rows, cols, row_ok, mask, D, ROUTED: tl.constexpr):
    """(BLOCK_M, BLOCK_D) float32 weights: each row's expert row of W, or the single weight broadcast.

    One return: the compiler types every return of a function alike, even one behind a constexpr
    branch, and the two weights have different shapes (the interpreter does not mind).
    """
    if ROUTED:
        expert = tl.load(MODALITY + rows, mask=row_ok, other=0)
        w = tl.load(W + expert[:, None] * D + cols[None, :], mask=mask, other=0.0)
    else:
        w = tl.load(W + cols, mask=cols < D, other=0.0)[None, :]
    return w.to(tl.float32)


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, MODALITY, Y, RSTD,
    stride_x, stride_y, N, D, eps,
    ROUTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: BLOCK_M whole rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols[None, :] < D)
    x = _load_tile(X, stride_x, rows, cols, mask)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    # transformers casts the normalised row to the input dtype before the weight multiply.
    x_hat = (x * rstd[:, None]).to(Y.dtype.element_ty).to(tl.float32)
    y = x_hat * _row_weights(W, MODALITY, rows, cols, row_ok, mask, D, ROUTED)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, MODALITY, RSTD, DX, DW_PARTIAL,
    stride_dy, stride_x, stride_dx, N, D, tiles_per_program,
    ROUTED: tl.constexpr, NUM_EXPERTS: tl.constexpr, BLOCK_E: tl.constexpr, COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: dx of ``tiles_per_program`` consecutive row tiles, and their dweight partial sums."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    experts = tl.arange(0, BLOCK_E)
    dw_acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
    for t in range(tiles_per_program):
        rows = (pid * tiles_per_program + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        mask = row_ok[:, None] & (cols[None, :] < D)
        x = _load_tile(X, stride_x, rows, cols, mask)
        dy = _load_tile(DY, stride_dy, rows, cols, mask)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        w = _row_weights(W, MODALITY, rows, cols, row_ok, mask, D, ROUTED)
        x_hat = x * rstd[:, None]
        # The cast of x_hat to the input dtype passes gradients straight through (as in autograd).
        dy_w = dy * w
        dx = (dy_w - x_hat * (tl.sum(dy_w * x_hat, 1) / D)[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            # dweight sees the rounded x_hat, exactly what the forward multiplied the weight by.
            contrib = dy * x_hat.to(DX.dtype.element_ty).to(tl.float32)
            if ROUTED:
                expert = tl.load(MODALITY + rows, mask=row_ok, other=0)
                for e in tl.static_range(NUM_EXPERTS):
                    part = tl.sum(tl.where((expert == e)[:, None], contrib, 0.0), 0)
                    dw_acc += tl.where((experts == e)[:, None], part[None, :], 0.0)
            else:
                dw_acc += tl.sum(contrib, 0)[None, :]
    if COMPUTE_DW:
        ptrs = DW_PARTIAL + pid * NUM_EXPERTS * D + experts[:, None] * D + cols[None, :]
        tl.store(ptrs, dw_acc, mask=(experts[:, None] < NUM_EXPERTS) & (cols[None, :] < D))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _launch_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps): whole rows per program, about _TILE_ELEMENTS elements a tile."""
    block_d = triton.next_power_of_2(D)
    block_m = max(1, min(64, _TILE_ELEMENTS // block_d))
    num_warps = min(16, max(4, block_m * block_d // 1024))
    return block_m, block_d, num_warps


def _bwd_program_count(num_tiles: int, device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over; fewer means fewer partial sums to reduce."""
    if device.type == "cuda":
        return min(num_tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(num_tiles, 4)


def _rms_norm_fwd_triton(x, weight, modality, eps):
    N, D = x.shape
    y = torch.empty((N, D), device=x.device, dtype=x.dtype)
    rstd = torch.empty(N, device=x.device, dtype=torch.float32)
    if N == 0:
        return y, rstd
    block_m, block_d, num_warps = _launch_config(D)
    torch.library.wrap_triton(_rms_norm_fwd_kernel)[(triton.cdiv(N, block_m),)](
        x, weight, modality if modality is not None else rstd, y, rstd,  # MODALITY unread unless ROUTED
        x.stride(0), y.stride(0), N, D, eps,
        ROUTED=modality is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    return y, rstd


def _rms_norm_bwd_triton(dy, x, weight, modality, rstd, compute_dw):
    N, D = x.shape
    E = weight.shape[0]
    block_m, block_d, num_warps = _launch_config(D)
    num_tiles = triton.cdiv(N, block_m)
    tiles_per_program = triton.cdiv(num_tiles, max(1, _bwd_program_count(num_tiles, x.device)))
    programs = triton.cdiv(num_tiles, tiles_per_program) if N else 0
    dx = torch.empty((N, D), device=x.device, dtype=x.dtype)
    partial = torch.zeros((programs, E, D), device=x.device, dtype=torch.float32)
    if programs:
        torch.library.wrap_triton(_rms_norm_bwd_kernel)[(programs,)](
            dy, x, weight, modality if modality is not None else rstd, rstd, dx, partial,
            dy.stride(0), x.stride(0), dx.stride(0), N, D, tiles_per_program,
            ROUTED=modality is not None, NUM_EXPERTS=E, BLOCK_E=triton.next_power_of_2(E),
            COMPUTE_DW=compute_dw, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )
    return dx, partial.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# PyTorch backend: the same math in a few fused-by-torch expressions
# ----------------------------------------------------------------------------------------------


def _row_weights_torch(weight, modality):
    """(N, D) gathered expert weights, or the (1, D) single weight when not routed."""
    return weight if modality is None else weight.index_select(0, modality)


def _rms_norm_fwd_torch(x, weight, modality, eps):
    """x (..., D) (any leading dims without modality; (N, D) with it) -> (y like x, rstd (...,) fp32)."""
    D = x.shape[-1]
    if modality is None and x.dtype == compute_dtype(x):
        y, rstd = _fused(x, weight.view(D), eps)
    else:
        # transformers' order: cast(x * rstd) first (the fused op rounds exactly so: checked bit for
        # bit against the composite), then the weight multiply in x's dtype, in place on the fresh y.
        y, rstd = _fused(x, None, eps)
        y = y.mul_(_row_weights_torch(weight, modality))
    return y, rstd.squeeze(-1).to(torch.float32)


def _fused(x, weight, eps):
    """PyTorch's fused RMSNorm forward: (cast(x * rstd) [* weight], rstd (..., 1) in the compute dtype)
    in one pass over x, where the composite ``pow, mean, add, rsqrt, mul`` makes five (CPU, (256, 256)
    fp32: 30 vs 50 us)."""
    return torch.ops.aten._fused_rms_norm(x, (x.shape[-1],), weight, eps)


def _rms_norm_infer_torch(x, weight, eps):
    """The forward's y alone (inference: no rstd to keep), x (..., D), weight (D,) or (1, D).
    fp32 / fp64: ``torch.rms_norm``, the public form of the fused op, which a traced graph lowers
    as it does any RMSNorm; fp16 / bf16 round ``x * rstd`` before the weight multiply."""
    if x.dtype == compute_dtype(x):
        dim = x.shape[-1]
        return torch.rms_norm(x, (dim,), weight if weight.dim() == 1 else weight.view(dim), eps)
    return _rms_norm_fwd_torch(x, weight, None, eps)[0]


def _rms_norm_bwd_torch(dy, x, weight, modality, rstd, compute_dw):
    """dx = (dy_w - x_hat * mean(dy_w * x_hat)) * rstd with dy_w = dy * w, and dw = sum(dy * x_hat)
    per expert; in place where it can, since every (N, D) temporary is a fresh allocation (measured
    at (448, 256) fp32: 7 of them cost more than the arithmetic)."""
    ct = compute_dtype(x)
    E = weight.shape[0]
    rstd = rstd.to(ct)[:, None]
    x_hat = x.to(ct) * rstd
    dy = as_dtype(dy, ct)
    dy_w = dy * _row_weights_torch(weight, modality).to(ct)
    dot = (dy_w * x_hat).mean(-1, keepdim=True)
    dx = dy_w.addcmul_(x_hat, dot, value=-1).mul_(rstd).to(x.dtype)
    if not compute_dw:
        return dx, torch.zeros_like(weight)
    # dw sees x_hat rounded to x's dtype, as the forward's weight multiply did.
    contrib = x_hat.mul_(dy) if x.dtype == ct else x_hat.to(x.dtype).to(ct).mul_(dy)
    if modality is None:
        dw = contrib.sum(0, keepdim=True)
    else:  # one-hot matmul: a deterministic segmented sum on every device (index_add_ uses atomics on CUDA)
        dw = torch.nn.functional.one_hot(modality.long(), E).to(ct).T @ contrib
    return dx, dw.to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# Custom ops + autograd
# ----------------------------------------------------------------------------------------------


def _rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, modality: torch.Tensor | None, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _rms_norm_fwd_triton(x, weight, modality, eps)
    return _rms_norm_fwd_torch(x, weight, modality, eps)


_rms_norm_fwd_op = torch.library.custom_op("mmfuse::rms_norm_fwd", mutates_args=())(_rms_norm_fwd)


@_rms_norm_fwd_op.register_fake
def _(x, weight, modality, eps, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[0], dtype=torch.float32)


def _rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, modality: torch.Tensor | None, rstd: torch.Tensor,
    compute_dw: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _rms_norm_bwd_triton(dy, x, weight, modality, rstd, compute_dw)
    return _rms_norm_bwd_torch(dy, x, weight, modality, rstd, compute_dw)


_rms_norm_bwd_op = torch.library.custom_op("mmfuse::rms_norm_bwd", mutates_args=())(_rms_norm_bwd)


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, modality, rstd, compute_dw, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, modality, _, backend = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, modality, rstd)
    ctx.backend = backend
    ctx.mark_non_differentiable(rstd)


def _backward(ctx, dy, _drstd):
    x, weight, modality, rstd = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    bwd = op_or_body(ctx, _rms_norm_bwd_op, _rms_norm_bwd)
    dx, dw = bwd(dy.contiguous(), x, weight, modality, rstd, need_dw, ctx.backend)
    return (dx if need_dx else None), (dw if need_dw else None), None, None, None


_rms_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_rms_norm_call = eager_autograd(_rms_norm_fwd_op, _rms_norm_fwd, _setup_context, _backward)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, D) view of x with unit column stride; copies only when no such view exists.

    A last-dim slice of a wider tensor (a half of a fused projection) stays a view: the kernels take
    the row stride. Shared with :mod:`.swiglu`.
    """
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _check_x(x, backend) -> None:
    dtypes = FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())
    check_tensor("x", x, dtypes=dtypes)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., D) with D > 0, got {tuple(x.shape)}")
    if backend == "triton" and x.shape[-1] > _MAX_TRITON_DIM:
        raise ValueError(f"x's last dim {x.shape[-1]} exceeds the Triton backend's limit of {_MAX_TRITON_DIM}")


def _norm(x, weight_stack, modality, eps, backend):
    shape = x.shape
    if runs_plain_form(backend, x, weight_stack):
        y, _ = _rms_norm_fwd_torch(_as_rows(x), weight_stack, modality, float(eps))
    else:
        y, _ = _rms_norm_call(_as_rows(x), weight_stack, modality, float(eps), backend)
    return y.view(shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """RMSNorm as transformers' ``LlamaRMSNorm``: ``cast(x * rsqrt(mean(x**2) + eps)) * weight``.

    Args:
        x: (..., D) fp16 / bf16 / fp32 (fp64 on the torch backend); any strides.
        weight: (D,), same dtype as x.
        eps: added to the mean square before the reciprocal square root.
        backend: None (Triton on CUDA, PyTorch otherwise), "torch" or "triton".

    Returns:
        (..., D) in x's dtype. Differentiable in x and weight.
    """
    meta = tensor_metadata(x, weight)
    if meta is None:
        check_tensor("x", x)
        check_tensor("weight", weight)
    backend = resolve_backend(backend, x, weight)
    _CHECKED.check((meta, backend), _check_inputs, x, weight, backend)
    if runs_plain_form(backend, x, weight):  # the body broadcasts over any leading dims: no reshape
        return _rms_norm_infer_torch(x, weight, float(eps))
    return _norm(x, weight.unsqueeze(0).contiguous(), None, eps, backend)


def _check_inputs(x, weight, backend) -> None:
    _check_x(x, backend)
    check_tensor("weight", weight, dtypes=(x.dtype,), shape=(x.shape[-1],))
    check_same_device(x=x, weight=weight)


# rms_norm's checks (~4 us, a third of a decode step's norm) run when its arguments' metadata changes.
_CHECKED = CheckMemo()


def routed_rms_norm(
    x: torch.Tensor,
    modality: torch.Tensor,
    weights: Sequence[torch.Tensor],
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """RMSNorm whose weight is chosen per token: ``y[i] = cast(x[i] * rstd[i]) * weights[modality[i]]``.

    Args:
        x: (..., D) fp16 / bf16 / fp32 (fp64 on the torch backend); any strides.
        modality: int32 / int64 tensor of shape ``x.shape[:-1]``, values in ``[0, E)`` (else
            ValueError on CPU, a device-side assertion on CUDA: no host sync).
        weights: E tensors (D,), x's dtype, each its own Parameter; an expert whose weight does not
            require grad gets none (a frozen text norm), an expert with no tokens gets zeros.
        eps: added to the mean square before the reciprocal square root.
        backend: None (Triton on CUDA, PyTorch otherwise), "torch" or "triton".

    Returns:
        (..., D) in x's dtype.
    """
    check_tensor("x", x)
    check_tensor("modality", modality, dtypes=(torch.int32, torch.int64))
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Iterable):
        raise TypeError("weights must be a sequence of (D,) tensors, one per modality (a list, not a stacked tensor)")
    weights = list(weights)  # also takes an nn.ParameterList
    if not weights:
        raise TypeError("weights must be a non-empty sequence of (D,) tensors, one per modality")
    for e, w in enumerate(weights):
        check_tensor(f"weights[{e}]", w)
    backend = resolve_backend(backend, x, modality, *weights)
    _check_x(x, backend)
    check_tensor("modality", modality, shape=tuple(x.shape[:-1]))
    for e, w in enumerate(weights):
        check_tensor(f"weights[{e}]", w, dtypes=(x.dtype,), shape=(x.shape[-1],))
    check_same_device(x=x, modality=modality, **{f"weights[{e}]": w for e, w in enumerate(weights)})
    E = len(weights)
    check_values_in_range("modality", modality, 0, E - 1, f"[0, {E})")
    # Stacking E weights of size D is cheap; autograd splits dweight back per expert (and skips frozen ones).
    weight_stack = torch.stack(weights)
    return _norm(x, weight_stack, modality.reshape(-1).contiguous(), eps, backend)
