"""Training data: records of text and image files, read lazily by data-loader workers into batches.

1. **Records** (:func:`read_sources`): a JSONL file, one document per line --
   ``{"text": "a red square", "image": "img/0.png"}`` (an image-caption pair: the caption, then the
   image) or ``{"segments": [{"text": "..."}, {"image": "a.png", "diffuse": false}, {"text": "..."}]}``
   (interleaved; ``diffuse`` false: a clean conditioning image, e.g. one to caption; a text segment
   with ``"loss": false`` -- or ``"role": "user"`` / ``"system"`` -- is read but not trained on, e.g. the
   question of a question-answer pair; ``"role": "assistant"`` is the default) -- with image
   paths relative to the file. The fast path keeps working: text as a list of token ids, an image as
   a ``.safetensors`` file holding one ready tensor (``latent``, or ``pixels`` for MetaMorph). A
   Hugging Face ``datasets`` folder (``save_to_disk``) with a text and an image column reads the same
   way. Several such sources with weights make a mixture. Every line is checked up front (structure,
   files present, ids in the vocabulary); no image is read until a worker needs it.
2. **Documents** (:class:`DocumentReader`, in the workers): text tokenized (BOS / EOS added, see
   :mod:`mmfuse.engine.text`), images opened with PIL and resized / cropped by the family's image
   input -- or taken encoded from the ``mmfuse prepare`` cache (:mod:`mmfuse.engine.prepare`). A
   model built on a VLM that reads source pictures with its tower (MetaQuery on a VLM base) gets a
   ``diffuse`` false picture as the VLM's image processor gives it (:class:`mmfuse.models.vlm.ReaderImages`).
3. **Micro-batches** (:class:`MicroBatches`): micro-batch ``i`` draws documents with a generator
   seeded from ``(seed, i, rank)`` until they fill its rows, so its content is a function of ``i``
   alone -- the same with any number of workers, and a resumed run reads what the uninterrupted one
   did. A mixture's sources take turns in proportion to their weights (smooth weighted round robin:
   exact shares in every micro-batch, not only on average). Caption dropout is drawn there too.
4. **Batches** (:class:`BatchStream`, the training process): images still in pixels are encoded on
   the training device in one call per micro-batch, then the family's ``make_batch`` packs the rows.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from mmfuse.engine.config import ConfigError, DataConfig
from mmfuse.engine.packing import Image, PromptText
from mmfuse.engine.text import text_ids
from mmfuse.models.vae import sample_latents

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
ROLES = {"system": False, "user": False, "assistant": True}  # a text segment's role -> whether it is trained on
TENSOR_SUFFIX = ".safetensors"


class DataError(ConfigError):
    """A document that cannot be read: named by its file and line (or dataset row)."""


@dataclass(frozen=True)
class ImageRef:
    """One image of a record: a file (PNG / JPEG / ready ``.safetensors`` tensor) or a dataset row's image."""

    key: str  # the cache key: the path relative to the run's folder, or "<dataset>:row:<i>"
    path: str | None = None
    image: Any = None  # a PIL image (a datasets row)
    diffuse: bool = True


@dataclass(frozen=True)
class Untrained:
    """A text segment with ``"loss": false``: read by the model, not an LM target (a question, a user turn)."""

    text: str | tuple[int, ...]


@dataclass(frozen=True)
class Record:
    """A document before reading: text (a string or token ids) and image references, in order."""

    segments: tuple
    where: str  # "docs.jsonl:7", or "<dataset> row 12"


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One source of a (possibly one-source) mixture: its records, its weight and its name."""

    records: Sequence[Record]
    weight: float = 1.0
    name: str = "data"


def read_sources(data: DataConfig, vocab_size: int | None = None, root: str | os.PathLike | None = None) -> list[Source]:
    """Every source of ``data.path`` (one, or a weighted mixture), read and checked."""
    return [Source(read_records(path, vocab_size, root, data.text_column, data.image_column), weight, name)
            for path, weight, name in data.sources()]


def read_records(path: str | os.PathLike, vocab_size: int | None = None, root: str | os.PathLike | None = None,
                 text_column: str = "text", image_column: str = "image") -> Sequence[Record]:
    """The documents of a JSONL file or a ``datasets`` folder (see the module docstring). Image keys
    (what the ``mmfuse prepare`` cache is indexed by) are relative to ``root`` (default the file's folder)."""
    path = Path(path)
    if path.is_dir():
        return DatasetRecords(path, text_column, image_column)
    if not path.is_file():
        raise DataError(f"data.path: no data file at {path}")
    root = Path(root) if root is not None else path.parent
    records = [r for r in (_parse_line(path, n, line, vocab_size, root) for n, line in
                           enumerate(path.read_text().splitlines(), 1)) if r is not None]
    if not records:
        raise DataError(f"data.path: {path} holds no documents")
    return records


def _parse_line(path: Path, n: int, line: str, vocab_size: int | None, root: Path) -> Record | None:
    if not line.strip():
        return None
    where = f"{path.name}:{n}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(obj, dict) or not ("segments" in obj or ("text" in obj and "image" in obj)):
        raise DataError(f'{where}: a document is {{"text": ..., "image": ...}} or {{"segments": [...]}}')
    raw = obj["segments"] if "segments" in obj else [{"text": obj["text"]}, {"image": obj["image"]}]
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: segments must be a non-empty list")
    return Record(tuple(_parse_segment(path, where, s, vocab_size, root) for s in raw), where)


def _parse_segment(path: Path, where: str, seg, vocab_size: int | None, root: Path):
    keys = set(seg) if isinstance(seg, dict) else set()
    text_keys = {"text", "loss", "role"}
    if len({"text", "image"} & keys) != 1 or keys - (text_keys if "text" in keys else {"image", "diffuse"}) or \
            {"loss", "role"} <= keys:
        raise DataError(f'{where}: a segment is {{"text": ..., "loss": bool}} (or "role": "user" / "assistant") or '
                        f'{{"image": "file", "diffuse": bool}}, got {json.dumps(seg)}')
    if "text" in seg:
        loss = seg.get("loss", ROLES.get(seg.get("role", "assistant")))
        if not isinstance(loss, bool):
            raise DataError(f"{where}: loss must be a boolean (false: text the model reads but is not trained on) and "
                            f"role one of {sorted(ROLES)}, got {json.dumps(seg)}")
        value = _parse_text(where, seg["text"], vocab_size)
        return value if loss else Untrained(value)
    name, diffuse = seg["image"], seg.get("diffuse", True)
    if not isinstance(name, str) or not isinstance(diffuse, bool):
        raise DataError(f"{where}: image must be a file name and diffuse a boolean, got {json.dumps(seg)}")
    file = (path.parent / name).resolve()
    if not file.is_file():
        raise DataError(f"{where}: image file {name} not found (looked in {file.parent})")
    if not file.name.lower().endswith(IMAGE_SUFFIXES + (TENSOR_SUFFIX,)):
        raise DataError(f"{where}: image {name} is neither an image file {IMAGE_SUFFIXES} nor {TENSOR_SUFFIX}")
    return ImageRef(key=Path(os.path.relpath(file, root)).as_posix(), path=str(file), diffuse=diffuse)


def _parse_text(where: str, text, vocab_size: int | None) -> str | tuple[int, ...]:
    if isinstance(text, str):
        return text
    if not isinstance(text, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in text):
        raise DataError(f"{where}: text must be a string or a list of token ids, got {json.dumps(text)}")
    bad = [t for t in text if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise DataError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return tuple(text)


class DatasetRecords(Sequence):
    """The rows of a Hugging Face ``datasets`` folder (``Dataset.save_to_disk``) as image-caption pairs."""

    def __init__(self, path: Path, text_column: str, image_column: str):
        try:
            import datasets
        except ImportError as exc:
            raise DataError(f"data.path: {path} is a folder; reading a datasets folder needs "
                            "`pip install datasets`") from exc
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"data.path: {path} is not a datasets folder saved with save_to_disk: {exc}") from exc
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"data.path: {path} holds splits {list(ds)} but no 'train'")
            ds = ds["train"]
        missing = [c for c in (text_column, image_column) if c not in ds.column_names]
        if missing:
            raise DataError(f"data.path: {path} has no column(s) {missing} (columns: {ds.column_names}); set "
                            "data.text_column / data.image_column")
        if len(ds) == 0:
            raise DataError(f"data.path: {path} holds no rows")
        self.dataset, self.name = ds, path.name
        self.text_column, self.image_column = text_column, image_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Record:
        row = self.dataset[int(i)]
        text, image = row[self.text_column], row[self.image_column]
        where = f"{self.name} row {i}"
        if not isinstance(text, str) or image is None:
            raise DataError(f"{where}: needs a string {self.text_column!r} and an image {self.image_column!r}")
        return Record((text, ImageRef(key=f"{self.name}:row:{i}", image=image)), where)


def check_structure(sources: Sequence[Source], check: Callable[[list, int], str | None]) -> None:
    """Run a family's document check on the layout of every JSONL record (text and image segments in
    order, lengths left to the workers), so a document the family cannot train on is named up front."""
    empty = torch.zeros(0, dtype=torch.long)
    for source in sources:
        if isinstance(source.records, DatasetRecords):
            continue  # image-caption pairs by construction
        for record in source.records:
            layout = [Image(empty, s.diffuse) if isinstance(s, ImageRef) else empty for s in record.segments]
            problem = check(layout, 2**62)
            if problem:
                raise DataError(f"{record.where}: {problem}")


def image_refs(sources: Sequence[Source]) -> Iterator[ImageRef]:
    """Every distinct image of the sources (by cache key), in order."""
    seen = set()
    for records in (s.records for s in sources):
        for record in (records[i] for i in range(len(records))):
            for seg in record.segments:
                if isinstance(seg, ImageRef) and seg.key not in seen:
                    seen.add(seg.key)
                    yield seg


# ----------------------------------------------------------------------------------------------
# Documents (data-loader workers)
# ----------------------------------------------------------------------------------------------


@dataclass
class ImageData(Image):
    """An image as a worker delivers it: ``tensor`` holds pixels to encode, the posterior mean of a
    cached one (``std`` beside it), the ready model input, or (``"source"``) a source picture as a
    VLM reader's image processor gives it, a dict of tensors (``kind`` says which)."""

    kind: str = "ready"  # "pixels" | "moments" | "ready" | "source"
    std: torch.Tensor | None = None


def open_image(ref: ImageRef, where: str):
    """The PIL image of a reference (decoded now, so that a truncated file fails here, by name)."""
    if ref.image is not None:
        return ref.image
    from PIL import Image as PILImage

    try:
        with PILImage.open(ref.path) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: cannot read image {ref.key}: {exc}") from exc


class DocumentReader:
    """Record -> document (token tensors and :class:`ImageData`), in a worker. Picklable: it holds the
    tokenizer, the family's image preprocessing and the cache, never the model."""

    def __init__(self, tokenizer, image_input, cache=None):
        self.tokenizer = tokenizer
        self._ids: dict[str, torch.Tensor] = {}  # text -> ids, for the texts documents repeat (prompts, labels)
        self.preprocess = image_input.preprocess if image_input is not None else None
        # a source picture (diffuse false) that a VLM reader reads, where the model has one
        self.source = getattr(image_input, "source", None)
        self.tensor_name = getattr(image_input, "tensor_name", "latent")
        self.ready_shape = getattr(image_input, "ready_shape", None)
        self.cache = cache

    def read(self, record: Record) -> list:
        tok = self.tokenizer
        bos = getattr(tok, "bos_token_id", None) if tok is not None else None
        eos = getattr(tok, "eos_token_id", None) if tok is not None else None
        doc: list = [torch.tensor([bos])] if bos is not None else []
        for seg in record.segments:
            if isinstance(seg, ImageRef):
                doc.append(self._image(seg, record.where))
            else:
                text = seg.text if isinstance(seg, Untrained) else seg
                if isinstance(text, str) and tok is None:
                    raise DataError(f"{record.where}: text given as a string but the run has no tokenizer")
                ids = self._text(text) if isinstance(text, str) else torch.tensor(text, dtype=torch.long)
                doc.append(PromptText(ids) if isinstance(seg, Untrained) else ids)
        if eos is not None and not isinstance(record.segments[-1], ImageRef):
            doc.append(torch.tensor([eos]))
        return doc

    def _text(self, text: str) -> torch.Tensor:
        ids = self._ids.get(text)
        if ids is None:
            ids = torch.tensor(text_ids(self.tokenizer, text), dtype=torch.long)
            if len(self._ids) < 65536:
                self._ids[text] = ids
        return ids

    def _image(self, ref: ImageRef, where: str) -> ImageData:
        if self.source is not None and not ref.diffuse:
            return ImageData(self.source(open_image(ref, where)), False, "source")
        if self.cache is not None and ref.key in self.cache:
            mean, std = self.cache.get(ref.key)
            return ImageData(mean, ref.diffuse, "moments", std)
        if ref.path is not None and ref.path.endswith(TENSOR_SUFFIX):
            return ImageData(self._ready_tensor(ref, where), ref.diffuse, "ready")
        if self.preprocess is None:
            raise DataError(f"{where}: image {ref.key} is a picture but the run cannot encode pictures (no 'vae')")
        return ImageData(self.preprocess(open_image(ref, where)), ref.diffuse, "pixels")

    def _ready_tensor(self, ref: ImageRef, where: str) -> torch.Tensor:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(ref.path)
        except (SafetensorError, OSError) as exc:
            raise DataError(f"{where}: {ref.key} is not a readable safetensors file (truncated?): {exc}") from exc
        if self.tensor_name not in tensors:
            raise DataError(f"{where}: {ref.key} holds {sorted(tensors)}, not the {self.tensor_name!r} tensor")
        t = tensors[self.tensor_name]
        if self.ready_shape is not None and tuple(t.shape) != tuple(self.ready_shape):
            raise DataError(f"{where}: {ref.key}'s {self.tensor_name!r} has shape {tuple(t.shape)}; the model takes "
                            f"{tuple(self.ready_shape)}")
        return t


def drop_caption(document: list) -> list:
    """The document without the text before its first diffused image (BOS included): what the
    unconditional prompt of classifier-free guidance trains on."""
    first = next((i for i, s in enumerate(document) if isinstance(s, ImageData) and s.diffuse), None)
    if first is None:
        return document
    return [s for i, s in enumerate(document) if i >= first or isinstance(s, ImageData)]


def weighted_turns(shares: Sequence[float]) -> Iterator[int]:
    """Source indices, each next one the source furthest behind its share (smooth weighted round robin):
    every prefix holds the shares as closely as whole documents can (equal shares alternate)."""
    taken, j = [0] * len(shares), 0
    while True:
        j += 1
        s = max(range(len(shares)), key=lambda k: j * shares[k] - taken[k])
        taken[s] += 1
        yield s


class WorkerFailure:
    """A worker's DataError, carried back as a value so the training process raises it as one line."""

    def __init__(self, message: str):
        self.message = message


class SourcedDocuments(list):
    """A micro-batch's documents and, for a mixture, each source's share of them: ``counts``
    (``docs/<name>``, ``tokens/<name>``: documents and text tokens), what the training log adds up."""

    counts: dict

    def __init__(self, documents=()):
        super().__init__(documents)
        self.counts = {}


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch index -> the documents that fill it (see the module docstring, step 3)."""

    def __init__(self, sources: Sequence[Source], reader: DocumentReader, size: Callable[[list], int],
                 check: Callable[[list, int], str | None], row_len: int, rows: int, *, seed: int = 0,
                 rank: int = 0, world: int = 1, caption_dropout: float = 0.0, length: int = 2**62):
        self.sources, self.reader, self.size, self.check = list(sources), reader, size, check
        total = sum(s.weight for s in self.sources)
        self.shares = [s.weight / total for s in self.sources]
        self.row_len, self.budget = row_len, rows * row_len
        self.seed, self.rank, self.world, self.caption_dropout, self.length = seed, rank, world, caption_dropout, length

    def __len__(self) -> int:
        return self.length

    def generator(self, index: int) -> torch.Generator:
        """The generator of micro-batch ``index`` on this rank (documents, caption dropout)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + index * self.world + self.rank)

    def __getitem__(self, index: int) -> list | WorkerFailure:
        try:
            return self.documents(index)
        except DataError as exc:
            return WorkerFailure(str(exc))

    def documents(self, index: int) -> "SourcedDocuments":
        gen = self.generator(index)
        picked, filled, counts = SourcedDocuments(), 0, {}
        turns = weighted_turns(self.shares)
        while filled < self.budget:
            source = self.sources[next(turns)]
            records = source.records
            record = records[int(torch.randint(0, len(records), (1,), generator=gen))]
            doc = self.reader.read(record)
            problem = self.check(doc, self.row_len)
            if problem:
                raise DataError(f"{record.where}: {problem}")
            if self.caption_dropout and float(torch.rand((), generator=gen)) < self.caption_dropout:
                doc = drop_caption(doc)
            picked.append(doc)
            filled += max(1, self.size(doc))
            docs, tokens = counts.get(source.name, (0, 0))
            counts[source.name] = (docs + 1, tokens + sum(len(s) for s in doc if not isinstance(s, ImageData)))
        if len(self.sources) > 1:
            picked.counts = {**{f"docs/{n}": d for n, (d, _) in counts.items()},
                             **{f"tokens/{n}": t for n, (_, t) in counts.items()}}
        return picked


def _identity(x):
    return x


def worker_options(num_workers: int) -> dict:
    """DataLoader options beside ``num_workers``: forked workers reading ahead (none in the main process)."""
    return dict(num_workers=num_workers, **(dict(prefetch_factor=2, multiprocessing_context="fork") if num_workers
                                              else {}))


def encode_images(documents: list[list], image_input, device: torch.device,
                  generator: torch.Generator | None) -> list[list]:
    """Documents with every :class:`ImageData` replaced by an :class:`Image` of its model input on
    ``device``: pixels encoded in one batched call, cached moments sampled, ready tensors moved."""
    images = [s for doc in documents for s in doc if isinstance(s, ImageData)]
    encoded: dict[int, Any] = {id(im): im.tensor if im.kind == "source" else im.tensor.to(device)
                               for im in images if im.kind != "pixels"}  # a source: the reader moves it
    pixels = [im for im in images if im.kind == "pixels"]
    if pixels:
        batch = image_input.encode(torch.stack([im.tensor for im in pixels]).to(device), generator)
        encoded.update({id(im): t for im, t in zip(pixels, batch)})
    drawn = [im for im in images if im.kind == "moments" and im.std is not None]  # cached KL posteriors
    if drawn:
        means = torch.stack([encoded[id(im)] for im in drawn])
        samples = sample_latents(means, torch.stack([im.std for im in drawn]).to(device), generator)
        encoded.update({id(im): t for im, t in zip(drawn, samples)})
    return [[Image(encoded[id(s)], s.diffuse) if isinstance(s, ImageData) else s for s in doc] for doc in documents]


class BatchStream:
    """``get_batch(step, micro)`` for the Trainer over a DataLoader of :class:`MicroBatches`.

    Reads ahead with ``num_workers`` processes; asked for another index than the next one (a resumed
    run), it starts a new loader there. ``finish(documents, index)`` turns the workers' documents into
    the batch on the training device.
    """

    def __init__(self, batches: MicroBatches, finish: Callable[[list, int], Any], grad_accum: int,
                 num_workers: int = 0):
        self.batches, self.finish, self.grad_accum, self.num_workers = batches, finish, grad_accum, num_workers
        self._iterator: Iterator | None = None
        self._next = -1

    def _loader(self, start: int) -> Iterator:
        loader = torch.utils.data.DataLoader(self.batches, batch_size=None, sampler=range(start, len(self.batches)),
                                             collate_fn=_identity, **worker_options(self.num_workers))
        return iter(loader)

    def __call__(self, step: int, micro: int):
        index = step * self.grad_accum + micro
        if self._iterator is None or index != self._next:
            self.close()
            self._iterator = self._loader(index)
        documents = next(self._iterator)
        self._next = index + 1
        if isinstance(documents, WorkerFailure):
            self.close()
            raise DataError(documents.message)
        return self.finish(documents, index)

    def close(self) -> None:
        """Stop the workers (also when training ends or fails)."""
        self._iterator = None

