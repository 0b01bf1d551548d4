"""The filesystem layer: runs, data, tokenizer and TensorBoard in a bucket-like filesystem (TensorFlow's
in-memory ram://, behind the same tf.io.gfile calls as gs://), and one-line errors for a bucket out of reach."""

import json
import os
import re
from pathlib import Path

import pytest

from MaxText import fs, prepare_data, train
from MaxText.checkpoint import checkpointing
from MaxText.config import loader
from MaxText.errors import ConfigError, StorageError
from MaxText.input_pipeline import preparation, tfrecord_files, tokenizer


@pytest.fixture
def bucket(request):
  """A fresh ram:// folder (the in-memory filesystem lives as long as the process)."""
  root = f"ram://test-{request.node.name}-{os.getpid()}"
  yield root
  if fs.exists(root):
    fs.rmtree(root)


def test_the_layer_reads_and_writes_local_and_remote_paths_alike(tmp_path, bucket):
  for root in (str(tmp_path), bucket):
    folder = fs.join(root, "a", "b")
    fs.makedirs(folder)
    fs.write_text(fs.join(folder, "x.txt"), "hello")
    fs.makedirs(fs.join(folder, "sub"))
    assert fs.read_text(fs.join(folder, "x.txt")) == "hello"
    assert fs.isdir(folder) and fs.isfile(fs.join(folder, "x.txt")) and not fs.isfile(folder)
    assert fs.listdir(folder) == ["sub", "x.txt"] and fs.listdir(folder, files_only=True) == ["x.txt"]
    assert fs.glob(fs.join(folder, "*.txt")) == [fs.join(folder, "x.txt")]
    fs.copy(fs.join(folder, "x.txt"), fs.join(root, "y.txt"))
    assert fs.read_bytes(fs.join(root, "y.txt")) == b"hello"
    with fs.open(fs.join(root, "y.txt"), "a") as f:
      f.write(" again")
    assert fs.read_text(fs.join(root, "y.txt")) == "hello again"
    assert fs.dirname(fs.join(folder, "x.txt")) == folder and fs.basename(folder) == "b"
    assert not fs.remove_if_empty(folder) and fs.remove_if_empty(fs.join(folder, "sub"))
    with pytest.raises(StorageError, match=r"^cannot read .*missing\.txt: "):
      fs.read_text(fs.join(root, "missing.txt"))
  assert fs.join("gs://b/runs/", "r1", "config.yml") == "gs://b/runs/r1/config.yml"
  assert fs.dirname("gs://b/runs/r1") == "gs://b/runs" and fs.absolute("gs://b/x") == "gs://b/x"


def test_prepare_train_and_evaluate_with_everything_in_a_bucket(make_config, tmp_path, bucket, capsys):
  source = tmp_path / "text"
  source.mkdir()
  for name in ("argparse", "textwrap", "string", "difflib", "glob"):
    (source / f"{name}.txt").write_text(Path(os.__file__).with_name(f"{name}.py").read_text())
  data = fs.join(bucket, "data")
  summary = preparation.prepare(str(source), data, vocab_size=400, num_shards=2, extensions=(".txt",),
                                 progress=False, validation_fraction=0.2, test_fraction=0.2)
  assert summary["tokenizer_path"] == fs.join(data, "tokenizer.model")
  assert fs.isfile(fs.join(data, preparation.INFO_FILE)) and tfrecord_files.split_files(data, "train")
  assert not Path("ram:").exists()  # nothing local named after the scheme

  runs = fs.join(bucket, "runs")
  config = make_config(dataset_type="tfrecord", dataset_path=data, vocab_size=512, base_output_directory=runs,
                       run_name="r", steps=2, eval_interval=2, eval_steps=1, enable_tensorboard=True,
                       print_sharding=True)
  result = train.train_and_evaluate(config, progress=False)
  # print_sharding=true: train.py lists every parameter before it starts (tests/test_scale_out.py checks the table).
  assert "\nlayers/mlp/wi_0 " in capsys.readouterr().out
  assert result["step"] == 2 and result["eval_loss"] > 0  # the tokenizer came from the bucket: bits per byte
  assert "eval_bits_per_byte" in result
  rows = [json.loads(line) for line in fs.read_text(fs.join(runs, "r", "metrics.jsonl")).splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
  [events] = fs.glob(fs.join(runs, "r", "tensorboard", "events.out.tfevents.*"))
  assert len(fs.read_bytes(events)) > 100
  # A command about the run (decode, evaluation) reads the run's config.yml from the bucket.
  values = loader.load([None, str(loader.BASE_CONFIG)], env={}, for_run=True, base_output_directory=runs,
                         run_name="r")
  assert values["base_emb_dim"] == config.base_emb_dim == 32 and values["dataset_path"] == data


UNREACHABLE = "gs://maxtext-no-such-bucket-for-tests"


def test_a_bucket_out_of_reach_is_a_one_line_error_and_leaves_no_local_folder(tmp_path, monkeypatch, capsys):
  # A token for tests keeps TF's GCS client from looking for credentials (it reads the variable on every
  # request); the request still fails (no such bucket, or no network), and fast.
  monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "not-a-token")
  monkeypatch.chdir(tmp_path)  # a local folder named after the scheme would appear here
  checks = [
      lambda: fs.check_writable(f"{UNREACHABLE}/runs/r", "base_output_directory"),
      lambda: fs.missing([f"{UNREACHABLE}/runs/r"], "base_output_directory"),
      lambda: tfrecord_files.split_files(f"{UNREACHABLE}/data", "train"),
      lambda: tokenizer.load_sentencepiece(f"{UNREACHABLE}/data/tokenizer.model"),
      lambda: checkpointing.load_parameters(f"{UNREACHABLE}/runs/r/checkpoints/10", {}),
  ]
  lines = []
  for check in checks:
    with pytest.raises(ConfigError) as e:
      check()
    lines.append(f"{type(e.value).__name__} {e.value}")
  # Each is one line that names what was being done and where; the reason is the storage's.
  assert all("\n" not in line for line in lines), lines
  assert lines[0].startswith(f"StorageError base_output_directory: cannot create folder {UNREACHABLE}/runs/r: ")
  assert lines[1].startswith(f"StorageError base_output_directory: cannot reach {UNREACHABLE}/runs/r: ")
  assert re.match(f"StorageError cannot (reach|list) {UNREACHABLE}/data: .", lines[2]), lines[2]
  assert lines[3].startswith(f"ConfigError tokenizer_path: cannot read SentencePiece model: cannot read {UNREACHABLE}")
  assert re.match(f"CheckpointError load_parameters_path: cannot (reach|list) {UNREACHABLE}/runs/r/checkpoints/10",
                  lines[4]), lines[4]

  (tmp_path / "in.txt").write_text("some text\n" * 100)
  code = prepare_data.main(["--input", str(tmp_path / "in.txt"), "--output_dir", f"{UNREACHABLE}/d",
                            "--vocab_size", "300"])
  err = capsys.readouterr().err
  assert code == 2 and "Traceback" not in err
  assert re.match(f"error: --output_dir: cannot (reach|list) {UNREACHABLE}/d: .",
                  err.strip().splitlines()[-1])
  assert list(tmp_path.iterdir()) == [tmp_path / "in.txt"]  # no local "gs:" folder
