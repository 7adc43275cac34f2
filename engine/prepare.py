"""``mmfuse prepare``: encode every picture of a run's data once, into a cache of safetensors shards.

A long run then reads each image's encoding instead of decoding and encoding the picture at every
visit. What is cached is the image input's *posterior* (the VAE's mean and std, scaled), so training
still draws a fresh latent per visit, as it does from pictures. The cache folder (``data.cache``)::

    index.json              {"fingerprint": {...}, "entries": {"img/0.png": ["shard-00000.safetensors", "0"], ...}}
    shard-00000.safetensors "0.mean", "0.std", "1.mean", ...

``fingerprint`` records the codec (class, channels, scaling) and the preprocessing (resolution); a
run whose image input differs refuses the cache rather than train on mismatched latents. The folder
is written beside its final place and renamed in whole, so a cache is never half written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmfuse._progress import progress_bar
from mmfuse.engine.atomic import atomic_folder
from mmfuse.engine.config import ConfigError, DataConfig, load_run_config
from mmfuse.engine.data import TENSOR_SUFFIX, DataError, ImageRef, WorkerFailure, image_refs, open_image, worker_options

CACHE_INDEX = "index.json"
SHARD_BYTES = 1 << 30


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


class LatentCache:
    """Read access to a prepared cache: ``key in cache``, ``cache.get(key) -> (mean, std or None)``."""

    def __init__(self, folder: Path, entries: dict[str, list[str]]):
        self.folder, self.entries = folder, entries
        self._files: dict[str, tuple[object, set[str]]] = {}  # shard -> (open file, its tensor names)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        shard, name = self.entries[key]
        if shard not in self._files:  # opened lazily, once per process (data-loader workers included)
            f = safe_open(str(self.folder / shard), framework="pt", device="cpu")
            self._files[shard] = (f, set(f.keys()))
        f, names = self._files[shard]
        std = f.get_tensor(f"{name}.std") if f"{name}.std" in names else None
        return f.get_tensor(f"{name}.mean"), std

    def __getstate__(self):
        return {"folder": self.folder, "entries": self.entries, "_files": {}}


def open_cache(data: DataConfig, image_input) -> LatentCache | None:
    """The cache ``data.cache`` names, checked against the run's image input; None when not configured."""
    if data.cache is None:
        return None
    folder = Path(data.cache)
    if not (folder / CACHE_INDEX).is_file():
        raise ConfigError(f"data.cache: no prepared cache at {folder}; write it with `mmfuse prepare --config ...`")
    index = json.loads((folder / CACHE_INDEX).read_text())
    if _canonical(index.get("fingerprint")) != _canonical(image_input.fingerprint()):
        raise ConfigError(f"data.cache: {folder} was prepared for another VAE or resolution "
                          f"({index.get('fingerprint')}); run `mmfuse prepare` again")
    return LatentCache(folder, index["entries"])


class _Pictures(torch.utils.data.Dataset):
    def __init__(self, refs: Sequence[ImageRef], preprocess):
        self.refs, self.preprocess = refs, preprocess

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        try:
            return self.preprocess(open_image(self.refs[i], "data"))
        except DataError as exc:
            return WorkerFailure(str(exc))


def _stack(items: list):
    failure = next((x for x in items if isinstance(x, WorkerFailure)), None)
    return failure or torch.stack(items)


def prepare_from_config(config_path: str | os.PathLike, device: str = "cpu", batch_size: int = 16,
                        progress: bool | None = None) -> Path:
    """Encode every picture of the config's data into ``data.cache``; returns the cache folder."""
    from mmfuse.engine.run import resolve_device, set_up

    cfg = load_run_config(config_path)
    if cfg.data.cache is None:
        raise ConfigError("data.cache: set it to the folder the encoded images go to (e.g. \"cache\")")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    run = set_up(cfg, dev)
    if run.image_input.preprocess is None:
        raise ConfigError("nothing to prepare: the run has no 'vae' to encode pictures with")
    refs = [r for r in image_refs(run.sources) if not (r.path or "").endswith(TENSOR_SUFFIX)]
    final = Path(cfg.data.cache)
    loader = torch.utils.data.DataLoader(_Pictures(refs, run.image_input.preprocess), batch_size=batch_size,
                                         collate_fn=_stack, **worker_options(cfg.data.num_workers))
    with atomic_folder(final) as tmp:
        entries, shard, size, shards, done = {}, {}, 0, 0, 0
        for pixels in progress_bar(loader, progress, desc="prepare", total=len(loader)):
            if isinstance(pixels, WorkerFailure):
                raise DataError(pixels.message)
            mean, std = run.image_input.moments(pixels.to(dev))
            for j in range(pixels.shape[0]):
                name = str(done + j)
                shard[f"{name}.mean"] = mean[j].float().cpu().contiguous()
                if std is not None:
                    shard[f"{name}.std"] = std[j].float().cpu().contiguous()
                entries[refs[done + j].key] = [f"shard-{shards:05d}.safetensors", name]
                size += mean[j].numel() * 4 * (2 if std is not None else 1)
            done += pixels.shape[0]
            if size >= SHARD_BYTES or (done == len(refs) and shard):
                save_file(shard, str(tmp / f"shard-{shards:05d}.safetensors"))
                shard, size, shards = {}, 0, shards + 1
        fingerprint = json.loads(_canonical(run.image_input.fingerprint()))
        (tmp / CACHE_INDEX).write_text(json.dumps({"fingerprint": fingerprint, "entries": entries}, indent=1) + "\n")
    return final
