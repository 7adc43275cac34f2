"""Lean model definitions that load Hugging Face safetensors checkpoints.

``from_pretrained(path)`` dispatches on ``config.json``'s ``model_type`` (Llama / Qwen2 decoders,
SigLIP / CLIP towers, LLaVA / LLaVA-NeXT / LLaVA-OneVision and Qwen2.5-VL whole, mmfuse's own
checkpoints); ``language_model(path)`` gives the LLM of any of them. Each model family
(fusion, metamorph, metaquery) is one :class:`FamilySpec` in its module; ``get_family(name)`` and
``families()`` look them up.
"""
if __name__ != "mmfuse.models":  # found under a bare name via sys.path: an empty shadow, see mmfuse/__init__.py
    del __file__, __path__
else:
    from .decoder import Decoder, DecoderConfig
    from .family import FamilySpec, Parts, PipelineHooks, families, family_of, get_family, register_family
    from .hf_io import CheckpointError
    from .layers import (BatchContext, CosineLoss, DiffusionLoss, KVCache, LinearCrossEntropy, MixedAttention, RMSNorm,
                         RoutedLinear, RoutedMLP, RoutedRMSNorm)
    from .llava import LlavaConfig, LlavaVLM, load_llava
    from .loading import from_pretrained, language_model, save_pretrained
    from .metaquery import Connector, MetaQuery, MetaQueryConfig, load_metaquery, save_metaquery
    # The function patch() is mmfuse.patch / mmfuse.models.patch.patch: binding it here would hide the
    # submodule mmfuse.models.patch behind a function of the same name.
    from .patch import PatchReport, apply_mmfuse, to_fusion, unpatch
    from .qwen_vl import Qwen25VL, QwenVisionConfig, QwenVisionTower, load_qwen25_vl
    from .siglip import SiglipVisionConfig, SiglipVisionTower, load_siglip, pool_to_tokens, save_siglip

    __all__ = [
        "BatchContext",
        "CheckpointError",
        "Connector",
        "CosineLoss",
        "Decoder",
        "DecoderConfig",
        "DiffusionLoss",
        "FamilySpec",
        "KVCache",
        "LinearCrossEntropy",
        "LlavaConfig",
        "LlavaVLM",
        "MetaQuery",
        "MetaQueryConfig",
        "MixedAttention",
        "Parts",
        "PatchReport",
        "PipelineHooks",
        "Qwen25VL",
        "QwenVisionConfig",
        "QwenVisionTower",
        "RMSNorm",
        "RoutedLinear",
        "RoutedMLP",
        "RoutedRMSNorm",
        "SiglipVisionConfig",
        "SiglipVisionTower",
        "apply_mmfuse",
        "families",
        "family_of",
        "from_pretrained",
        "language_model",
        "load_llava",
        "load_qwen25_vl",
        "get_family",
        "load_metaquery",
        "load_siglip",
        "pool_to_tokens",
        "register_family",
        "save_metaquery",
        "save_pretrained",
        "save_siglip",
        "to_fusion",
        "unpatch",
    ]
