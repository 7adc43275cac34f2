"""SwiGLU activation of the Llama / Qwen2 MLP: ``silu(gate) * up``, math in float32.

``gate`` and ``up`` may be strided views, in particular the two halves of one fused ``(..., 2I)``
gate/up projection (``h[..., :I]``, ``h[..., I:]``): the kernels take a row stride per tensor and read
such views in place. Only inputs whose leading dims cannot be flattened into one row stride, or whose
last dim is not unit-stride, are copied first. Outputs (and the gradients) are contiguous.

The backward recomputes ``sigmoid(gate)`` from the saved inputs instead of saving activations:
``dgate = dy * up * s * (1 + gate * (1 - s))``, ``dup = dy * gate * s``, ``s = sigmoid(gate)``.
Layout of this file: Triton kernels -> launchers -> PyTorch backend -> custom ops + autograd ->
public function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    CheckMemo,
    as_dtype,
    check_same_device,
    check_tensor,
    compute_dtype,
    eager_autograd,
    op_or_body,
    resolve_backend,
    runs_plain_form,
    tensor_metadata,
)
from .rms_norm import _as_rows

_BLOCK_N = 1024  # columns per program
_BLOCK_M = 4  # rows per program


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile(N, I, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols, (rows[:, None] < N) & (cols[None, :] < I)


@triton.jit
def _load(ptr, stride_row, rows, cols, mask):
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, stride_g, stride_u, stride_y, N, I,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, mask = _tile(N, I, BLOCK_M, BLOCK_N)
    g = _load(G, stride_g, rows, cols, mask)
    u = _load(U, stride_u, rows, cols, mask)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, stride_dg, stride_du, N, I,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, mask = _tile(N, I, BLOCK_M, BLOCK_N)
    dy = _load(DY, stride_dy, rows, cols, mask)
    g = _load(G, stride_g, rows, cols, mask)
    u = _load(U, stride_u, rows, cols, mask)
    s = tl.sigmoid(g)
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * g * s
    tl.store(DG + rows[:, None] * stride_dg + cols[None, :], dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows[:, None] * stride_du + cols[None, :], du.to(DU.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers (2-D views: (N, I) with unit column stride)
# ----------------------------------------------------------------------------------------------


def _grid(N: int, I: int) -> tuple[int, int]:
    return triton.cdiv(N, _BLOCK_M), triton.cdiv(I, _BLOCK_N)


def _swiglu_fwd_triton(gate, up):
    N, I = gate.shape
    y = torch.empty((N, I), device=gate.device, dtype=gate.dtype)
    if y.numel():
        torch.library.wrap_triton(_swiglu_fwd_kernel)[_grid(N, I)](
            gate, up, y, gate.stride(0), up.stride(0), y.stride(0), N, I, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
        )
    return y


def _swiglu_bwd_triton(dy, gate, up):
    N, I = gate.shape
    dg = torch.empty((N, I), device=gate.device, dtype=gate.dtype)
    du = torch.empty((N, I), device=gate.device, dtype=gate.dtype)
    if dg.numel():
        torch.library.wrap_triton(_swiglu_bwd_kernel)[_grid(N, I)](
            dy, gate, up, dg, du, dy.stride(0), gate.stride(0), up.stride(0), dg.stride(0), du.stride(0), N, I,
            BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
        )
    return dg, du


# ----------------------------------------------------------------------------------------------
# PyTorch backend
# ----------------------------------------------------------------------------------------------


def _swiglu_fwd_torch(gate, up):
    ct = compute_dtype(gate)
    # silu's output is a fresh buffer, so the multiply runs in place (one N x I temporary less).
    return as_dtype(torch.nn.functional.silu(as_dtype(gate, ct)).mul_(as_dtype(up, ct)), gate.dtype)


def _swiglu_bwd_torch(dy, gate, up):
    ct = compute_dtype(gate)
    g, u, dy = gate.to(ct), up.to(ct), dy.to(ct)
    dy_u = dy * u
    dg = torch.ops.aten.silu_backward(dy_u, g)  # one fused kernel for dy*u * silu'(g)
    # dy * u is spent: du = silu(g) * dy goes into its buffer (each fresh N x I buffer costs its
    # page faults on CPU: (256, 768) fp32, 134 -> 105 us for the backward).
    du = torch.ops.aten.silu.out(g, out=dy_u).mul_(dy)
    return dg.to(gate.dtype), du.to(gate.dtype)


# ----------------------------------------------------------------------------------------------
# Custom ops + autograd
# ----------------------------------------------------------------------------------------------


def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _swiglu_fwd_triton(gate, up)
    return _swiglu_fwd_torch(gate, up)


_swiglu_fwd_op = torch.library.custom_op("mmfuse::swiglu_fwd", mutates_args=())(_swiglu_fwd)


@_swiglu_fwd_op.register_fake
def _(gate, up, backend):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _swiglu_bwd_triton(dy, gate, up)
    return _swiglu_bwd_torch(dy, gate, up)


_swiglu_bwd_op = torch.library.custom_op("mmfuse::swiglu_bwd", mutates_args=())(_swiglu_bwd)


@_swiglu_bwd_op.register_fake
def _(dy, gate, up, backend):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(gate, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dg, du = op_or_body(ctx, _swiglu_bwd_op, _swiglu_bwd)(_as_rows(dy), gate, up, ctx.backend)
    return dg, du, None


_swiglu_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_swiglu_call = eager_autograd(_swiglu_fwd_op, _swiglu_fwd, _setup_context, _backward)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``silu(gate) * up`` in float32, rounded once to the inputs' dtype.

    Args:
        gate, up: (..., I), same shape and dtype (fp16 / bf16 / fp32; fp64 on the torch backend);
            any strides: the halves of a fused ``(..., 2I)`` projection are read in place.
        backend: None (Triton on CUDA, PyTorch otherwise), "torch" or "triton".

    Returns:
        (..., I), contiguous, in the inputs' dtype; differentiable in gate and up.
    """
    meta = tensor_metadata(gate, up)
    if meta is None:
        check_tensor("gate", gate)
        check_tensor("up", up)
    backend = resolve_backend(backend, gate, up)
    _CHECKED.check((meta, backend), _check_inputs, gate, up, backend)
    if runs_plain_form(backend, gate, up):  # elementwise: any shape, no reshape to pay
        return _swiglu_fwd_torch(gate, up)
    shape = gate.shape
    return _swiglu_call(_as_rows(gate), _as_rows(up), backend).view(shape)


def _check_inputs(gate, up, backend) -> None:
    dtypes = FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())
    check_tensor("gate", gate, dtypes=dtypes)
    check_tensor("up", up, dtypes=(gate.dtype,), shape=tuple(gate.shape))
    check_same_device(gate=gate, up=up)
    if gate.dim() == 0 or gate.shape[-1] == 0:
        raise ValueError(f"gate must have shape (..., I) with I > 0, got {tuple(gate.shape)}")


# The checks (~5 us, more than a decode step's silu * up) run when the arguments' metadata changes.
_CHECKED = CheckMemo()
