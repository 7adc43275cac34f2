"""Hugging Face checkpoints in and out, through safetensors only (nothing is unpickled).

A model family describes its checkpoint with a *key map*: a list of :class:`KeyRule`, each naming one
native tensor and the HF tensors it is made of (one for a rename, several concatenated along dim 0 for
a fused projection such as QKV). The same list converts both ways, so loading and saving cannot drift
apart, and loading is strict: every HF tensor consumed, every native tensor filled, every shape checked.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: missing, unexpected or mis-shaped tensors, bad files."""


@dataclass(frozen=True)
class KeyRule:
    """One native tensor ``native`` made of the HF tensors ``hf`` concatenated along dim 0."""

    native: str
    hf: tuple[str, ...]


def rename(native: str, hf: str) -> KeyRule:
    return KeyRule(native, (hf,))


def fuse(native: str, *hf: str) -> KeyRule:
    return KeyRule(native, tuple(hf))


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> dict:
    """``config.json`` of a checkpoint folder as a dict."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"no config.json in {path}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from exc


def checkpoint_files(path: str | os.PathLike, weights_name: str = SINGLE_FILE) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards its index lists."""
    path = Path(path)
    index = path / weights_name.replace(".safetensors", ".safetensors.index.json")
    if (path / weights_name).is_file():
        return [path / weights_name]
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index.name} lists shards that are missing: {missing}")
        return files
    raise CheckpointError(f"no {weights_name} or {index.name} in {path}")


def tensor_names(files: Iterable[Path]) -> list[str]:
    """The tensor names of safetensors files, from their headers (no tensor data is read)."""
    names: list[str] = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                names.extend(f.keys())
        except SafetensorError as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    return names


def load_tensors(files: Iterable[Path], device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the given safetensors files (floating ones cast to ``dtype`` if given).

    ``keep(key)`` False skips a tensor without reading it (e.g. the text tower of a full SigLIP file).
    """
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if keep is not None and not keep(key):
                        continue
                    if key in tensors:
                        raise CheckpointError(f"tensor {key!r} appears in more than one shard ({file.name})")
                    t = f.get_tensor(key)
                    tensors[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except SafetensorError as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    return tensors


# ----------------------------------------------------------------------------------------------
# Converting
# ----------------------------------------------------------------------------------------------


def hf_to_native(hf: Mapping[str, torch.Tensor], rules: Iterable[KeyRule],
                 optional_hf: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Apply the key map; every HF tensor must be consumed (``optional_hf`` may be absent or ignored)."""
    rules = list(rules)
    optional = set(optional_hf)
    missing = [k for r in rules for k in r.hf if k not in hf]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:5]}")
    consumed = {k for r in rules for k in r.hf}
    unexpected = sorted(set(hf) - consumed - optional)
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}")
    native = {}
    for r in rules:
        parts = [hf[k] for k in r.hf]
        for key, part in zip(r.hf[1:], parts[1:]):
            if part.shape[1:] != parts[0].shape[1:]:
                raise CheckpointError(f"tensor {key!r} has shape {tuple(part.shape)}, which cannot be fused with "
                                      f"{r.hf[0]!r} of shape {tuple(parts[0].shape)}")
        native[r.native] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return native


def native_to_hf(native: Mapping[str, torch.Tensor], rules: Iterable[KeyRule],
                 split_sizes: Callable[[KeyRule], list[int]]) -> dict[str, torch.Tensor]:
    """Invert the key map; ``split_sizes(rule)`` gives the dim-0 sizes of a fused rule's parts."""
    hf = {}
    for r in rules:
        t = native[r.native]
        parts = [t] if len(r.hf) == 1 else list(torch.split(t, split_sizes(r), dim=0))
        for key, part in zip(r.hf, parts):
            hf[key] = part.contiguous()
    return hf


# ----------------------------------------------------------------------------------------------
# Building and saving
# ----------------------------------------------------------------------------------------------


def check_against_model(model: torch.nn.Module, native: Mapping[str, torch.Tensor]) -> None:
    """Every parameter/persistent buffer of ``model`` present in ``native`` with the same shape, nothing extra."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(native))
    unexpected = sorted(set(native) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint gives no value for {len(missing)} model tensor(s), e.g. {missing[:5]}")
    if unexpected:
        raise CheckpointError(f"checkpoint maps to {len(unexpected)} tensor(s) the model lacks, e.g. {unexpected[:5]}")
    for key, t in native.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"tensor {key!r} has shape {tuple(t.shape)} in the checkpoint but the config implies "
                f"{tuple(expected[key].shape)}"
            )


def build_from_state(make_model: Callable[[], torch.nn.Module], native: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Build on the meta device (no random init, no second copy) and adopt the tensors with ``assign=True``.

    Modules with derived, non-persistent buffers (RoPE tables) rebuild them in ``reset_buffers(device)``.
    """
    with torch.device("meta"):
        model = make_model()
    check_against_model(model, native)
    model.load_state_dict(dict(native), strict=True, assign=True)
    device = next(iter(native.values())).device if native else torch.device("cpu")
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(device)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"tensors left uninitialised after loading: {still_meta[:5]}")
    return model


def load_native(path: str | os.PathLike, model_type: str, make_builder: Callable[[dict], Callable[[], torch.nn.Module]],
                dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.nn.Module:
    """Load one of mmfuse's own checkpoints (``config.json`` with ``model_type`` + native safetensors).

    ``make_builder(config)`` parses the config's sections and returns the model constructor that
    :func:`build_from_state` runs on the meta device; a missing or bad section is a CheckpointError.
    """
    cfg = read_config(path)
    if cfg.get("model_type") != model_type:
        raise CheckpointError(f"config model_type {cfg.get('model_type')!r} is not {model_type!r}")
    try:
        make_model = make_builder(cfg)
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"config.json of {path} has a bad or missing key: {exc}") from exc
    return build_from_state(make_model, load_tensors(checkpoint_files(path), device or "cpu", dtype))


def save_checkpoint(path: str | os.PathLike, config: dict, tensors: Mapping[str, torch.Tensor],
                    max_shard_bytes: int | None = None, weights_name: str = SINGLE_FILE) -> None:
    """Write ``config.json`` and safetensors weights (sharded with an index past ``max_shard_bytes``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"format": "pt"}
    if max_shard_bytes is None or sum(t.nbytes for t in tensors.values()) <= max_shard_bytes:
        save_file(tensors, str(path / weights_name), metadata=metadata)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        t = tensors[key]
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += t.nbytes
    stem = weights_name.removesuffix(".safetensors")
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata=metadata)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (path / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
