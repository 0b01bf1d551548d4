"""Byte-level data for Transformer-VQ: the byte tokenizer, prepare_data's byte / contiguous / vocab-only
modes, and bits per byte in evaluation."""

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from MaxText import input_pipeline, prepare_data
from MaxText.errors import ConfigError
from MaxText.input_pipeline import preparation, tfrecord_files
from MaxText.input_pipeline.tokenizer import ByteTokenizer, Tokenizer
from MaxText.parallel import sharding
from MaxText.training.run import Run
from tests.test_transformer_vq import VQ, init

TEXT = "def f(x):\n    return  x + 1  # é ü 😀\n\n\tend"


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> Path:
  """One text file of ~60k characters (three standard-library modules, non-ASCII included)."""
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  text = "".join((stdlib / f"{name}.py").read_text() for name in ("textwrap", "shlex", "fractions")) + TEXT
  path = tmp_path_factory.mktemp("stream") / "stream.txt"
  path.write_text(text)
  return path


def test_byte_tokenizer_round_trips_and_counts_bytes():
  tok = ByteTokenizer()
  ids = tok.encode(TEXT)
  assert len(ids) == len(TEXT.encode("utf-8")) and min(ids) >= 4 and max(ids) < tok.vocab_size == 260
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == TEXT
  assert tok.byte_lengths()[ids].sum() == len(TEXT.encode("utf-8")) and tok.byte_lengths()[:4].sum() == 0
  assert [list(a) for a in tok.encode_batch(["ab", ""])] == [[101, 102], []]


def test_contiguous_byte_dataset_keeps_the_stream_in_order(stream, tmp_path):
  text = stream.read_text()
  summary = preparation.prepare(str(stream), str(tmp_path / "bytes"), tokenizer="byte", contiguous=True,
                                 validation_fraction=0.1, test_fraction=0.1, document_chars=10_000, num_shards=1,
                                 progress=False)
  assert summary["tokenizer"] == "byte" and summary["vocab_size"] == 260
  assert not (tmp_path / "bytes" / "tokenizer.model").exists()
  tok, pieces = ByteTokenizer(), {}
  for split in preparation.SPLITS:
    (path,) = tfrecord_files.split_files(str(tmp_path / "bytes"), split)
    pieces[split] = "".join(tok.decode(doc) for doc in tfrecord_files.read_documents(path))
  assert pieces["train"] + pieces["validation"] + pieces["test"] == text
  assert len(pieces["validation"]) == round(0.1 * len(text))
  assert summary["splits"]["train"]["documents"] == math.ceil(len(pieces["train"]) / 10_000)


def test_vocab_only_trains_just_the_sentencepiece_model(stream, tmp_path, capsys):
  assert prepare_data.main(["--input", str(stream), "--output_dir", str(tmp_path / "vocab"), "--vocab_only",
                            "--vocab_size", "400"]) == 0
  assert sorted(p.name for p in (tmp_path / "vocab").iterdir()) == ["tokenizer.model"]
  assert "400 pieces" in capsys.readouterr().out
  tok = Tokenizer(tmp_path / "vocab" / "tokenizer.model")
  # Bits per byte's denominator: every piece's UTF-8 length, control ids none.
  assert tok.byte_lengths()[tok.encode(TEXT)].sum() == len(TEXT.encode("utf-8"))
  assert tok.byte_lengths()[[tok.pad_id, tok.bos_id, tok.eos_id]].sum() == 0
  assert prepare_data.main(["--input", str(stream), "--output_dir", str(tmp_path / "x"), "--tokenizer", "byte",
                            "--tokenizer_path", str(tmp_path / "vocab" / "tokenizer.model")]) == 2


def test_byte_config_errors(make_config):
  with pytest.raises(ConfigError, match="tokenizer_type=byte needs dataset_path"):
    input_pipeline.create_iterator(make_config(dataset_type="tfrecord", tokenizer_type="byte", vocab_size=512), "train")
  with pytest.raises(ConfigError, match="vocab_size >= 260"):
    input_pipeline.get_tokenizer(make_config(dataset_type="tfrecord", tokenizer_type="byte", dataset_path="x"))
  with pytest.raises(ConfigError, match="tokenizer_type"):
    make_config(tokenizer_type="bytes")


def test_byte_level_evaluation_reports_bits_per_byte(make_config, stream, tmp_path):
  """Without BOS/EOS every target is one byte, so bits per byte is exactly the loss over ln 2."""
  data = tmp_path / "bytes"
  preparation.prepare(str(stream), str(data), tokenizer="byte", contiguous=True, validation_fraction=0.1,
                       test_fraction=0.1, document_chars=20_000, num_shards=1, progress=False)
  config = make_config(**{**VQ, "vocab_size": 260}, dataset_type="tfrecord", dataset_path=str(data),
                       tokenizer_type="byte", add_bos=False, add_eos=False, per_device_batch_size=4.0, eval_steps=2)
  np.testing.assert_array_equal(input_pipeline.token_byte_lengths(config), ByteTokenizer().byte_lengths())
  run = Run(config)
  _, params = init(config)
  with sharding.use_mesh(run.mesh, run.rules):
    row = run.evaluate(run.evaluate_fn(), params, config.eval_split)
  assert row["tokens"] == 2 * 4 * 16
  np.testing.assert_allclose(row["bits_per_byte"], row["loss"] / math.log(2), rtol=1e-6)
