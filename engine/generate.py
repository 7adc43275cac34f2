"""Text generation with a static KV cache: one prefill, then one-token decode steps.

The decode step takes the cache position as a tensor and reads no value back to the host, so it is
compiled once per model (``compile=True``: ``torch.compile``, with CUDA graphs on GPU) and replayed
for every position of every later call. Left-padded prompts of different lengths share a batch: each
row's key interval starts at its first real token, so padding is never attended. The KV cache lives
for the call only: the model is left as it was.

A prompt with images in it is prefilled from a :class:`PromptLayout` (embeddings with the images'
positions filled in by the family, and the mask intervals that make each image span bidirectional);
the decode steps after it are the same text steps.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Sequence

import torch

from mmfuse._progress import progress_bar
from mmfuse.kernels._common import check_values_in_range
from mmfuse.models.decoder import Decoder, PromptLayout

# model -> its compiled decode step, built on the first compile=True call and reused by every later one
_COMPILED_STEPS: "weakref.WeakKeyDictionary[Decoder, Callable]" = weakref.WeakKeyDictionary()


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) float logits -> (B,) int64 next tokens: greedy at temperature 0, else filtered sampling.

    ``noise``: (B, V) Exp(1) draws to sample with (default: drawn here from ``generator``); a
    compiled step takes them as an input, since torch.compile cannot trace a user's generator.
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    # argmax(p / Exp(1)) draws from p without torch.multinomial's host sync.
    q = torch.empty_like(probs).exponential_(1.0, generator=generator) if noise is None else noise
    return (probs / q).argmax(dim=-1)


def decode_step(model: Decoder, tokens: torch.Tensor, pos: torch.Tensor, positions: torch.Tensor,
                first: torch.Tensor, noise: torch.Tensor | None, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None) -> torch.Tensor:
    """tokens (B, T) written to cache slots ``pos`` (T,) at RoPE ``positions`` (B, T) -> next token (B,).

    Each row sees keys ``[first, pos + 1)`` (``first`` (B, 1) int32: its first real token).
    ``noise``: see :func:`sample_next`.
    """
    hidden = text_step(model, tokens, pos, positions, first)
    return sample_next(model.logits(hidden[:, -1]), temperature, top_k, top_p, noise=noise)


def text_step(model: Decoder, tokens: torch.Tensor, pos: torch.Tensor, positions: torch.Tensor,
              first: torch.Tensor) -> torch.Tensor:
    """Text tokens (B, T) into cache slots ``pos`` (T,), causal from ``first`` (B, 1) -> hidden (B, T, dim)."""
    B, T = tokens.shape
    kv_start = first.expand(B, T)
    kv_end = (pos + 1).to(torch.int32).expand(B, T)
    # A multi-expert (fusion) decoder routes generated text through its text expert.
    modality = torch.zeros_like(tokens) if model.config.num_experts > 1 else None
    return model(tokens, position_ids=positions, kv_start=kv_start, kv_end=kv_end, modality=modality, input_pos=pos)


def prefill_layout(model: Decoder, layout: PromptLayout, noise: torch.Tensor | None, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Run a laid-out prompt into cache slots ``0..P-1`` -> the first new token (B,)."""
    return sample_next(model.logits(model.prefill(layout)[:, -1]), temperature, top_k, top_p,
                       noise=noise)


def compiled_decode_step(model: Decoder) -> Callable:
    """The model's :func:`decode_step` under ``torch.compile(fullgraph=True)``, built once per model
    (fullgraph: a graph break would mean a host round trip inside the step)."""
    step = _COMPILED_STEPS.get(model)
    if step is None:
        cuda = model.embed.weight.device.type == "cuda"
        step = torch.compile(decode_step, mode="reduce-overhead" if cuda else None, dynamic=False, fullgraph=True)
        _COMPILED_STEPS[model] = step
    return step


def _check_layout(model: Decoder, layout: PromptLayout) -> None:
    B, P = layout.input_ids.shape
    positions = (3, B, P) if model.config.mrope_section and layout.position_ids.dim() == 3 else (B, P)
    want = {"modality": (B, P), "kv_start": (B, P), "kv_end": (B, P), "position_ids": positions, "first": (B,),
            "inputs_embeds": (B, P, model.config.dim)}
    for name, shape in want.items():
        if tuple(getattr(layout, name).shape) != shape:
            raise ValueError(f"layout.{name} must have shape {shape}, got {tuple(getattr(layout, name).shape)}")


def _stop_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]


def _check_args(model, input_ids, max_new_tokens, attention_mask, temperature, top_k, top_p) -> None:
    if not isinstance(model, Decoder):
        raise TypeError(f"model must be an mmfuse Decoder, got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an integer tensor (B, L), got {getattr(input_ids, 'shape', input_ids)}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token per row")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    limit = model.config.max_seq_len
    if limit and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"input_ids ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
                         f"model's context of {limit} positions")
    vocab = model.config.vocab_size
    check_values_in_range("input_ids", input_ids, 0, vocab - 1, f"[0, {vocab}) (the vocabulary)")


@torch.no_grad()
def generate(
    model: Decoder,
    input_ids: torch.Tensor | None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    layout: PromptLayout | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
    progress: bool | None = False,
) -> torch.Tensor:
    """Continue ``input_ids`` (B, L) by ``max_new_tokens`` tokens; returns (B, L + max_new_tokens).

    Args:
        temperature: 0 = greedy; otherwise sample from softmax(logits / temperature) after the
            ``top_k`` / ``top_p`` filters.
        eos_token_id: a stop token, or several; a row that emits one keeps emitting the first of them
            (the padding transformers uses when the pad token is the EOS token); generation stops
            early once every row has.
        attention_mask: (B, L) 1 for real tokens, 0 for left padding (prompts of different lengths).
        layout: a prompt with images in it, laid out by the family (``input_ids`` None and no
            ``attention_mask``: both come from it).
        compile: compile the decode step (CUDA graphs on GPU); built once per model.
        progress: show a progress bar (None: only when stderr is a terminal).
    """
    if layout is not None:
        if input_ids is not None or attention_mask is not None:
            raise ValueError("give layout alone: its input_ids and left padding are the prompt's")
        input_ids, attention_mask = layout.input_ids, layout.attention_mask
    _check_args(model, input_ids, max_new_tokens, attention_mask, temperature, top_k, top_p)
    if layout is not None:
        _check_layout(model, layout)
    stops = _stop_ids(eos_token_id)
    B, L = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        first = torch.zeros(B, 1, dtype=torch.int32, device=device)
        position_ids = torch.arange(L, device=device).expand(B, L)
    else:
        mask = attention_mask.to(device).long()
        first = (L - mask.sum(dim=1, keepdim=True)).to(torch.int32)  # left padding: first real token
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0) if layout is None else layout.position_ids
    out = torch.empty(B, L + max_new_tokens, dtype=input_ids.dtype, device=device)
    out[:, :L] = input_ids
    if max_new_tokens == 0:
        return out

    def draw_noise() -> torch.Tensor | None:
        """The sampling noise of one step, drawn outside the (compiled) step; None when greedy."""
        if temperature <= 0.0:
            return None
        return torch.empty(B, model.config.vocab_size, device=device).exponential_(1.0, generator=generator)

    decode: Callable = compiled_decode_step(model) if compile else decode_step
    sampling = (temperature, top_k, top_p)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # the next position follows the row's last one (multimodal RoPE: the largest of every stream, as an
    # image's height / width positions may run past the text after it)
    next_pos = position_ids[:, -1:] + 1 if position_ids.dim() == 2 else position_ids.amax(dim=(0, 2))[:, None] + 1
    stop_ids = torch.tensor(stops, dtype=input_ids.dtype, device=device)
    with model.kv_cache(B, L + max_new_tokens):
        if layout is not None:
            tok = prefill_layout(model, layout, draw_noise(), *sampling)
        else:
            tok = decode_step(model, input_ids, torch.arange(L, device=device), position_ids, first, draw_noise(),
                              *sampling)  # prefill
        for i in progress_bar(range(max_new_tokens), progress, desc="decode"):
            if stops:
                tok = torch.where(done, stops[0], tok)
                done |= torch.isin(tok, stop_ids)
            out[:, L + i] = tok
            if i + 1 == max_new_tokens or (stops and i % 16 == 15 and bool(done.all())):
                if i + 1 < max_new_tokens:
                    out[:, L + i + 1:] = stops[0]
                break
            with _steady_guards(compile and i > 0):
                tok = decode(model, tok[:, None], torch.tensor([L + i], device=device), next_pos + i, first,
                             draw_noise(), *sampling)
    return out


def _steady_guards(steady: bool):
    """From the second compiled step of a call on, Dynamo checks only the guards that tell its
    compiled entries apart, not every guard of every entry (each step's inputs have the first step's
    shapes, dtypes and devices, the cache and the weights stay the same objects, and the first step
    of every call still checks them all). Checking them all cost 5% of a compiled CPU decode (bench
    quick decode model, batch 1, 24 tokens: 38.5 vs 36.6 ms, same tokens)."""
    return torch.compiler.set_stance(skip_guard_eval_unsafe=True) if steady else contextlib.nullcontext()
