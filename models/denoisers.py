"""The diffusers denoisers the families condition: SANA's transformer and Stable Diffusion 1.5's UNet.

One place builds them from a config dict, loads them from a model folder (config.json +
safetensors, never a pickle) and gives the config a checkpoint records.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .hf_io import CheckpointError

# kind -> the diffusers class: "sana" (rectified flow, SanaTransformer2DModel), "sd15" (DDPM, UNet2DConditionModel)
DENOISER_CLASSES = {"sana": "SanaTransformer2DModel", "sd15": "UNet2DConditionModel"}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _check_kind(kind: str) -> str:
    if kind not in DENOISER_CLASSES:
        raise ValueError(f"decoder must be one of {tuple(DENOISER_CLASSES)}, got {kind!r}")
    return DENOISER_CLASSES[kind]


def build_denoiser(kind: str, config: dict) -> nn.Module:
    """A fresh (randomly initialised) denoiser of ``kind`` from its diffusers config dict.

    Raises:
        ValueError: a key the class does not take (diffusers would only warn, then build the default size).
    """
    import inspect

    import diffusers  # heavy import, only when needed

    cls = getattr(diffusers, _check_kind(kind))
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    if unknown:
        raise ValueError(f"{cls.__name__} takes no key(s) {unknown}")
    return cls.from_config(dict(config))


def load_denoiser(path: str | os.PathLike, kind: str, where: str = "diffusion") -> nn.Module:
    """A diffusers denoiser folder of the class ``kind`` names (config.json + safetensors weights).

    Raises:
        CheckpointError: no folder / config.json, a different model class, no safetensors weights.
    """
    import diffusers

    class_name = _check_kind(kind)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{where}: no diffusers model folder (config.json) at {path}")
    found = json.loads((path / "config.json").read_text()).get("_class_name")
    if found not in (None, class_name):
        raise CheckpointError(f"{where}: {path} holds a {found}, but decoder {kind!r} needs a {class_name}")
    if not (path / WEIGHTS).is_file() and not (path / f"{WEIGHTS}.index.json").is_file():
        raise CheckpointError(f"{where}: {path} has no {WEIGHTS} (only safetensors weights load)")
    try:
        return getattr(diffusers, class_name).from_pretrained(str(path), use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: cannot load a {class_name} from {path}: {exc}") from exc


def denoiser_config(module: nn.Module) -> dict:
    """A denoiser's config as a checkpoint stores it (diffusers' private ``_`` keys left out)."""
    return {k: v for k, v in module.config.items() if not k.startswith("_")}


def denoiser_kind(module: nn.Module) -> str:
    """"sana" or "sd15" for a diffusers denoiser object."""
    name = type(module).__name__
    for kind, class_name in DENOISER_CLASSES.items():
        if name == class_name:
            return kind
    raise TypeError(f"diffusion must be one of {tuple(DENOISER_CLASSES.values())}, got {name}")
