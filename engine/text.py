"""Tokenizers: loaded through ``transformers.AutoTokenizer``, extended with a family's special tokens,
and one way of turning text into ids for training documents and prompts alike.

A document's ids are ``[BOS] + its segments + [EOS]`` (BOS / EOS where the tokenizer has them; EOS
only after a final text segment). A prompt is ``[BOS] + its text``, and the empty prompt is no
tokens at all -- exactly what caption dropout leaves of a document's text, so the unconditional
branch of classifier-free guidance sees at sampling what it saw in training.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from mmfuse.models.decoder import Decoder
from mmfuse.models.family import FamilySpec
from mmfuse.models.hf_io import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TOKENIZER_DIR = "tokenizer"  # where mmfuse's model folders keep theirs


def word_tokenizer(words: list[str], specials: tuple[str, ...] = ("<pad>", "<boi>", "<eoi>"), *,
                   bos: str | None = None, eos: str | None = None):
    """A word-level transformers tokenizer (whitespace-split): ids ``specials``, then ``words``, then
    ``<unk>``. The tokenizer of a tiny run from scratch (the demo, the example configs); ``bos`` /
    ``eos``: special tokens (among ``specials``) that documents begin and end with."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, *words, "<unk>"]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([*specials, "<unk>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token=bos,
                                   eos_token=eos)


def has_tokenizer(path: str | os.PathLike) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | os.PathLike, where: str = "tokenizer"):
    """``AutoTokenizer.from_pretrained`` of a folder (or of its ``tokenizer/`` subfolder), offline.

    Raises:
        CheckpointError: no tokenizer files there, or files transformers cannot read.
    """
    path = Path(path)
    if (path / TOKENIZER_DIR).is_dir() and has_tokenizer(path / TOKENIZER_DIR):
        path = path / TOKENIZER_DIR
    if not has_tokenizer(path):
        raise CheckpointError(f"{where}: no tokenizer in {path} (tokenizer.json / tokenizer_config.json); give "
                              "'tokenizer' (a tokenizer folder) in the config")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # data-loader workers fork after the tokenizer is used
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{where}: transformers cannot read the tokenizer in {path}: {exc}") from exc


def add_family_tokens(tokenizer, spec: FamilySpec, config, explicit: set[str] = frozenset()):
    """Add the family's special tokens (BOI / EOI) to ``tokenizer`` where missing; returns the family
    config with their ids filled in. A token id the config sets by hand (``explicit``) must agree."""
    from tokenizers import AddedToken

    texts = {id_field: getattr(config, text_field) for id_field, text_field in spec.special_tokens.items()}
    missing = [t for t in texts.values() if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    ids = {id_field: tokenizer.convert_tokens_to_ids(text) for id_field, text in texts.items()}
    for id_field in explicit & set(ids):
        if getattr(config, id_field) != ids[id_field]:
            raise CheckpointError(f"{spec.name}.{id_field}={getattr(config, id_field)} but the tokenizer gives "
                                  f"{texts[id_field]!r} the id {ids[id_field]}; leave {id_field} out to take "
                                  "the tokenizer's")
    return dataclasses.replace(config, **ids)


def fit_vocabulary(decoder: Decoder, tokenizer) -> None:
    """Grow the decoder's embeddings to the tokenizer's size (after added special tokens)."""
    if len(tokenizer) > decoder.config.vocab_size:
        decoder.resize_vocab(len(tokenizer))


def text_ids(tokenizer, text: str) -> list[int]:
    """The ids of a piece of text, without special tokens (BOS / EOS are the document's)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A prompt's ids: BOS + the text; the empty prompt is no tokens (the unconditional prompt)."""
    if text == "":
        return []
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + text_ids(tokenizer, text)
