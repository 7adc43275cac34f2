"""LlamaFusion's routed layers built from the routed GEMM: the SwiGLU feed-forward and the QKV projection.

Both are compositions of :func:`mmfuse.kernels.routed_linear.apply_routed_linear` over one shared
:class:`~mmfuse.kernels.routed_linear.Routing`, so every token meets exactly one expert per GEMM and
the layer costs what the dense layer costs.

* :func:`routed_swiglu_mlp`: per expert, the gate and up projections are ONE routed GEMM against a
  fused (2 * I, D) weight (gate rows first, then up rows, as in ``torch.cat([gate_w, up_w])``) with
  ``silu(gate) * up`` in its epilogue (Triton: each tile accumulates its gate and up columns in the
  same pass over K; the pre-activations are written only when a backward will need them). Its
  output stays in routing order, so the down projection reads it without a gather and writes token
  order: the token permutation is applied once on the way in and once on the way out.
* :func:`routed_qkv_projection`: one routed GEMM against a fused ((Hq + 2 Hkv) * Dh, D) weight per
  expert (q rows, then k rows, then v rows), split into q, k, v views.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._common import check_tensor, eager_autograd, op_or_body, resolve_backend, runs_body_directly
from .routed_linear import (
    Routing,
    _check_experts,
    _check_inputs,
    _grouped_gemm_torch,
    _grouped_gemm_triton,
    _routed_linear_bwd,
    _routed_linear_bwd_op,
    _row_ranges,
    _to_sorted,
    apply_routed_linear,
    build_routing,
)
from .swiglu import _swiglu_bwd, _swiglu_bwd_op, _swiglu_fwd_torch


# ----------------------------------------------------------------------------------------------
# Gate/up GEMM with the SwiGLU activation in its epilogue (custom op + autograd)
# ----------------------------------------------------------------------------------------------


def _gate_up_swiglu(
    x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor | None, offsets: torch.Tensor, tiles: torch.Tensor,
    host_offsets: torch.Tensor | None, weights: list[torch.Tensor], keep_preact: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(gate) * up (N, I), pre-activations gate | up (N, 2I) or empty), rows in routing order."""
    if backend == "triton":
        return _grouped_gemm_triton(x, order, tiles, weights, [], transpose_weights=False, sorted_in=False,
                                    sorted_out=True, swiglu=True, store_preact=keep_preact)
    pre = _grouped_gemm_torch(_to_sorted(x, order, False), _row_ranges(host_offsets, offsets), weights, [],
                              transpose_weights=False)
    gate, up = pre.chunk(2, dim=-1)
    return _swiglu_fwd_torch(gate, up), (pre if keep_preact else pre.new_empty(0, 0))


_gate_up_swiglu_op = torch.library.custom_op("mmfuse::routed_gate_up_swiglu", mutates_args=())(_gate_up_swiglu)


@_gate_up_swiglu_op.register_fake
def _(x, order, inverse, offsets, tiles, host_offsets, weights, keep_preact, backend):
    inter = weights[0].shape[0] // 2
    return x.new_empty((x.shape[0], inter)), x.new_empty((x.shape[0], 2 * inter) if keep_preact else (0, 0))


def _gate_up_setup_context(ctx, inputs, output):
    x, order, inverse, offsets, tiles, host_offsets, weights, keep_preact, backend = inputs
    ctx.save_for_backward(x, order, inverse, offsets, tiles, host_offsets, output[1], *weights)
    ctx.backend = backend
    ctx.weight_needs_grad = [w.requires_grad for w in weights]
    ctx.mark_non_differentiable(output[1])


def _gate_up_backward(ctx, grad_hidden, _grad_pre):
    x, order, inverse, offsets, tiles, host_offsets, pre, *weights = ctx.saved_tensors
    if pre.numel() == 0 and grad_hidden.numel():
        raise RuntimeError("routed SwiGLU: the forward ran without keeping pre-activations (no grad was needed)")
    gate, up = pre.chunk(2, dim=-1)
    swiglu_bwd = op_or_body(ctx, _swiglu_bwd_op, _swiglu_bwd)
    d_gate, d_up = swiglu_bwd(grad_hidden.contiguous(), gate, up, ctx.backend)
    d_pre = torch.cat([d_gate, d_up], dim=-1)  # laid out like the fused weight's rows: gate | up
    need_dx = ctx.needs_input_grad[0]
    linear_bwd = op_or_body(ctx, _routed_linear_bwd_op, _routed_linear_bwd)
    dx, dws, _ = linear_bwd(d_pre, x, order, inverse, offsets, tiles, host_offsets, weights, False, True, need_dx,
                            ctx.weight_needs_grad, [False] * len(weights), ctx.backend)
    dws = iter(dws)
    grad_w = [next(dws) if want else None for want in ctx.weight_needs_grad]
    return dx if need_dx else None, None, None, None, None, None, grad_w, None, None


_gate_up_swiglu_op.register_autograd(_gate_up_backward, setup_context=_gate_up_setup_context)
_gate_up_swiglu_call = eager_autograd(_gate_up_swiglu_op, _gate_up_swiglu, _gate_up_setup_context, _gate_up_backward)


def _routing_for(x, modality, weights, biases, routing, backend, weights_name, biases_name) -> Routing:
    _check_inputs(x, modality, weights, biases, routing, backend, weights_name=weights_name, biases_name=biases_name)
    return routing if routing is not None else build_routing(modality, len(weights), backend=backend)


def routed_swiglu_mlp(
    x: torch.Tensor,
    modality: torch.Tensor,
    gate_up_weights: Sequence[torch.Tensor],
    down_weights: Sequence[torch.Tensor],
    *,
    routing: Routing | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """LlamaFusion's per-modality SwiGLU FFN: ``down_e(silu(gate_e(x)) * up_e(x))`` with e = modality.

    Args:
        x: (..., D) fp16 / bf16 / fp32 (fp64 on the torch backend).
        modality: integer tensor of shape ``x.shape[:-1]``, values in ``[0, E)``.
        gate_up_weights: E tensors (2 * I, D): rows ``[:I]`` are the gate projection, rows ``[I:]``
            the up projection (``torch.cat([gate_proj.weight, up_proj.weight])``).
        down_weights: E tensors (D, I).
        routing: :func:`build_routing` of this batch, shared with the other layers; built when None.
        backend: None (Triton on CUDA, PyTorch otherwise), "torch" or "triton".

    Returns:
        (..., D) in x's dtype. Experts whose weights do not require grad get no weight gradient.
    """
    backend = resolve_backend(backend, x)
    routing = _routing_for(x, modality, gate_up_weights, None, routing, backend, "gate_up_weights", "")
    if gate_up_weights[0].shape[0] % 2:
        raise ValueError(f"gate_up_weights[e] must have shape (2 * I, D), got {tuple(gate_up_weights[0].shape)}")
    inter = gate_up_weights[0].shape[0] // 2
    _check_experts("down_weights", down_weights, len(gate_up_weights), 2, x)
    check_tensor("down_weights[0]", down_weights[0], shape=(x.shape[-1], inter))

    x2d = x.reshape(-1, x.shape[-1])
    keep_preact = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in gate_up_weights))
    weights = list(gate_up_weights)
    gate_up = _gate_up_swiglu if runs_body_directly(backend, x, *weights) else _gate_up_swiglu_call
    hidden, _ = gate_up(x2d, routing.order, routing.inverse, routing.offsets, routing.tiles,
                        routing.host_offsets, weights, keep_preact, backend)
    # hidden is in routing order: the down projection reads it without a gather.
    y = apply_routed_linear(hidden, routing, down_weights, None, backend, sorted_input=True)
    return y.reshape(x.shape)


def routed_qkv_projection(
    x: torch.Tensor,
    modality: torch.Tensor,
    qkv_weights: Sequence[torch.Tensor],
    qkv_biases: Sequence[torch.Tensor] | None = None,
    *,
    num_heads: int,
    num_kv_heads: int,
    routing: Routing | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-modality fused QKV projection: one routed GEMM, split into q, k, v.

    Args:
        x: (..., D).
        modality: integer tensor of shape ``x.shape[:-1]``, values in ``[0, E)``.
        qkv_weights: E tensors ((Hq + 2 * Hkv) * Dh, D): q rows, then k rows, then v rows
            (``torch.cat([q_proj.weight, k_proj.weight, v_proj.weight])``).
        qkv_biases: None or E tensors ((Hq + 2 * Hkv) * Dh,) in the same order (Qwen2 has them).
        num_heads, num_kv_heads: Hq and Hkv; Dh is inferred.
        routing, backend: as :func:`routed_swiglu_mlp`.

    Returns:
        q (..., Hq, Dh), k (..., Hkv, Dh), v (..., Hkv, Dh): views into one (..., (Hq + 2 Hkv) * Dh)
        output, in x's dtype.
    """
    backend = resolve_backend(backend, x)
    routing = _routing_for(x, modality, qkv_weights, qkv_biases, routing, backend, "qkv_weights", "qkv_biases")
    if num_heads < 1 or num_kv_heads < 1:
        raise ValueError(f"num_heads and num_kv_heads must be >= 1, got {num_heads} and {num_kv_heads}")
    heads = num_heads + 2 * num_kv_heads
    out_features = qkv_weights[0].shape[0]
    if out_features % heads:
        raise ValueError(f"qkv_weights[e] must have (num_heads + 2 * num_kv_heads) * head_dim = {heads} * Dh rows, "
                         f"got {out_features}")
    head_dim = out_features // heads
    qkv = apply_routed_linear(x.reshape(-1, x.shape[-1]), routing, qkv_weights, qkv_biases, backend)
    qkv = qkv.view(*x.shape[:-1], heads, head_dim)
    return qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=-2)
