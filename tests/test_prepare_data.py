"""prepare_data: text files -> tokenizer + TFRecord shards; splits, chunking, errors, atomic output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from MaxText import prepare_data
from MaxText.input_pipeline import preparation, tfrecord_files
from MaxText.input_pipeline.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def make_sources(folder, n=8):
  texts = {}
  for i in range(n):
    rel = f"pkg{i % 2}/mod{i}.py"
    texts[rel] = f"def f{i}(x):\n    return x * {i}\n\n\nclass C{i}:\n    pass\n" * (1 + i % 3)
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    (folder / rel).write_text(texts[rel])
  (folder / "pkg0" / "ignored.bin").write_bytes(b"\x00\x01")
  (folder / ".hidden").mkdir()
  (folder / ".hidden" / "secret.py").write_text("x = 1\n")
  return texts


def decoded_documents(folder, split):
  tok = Tokenizer(folder / "tokenizer.model")
  return [tok.decode(ids) for f in sorted(folder.glob(f"{split}-*.tfrecord")) for ids in tfrecord_files.read_documents(str(f))]


def test_prepare_writes_every_split_and_round_trips_the_text(tmp_path):
  texts = make_sources(tmp_path / "src")
  out = tmp_path / "out"
  summary = preparation.prepare(str(tmp_path / "src"), str(out), vocab_size=400, num_shards=2, progress=False)
  splits = summary["splits"]
  assert all(splits[s]["documents"] >= 1 for s in preparation.SPLITS)
  assert sum(splits[s]["documents"] for s in preparation.SPLITS) == len(texts)
  assert splits["train"]["files"] == 2
  assert sorted(p.name for p in out.glob("train-*")) == ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
  assert json.loads((out / "dataset_info.json").read_text())["splits"] == splits
  documents = [d for s in preparation.SPLITS for d in decoded_documents(out, s)]
  assert sorted(documents) == sorted(texts.values())  # whitespace and newlines survive exactly
  assert sum(splits[s]["tokens"] for s in preparation.SPLITS) == sum(
      len(ids) for f in out.glob("*.tfrecord") for ids in tfrecord_files.read_documents(str(f)))
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

  # The same input gives the same splits; a given tokenizer is copied, and the old folder replaced.
  again = preparation.prepare(str(tmp_path / "src"), str(out), tokenizer_path=str(out / "tokenizer.model"),
                               num_shards=2, progress=False)
  assert again["splits"] == splits


def test_split_assignment_is_stable_and_fills_small_splits():
  keys = [f"file{i}.py" for i in range(400)]
  splits = preparation.assign_splits(keys, 0.1, 0.05)
  assert 20 < len(splits["validation"]) < 60 and 5 < len(splits["test"]) < 40
  grown = preparation.assign_splits(keys + ["new.py"], 0.1, 0.05)
  for s in preparation.SPLITS:
    assert set(splits[s]) <= set(grown[s])  # adding a file moves no other file
  tiny = preparation.assign_splits(["a", "b", "c"], 0.01, 0.01)
  assert all(len(tiny[s]) == 1 for s in preparation.SPLITS)
  assert preparation.assign_splits(["a", "b", "c"], 0.0, 0.01)["validation"] == []


def test_a_single_file_is_cut_into_documents_at_blank_lines(tmp_path):
  paragraphs = [f"Paragraph {i}. " + "word " * (50 + i % 200) for i in range(300)]
  text = "\n\n".join(paragraphs) + "\n"
  pieces = preparation.split_into_documents(text)
  assert "".join(pieces) == text and len(pieces) > 20
  assert all(p.endswith("\n\n") for p in pieces[:-1])
  assert all(len(p) <= 8000 for p in pieces)
  one_line = "x" * 20000
  assert "".join(preparation.split_into_documents(one_line)) == one_line
  (tmp_path / "book.txt").write_text(text)
  summary = preparation.prepare(str(tmp_path / "book.txt"), str(tmp_path / "out"), vocab_size=400,
                                 progress=False)
  assert all(summary["splits"][s]["documents"] >= 1 for s in preparation.SPLITS)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
  def run(*args):
    return subprocess.run([sys.executable, str(REPO / "MaxText" / "prepare_data.py"), *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)

  bad = run("--input", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out"))
  assert bad.returncode == 2
  assert bad.stderr.count("\n") == 1 and "missing" in bad.stderr and "Traceback" not in bad.stderr
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "a.py").write_text("a = 1\n")
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "mine.txt").write_text("keep me")
  assert prepare_data.main(["--input", str(tmp_path / "src"), "--output_dir", str(tmp_path / "busy")]) == 2
  assert (tmp_path / "busy" / "mine.txt").read_text() == "keep me"


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
  make_sources(tmp_path / "src")

  def interrupt(self, texts):
    raise KeyboardInterrupt

  monkeypatch.setattr(Tokenizer, "encode_batch", interrupt)
  with pytest.raises(KeyboardInterrupt):
    preparation.prepare(str(tmp_path / "src"), str(tmp_path / "out"), vocab_size=400, progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli_prints_a_summary(tmp_path, capsys):
  make_sources(tmp_path / "src", n=3)
  code = prepare_data.main(["--input", f"{tmp_path / 'src'}/pkg0/*.py,{tmp_path / 'src'}/pkg1",
                            "--output_dir", str(tmp_path / "out"), "--vocab_size", "300", "--extensions", "py"])
  assert code == 0
  printed = capsys.readouterr().out
  assert "train" in printed and "validation" in printed and "documents" in printed


def test_a_bpe_tokenizer_is_trained_or_reused_with_tokenizer_hf(tmp_path, make_config):
  from MaxText import input_pipeline  # noqa: PLC0415
  from MaxText.input_pipeline.hf_tokenizer import HFTokenizer  # noqa: PLC0415

  texts = make_sources(tmp_path / "src")
  out = tmp_path / "out"
  summary = preparation.prepare(str(tmp_path / "src"), str(out), vocab_size=300, tokenizer="hf", num_shards=1,
                                 progress=False)
  assert summary["tokenizer_path"] == str(out / "tokenizer.json") and not (out / "tokenizer.model").exists()
  tok = HFTokenizer(out / "tokenizer.json")
  assert 260 < summary["vocab_size"] == tok.vocab_size <= 300 and (tok.bos_id, tok.eos_id) == (2, 3)
  documents = [tok.decode(ids) for f in sorted(out.glob("*.tfrecord")) for ids in tfrecord_files.read_documents(str(f))]
  assert sorted(documents) == sorted(texts.values())  # whitespace and newlines survive exactly
  # Training finds tokenizer.json next to the data when tokenizer_type=hf.
  config = make_config(dataset_path=str(out), dataset_type="tfrecord", tokenizer_type="hf", vocab_size=300)
  assert input_pipeline.resolve_dataset(config) == (str(out), str(out / "tokenizer.json"))
  assert input_pipeline.get_tokenizer(config).fingerprint == tok.fingerprint

  # An existing Hugging Face tokenizer (a folder saved by save_pretrained, or the file) is used as it is.
  saved = tmp_path / "saved_tok"
  saved.mkdir()
  (saved / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes())
  (saved / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  for given in (saved, saved / "tokenizer.json"):
    again = preparation.prepare(str(tmp_path / "src"), str(tmp_path / "again"), tokenizer="hf",
                                 tokenizer_path=str(given), num_shards=1, progress=False)
    assert again["splits"] == summary["splits"]
    assert HFTokenizer(tmp_path / "again").fingerprint == tok.fingerprint
  assert (tmp_path / "again" / "tokenizer.json").is_file()
  code = prepare_data.main(["--input", str(tmp_path / "src"), "--output_dir", str(tmp_path / "x"), "--tokenizer", "hf",
                            "--vocab_size", "100"])
  assert code == 2
