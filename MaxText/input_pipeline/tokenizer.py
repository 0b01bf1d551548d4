"""Tokenizers (`tokenizer_type`, the TOKENIZERS registry): SentencePiece, UTF-8 bytes and Hugging Face
(hf_tokenizer.py); training a whitespace-preserving SentencePiece model for source code.

A tokenizer is registered as a loader, `load(path) -> tokenizer` (None when it needs a file and `path` is
""), where a tokenizer has `encode(text)`, `encode_batch(texts)`, `decode(ids)`, `id_to_piece(i)`,
`byte_lengths()` (bytes of text per id, for bits per byte), `vocab_size`, `pad_id`, `bos_id` and `eos_id`
(None: the tokenizer has none, and none is added), and `fingerprint` (changes with the vocabulary: part
of a token store's name); `encode` adds no BOS/EOS (the input pipeline adds them per document). A
loader's `default_file` attribute names the file looked for next to the data when `tokenizer_path` is
empty. Every model this project trains uses the ids pad=0, unk=1, bos=2, eos=3; the pipeline pads with 0
and masks padding through segment ids, so a foreign model only needs its own bos/eos, which are read
from it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from MaxText import fs
from MaxText.errors import ConfigError, StorageError
from MaxText.input_pipeline.hf_tokenizer import HFTokenizer
from MaxText.registry import Registry

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# SentencePiece skips longer lines while training; long lines of code are rare and still encode fine.
_MAX_TRAIN_LINE_BYTES = 16384


class Tokenizer:
  """A loaded SentencePiece model. `encode` adds no BOS/EOS: the input pipeline adds them per document."""

  def __init__(self, model_path: str | os.PathLike):
    self.path = str(model_path)
    try:
      proto = fs.read_bytes(self.path)
    except StorageError as e:
      raise ValueError(f"cannot read SentencePiece model: {e}") from None
    self.fingerprint = "sentencepiece:" + hashlib.sha256(proto).hexdigest()
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError):
      raise ValueError(f"{self.path!r} is not a SentencePiece model") from None
    self.vocab_size = self._sp.vocab_size()
    self.pad_id = PAD_ID
    self.unk_id = self._sp.unk_id()
    # A model trained without BOS/EOS reports -1; fall back to the project's convention.
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else BOS_ID
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else EOS_ID

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts), out_type=int, num_threads=os.cpu_count() or 1)

  def decode(self, ids: Iterable[int]) -> str:
    # Control ids (pad, bos, eos) decode to nothing, so padded rows decode cleanly.
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def byte_lengths(self) -> np.ndarray:
    """[vocab_size] UTF-8 bytes of text each id stands for (0 for control ids): bits per byte's denominator."""
    out = np.zeros(self.vocab_size, np.int64)
    for i in range(self.vocab_size):
      if self._sp.is_byte(i):
        out[i] = 1
      elif not (self._sp.is_control(i) or self._sp.is_unknown(i) or self._sp.is_unused(i)):
        out[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out

  def __repr__(self) -> str:
    return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


class ByteTokenizer:
  """UTF-8 bytes as ids: byte b is id b + 4, after pad, unk, bos and eos (260 ids); nothing to train or load.

  For byte-level data such as enwik8 (`tokenizer_type: byte`), where losses are reported in bits per byte.
  """

  OFFSET = 4
  path = fingerprint = "byte"
  vocab_size = 256 + OFFSET
  pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_array(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.OFFSET

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode_array(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    # Special ids decode to nothing; a sequence cut inside a character shows a replacement character.
    data = bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < self.vocab_size)
    return data.decode("utf-8", "replace")

  def id_to_piece(self, i: int) -> str:
    i = int(i)
    return ("<pad>", "<unk>", "<s>", "</s>")[i] if i < self.OFFSET else f"<0x{i - self.OFFSET:02X}>"

  def byte_lengths(self) -> np.ndarray:
    return (np.arange(self.vocab_size) >= self.OFFSET).astype(np.int64)

  def __repr__(self) -> str:
    return "ByteTokenizer()"


TOKENIZERS: Registry = Registry("tokenizer_type", "tokenizer")


def _from_file(make, path: str):
  """`make(path)`, None without a path, a file it cannot read as a one-line error naming tokenizer_path."""
  if not path:
    return None
  try:
    return make(path)
  except ValueError as e:
    raise ConfigError(f"tokenizer_path: {e}") from None


@TOKENIZERS.register("sentencepiece")
def load_sentencepiece(path: str) -> Tokenizer | None:
  return _from_file(Tokenizer, path)


load_sentencepiece.default_file = "tokenizer.model"


@TOKENIZERS.register("byte")
def load_bytes(path: str) -> ByteTokenizer:
  del path  # nothing to load
  return ByteTokenizer()


@TOKENIZERS.register("hf")
def load_hf(path: str) -> HFTokenizer | None:
  return _from_file(HFTokenizer, path)


load_hf.default_file = "tokenizer.json"


def default_file(tokenizer_type: str) -> str | None:
  """The file name a tokenizer of this type has next to its data ("tokenizer.model"), None if it needs none."""
  return getattr(TOKENIZERS.get(tokenizer_type), "default_file", None)


def _lines_of_files(paths: Sequence[str | os.PathLike]) -> Iterator[str]:
  for path in paths:
    with open(path, "rb") as f:
      yield from _lines_of_text(f.read().decode("utf-8", "replace"))


def _lines_of_text(text: str) -> Iterator[str]:
  # SentencePiece learns from lines; "\n" is a symbol of its own, so documents keep their line structure.
  for line in text.split("\n"):
    if line.strip():
      yield line


def train_sentencepiece(source, model_path: str | os.PathLike, vocab_size: int, *,
                        model_type: str = "bpe", max_sentences: int = 300_000, seed: int = 0,
                        num_threads: int | None = None) -> Tokenizer:
  """Train a byte-fallback model that keeps whitespace exactly, write it to `model_path`, return it.

  `source` is either a sequence of text file paths, or an iterator (e.g. a generator) of document
  strings. At most `max_sentences` lines, sampled with `seed`, are used, which keeps an 8192-piece
  BPE model at a few seconds on two cores. On a tiny corpus the vocabulary comes out smaller than
  `vocab_size` rather than failing.
  """
  if iter(source) is source:
    lines = (line for text in source for line in _lines_of_text(text))
  else:
    lines = _lines_of_files(list(source))
  lines = (line for line in lines if len(line.encode("utf-8")) <= _MAX_TRAIN_LINE_BYTES)
  first = next(lines, None)
  if first is None:
    raise ValueError("no text to train the tokenizer on (every document is empty)")

  def all_lines():
    yield first
    yield from lines

  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=all_lines(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        user_defined_symbols=["\n"], normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, byte_fallback=True, split_digits=True,
        character_coverage=0.9995, hard_vocab_limit=False, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, max_sentence_length=_MAX_TRAIN_LINE_BYTES,
        num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
    if too_small:
      raise ValueError(f"vocab_size={vocab_size} is too small for this corpus: the byte-fallback "
                       f"tokenizer needs at least {too_small.group(2)} pieces") from None
    raise ValueError(f"SentencePiece training failed: {str(e).splitlines()[0]}") from None
  model_path = Path(model_path)
  tmp = model_path.with_name(f".{model_path.name}.tmp")
  tmp.write_bytes(model.getvalue())
  os.replace(tmp, model_path)
  return Tokenizer(model_path)
