"""Hugging Face tokenizers (`tokenizer_type: hf`) through the `tokenizers` library, and training a BPE one.

`tokenizer_path` is a `tokenizer.json` or a folder holding one (what `save_pretrained` writes, e.g. the
T5 or Llama tokenizer downloaded by the user); a folder without one (a slow SentencePiece-only
tokenizer) is converted by `transformers.AutoTokenizer`, offline, when transformers is installed.
bos / eos / pad / unk come from the folder's tokenizer_config.json or special_tokens_map.json, else from
the tokenizer's special tokens by their usual names; a tokenizer without a BOS (T5) adds none. `encode`
adds no special tokens: the input pipeline adds BOS/EOS per document.

`train_bpe` makes a byte-level BPE (GPT-2's scheme: every byte is a symbol, so any text round-trips
exactly, whitespace included) with this project's ids pad=0, unk=1, bos=2, eos=3.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0..3, the project's convention
_GUESSES = {
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]"),
    "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[SEP]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "unk": ("<unk>", "[UNK]"),
}


def _token_name(value) -> str | None:
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def _declared_specials(folder: Path) -> dict[str, str]:
  """bos/eos/pad/unk token strings declared by a saved tokenizer's config files."""
  found: dict[str, str] = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    try:
      data = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
      continue
    for role in ("bos", "eos", "pad", "unk"):
      token = _token_name(data.get(f"{role}_token"))
      if token and role not in found:
        found[role] = token
  return found


def _load_backend(path: Path):
  file = path / "tokenizer.json" if path.is_dir() else path
  if file.is_file():
    try:
      return tokenizers.Tokenizer.from_file(str(file)), file
    except Exception as e:  # noqa: BLE001 (the Rust side raises plain Exception)
      raise ValueError(f"{str(file)!r} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:200]})") from None
  if not path.is_dir():
    raise ValueError(f"{str(path)!r} is neither a tokenizer.json nor a folder holding one")
  try:
    import transformers  # noqa: PLC0415 (optional: the hf extra, 0.8 s to import)
  except ImportError:
    raise ValueError(f"{str(path)!r} has no tokenizer.json (converting other tokenizer files needs "
                     f"transformers)") from None
  try:
    fast = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
  except Exception as e:  # noqa: BLE001 (transformers raises many kinds for a folder it cannot read)
    raise ValueError(f"{str(path)!r} has no tokenizer.json and transformers cannot load it "
                     f"({str(e).splitlines()[0][:200]})") from None
  if not hasattr(fast, "backend_tokenizer"):
    raise ValueError(f"{str(path)!r} holds a tokenizer without a fast (tokenizers) version")
  return fast.backend_tokenizer, path


class HFTokenizer:
  """A loaded Hugging Face tokenizer with the interface of tokenizer.Tokenizer."""

  def __init__(self, path: str | os.PathLike):
    self.path = str(path)
    self._tok, source = _load_backend(Path(path).expanduser())
    self._tok.no_padding()
    self._tok.no_truncation()
    self.fingerprint = "hf:" + hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    folder = source if source.is_dir() else source.parent
    declared = _declared_specials(folder)
    vocab = self._tok.get_vocab(with_added_tokens=True)
    ids = {}
    for role, names in _GUESSES.items():
      name = declared.get(role) or next((n for n in names if n in vocab), None)
      ids[role] = vocab.get(name) if name is not None else None
    self.bos_id, self.eos_id, self.unk_id = ids["bos"], ids["eos"], ids["unk"]
    # The pipeline pads with 0 and masks padding through segment ids; pad_id only labels that id.
    self.pad_id = ids["pad"] if ids["pad"] is not None else 0

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i)) or ""

  def byte_lengths(self) -> np.ndarray:
    """[vocab_size] UTF-8 bytes of text each id stands for (0 for special tokens): bits per byte's denominator.

    Byte-level tokenizers spell each byte as one character, so a piece's length is its byte count;
    others decode the piece (SentencePiece-style pieces count their word-boundary mark as a space).
    """
    config = json.loads(self._tok.to_str())
    byte_level = "ByteLevel" in json.dumps(config.get("decoder"))
    special = {t["id"] for t in config.get("added_tokens", []) if t.get("special")}
    out = np.zeros(self.vocab_size, np.int64)
    for i in range(self.vocab_size):
      piece = self._tok.id_to_token(i)
      if piece is None or i in special:
        continue
      if byte_level:
        out[i] = len(piece)
      elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        out[i] = 1  # a byte-fallback piece
      else:
        out[i] = len(piece.replace("\u2581", " ").removeprefix("##").encode("utf-8"))
    return out

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def train_bpe(texts: Iterator[str], path: str | os.PathLike, vocab_size: int) -> HFTokenizer:
  """Train a byte-level BPE tokenizer on `texts`, write it to `path` (a tokenizer.json), return it."""
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + len(SPECIALS):
    raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs at least "
                     f"{len(alphabet) + len(SPECIALS)} tokens (256 bytes + {len(SPECIALS)} special)")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), initial_alphabet=alphabet,
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  tok.save(str(tmp))
  os.replace(tmp, path)
  return HFTokenizer(path)
