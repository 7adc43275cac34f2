"""Drop-in layers over the public ops; the models of mmfuse are built from these same modules.

Every weight-bearing layer of the models holds E experts (one Parameter each, so the text expert can
be frozen). With E = 1 it is the plain layer (``F.linear``, RMSNorm, SwiGLU MLP); with E >= 2 each
token goes through its modality's expert (LlamaFusion / Mixture-of-Transformers) at the cost of one
dense layer. Per-batch data (modality ids, routing, RoPE tables, mask intervals, cache positions)
travels in one :class:`BatchContext` built once per forward.

The drop-in modules for other code (``mmfuse.patch`` swaps them into a transformers model) hold the
weights a user expects: :class:`RMSNorm` (``weight`` (D,), ``eps``), :class:`LinearCrossEntropy` (the
fused LM-head loss, holding or given the (V, D) head), :class:`CosineLoss`, :class:`DiffusionLoss`.
Each takes ``backend=None | "torch" | "triton"`` like the ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmfuse.kernels import (
    Routing,
    apply_rope,
    cosine_loss,
    diffusion_loss,
    linear_cross_entropy,
    mixed_attention,
    rms_norm,
    routed_linear,
    routed_rms_norm,
    routed_swiglu_mlp,
    swiglu,
)
from mmfuse.kernels._common import check_backend_name, check_tensor
from mmfuse.kernels.cosine_loss import DEFAULT_EPS as _COSINE_EPS


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


def _check_parameter(name: str, p: object, ndim: int) -> None:
    if not isinstance(p, nn.Parameter):
        raise TypeError(f"{name} must be an nn.Parameter (shared, not copied), got {type(p).__name__}")
    check_tensor(name, p, ndim=ndim)


def _check_eps(eps: float) -> None:
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")


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


def _normalize(x: torch.Tensor, weights: list[torch.Tensor], eps: float, modality: torch.Tensor | None,
               backend: str | None) -> torch.Tensor:
    """The RMSNorm of both norm modules: one weight is the plain op, several are routed by ``modality``."""
    if x.dtype != weights[0].dtype and torch.is_autocast_enabled(x.device.type):
        # Autocast runs norms in float32 (as layer_norm): a bf16 activation meets its fp32 weights.
        x = x.to(weights[0].dtype)
    if len(weights) == 1:
        return rms_norm(x, weights[0], eps, backend=backend)
    return routed_rms_norm(x, modality, weights, eps, backend=backend)


class RMSNorm(nn.Module):
    """RMSNorm as transformers' ``LlamaRMSNorm``: ``cast(x * rsqrt(mean(x**2) + eps)) * weight``.

    Args:
        dim: D, for a fresh ``weight`` of ones; or give ``weight`` instead.
        eps: added to the mean square.
        weight: an existing (D,) Parameter to use (shared, not copied: optimizer state and tied
            weights keep working), e.g. the ``weight`` of the norm this module replaces.
        backend: None (Triton on CUDA, PyTorch otherwise), "torch" or "triton".

    ``forward(x)``: x (..., D) in the weight's dtype -> (..., D).
    """

    def __init__(self, dim: int | None = None, eps: float = 1e-6, *, weight: nn.Parameter | None = None,
                 backend: str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if weight is None:
            if not isinstance(dim, int) or dim <= 0:
                raise ValueError(f"dim must be a positive int when no weight is given, got {dim!r}")
            weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        else:
            _check_parameter("weight", weight, ndim=1)
            if dim is not None and weight.shape[0] != dim:
                raise ValueError(f"weight must have shape ({dim},), got {tuple(weight.shape)}")
        _check_eps(eps)
        check_backend_name(backend)  # a bad name fails when the module is built, not at its first forward
        self.weight, self.eps, self.backend = weight, float(eps), backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _normalize(x, [self.weight], self.eps, None, self.backend)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}" + (f", backend={self.backend!r}" if self.backend else "")


class RoutedRMSNorm(nn.Module):
    """RMSNorm with one (D,) weight per expert; E = 1 is :class:`RMSNorm` (the same code path)."""

    def __init__(self, dim: int, eps: float = 1e-6, num_experts: int = 1):
        super().__init__()
        self.eps = eps
        self.weights = nn.ParameterList([nn.Parameter(torch.ones(dim)) for _ in range(num_experts)])

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        return _normalize(x, list(self.weights), self.eps, modality, None)


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
        q, k, v = self._project(x, ctx)
        out = mixed_attention(q, k, v, ctx.kv_start, ctx.kv_end)
        return self.o(out.transpose(1, 2).reshape(B, L, -1), ctx.modality, ctx.routing)

    def fill_cache(self, x: torch.Tensor, ctx: BatchContext) -> None:
        """Only write x's keys and values (x (B, L, dim), normed) into the cache at ``ctx.input_pos``:
        all a prefix's last layer has to do when nothing reads its output."""
        if self.kv_cache is None:
            raise ValueError("fill_cache needs a KV cache: call it inside Decoder.kv_cache(...)")
        self._project(x, ctx)

    def _project(self, x: torch.Tensor, ctx: BatchContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, Hq, L, Dh) rotated, and the keys / values to attend to: x's own (B, Hkv, L, Dh), or,
        with a cache, the whole cache after x's are written into it."""
        B, L, _ = x.shape
        qkv = self.qkv(x, ctx.modality, ctx.routing).view(B, L, -1, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), ctx.cos, ctx.sin)
        v = v.transpose(1, 2)
        if self.kv_cache is not None:
            if ctx.input_pos is None:
                raise ValueError("this layer has a KV cache: pass input_pos (the cache slots of the new tokens)")
            k, v = self.kv_cache.update(ctx.input_pos, k, v)
        return q, k, v


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


_REDUCTIONS = ("mean", "sum", "none")


class LinearCrossEntropy(nn.Module):
    """The fused LM head + cross-entropy, ``F.cross_entropy(hidden @ weight.T, labels)`` without the
    (N, V) logits (:func:`mmfuse.kernels.linear_cross_entropy`).

    The (V, D) head is held by the module or given at each call:

    * ``LinearCrossEntropy(D, V)``: a fresh ``weight`` Parameter (initialised like ``nn.Linear``);
    * ``LinearCrossEntropy(weight=lm_head.weight)``: that Parameter, shared (e.g. a tied embedding);
    * ``LinearCrossEntropy()``: none held; pass ``weight`` to ``forward``.

    Args:
        ignore_index: label of positions without a loss.
        label_smoothing: as in ``F.cross_entropy``, in [0, 1].
        z_loss: PaLM's z-loss weight (adds ``z_loss * logsumexp(logits) ** 2`` per row).
        reduction: "mean" (over non-ignored rows; 0, not NaN, when every row is ignored), "sum" or
            "none" (per-row losses, labels' shape).
        backend: None (Triton on CUDA, PyTorch otherwise), "torch" or "triton".

    Under ``torch.autocast`` hidden and weight are cast to the autocast dtype, as ``F.linear`` would.
    """

    def __init__(self, in_features: int | None = None, vocab_size: int | None = None, *,
                 weight: nn.Parameter | None = None, ignore_index: int = -100, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, reduction: str = "mean", backend: str | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if weight is not None:
            _check_parameter("weight", weight, ndim=2)
            if (in_features, vocab_size) != (None, None) and (vocab_size, in_features) != tuple(weight.shape):
                raise ValueError(f"weight must have shape (vocab_size={vocab_size}, in_features={in_features}), "
                                 f"got {tuple(weight.shape)}")
        elif (in_features is None) != (vocab_size is None):
            raise ValueError("give both in_features and vocab_size (to hold a fresh weight), or neither")
        elif in_features is not None:
            weight = nn.Parameter(torch.empty(vocab_size, in_features, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(weight, a=5**0.5)  # nn.Linear's default
        self.weight = weight
        # ignore_index, label_smoothing and z_loss are checked by the op (at the first call).
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        check_backend_name(backend)
        self.ignore_index, self.label_smoothing, self.z_loss = ignore_index, float(label_smoothing), float(z_loss)
        self.reduction, self.backend = reduction, backend

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None, *,
                num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        """The loss: 0-dim, or labels' shape for reduction "none"; fp32 (fp64 for fp64 inputs).

        Args:
            hidden: (..., D) final hidden states (already lined up with ``labels``).
            labels: int (...), hidden's leading shape; values in [0, V) or ``ignore_index``.
            weight: (V, D) head, only when the module holds none.
            num_items_in_batch: the denominator of a "mean" instead of this call's count of
                non-ignored labels (transformers' convention under gradient accumulation: the
                loss is ``sum / num_items_in_batch``).
        """
        if (weight is None) == (self.weight is None):
            raise ValueError("weight: pass the (V, D) head to forward exactly when the module holds none "
                             f"(it holds {'one' if self.weight is not None else 'none'})")
        weight = self.weight if weight is None else weight
        if num_items_in_batch is not None and self.reduction != "mean":
            raise ValueError(f"num_items_in_batch replaces the denominator of reduction='mean', "
                             f"not of {self.reduction!r}")
        hidden, (weight,) = _autocast(hidden, [weight])
        reduction = "sum" if num_items_in_batch is not None else self.reduction
        loss = linear_cross_entropy(hidden, weight, labels, self.ignore_index, label_smoothing=self.label_smoothing,
                                    z_loss=self.z_loss, reduction=reduction, backend=self.backend)
        if num_items_in_batch is None:
            return loss
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch

    def extra_repr(self) -> str:
        head = f"weight={tuple(self.weight.shape)}" if self.weight is not None else "weight given per call"
        return (f"{head}, ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, reduction={self.reduction!r}")


class CosineLoss(nn.Module):
    """Mean over the selected rows of ``1 - cos(pred, target)`` (:func:`mmfuse.kernels.cosine_loss`).

    ``forward(pred, target, mask=None)``: pred/target (..., D), mask bool (...,) or None -> 0-dim loss
    in pred's dtype. ``eps`` bounds each norm from below, as in ``F.cosine_similarity``.
    """

    def __init__(self, eps: float = _COSINE_EPS, *, backend: str | None = None):
        super().__init__()
        _check_eps(eps)
        check_backend_name(backend)
        self.eps, self.backend = float(eps), backend

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return cosine_loss(pred, target, mask, eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class DiffusionLoss(nn.Module):
    """Weighted diffusion MSE ``mean_b w_b * mean((pred_b - target_b) ** 2)`` (:func:`mmfuse.kernels.diffusion_loss`).

    ``forward(pred, target, weights=None)``: pred/target (B, ...) noise / velocity / flow predictions
    and targets, weights (B,) or None -> 0-dim loss in pred's dtype.
    """

    def __init__(self, *, backend: str | None = None):
        super().__init__()
        check_backend_name(backend)
        self.backend = backend

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return diffusion_loss(pred, target, weights, backend=self.backend)
