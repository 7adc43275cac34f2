"""One lean decoder for Llama-3 / 3.1 / 3.2 and Qwen2 / 2.5, loading Hugging Face safetensors.

GQA, explicit ``head_dim``, llama3 RoPE scaling, tied embeddings, Qwen2's QKV biases. Every layer
may hold several modality experts (``num_experts``): 1 is the plain model; LlamaFusion uses 2
(frozen text + trainable image). Attention takes per-query key intervals, so the same model runs
causal text, bidirectional image spans and packed documents.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmfuse.kernels import build_routing, rope_cos_sin, rope_frequencies
from mmfuse.kernels.rope import mrope_cos_sin
from mmfuse.kernels.objectives import lm_loss

from .hf_io import CheckpointError, KeyRule, fuse, hf_to_native, native_to_hf, rename
from .layers import BatchContext, KVCache, MixedAttention, RoutedMLP, RoutedRMSNorm

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen2_5_vl_text")  # the last: Qwen2.5-VL's language model (M-RoPE)


@dataclass
class DecoderConfig:
    vocab_size: int
    dim: int
    hidden_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    qkv_bias: bool = False
    tie_embeddings: bool = False
    num_experts: int = 1
    model_type: str = "llama"
    max_seq_len: int | None = None  # the checkpoint's context length (max_position_embeddings), if it states one
    mrope_section: tuple[int, ...] | None = None  # multimodal RoPE (Qwen2.5-VL): frequencies per t / h / w stream
    hf_config: dict = field(default_factory=dict, repr=False)  # the original config.json, for saving

    @classmethod
    def from_hf(cls, cfg: dict) -> "DecoderConfig":
        """Read a transformers config.json (v5 ``rope_parameters`` or v4 ``rope_theta``/``rope_scaling``)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(f"config model_type {model_type!r} is not a decoder this loader supports "
                                  f"{SUPPORTED_MODEL_TYPES}")
        _require(cfg, "hidden_act", "silu", default="silu")
        _require(cfg, "mlp_bias", False, default=False)
        if model_type in ("qwen2", "qwen2_5_vl_text"):
            _require(cfg, "use_sliding_window", False, default=False)
        if model_type == "llama" and cfg.get("attention_bias", False):
            raise CheckpointError("config attention_bias=True is not supported for llama (o_proj bias)")
        rope = dict(cfg.get("rope_parameters") or {})
        if not rope:  # transformers 4 layout
            rope = dict(cfg.get("rope_scaling") or {})
            rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise CheckpointError(f"config rope_type {rope_type!r} is not supported (default, llama3)")
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            hidden_dim=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=rope if rope_type == "llama3" else None,
            qkv_bias=model_type in ("qwen2", "qwen2_5_vl_text"),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            model_type=model_type,
            max_seq_len=cfg.get("max_position_embeddings"),
            mrope_section=tuple(rope["mrope_section"]) if rope.get("mrope_section") else None,
            hf_config=dict(cfg),
        )


def left_pad(rows: Sequence[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D token rows of any lengths, left-padded to one length.

    Returns ``ids`` (R, P) and ``first`` int32 (R,), each row's first real position: a row's key
    interval starts there, so padding is never attended, and its RoPE positions count from it.
    """
    if not rows or any(r.dim() != 1 or r.numel() == 0 for r in rows):
        raise ValueError("rows must be a non-empty sequence of non-empty 1-D token tensors")
    length = max(r.shape[0] for r in rows)
    device = rows[0].device
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, length - r.shape[0]:] = r
    first = torch.tensor([length - r.shape[0] for r in rows], dtype=torch.int32, device=device)
    return ids, first


def padded_positions(first: torch.Tensor, length: int) -> torch.Tensor:
    """(R, length) RoPE positions of left-padded rows: 0 at each row's first real token (0 on padding)."""
    return (torch.arange(length, device=first.device)[None] - first[:, None].long()).clamp(min=0)


@dataclass
class PromptLayout:
    """Left-padded prompts ready for prefill; every tensor (B, P) but ``inputs_embeds`` (B, P, dim).

    Attributes:
        input_ids: the prompt tokens (placeholder ids at image positions).
        inputs_embeds: the decoder's input, image positions filled by the family.
        modality: the expert of each position (TEXT / IMAGE), for multi-expert decoders.
        kv_start, kv_end: int32 mask intervals (an image span bidirectional, text causal, padding empty).
        position_ids: RoPE positions, 0 at each row's first real position ((3, B, P) streams for a
            multimodal-RoPE decoder).
        first: int32 (B,) each row's first real position (its left padding before it).
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    modality: torch.Tensor
    kv_start: torch.Tensor
    kv_end: torch.Tensor
    position_ids: torch.Tensor
    first: torch.Tensor

    @classmethod
    def of_tokens(cls, rows: Sequence[torch.Tensor], embed: Callable[[torch.Tensor], torch.Tensor]) -> "PromptLayout":
        """Text-only prompts (1-D id tensors of any lengths), left-padded and causal; ``embed``: ids -> embeddings."""
        ids, first = left_pad(rows)
        mask = torch.arange(ids.shape[1], device=ids.device)[None] >= first[:, None]
        return cls.causal(ids, mask, embed(ids))

    def repeat(self, times: int) -> "PromptLayout":
        """Every row ``times`` times, in blocks (rows 0..B-1, then 0..B-1 again, ...)."""
        tensors = (getattr(self, f.name) for f in dataclasses.fields(self))
        return PromptLayout(*(t.repeat(times, *[1] * (t.dim() - 1)) for t in tensors))

    @classmethod
    def causal(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, inputs_embeds: torch.Tensor,
               position_ids: torch.Tensor | None = None) -> "PromptLayout":
        """Left-padded prompts (a processor's ``input_ids`` / ``attention_mask``) read causally, e.g. a
        VLM's prompt with its image features already in ``inputs_embeds``; ``position_ids`` default
        to each row's count of real tokens so far.

        Raises:
            ValueError: ``attention_mask`` is not left padding.
        """
        B, L = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        first = (L - mask.sum(dim=1)).to(torch.int32)
        if not torch.equal(mask, (torch.arange(L, device=mask.device)[None] >= first[:, None].long()).long()):
            raise ValueError("attention_mask must be left padding (1s after 0s in every row): use padding_side='left'")
        kv_end = (torch.arange(L, device=input_ids.device) + 1).to(torch.int32).expand(B, L).contiguous()
        positions = (mask.cumsum(1) - 1).clamp(min=0) if position_ids is None else position_ids
        return cls(input_ids, inputs_embeds, torch.zeros_like(input_ids), first[:, None].expand(B, L).contiguous(),
                   kv_end, positions, first)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P) 1 on real positions, 0 on the left padding."""
        P = self.input_ids.shape[1]
        return (torch.arange(P, device=self.first.device)[None] >= self.first[:, None]).long()


def _require(cfg: dict, key: str, value, default) -> None:
    if cfg.get(key, default) != value:
        raise CheckpointError(f"config {key}={cfg.get(key)!r} is not supported (only {value!r})")


class DecoderLayer(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.attn_norm = RoutedRMSNorm(c.dim, c.norm_eps, c.num_experts)
        self.attn = MixedAttention(c.dim, c.num_heads, c.num_kv_heads, c.head_dim, c.qkv_bias, c.num_experts)
        self.mlp_norm = RoutedRMSNorm(c.dim, c.norm_eps, c.num_experts)
        self.mlp = RoutedMLP(c.dim, c.hidden_dim, c.num_experts)

    def forward(self, x: torch.Tensor, ctx: BatchContext, cache_only: bool = False) -> torch.Tensor | None:
        """x (B, L, dim) -> (B, L, dim); ``cache_only``: write x's keys and values into the cache and
        stop there (None). A flag of ``forward``, not a method of its own, so that the call goes
        through the module's hooks (an FSDP2 unit gathers its weights in them)."""
        if cache_only:
            self.attn.fill_cache(self.attn_norm(x, ctx.modality), ctx)
            return None
        x = x + self.attn(self.attn_norm(x, ctx.modality), ctx)
        return x + self.mlp(self.mlp_norm(x, ctx.modality), ctx.modality, ctx.routing)


class Decoder(nn.Module):
    """Token embeddings -> layers -> final norm; ``logits`` applies the (possibly tied) LM head."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RoutedRMSNorm(config.dim, config.norm_eps, config.num_experts)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)
        self.reset_buffers(self.embed.weight.device)

    def reset_buffers(self, device: torch.device | str) -> None:
        """RoPE inverse frequencies: derived from the config, never stored in checkpoints."""
        if torch.device(device).type == "meta":
            return
        c = self.config
        self.inv_freq = rope_frequencies(c.head_dim, c.rope_theta, c.rope_scaling).to(device)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, dim): the LM head, or the embedding matrix when tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Give every attention layer a static KV cache for ``batch`` rows of ``max_len`` positions
        (prefer :meth:`kv_cache`, which also takes it away again)."""
        c = self.config
        dtype = dtype or self.embed.weight.dtype
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch, c.num_kv_heads, max_len, c.head_dim, dtype, self.embed.weight.device)

    @contextlib.contextmanager
    def kv_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> Iterator[None]:
        """A static KV cache for the duration of a ``with`` block: set up on entry, and on exit every
        layer gets back the cache it had before (None for a model at rest), so no memory stays behind."""
        before = [layer.attn.kv_cache for layer in self.layers]
        self.setup_cache(batch, max_len, dtype)
        try:
            yield
        finally:
            for layer, cache in zip(self.layers, before):
                layer.attn.kv_cache = cache

    def resize_vocab(self, vocab_size: int) -> None:
        """Grow the embeddings (and an untied LM head) to ``vocab_size`` rows, e.g. for added special
        tokens. New rows start at the mean of the existing ones (transformers' ``mean_resizing``), so a
        new token's logit starts near the average instead of at a random extreme."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"vocab_size can only grow: the model has {old} tokens, asked for {vocab_size}")
        if vocab_size == old:
            return

        def grown(weight: torch.Tensor) -> nn.Parameter:
            extra = weight.detach().mean(dim=0, keepdim=True).expand(vocab_size - old, -1)
            return nn.Parameter(torch.cat([weight.detach(), extra]), requires_grad=weight.requires_grad)

        self.embed.weight = grown(self.embed.weight)
        self.embed.num_embeddings = vocab_size
        if self.lm_head is not None:
            self.lm_head.weight = grown(self.lm_head.weight)
            self.lm_head.out_features = vocab_size
        hf_config = {**self.config.hf_config, "vocab_size": vocab_size} if self.config.hf_config else {}
        self.config = dataclasses.replace(self.config, vocab_size=vocab_size, hf_config=hf_config)

    def prefill(self, layout: PromptLayout) -> torch.Tensor:
        """A laid-out prompt into cache slots ``0..P-1`` (after :meth:`kv_cache`) -> hidden (B, P, dim)."""
        return self(**self._prefill_args(layout))

    def fill_cache(self, layout: PromptLayout) -> None:
        """:meth:`prefill` for a prompt whose hidden states nothing reads (a MetaQuery prompt before
        its queries, a prompt before an image): the same keys and values into cache slots ``0..P-1``,
        but the last layer stops at its cache write, so its attention, MLP and the final norm never
        run (a layer's work less)."""
        args = self._prefill_args(layout)
        x, ctx = self._context(self._embed(None, args.pop("inputs_embeds")), **args)
        for i, layer in enumerate(self.layers):
            if i == len(self.layers) - 1:
                layer(x, ctx, cache_only=True)
            else:
                x = layer(x, ctx)

    def _prefill_args(self, layout: PromptLayout) -> dict:
        """:meth:`forward`'s arguments for a laid-out prompt into cache slots ``0..P-1``."""
        P = layout.input_ids.shape[1]
        return dict(inputs_embeds=layout.inputs_embeds, position_ids=layout.position_ids, kv_start=layout.kv_start,
                    kv_end=layout.kv_end, modality=layout.modality if self.config.num_experts > 1 else None,
                    input_pos=torch.arange(P, device=layout.first.device))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_start: torch.Tensor | None = None,
        kv_end: torch.Tensor | None = None,
        modality: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, L, dim).

        Args:
            input_ids: int (B, L), or give ``inputs_embeds`` (B, L, dim) instead (image patches etc.).
            position_ids: int (B, L) RoPE positions; default ``input_pos`` or ``0..L-1``; (3, B, L)
                for a multimodal-RoPE model (``mrope_section``).
            kv_start, kv_end: int32 (B, L) key intervals (see ``mask_intervals``); default causal
                over the cache (``[0, input_pos + 1)``) or over the sequence.
            modality: int (B, L) expert per token; required when the model has several experts.
            input_pos: int64 (L,) cache slots of these tokens, when ``setup_cache`` was called.
        """
        x, ctx = self._context(self._embed(input_ids, inputs_embeds), position_ids=position_ids, kv_start=kv_start,
                               kv_end=kv_end, modality=modality, input_pos=input_pos)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x, ctx.modality)

    def _context(self, x, *, position_ids, kv_start, kv_end, modality, input_pos) -> tuple[torch.Tensor, BatchContext]:
        """:meth:`forward`'s arguments -> (embeddings x, the layers' shared context), defaults filled in."""
        B, L, _ = x.shape
        steps = input_pos if input_pos is not None else torch.arange(L, device=x.device)
        if position_ids is None:
            position_ids = steps.expand(B, L)
        if kv_end is None or kv_start is None:
            kv_start = torch.zeros(B, L, dtype=torch.int32, device=x.device) if kv_start is None else kv_start
            kv_end = (steps + 1).to(torch.int32).expand(B, L).contiguous() if kv_end is None else kv_end
        routing = None
        if self.config.num_experts > 1:
            if modality is None:
                raise ValueError(f"modality (B, L) is required: the model has {self.config.num_experts} experts per layer")
            routing = build_routing(modality, self.config.num_experts)
        if self.config.mrope_section:  # (3, B, L) streams; text positions (B, L) are the same in all three
            streams = position_ids if position_ids.dim() == 3 else position_ids.expand(3, B, L)
            cos, sin = mrope_cos_sin(streams, self.inv_freq, self.config.mrope_section, torch.float32)
        else:
            cos, sin = rope_cos_sin(position_ids, self.inv_freq, torch.float32)
        return x, BatchContext(modality, routing, cos, sin, kv_start, kv_end, input_pos)

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids (B, L) and inputs_embeds (B, L, dim)")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.dim:
                raise ValueError(f"inputs_embeds must have shape (B, L, {self.config.dim}), got {tuple(inputs_embeds.shape)}")
            return inputs_embeds
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor (B, L), got {input_ids.dtype} {tuple(input_ids.shape)}")
        return self.embed(input_ids)

    def next_token_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """LM cross-entropy of final hidden states (B, L, dim) against ``labels`` (B, L): position i
        predicts ``labels[:, i + 1]`` (-100: no loss). The fused linear cross-entropy: no (B, L, V) logits."""
        return lm_loss(hidden=hidden[:, :-1].reshape(-1, hidden.shape[-1]), lm_weight=self.lm_head_weight,
                       labels=labels[:, 1:].reshape(-1))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(…, dim) -> (…, V) in float32.

        ``F.linear`` at every row count. A decode step's few rows were once taken through the
        transposed product ``(W @ h.T).T`` where that timed faster on its own, but inside a decode
        loop F.linear was the faster form at 1, 4 and 8 rows (CPU, 2 cores, V = 32000, dim 256,
        24-token generate: 76 vs 122, 105 vs 140, 138 vs 154 ms); the head timed alone, its weight
        re-read call after call, ranks the forms differently from a step that reads every layer's.
        """
        return F.linear(hidden, self.lm_head_weight).float()


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints
# ----------------------------------------------------------------------------------------------


def hf_key_map(c: DecoderConfig) -> list[KeyRule]:
    """Native <-> transformers names for a one-expert decoder (q/k/v and gate/up fused on our side)."""
    rules = [rename("embed.weight", "model.embed_tokens.weight"), rename("norm.weights.0", "model.norm.weight")]
    for i in range(c.num_layers):
        hf, me = f"model.layers.{i}", f"layers.{i}"
        attn = f"{hf}.self_attn"
        rules += [
            rename(f"{me}.attn_norm.weights.0", f"{hf}.input_layernorm.weight"),
            fuse(f"{me}.attn.qkv.weights.0", f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"),
            rename(f"{me}.attn.o.weights.0", f"{attn}.o_proj.weight"),
            rename(f"{me}.mlp_norm.weights.0", f"{hf}.post_attention_layernorm.weight"),
            fuse(f"{me}.mlp.gate_up.weights.0", f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"),
            rename(f"{me}.mlp.down.weights.0", f"{hf}.mlp.down_proj.weight"),
        ]
        if c.qkv_bias:
            rules.append(fuse(f"{me}.attn.qkv.biases.0", f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias"))
    if not c.tie_embeddings:
        rules.append(rename("lm_head.weight", "lm_head.weight"))
    return rules


def _split_sizes(c: DecoderConfig):
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def sizes(rule: KeyRule) -> list[int]:
        return [q, kv, kv] if ".attn.qkv." in rule.native else [c.hidden_dim, c.hidden_dim]

    return sizes


def decoder_state_from_hf(c: DecoderConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A tied checkpoint may still carry lm_head.weight (a copy of the embeddings): ignore it then.
    return hf_to_native(hf, hf_key_map(c), optional_hf=("lm_head.weight",) if c.tie_embeddings else ())


def load_language_model(path, config: DecoderConfig, to_decoder_names: Callable[[list[str]], dict[str, str]],
                        dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Decoder:
    """The decoder inside a larger checkpoint (a VLM's language model): ``to_decoder_names`` maps the
    file's tensor names to the decoder's HF names (``model.*``, ``lm_head.*``); only those are read."""
    from .hf_io import build_from_state, checkpoint_files, load_tensors, tensor_names

    files = checkpoint_files(path)
    names = to_decoder_names(tensor_names(files))
    tensors = load_tensors(files, torch.device(device or "cpu"), dtype, keep=lambda k: k in names)
    return build_from_state(lambda: Decoder(config), decoder_state_from_hf(config, {names[k]: v for k, v in tensors.items()}))


def decoder_state_to_hf(model: Decoder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, HF-named tensors) of a one-expert decoder."""
    c = model.config
    if c.num_experts != 1:
        raise ValueError(f"only a one-expert decoder maps to a transformers checkpoint (this one has {c.num_experts})")
    tensors = native_to_hf(model.state_dict(), hf_key_map(c), _split_sizes(c))
    cfg = dict(c.hf_config) or _default_hf_config(c)
    cfg["dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    return cfg, tensors


def _default_hf_config(c: DecoderConfig) -> dict:
    cfg = {
        "model_type": c.model_type, "architectures": ["LlamaForCausalLM" if c.model_type == "llama" else "Qwen2ForCausalLM"],
        "vocab_size": c.vocab_size, "hidden_size": c.dim, "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu", "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
    }
    if c.max_seq_len:
        cfg["max_position_embeddings"] = c.max_seq_len
    if c.rope_scaling:
        cfg["rope_parameters"] = {**c.rope_scaling, "rope_theta": c.rope_theta}
    return cfg


def with_experts(config: DecoderConfig, num_experts: int) -> DecoderConfig:
    return dataclasses.replace(config, num_experts=num_experts)
