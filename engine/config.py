"""The run config of ``mmfuse train`` and ``mmfuse prepare``: one JSON file, parsed into dataclasses.

Every key is checked by name and type before anything loads; relative paths resolve against the
config file's folder. The schema (``mmfuse train --help`` prints it)::

    {"family": "fusion" | "metamorph" | "metaquery",
     "base": "llm/",                 # an HF Llama / Qwen2 folder with its tokenizer, or a VLM folder
                                     #     (LLaVA / -NeXT / -OneVision, Qwen2.5-VL; fusion: LlavaFusion,
                                     #     metaquery: source images read by its tower) ...
     "decoder": {...},               # ... or a decoder from scratch (DecoderConfig fields) with "tokenizer"
     "init": "run/model/",           # ... or a model folder of this family to continue from (a later stage:
                                     #     its model, tokenizer, VAE and processor; the family section's keys
                                     #     override its config, e.g. {"metamorph": {"stage": "visualizer"}})
     "tokenizer": "tok/",            # a tokenizer folder (default: the base's)
     "vae": "vae/" | "pixels",       # a diffusers AutoencoderKL / AutoencoderDC folder, or pixel space
     "vision": "siglip/" | {...},    # metamorph: its SigLIP tower (HF folder, or SiglipVisionConfig fields)
     "diffusion": "sana/" | {...},   # metamorph: the SD1.5 UNet; metaquery: SANA or SD1.5 (folder or config)
     "<family>": {...},              # the family's own config (FusionConfig, MetaMorphConfig, MetaQueryConfig)
     "data": {...DataConfig...},
     "train": {...TrainConfig...}}
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfuse.engine.train import TrainConfig
from mmfuse.models.decoder import DecoderConfig
from mmfuse.models.family import FamilySpec, families, get_family



class ConfigError(ValueError):
    """A run config that cannot run: an unknown family or key, a missing or mistyped field, bad data."""


@dataclass
class DataConfig:
    """Where the training documents are and how they become batches.

    Attributes:
        path: a JSONL file (one document per line: ``{"text": "...", "image": "a.png"}`` or
            ``{"segments": [{"text": "..."}, {"image": "a.png", "diffuse": true}, ...]}``; image paths
            relative to the file; text may also be a list of token ids and an image a .safetensors
            file of ready tensors), or a Hugging Face ``datasets`` folder saved with ``save_to_disk``;
            or a mixture, ``[{"path": "understanding.jsonl", "weight": 7}, {"path": ..., "weight": 2}]``:
            every micro-batch then takes documents from the sources in those proportions, and the
            training log counts each source's documents and text tokens (``docs/<name>``,
            ``tokens/<name>``; ``"name"`` defaults to the file's stem).
        row_len: positions per packed row (metaquery: the longest prompt).
        rows_per_batch: rows per micro-batch (metaquery: documents per micro-batch).
        num_workers: data-loader worker processes reading, tokenizing and resizing (0: in the main process).
        caption_dropout: share of documents whose text before their first diffused image is dropped
            (the unconditional branch that classifier-free guidance needs).
        cache: a folder of encoded images written by ``mmfuse prepare`` (used when it exists).
        text_column, image_column: the columns of a ``datasets`` folder.
    """

    path: str | list
    row_len: int = 512
    rows_per_batch: int = 8
    num_workers: int = 2
    caption_dropout: float = 0.1
    cache: str | None = None
    text_column: str = "text"
    image_column: str = "image"

    def __post_init__(self):
        _check_positive(self, "row_len", "rows_per_batch")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1), got {self.caption_dropout}")
        self.sources()

    def sources(self) -> list[tuple[str, float, str]]:
        """(path, weight, name) of every source: one for a plain ``path``. A mixture source's name is
        its ``name``, or its file's stem (what the training log's per-source counts are keyed by)."""
        if isinstance(self.path, str):
            return [(self.path, 1.0, Path(self.path).stem)]
        out = []
        for i, source in enumerate(self.path):
            ok = isinstance(source, dict) and isinstance(source.get("path"), str) and \
                set(source) <= {"path", "weight", "name"} and isinstance(source.get("name", ""), str)
            weight = source.get("weight", 1.0) if isinstance(source, dict) else None
            if not ok or isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise ValueError(f"path[{i}] must be {{\"path\": \"file\", \"weight\": w > 0, \"name\": optional}}, "
                                 f"got {source!r}")
            out.append((source["path"], float(weight), source.get("name") or Path(source["path"]).stem))
        if not out:
            raise ValueError("path: an empty mixture")
        names = [name for _, _, name in out]
        if len(set(names)) != len(names):
            raise ValueError(f"path: two sources share a name {names}; give each a distinct \"name\"")
        return out


@dataclass
class RunConfig:
    """A parsed run config (see the module docstring); paths are absolute."""

    family: str
    data: DataConfig
    train: TrainConfig
    family_config: Any  # the family's config dataclass
    family_keys: set[str] = field(default_factory=set)  # the keys the config's family section set
    base: str | None = None
    init: str | None = None  # a model folder of this family to continue from (a later training stage)
    decoder: DecoderConfig | None = None  # an LLM from scratch
    tokenizer: str | None = None
    vae: str | None = None
    vision: str | dict | None = None
    diffusion: str | dict | None = None
    path: Path | None = None

    @property
    def spec(self) -> FamilySpec:
        return get_family(self.family)


def _check_positive(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(obj, name)}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _matches(value, tp) -> bool:
    """Whether a JSON value fits a field annotation (int, float, str, bool, dict, list, unions, None)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (tuple, list) or tp in (tuple, list):
        return isinstance(value, list)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return isinstance(value, tp) if isinstance(tp, type) else True


def parse_section(cls: type, fields: Any, where: str):
    """A dataclass from one JSON object: unknown keys, missing fields, wrong types and rejected values
    are ConfigErrors naming ``where`` and the key."""
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}: expected an object of {cls.__name__} fields, got {json.dumps(fields)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    missing = [n for n, f in known.items() if n not in fields and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    for name, value in fields.items():
        if not _matches(value, hints[name]):
            raise ConfigError(f"{where}.{name}: expected {_type_name(hints[name])}, got {json.dumps(value)}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _resolve(root: Path, value: str | None) -> str | None:
    return None if value is None else str((root / value).resolve())


def load_run_config(path: str | Path) -> RunConfig:
    """Read and check a run config file (nothing is loaded yet)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"no config file at {path}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    name = raw.get("family")
    known_families = families()
    if name not in known_families:
        raise ConfigError(f"{path}: family {name!r} is not one mmfuse knows {tuple(sorted(known_families))}")
    spec = known_families[name]
    allowed = {"family", "base", "decoder", "init", "tokenizer", "vae", "data", "train", spec.name, *spec.parts}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} for family {name!r}; known: {sorted(allowed)}")
    root = path.parent
    for key in ("base", "init", "tokenizer", "vae"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"{path}: {key} must be a folder path (a string), got {json.dumps(raw[key])}")
    for key in ("vision", "diffusion"):
        if raw.get(key) is not None and not isinstance(raw[key], (str, dict)):
            raise ConfigError(f"{path}: {key} must be a folder path or a config object, got {json.dumps(raw[key])}")
    if raw.get("decoder") is not None and not isinstance(raw["decoder"], dict):
        raise ConfigError(f"{path}: decoder must be an object of DecoderConfig fields, got {json.dumps(raw['decoder'])}")
    if raw.get("init") and (raw.get("base") or raw.get("decoder") is not None):
        raise ConfigError(f"{path}: 'init' (a model folder to continue from) replaces 'base' / 'decoder': give one")
    if not raw.get("base") and raw.get("decoder") is None and not raw.get("init"):
        raise ConfigError(f"{path}: give 'base' (an HF checkpoint folder), 'decoder' (DecoderConfig fields for an "
                          "LLM from scratch) or 'init' (a model folder of this family, e.g. an earlier stage's)")
    if raw.get("base") and raw.get("decoder") is not None:
        raise ConfigError(f"{path}: give 'base' or 'decoder', not both")
    if "data" not in raw:
        raise ConfigError(f"{path}: missing 'data' (at least {{\"path\": \"docs.jsonl\"}})")
    data = parse_section(DataConfig, raw["data"], "data")
    data.path = _resolve(root, data.path) if isinstance(data.path, str) else \
        [{**source, "path": _resolve(root, source["path"])} for source in data.path]
    data.cache = _resolve(root, data.cache)
    train_fields = {"out_dir": "run", **(raw.get("train") or {})}
    train = parse_section(TrainConfig, train_fields, "train")
    train.out_dir = _resolve(root, train.out_dir)
    section = raw.get(spec.name) or {}
    family_config = parse_section(spec.config_class, section, spec.name)
    vae, vision, diffusion = raw.get("vae"), raw.get("vision"), raw.get("diffusion")
    return RunConfig(
        family=name, data=data, train=train, family_config=family_config, family_keys=set(section),
        base=_resolve(root, raw.get("base")),
        init=_resolve(root, raw.get("init")),
        decoder=None if raw.get("decoder") is None else parse_section(DecoderConfig, raw["decoder"], "decoder"),
        tokenizer=_resolve(root, raw.get("tokenizer")),
        vae=vae if vae in (None, "pixels") else _resolve(root, vae),
        vision=_resolve(root, vision) if isinstance(vision, str) else vision,
        diffusion=_resolve(root, diffusion) if isinstance(diffusion, str) else diffusion,
        path=path.resolve(),
    )
