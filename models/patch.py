"""``mmfuse.patch(model)``: mmfuse's kernels inside a loaded transformers Llama / Qwen2 / Mistral / Qwen3, in place.

Supported: ``LlamaForCausalLM``, ``LlamaModel``, ``Qwen2ForCausalLM``, ``Qwen2Model``, ``MistralForCausalLM``,
``MistralModel``, ``Qwen3ForCausalLM``, ``Qwen3Model`` (transformers 5; Qwen3's per-head q / k norms
are swapped too, Mistral's and Qwen3's sliding windows pass on to the attention).
What is swapped, each kind switchable:

* ``rms_norm``: every ``LlamaRMSNorm`` / ``Qwen2RMSNorm`` -> :class:`~mmfuse.models.layers.RMSNorm`
  holding the same ``weight`` Parameter;
* ``mlp``: every ``LlamaMLP`` / ``Qwen2MLP`` -> :class:`SwiGLUMLP`, holding the same ``gate_proj`` /
  ``up_proj`` / ``down_proj`` Linear modules, with ``silu(gate) * up`` fused (:func:`swiglu`);
* ``rope``: each attention module gets an instance-level ``forward``: transformers' own steps, with
  :func:`apply_rope` in place of ``apply_rotary_pos_emb`` (transformers' module globals are never
  touched, so other models in the process are unaffected);
* ``loss``: the causal LM gets an instance-level ``forward``. Without labels it is transformers'
  forward (generation is unchanged). With ``labels`` the loss is
  :class:`~mmfuse.models.layers.LinearCrossEntropy` over the final hidden states -- transformers'
  ``ForCausalLMLoss`` (labels shifted left, ``ignore_index`` -100, ``shift_labels``,
  ``num_items_in_batch`` as the denominator under gradient accumulation) without the (B, L, V) logits.
  What comes back with labels: in training (``model.training`` and autograd on) ``logits`` is None,
  the point of the fused loss; otherwise (evaluation) the logits are computed as transformers does
  (``logits_to_keep`` honoured) beside the same loss. If every label is ignored the loss is 0, where
  transformers gives NaN.

No Parameter is copied: the swapped modules hold the original Parameters and Linear modules, so
optimizer state and tied weights keep working and ``state_dict`` keys (hence ``save_pretrained``) are
unchanged. Everything is validated before anything changes: an unsupported model (another
architecture, a non-SiLU ``hidden_act``, an MLP or LM head with biases) raises ``ValueError`` and is
left as it was. Patching a patched model raises ``ValueError`` (call :func:`unpatch` first);
:func:`unpatch` puts back the original module objects and forwards.

:func:`to_fusion` turns such a model into mmfuse's :class:`~mmfuse.models.fusion.LlamaFusion`.
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmfuse.kernels import apply_rope, swiglu
from mmfuse.kernels._common import check_backend_name

from .decoder import Decoder, DecoderConfig, decoder_state_from_hf
from .fusion import FusionConfig, LlamaFusion
from .hf_io import build_from_state
from .layers import LinearCrossEntropy, RMSNorm

logger = logging.getLogger(__name__)

KINDS = ("rms_norm", "mlp", "rope", "loss")
# The transformers classes patch() takes -> the class-name prefix of their modules (LlamaRMSNorm, ...).
SUPPORTED_CLASSES = {"LlamaForCausalLM": "Llama", "LlamaModel": "Llama",
                     "Qwen2ForCausalLM": "Qwen2", "Qwen2Model": "Qwen2",
                     "MistralForCausalLM": "Mistral", "MistralModel": "Mistral",
                     "Qwen3ForCausalLM": "Qwen3", "Qwen3Model": "Qwen3",
                     "Gemma2ForCausalLM": "Gemma2", "Gemma2Model": "Gemma2",
                     "Gemma3ForCausalLM": "Gemma3", "Gemma3TextModel": "Gemma3",
                     "Qwen2_5_VLTextModel": "Qwen2_5_VL", "Qwen2_5_VisionTransformerPretrainedModel": "Qwen2_5_VL"}
# Module classes whose names do not follow "<prefix>RMSNorm" / "<prefix>MLP" / "<prefix>Attention"
# (the ViT's attention is never looked up: its RoPE is kept, see _kept_features).
MODULE_CLASSES = {"Qwen2_5_VLTextModel": dict(mlp="Qwen2MLP")}
# Models with none of the four kinds, and what they have instead (patch() says so, by name).
NOTHING_TO_SWAP = {name: "LayerNorm, a GELU MLP (fc1 / fc2), learned position embeddings, no LM head"
                   for name in ("SiglipVisionModel", "SiglipModel", "CLIPVisionModel", "CLIPModel")}
# Architectures whose attention passes its attention-logit soft-capping on (mixed_attention's softcap=).
SOFTCAPPED_ATTENTION = ("Gemma2",)
FUSION_CLASSES = ("LlamaForCausalLM", "Qwen2ForCausalLM")  # what to_fusion converts (mmfuse's Decoder)
# VLM wrappers whose language model (``model.model.language_model``) patch() patches
LLAVA_WRAPPERS = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                  "LlavaOnevisionForConditionalGeneration")
# VLM wrappers patch() patches the parts of: their language model (model.model.language_model) and,
# for Qwen2.5-VL, its ViT (model.model.visual); the LLaVA towers (CLIP / SigLIP) have nothing to swap.
VLM_WRAPPERS = (*LLAVA_WRAPPERS, "Qwen2_5_VLForConditionalGeneration")
FUSION_VLM_CLASSES = VLM_WRAPPERS  # what to_fusion makes LlavaFusion of
_STATE = "_mmfuse_patch"  # instance attribute holding what unpatch() restores


@dataclass
class PatchReport:
    """What :func:`patch` replaced: ``counts[kind]`` for kind in ``KINDS`` (norm modules, MLP modules,
    attention modules, LM-head losses), and ``kept[kind]``: why a kind asked for was left as
    transformers' own (an architecture feature mmfuse's kernel does not compute)."""

    model: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    backend: str | None = None
    kept: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = ", ".join(f"{kind} {n}" for kind, n in self.counts.items())
        kept = "".join(f"; kept: {kind} ({why})" for kind, why in self.kept.items())
        return f"mmfuse.patch({self.model}): {parts} (backend {self.backend or 'auto'}){kept}"


@dataclass
class _PatchState:
    report: PatchReport
    swapped: list[tuple[nn.Module, str, nn.Module]]  # (parent, attribute, original child)
    forwards: list[nn.Module]  # modules given an instance-level forward
    inner: list[nn.Module] | None = None  # a VLM wrapper's patched parts


class SwiGLUMLP(nn.Module):
    """``down_proj(swiglu(gate_proj(x), up_proj(x)))`` over existing ``nn.Linear`` modules (no biases)."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, backend: str | None = None):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.backend = gate_proj, up_proj, down_proj, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., D)."""
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=self.backend))


# ----------------------------------------------------------------------------------------------
# The instance-level forwards
# ----------------------------------------------------------------------------------------------


def _attention_forward(cls_forward, eager, cache_kwargs: bool, backend: str | None, softcap: bool = False):
    """The Llama / Qwen2 attention forward of transformers with :func:`apply_rope`, to bind to an instance.

    transformers 5 names the cache ``cache`` (``past_key_values`` in earlier 5.x releases) and, under that name,
    passes its kwargs on to ``cache.update`` (``cache_kwargs``); both spellings are taken here.
    ``functools.wraps`` gives it the signature of the class's forward.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    @functools.wraps(cls_forward)
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, past_key_values=None,
                **kwargs):
        """hidden_states (B, L, D) -> (B, L, D), attention weights (or None)."""
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        if getattr(self, "q_norm", None) is not None:  # Qwen3: RMSNorm over each head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rope(q, k, cos, sin, backend=backend)
        if cache is not None and cache_kwargs:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        elif cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
        if hasattr(self, "sliding_window"):  # Qwen2 passes its (possibly None) window on; Llama has none
            kwargs["sliding_window"] = self.sliding_window
        if softcap:  # Gemma 2 passes its attention-logit cap on
            kwargs["softcap"] = self.attn_logit_softcapping
        dropout = self.attention_dropout if self.training else 0.0
        out, weights = attention(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights

    return forward


def _causal_lm_forward(cls_forward, loss_fn: LinearCrossEntropy):
    """The causal-LM forward of transformers, with the fused loss when ``labels`` (or ``shift_labels``) are given."""
    names = tuple(n for n, p in inspect.signature(cls_forward).parameters.items()
                  if p.kind is p.POSITIONAL_OR_KEYWORD)[1:]  # after self

    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        if len(args) > len(names):
            raise TypeError(f"forward() takes at most {len(names)} positional arguments, got {len(args)}")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"forward() got multiple values for argument {name!r}")
            kwargs[name] = value
        labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return cls_forward(self, **kwargs)
        return _forward_with_loss(self, loss_fn, labels, shift_labels, **kwargs)

    return forward


def _forward_with_loss(model: nn.Module, loss_fn: LinearCrossEntropy, labels, shift_labels, *,
                       num_items_in_batch=None, logits_to_keep=0, return_dict: bool | None = None, **kwargs):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    outputs = model.model(**kwargs)
    hidden = outputs.last_hidden_state
    if shift_labels is None:  # position i predicts labels[i + 1]; the last position predicts nothing
        shift_labels = F.pad(labels, (0, 1), value=loss_fn.ignore_index)[..., 1:]
    loss = loss_fn(hidden, shift_labels.to(hidden.device), model.lm_head.weight, num_items_in_batch=num_items_in_batch)
    logits = None
    if not (model.training and torch.is_grad_enabled()):  # evaluation: logits as transformers returns them
        logits = model.lm_head(_keep(hidden, logits_to_keep))
    extra = {k: v for k, v in outputs.items() if k != "last_hidden_state"}  # cache, hidden_states, attentions
    output = CausalLMOutputWithPast(loss=loss, logits=logits, **extra)
    return_dict = model.config.return_dict if return_dict is None else return_dict
    return output if return_dict else output.to_tuple()


def _keep(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """transformers' ``logits_to_keep``: the last n positions (0: all), or the given positions."""
    from transformers import modeling_utils

    if hasattr(modeling_utils, "slice_logits_to_keep"):
        return modeling_utils.slice_logits_to_keep(hidden, logits_to_keep)
    index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden[:, index, :]


# ----------------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------------


def _arch(model: object, causal_lm: bool = False) -> tuple[str, types.ModuleType]:
    """(class-name prefix, transformers modeling module) of a supported model, else an error."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers nn.Module, got {type(model).__name__}")
    cls = type(model)
    supported = [c for c in SUPPORTED_CLASSES if c.endswith("ForCausalLM") or not causal_lm]
    module = sys.modules.get(cls.__module__)
    # The transformers class itself: a subclass may have changed the forwards patch() replaces.
    if cls.__name__ in NOTHING_TO_SWAP:
        raise ValueError(f"model: {cls.__name__} has nothing mmfuse.patch swaps ({NOTHING_TO_SWAP[cls.__name__]}); "
                         "load it with attn_implementation='mmfuse' to run its (bidirectional) attention on mmfuse")
    if cls.__name__ not in supported or not cls.__module__.startswith("transformers.") or \
            getattr(module, cls.__name__, None) is not cls:
        wrappers = "" if causal_lm else f", and the VLMs {', '.join(VLM_WRAPPERS)}"
        raise ValueError(f"model: {cls.__name__} is not supported, only transformers' {', '.join(supported)}{wrappers}")
    return SUPPORTED_CLASSES[cls.__name__], module


def _vlm_parts(model: object) -> list[nn.Module] | None:
    """The parts patch() patches of a supported transformers VLM wrapper (language model first), else None."""
    cls = type(model)
    if cls.__name__ not in VLM_WRAPPERS or not cls.__module__.startswith("transformers."):
        return None
    names = ("language_model", "visual") if cls.__name__ == "Qwen2_5_VLForConditionalGeneration" else ("language_model",)
    parts = [getattr(getattr(model, "model", None), name, None) for name in names]
    if any(part is None for part in parts):
        raise ValueError(f"model: {cls.__name__} without model.{' / model.'.join(names)} (an older transformers "
                         "layout?)")
    return parts


def _children_of_type(model: nn.Module, cls: type) -> list[tuple[nn.Module, str, nn.Module]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is cls]


def _kept_features(prefix: str, model: nn.Module) -> dict[str, str]:
    """Kinds an architecture computes in a way mmfuse's kernels do not, by name (patch keeps them)."""
    kept = {}
    if type(model).__name__ == "Qwen2_5_VisionTransformerPretrainedModel":
        kept["rope"] = ("its 2D RoPE runs inside transformers' per-window vision attention forward; "
                        "attn_implementation='mmfuse' computes that attention")
    if prefix.startswith("Gemma"):
        act = getattr(model.config, "hidden_activation", None)
        kept["rms_norm"] = (f"{prefix}RMSNorm scales by (1 + weight) in float32 before rounding; mmfuse's RMSNorm "
                            "rounds, then scales by weight")
        kept["mlp"] = f"{prefix}MLP is GeGLU (hidden_activation={act!r}); mmfuse's MLP is SwiGLU"
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        kept["loss"] = f"final_logit_softcapping={cap}: the fused LM-head loss has no logit cap"
    return kept


def _check_mlp(model: nn.Module, mlp: nn.Module) -> None:
    from transformers.activations import SiLUActivation

    where = f"{type(model).__name__} ({type(mlp).__name__})"
    if type(mlp.act_fn) not in (nn.SiLU, SiLUActivation):
        raise ValueError(f"{where}: hidden_act={getattr(model.config, 'hidden_act', None)!r} is not supported by "
                         "mmfuse's SwiGLU MLP (only 'silu'); pass mlp=False to keep transformers' MLP")


def _check_loss(model: nn.Module) -> None:
    name = type(model).__name__
    if model.lm_head.bias is not None:
        raise ValueError(f"{name}: an LM head with a bias is not supported by the fused loss; pass loss=False")
    if "_loss_function" in model.__dict__ or getattr(model, "loss_type", None) not in (None, "ForCausalLM"):
        raise ValueError(f"{name}: a custom loss_function / loss_type is set; the fused loss replaces only "
                         "transformers' ForCausalLMLoss, so pass loss=False to keep yours")


def _check_free(model: nn.Module, modules: list[nn.Module]) -> None:
    """Patching twice is an error, and so is a forward some other code already set on an instance."""
    for m in model.modules():
        if _STATE in m.__dict__ or isinstance(m, (RMSNorm, SwiGLUMLP)):
            where = "this model" if m is model else f"its submodule {type(m).__name__}"
            raise ValueError(f"model: {where} is already patched by mmfuse.patch (of this model or an enclosing "
                             "one); call mmfuse.unpatch on that model first")
    for m in modules:
        if "forward" in m.__dict__:
            raise ValueError(f"model: {type(m).__name__} already has an instance-level forward (patched by another "
                             "library?); mmfuse.patch would replace it")


def patch(model: nn.Module, *, rms_norm: bool = True, mlp: bool = True, rope: bool = True, loss: bool = True,
          backend: str | None = None) -> PatchReport:
    """Swap mmfuse's RMSNorm, SwiGLU, RoPE and fused LM-head loss into a transformers model, in place.

    Args:
        model: a loaded Llama, Qwen2, Mistral, Qwen3, Gemma 2 or Gemma 3 (text) causal LM or bare model
            (``SUPPORTED_CLASSES``), or a VLM wrapper (``VLM_WRAPPERS``: a LLaVA-family VLM's language
            model; Qwen2.5-VL's language model and ViT). Kinds an architecture
            computes differently are kept and named in the report (``kept``): Gemma's (1 + weight)
            norms and GeGLU MLP, a final logit cap (Gemma 2); Gemma 2's attention-logit cap and the
            sliding windows go to ``attn_implementation="mmfuse"``'s kernel.
        rms_norm, mlp, rope, loss: which kinds to swap (``loss`` needs a causal LM; a bare model has
            no LM head and reports 0 losses).
        backend: for the swapped ops: None (Triton on CUDA, PyTorch otherwise, or what an enclosing
            ``mmfuse.kernels.default_backend`` says), "torch" or "triton".

    Returns:
        A :class:`PatchReport` with the count of each kind replaced (also logged at INFO).

    Raises:
        ValueError: unsupported model or configuration (nothing is changed then), or already patched.
        TypeError: ``model`` is not an ``nn.Module``.
    """
    parts = _vlm_parts(model)
    if parts is not None:  # a VLM: its parts are patched (its lm_head loss is the wrapper's)
        return _patch_vlm(model, parts, rms_norm=rms_norm, mlp=mlp, rope=rope, loss=loss, backend=backend)
    prefix, module = _arch(model)
    check_backend_name(backend)
    wanted = {"rms_norm": rms_norm, "mlp": mlp, "rope": rope, "loss": loss and hasattr(model, "lm_head")}
    kept = {kind: why for kind, why in _kept_features(prefix, model).items() if wanted[kind]}
    rms_norm, mlp, loss = (wanted[kind] and kind not in kept for kind in ("rms_norm", "mlp", "loss"))
    names = {"norm": f"{prefix}RMSNorm", "mlp": f"{prefix}MLP", "attention": f"{prefix}Attention",
             **MODULE_CLASSES.get(type(model).__name__, {})}
    norms = _children_of_type(model, getattr(module, names["norm"])) if rms_norm else []
    mlps = _children_of_type(model, getattr(module, names["mlp"])) if mlp else []
    rope = rope and "rope" not in kept
    attention_cls = getattr(module, names["attention"]) if rope else None
    attentions = [m for m in model.modules() if type(m) is attention_cls] if rope else []
    lm = [model] if loss else []
    for _, _, m in mlps:
        _check_mlp(model, m)
    for m in lm:
        _check_loss(m)
    _check_free(model, attentions + lm)

    report = PatchReport(type(model).__name__, backend=backend, kept=kept)
    state = _PatchState(report, swapped=[], forwards=[])
    for parent, name, old in norms:
        _swap(state, parent, name, RMSNorm(eps=old.variance_epsilon, weight=old.weight, backend=backend))
    for parent, name, old in mlps:
        _swap(state, parent, name, SwiGLUMLP(old.gate_proj, old.up_proj, old.down_proj, backend))
    if attentions:
        # transformers renamed the attention's past_key_values to cache, and then passes kwargs to update().
        cache_kwargs = "cache" in inspect.signature(attention_cls.forward).parameters
        forward = _attention_forward(attention_cls.forward, module.eager_attention_forward, cache_kwargs, backend,
                                     softcap=prefix in SOFTCAPPED_ATTENTION)
        for attn in attentions:
            _set_forward(state, attn, forward)
    for m in lm:
        loss_fn = LinearCrossEntropy(ignore_index=-100, backend=backend)
        _set_forward(state, m, _causal_lm_forward(type(m).forward, loss_fn))
    report.counts.update(rms_norm=len(norms), mlp=len(mlps), rope=len(attentions), loss=len(lm))
    model.__dict__[_STATE] = state
    logger.info("%s", report)
    return report


apply_mmfuse = patch


def _patch_vlm(model: nn.Module, parts: list[nn.Module], *, loss: bool, **kinds) -> PatchReport:
    """patch() of each part of a VLM wrapper, as one report; unpatch(model) undoes them all."""
    _check_free(model, [])
    reports = []
    try:
        for part in parts:
            reports.append(patch(part, loss=False, **kinds))
    except Exception:
        for part in parts[:len(reports)]:  # nothing stays half patched
            unpatch(part)
        raise
    report = PatchReport(f"{type(model).__name__} ({', '.join(type(p).__name__ for p in parts)})",
                         backend=kinds.get("backend"))
    for part_report in reports:
        for kind, n in part_report.counts.items():
            report.counts[kind] += n
        for kind, why in part_report.kept.items():
            said = f"{part_report.model}: {why}"
            report.kept[kind] = f"{report.kept[kind]}; {said}" if kind in report.kept else said
    if loss:
        report.kept["loss"] = f"{type(model).__name__} computes its own loss over its language model's output"
    model.__dict__[_STATE] = _PatchState(report, swapped=[], forwards=[], inner=parts)
    logger.info("%s", report)
    return report


def _swap(state: _PatchState, parent: nn.Module, name: str, new: nn.Module) -> None:
    state.swapped.append((parent, name, getattr(parent, name)))
    setattr(parent, name, new)


def _set_forward(state: _PatchState, module: nn.Module, forward) -> None:
    # A bound method rather than a closure over the module, so that copy.deepcopy rebinds it to the copy.
    module.forward = types.MethodType(forward, module)
    state.forwards.append(module)


def unpatch(model: nn.Module) -> None:
    """Undo :func:`patch`: the original module objects and forwards come back (Parameters were never copied).

    Raises:
        ValueError: the model is not patched.
    """
    state = model.__dict__.pop(_STATE, None) if isinstance(model, nn.Module) else None
    if state is None:
        raise ValueError("model: not patched by mmfuse.patch (nothing to undo)")
    for part in state.inner or []:
        unpatch(part)
    for parent, name, original in reversed(state.swapped):
        setattr(parent, name, original)
    for m in state.forwards:
        del m.__dict__["forward"]


# ----------------------------------------------------------------------------------------------
# to_fusion
# ----------------------------------------------------------------------------------------------


def to_fusion(model: nn.Module, fusion_config: FusionConfig | None = None) -> LlamaFusion:
    """A transformers ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` as mmfuse's LlamaFusion, or a
    transformers VLM (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL) as LlavaFusion.

    The text weights come from ``model`` (through the decoder's transformers key map), copied, so
    ``model`` is left as it was; LlamaFusion adds the image expert of every layer as a copy of the
    text weights and freezes the text side unless ``fusion_config.train_text`` (see
    :meth:`LlamaFusion.from_decoder`). On text-only input its logits equal ``model``'s; a VLM's tower
    and projector become the frozen reader, so its logits on prompts with pictures (laid out by the
    VLM's processor, :func:`mmfuse.models.vlm.read_prompt`) equal the VLM's too.

    Args:
        model: the causal LM or VLM (patched or not), on any device / dtype; the result has the same.
        fusion_config: image-path settings (latent shape, patch size, BOI/EOI ids, ...); default
            ``FusionConfig()``.

    Raises:
        ValueError: an unsupported model or configuration (``CheckpointError`` for the config).
    """
    fusion_config = fusion_config or FusionConfig()
    if type(model).__name__ in FUSION_VLM_CLASSES and type(model).__module__.startswith("transformers."):
        return LlamaFusion.from_vlm(_vlm_from_transformers(model), fusion_config)
    _arch(model, causal_lm=True)
    if type(model).__name__ not in FUSION_CLASSES:  # mmfuse's decoder has no sliding window, no q / k norms
        raise ValueError(f"model: to_fusion takes transformers' {', '.join(FUSION_CLASSES + FUSION_VLM_CLASSES)}, "
                         f"not {type(model).__name__} (mmfuse.patch supports it)")
    config = DecoderConfig.from_hf(model.config.to_dict())
    native = decoder_state_from_hf(config, _own_tensors(model))
    decoder = build_from_state(lambda: Decoder(config), native)
    return LlamaFusion.from_decoder(decoder, fusion_config)


def _own_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s tensors, detached and copied: the mmfuse model must not alias ``model``'s weights."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _vlm_from_transformers(model: nn.Module) -> nn.Module:
    from .llava import llava_from_hf
    from .qwen_vl import qwen_vl_from_hf

    cfg = model.config.to_dict()
    build = qwen_vl_from_hf if cfg.get("model_type") == "qwen2_5_vl" else llava_from_hf
    return build(cfg, _own_tensors(model), f"model ({type(model).__name__})")
