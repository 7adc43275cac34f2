"""Drop-in layers over the public ops; the models of mmfuse are built from these same modules.

Every weight-bearing layer holds E experts (one Parameter each, so the text expert can be frozen).
With E = 1 it is the plain layer (``F.linear``, RMSNorm, SwiGLU MLP); with E >= 2 each token goes
through its modality's expert (LlamaFusion / Mixture-of-Transformers) at the cost of one dense layer.
Per-batch data (modality ids, routing, RoPE tables, mask intervals, cache positions) travels in one
:class:`BatchContext` built once per forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmfuse.kernels import (
    Routing,
    apply_rope,
    mixed_attention,
    rms_norm,
    routed_linear,
    routed_rms_norm,
    routed_swiglu_mlp,
    swiglu,
)


@dataclass
class BatchContext:
    """What every layer of one forward pass shares.

    Attributes:
        modality: int (B, L) expert id per token, or None when every layer has one expert.
        routing: tokens sorted by modality (``build_routing``), or None with ``modality`` None.
        cos, sin: RoPE tables (B, L, Dh).
        kv_start, kv_end: int32 (B, L) key interval of each query (indices into the cache if any).
        input_pos: int64 (L,) cache slots the new keys/values are written to, or None without a cache.
    """

    modality: torch.Tensor | None
    routing: Routing | None
    cos: torch.Tensor
    sin: torch.Tensor
    kv_start: torch.Tensor
    kv_end: torch.Tensor
    input_pos: torch.Tensor | None = None


def _autocast(x: torch.Tensor, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Under torch.autocast, the routed GEMMs run in the autocast dtype like ``F.linear`` does (custom
    ops are not cast automatically); otherwise the tensors pass through."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, tensors
    dtype = torch.get_autocast_dtype(device)
    return x.to(dtype), [t.to(dtype) for t in tensors]


class RoutedLinear(nn.Module):
    """``y = x @ W[m].T + b[m]`` with one (out, in) weight per expert; E = 1 is ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, num_experts: int = 1):
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(out_features, in_features)) for _ in range(num_experts)])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(out_features)) for _ in range(num_experts)]) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in self.weights:
            if not w.is_meta:
                nn.init.kaiming_uniform_(w, a=5**0.5)

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None, routing: Routing | None = None) -> torch.Tensor:
        if len(self.weights) == 1:
            return F.linear(x, self.weights[0], self.biases[0] if self.biases is not None else None)
        biases = list(self.biases) if self.biases is not None else []
        x, params = _autocast(x, list(self.weights) + biases)
        experts = len(self.weights)
        return routed_linear(x, modality, params[:experts], params[experts:] or None, routing=routing)


class RoutedRMSNorm(nn.Module):
    """RMSNorm with one (D,) weight per expert; E = 1 is Llama's RMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-6, num_experts: int = 1):
        super().__init__()
        self.eps = eps
        self.weights = nn.ParameterList([nn.Parameter(torch.ones(dim)) for _ in range(num_experts)])

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        if len(self.weights) == 1:
            return rms_norm(x, self.weights[0], self.eps)
        return routed_rms_norm(x, modality, list(self.weights), self.eps)


class RoutedMLP(nn.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``; gate and up fused into one (2I, D) weight."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int = 1):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.gate_up = RoutedLinear(dim, 2 * hidden_dim, num_experts=num_experts)
        self.down = RoutedLinear(hidden_dim, dim, num_experts=num_experts)

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None, routing: Routing | None = None) -> torch.Tensor:
        if len(self.gate_up.weights) == 1:
            gate, up = self.gate_up(x).split(self.hidden_dim, dim=-1)
            return self.down(swiglu(gate, up))
        x, weights = _autocast(x, list(self.gate_up.weights) + list(self.down.weights))
        experts = len(self.gate_up.weights)
        return routed_swiglu_mlp(x, modality, weights[:experts], weights[experts:], routing=routing)


class KVCache(nn.Module):
    """Static, preallocated keys and values (B, Hkv, max_len, Dh), written at ``input_pos``."""

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # index_copy_ takes a position tensor, so one compiled decode step serves every position.
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


class MixedAttention(nn.Module):
    """Self-attention under the interval mask: fused QKV, RoPE, GQA, optional KV cache, output projection."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, qkv_bias: bool = False,
                 num_experts: int = 1):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.qkv = RoutedLinear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=qkv_bias, num_experts=num_experts)
        self.o = RoutedLinear(num_heads * head_dim, dim, num_experts=num_experts)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        """x (B, L, dim) -> (B, L, dim)."""
        B, L, _ = x.shape
        qkv = self.qkv(x, ctx.modality, ctx.routing).view(B, L, -1, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), ctx.cos, ctx.sin)
        v = v.transpose(1, 2)
        if self.kv_cache is not None:
            if ctx.input_pos is None:
                raise ValueError("this layer has a KV cache: pass input_pos (the cache slots of the new tokens)")
            k, v = self.kv_cache.update(ctx.input_pos, k, v)
        out = mixed_attention(q, k, v, ctx.kv_start, ctx.kv_end)
        return self.o(out.transpose(1, 2).reshape(B, L, -1), ctx.modality, ctx.routing)
