"""transformers integration: ``from_pretrained(..., attn_implementation="mmfuse")``.

``register()`` (run by ``import mmfuse``) adds mmfuse's attention to transformers' attention registry,
with transformers' SDPA mask builder, so the function receives a boolean mask (or None when the mask
is purely causal). The masks transformers builds for Llama / Qwen2 (causal, left or right padding,
packed sequences, a KV cache, static or dynamic) are one key interval per query, which
:func:`mixed_attention` takes directly -- in whatever form they come: bool, or float additive
(0 / -inf), 4D custom masks included. Any other valid mask (padding holes inside a row, an additive
bias, a mask under ``torch.compile``, where the interval check would be a host sync) is computed by
transformers' own SDPA attention, with a one-time warning naming the reason: the same result, never
an exception. Gemma 2's attention-logit soft-capping (``softcap``) runs in the kernel; sliding windows
(Mistral, Qwen2, Gemma 2 / 3) come in the mask, or, when transformers passes no mask, from
``sliding_window``.
"""
from __future__ import annotations

import warnings
import weakref

import torch

from mmfuse.kernels import mixed_attention

ATTN_IMPLEMENTATION = "mmfuse"
# transformers hands every layer of a forward the same mask tensor (one per layer type: Gemma's and
# Qwen2's sliding-window layers get a second one): its intervals (and their contiguity check, a host
# sync) are worked out once, for the first layer of each. Newest first: (mask weakref, key, result).
_last_intervals: list[tuple] = []
_KEPT_MASKS = 2
_warned: set[str] = set()


class MaskNotIntervals(ValueError):
    """A valid attention mask that is not one key interval per query (the caller falls back to SDPA)."""


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as is; a float additive one (0 = attend, -inf or the dtype's minimum = blocked) as bool."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise ValueError(f"attention_mask must be a bool or float mask, got {mask.dtype}")
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool(((mask == 0) | blocked).all()):
        raise MaskNotIntervals("a float attention_mask with values other than 0 and -inf (an additive bias)")
    return ~blocked


def mask_to_intervals(mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int,
                      causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A bool or float-additive mask (B or 1, 1, Lq, Lk) -> int32 (B, Lq) ``kv_start, kv_end``.

    ``None`` means causal over the cache (query i is key ``kv_len - q_len + i``), or full attention
    when ``causal`` is False.

    Raises:
        MaskNotIntervals: a row whose allowed keys are not one contiguous run, or an additive bias.
        ValueError: a mask of another shape or dtype.
    """
    device = mask.device if mask is not None else None
    if mask is None:
        steps = torch.arange(q_len, device=device)
        end = steps + kv_len - q_len + 1 if causal else torch.full_like(steps, kv_len)
        return torch.zeros(batch, q_len, dtype=torch.int32, device=device), end.to(torch.int32).expand(batch, q_len)
    if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (q_len, kv_len):
        raise ValueError(f"attention_mask must be a (B, 1, {q_len}, {kv_len}) mask, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    allowed = _bool_mask(mask)[:, 0].expand(batch, q_len, kv_len)
    count = allowed.sum(-1)
    cols = torch.arange(kv_len, device=mask.device)
    start = torch.where(allowed, cols, kv_len).amin(-1)
    end = torch.where(allowed, cols + 1, 0).amax(-1)
    nonempty = count > 0
    if not torch.compiler.is_compiling() and bool((nonempty & (end - start != count)).any()):
        raise MaskNotIntervals("an attention_mask that is not one contiguous key interval per query (padding "
                               "inside a row)")
    start = torch.where(nonempty, start, 0)
    end = torch.where(nonempty, end, 0)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def _intervals_of(mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int,
                  causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mask_to_intervals`, reused while the same mask object comes back unmodified (a mask that
    is not intervals too: every layer then falls back without checking again)."""
    if mask is None:
        return mask_to_intervals(mask, batch, q_len, kv_len, causal)
    if torch.compiler.is_compiling():
        raise MaskNotIntervals("an explicit attention_mask under torch.compile (checking it would sync with the host)")
    key = (mask._version, batch, q_len, kv_len, causal)
    for ref, last_key, last in _last_intervals:
        if ref() is mask and last_key == key:
            if isinstance(last, MaskNotIntervals):
                raise last
            return last
    try:
        result = mask_to_intervals(mask, batch, q_len, kv_len, causal)
    except MaskNotIntervals as why:
        _remember(mask, key, why)
        raise
    _remember(mask, key, result)
    return result


def _remember(mask: torch.Tensor, key: tuple, result) -> None:
    _last_intervals.insert(0, (weakref.ref(mask), key, result))
    del _last_intervals[_KEPT_MASKS:]


def mmfuse_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q (B, H, Lq, D), k/v (B, Hkv, Lk, D) -> (B, Lq, H, D).

    ``kwargs`` may hold ``softcap`` (Gemma 2: scores become ``softcap * tanh(scores / softcap)``) and
    ``sliding_window`` (applied here only when there is no mask: transformers' masks already hold it).
    """
    if dropout and module.training:
        raise ValueError("the mmfuse attention has no dropout; set attention_dropout=0")
    B, _, q_len, _ = query.shape
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    softcap, window = kwargs.get("softcap"), kwargs.get("sliding_window")
    try:
        kv_start, kv_end = _intervals_of(attention_mask, B, q_len, key.shape[2], causal)
    except MaskNotIntervals as why:
        if softcap is not None:  # transformers' SDPA has no soft-capping
            return _softcapped_dense(query, key, value, attention_mask, scaling, softcap, str(why)), None
        return _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, str(why), **kwargs)
    if attention_mask is None and window and causal:  # key j is seen from query i when i - window < j <= i
        kv_start = torch.maximum(kv_start, kv_end - window).clamp_min_(0)
    out = mixed_attention(query, key, value, kv_start.to(query.device), kv_end.to(query.device), scaling,
                          softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


def _softcapped_dense(query, key, value, mask, scaling, softcap, reason: str) -> torch.Tensor:
    """Soft-capped attention over an explicit mask that is not intervals, as transformers' Gemma 2 eager
    attention computes it (softmax in float32), warned once per reason; -> (B, Lq, H, D)."""
    _warn_once(f"{reason}; computing the soft-capped attention densely instead")
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).nan_to_num(0.0).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def _warn_once(message: str) -> None:
    if message not in _warned and not torch.compiler.is_compiling():
        _warned.add(message)
        warnings.warn(f"mmfuse attention: {message}", stacklevel=4)


def _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, reason: str, **kwargs):
    """transformers' own SDPA attention for a mask the intervals cannot express (warned once per reason)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _warn_once(f"{reason}; computing it with transformers' SDPA attention instead")
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register() -> None:
    """Make ``attn_implementation="mmfuse"`` available to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, mmfuse_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
