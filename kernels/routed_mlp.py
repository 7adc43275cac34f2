"""LlamaFusion's routed layers built from the routed GEMM: the SwiGLU feed-forward and the QKV projection.

Both are compositions of :func:`mmfuse.kernels.routed_linear.apply_routed_linear` over one shared
:class:`~mmfuse.kernels.routed_linear.Routing`, so every token meets exactly one expert per GEMM and
the layer costs what the dense layer costs.

* :func:`routed_swiglu_mlp`: per expert, the gate and up projections are ONE routed GEMM against a
  fused (2 * I, D) weight (gate rows first, then up rows, as in ``torch.cat([gate_w, up_w])``).
  Its output stays in routing order, ``silu(gate) * up`` runs there as a separate elementwise step
  (not fused into the GEMM epilogue), and the down projection reads it without a gather and writes
  token order: the token permutation is applied once on the way in and once on the way out.
* :func:`routed_qkv_projection`: one routed GEMM against a fused ((Hq + 2 Hkv) * Dh, D) weight per
  expert (q rows, then k rows, then v rows), split into q, k, v views.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ._common import check_tensor, resolve_backend
from .routed_linear import Routing, _check_experts, _check_inputs, apply_routed_linear, build_routing


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
    gate_up = apply_routed_linear(x2d, routing, gate_up_weights, None, backend, sorted_output=True)
    gate, up = gate_up.split(inter, dim=-1)
    hidden = F.silu(gate) * up  # routing order: the down projection needs no gather
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
