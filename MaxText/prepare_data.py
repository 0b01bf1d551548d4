r"""Text files -> tokenizer + TFRecord shards of pre-tokenized documents.

  python MaxText/prepare_data.py --input ~/src/project --output_dir data/project [--vocab_size 8192]
  python MaxText/prepare_data.py --input books/ --output_dir data/books --tokenizer hf [--tokenizer_path t5/]

Every file is one document. Files go to train / validation / test by a hash of their path relative to
the input, so adding files never moves the others. With fewer than 3 files there would be too few
documents to split, so each file is cut into documents at blank lines once a piece reaches 2000
characters (at a line break after 8000 characters when there is no blank line). The output folder
holds tokenizer.model, {split}-{i:05d}-of-{n:05d}.tfrecord (feature `tokens`, no BOS/EOS; the loader
adds them) and dataset_info.json; it is written to a temporary folder and renamed at the end.

`--tokenizer hf` trains a byte-level BPE with the `tokenizers` library instead (tokenizer.json; train with
tokenizer_type=hf), or with `--tokenizer_path` tokenizes with an existing Hugging Face tokenizer (a
tokenizer.json or a folder saved by `save_pretrained`), whose files are copied next to the shards.

Byte-level data (enwik8-style: one long stream, losses in bits per byte; train with tokenizer_type=byte):
  python MaxText/prepare_data.py --input enwik8 --output_dir data/enwik8 --tokenizer byte --contiguous \
      --validation_fraction 0.05 --test_fraction 0.05
`--contiguous` keeps the input (files in order) one stream: its first part is train, then validation,
then test, each cut into documents of --document_chars characters. `--vocab_only` only trains the
SentencePiece model (the reference's train_vocab mode) and writes <output_dir>/tokenizer.model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if not __package__:  # run as a script: make `MaxText` importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MaxText import startup
from MaxText.errors import PrepareError
from MaxText.input_pipeline.preparation import DEFAULT_EXTENSIONS, TOKENIZERS, prepare, train_vocab
from MaxText.input_pipeline.tokenizer import Tokenizer


def format_summary(summary: dict) -> str:
  lines = [f"prepared {summary['output_dir']} (vocab {summary['vocab_size']})",
           f"  {'split':<11}{'documents':>10}{'tokens':>14}{'files':>7}"]
  for split, s in summary["splits"].items():
    lines.append(f"  {split:<11}{s['documents']:>10}{s['tokens']:>14}{s['files']:>7}")
  if summary["skipped_files"]:
    lines.append(f"  skipped {len(summary['skipped_files'])} unreadable files, e.g. {summary['skipped_files'][0]}")
  return "\n".join(lines)


@startup.cli
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True, help="folder, glob or comma-separated list of either")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--tokenizer_path", default="",
                      help="use this tokenizer instead of training one: a SentencePiece model, or with --tokenizer hf "
                           "a tokenizer.json or a folder holding one")
  parser.add_argument("--validation_fraction", type=float, default=0.01)
  parser.add_argument("--test_fraction", type=float, default=0.01)
  parser.add_argument("--num_shards", type=int, default=4)
  parser.add_argument("--extensions", default=",".join(DEFAULT_EXTENSIONS),
                      help="file extensions searched for in folders, comma-separated")
  parser.add_argument("--tokenizer", default="sentencepiece", choices=TOKENIZERS,
                      help="byte: UTF-8 bytes as ids (train with tokenizer_type=byte), no model is trained; hf: a "
                           "Hugging Face tokenizer, a byte-level BPE trained here unless --tokenizer_path (train with "
                           "tokenizer_type=hf)")
  parser.add_argument("--contiguous", action="store_true",
                      help="one stream split in order into train, validation and test (enwik8-style)")
  parser.add_argument("--document_chars", type=int, default=1_000_000,
                      help="--contiguous: characters per document")
  parser.add_argument("--vocab_only", action="store_true",
                      help="only train the SentencePiece model: <output_dir>/tokenizer.model")
  args = parser.parse_args(argv)
  extensions = tuple(e if e.startswith(".") else f".{e}" for e in (x.strip() for x in args.extensions.split(",")) if e)
  split = dict(validation_fraction=args.validation_fraction, test_fraction=args.test_fraction,
               extensions=extensions, contiguous=args.contiguous, document_chars=args.document_chars)
  if args.vocab_only:
    if args.tokenizer != "sentencepiece" or args.tokenizer_path:
      raise PrepareError(f"--vocab_only trains a SentencePiece model: drop --tokenizer {args.tokenizer} and "
                         f"--tokenizer_path")
    path = train_vocab(args.input, args.output_dir, vocab_size=args.vocab_size, **split)
    print(f"trained {path} ({Tokenizer(path).vocab_size} pieces)")
    return 0
  summary = prepare(args.input, args.output_dir, vocab_size=args.vocab_size, tokenizer_path=args.tokenizer_path,
                    num_shards=args.num_shards, tokenizer=args.tokenizer, **split)
  print(format_summary(summary))
  return 0


if __name__ == "__main__":
  startup.exit_now(main())
