"""End to end: train_and_evaluate on a small real corpus, resume, restore onto another mesh, evaluate."""

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from MaxText import errors, startup, train
from MaxText.checkpoint import checkpointing
from MaxText.input_pipeline import preparation
from MaxText.training import train_state
from MaxText.training.run import Run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
  """A few of this machine's standard-library modules, prepared into a 512-token SentencePiece corpus."""
  source = tmp_path_factory.mktemp("text")
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  for name in ("argparse", "textwrap", "string", "difflib", "fractions", "heapq", "bisect", "shlex", "glob",
               "fnmatch", "calendar", "colorsys", "contextlib", "copy", "dataclasses", "enum"):
    (source / f"{name}.txt").write_text((stdlib / f"{name}.py").read_text())
  out = tmp_path_factory.mktemp("corpus") / "data"
  preparation.prepare(str(source), str(out), vocab_size=512, validation_fraction=0.15, test_fraction=0.1,
                       num_shards=2, extensions=(".txt",), progress=False)
  return str(out)


def rows(run_dir, prefix="train"):
  out = []
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if f"{prefix}/loss" in row:
        out.append(row)
  return out


def corpus_config(make_config, corpus, **overrides):
  values = dict(dataset_type="tfrecord", dataset_path=corpus, vocab_size=512, max_target_length=32,
                per_device_batch_size=4.0, base_emb_dim=64, base_mlp_dim=128, learning_rate=3e-3)
  values.update(overrides)
  return make_config(**values)


def test_train_and_evaluate_end_to_end(make_config, corpus):
  config = corpus_config(make_config, corpus, steps=40, log_period=5, eval_interval=20, eval_steps=4,
                         enable_checkpointing=True, checkpoint_period=20, enable_tensorboard=True,
                         learning_rate=1e-2, per_device_batch_size=8.0)
  result = train.train_and_evaluate(config, progress=False)
  assert result["step"] == 40
  train_rows = rows(config.run_dir)
  assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30, 35, 40]
  first, last = train_rows[0]["train/loss"], train_rows[-1]["train/loss"]
  uniform = np.log(config.vocab_size)
  assert last < uniform - 1.0, f"final loss {last:.3f} is not 1 nat below the uniform {uniform:.3f}"
  assert last < first - 0.1, f"loss stopped falling after step 5: {first:.3f} -> {last:.3f}"
  evals = rows(config.run_dir, "eval")
  assert [r["step"] for r in evals] == [20, 40] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
  for key in ("train/grad_norm", "train/param_norm", "train/learning_rate", "train/tokens_per_s", "train/mfu",
              "train/tflops_per_device", "train/step_time", "train/perplexity"):
    assert np.isfinite(train_rows[-1][key]) and train_rows[-1][key] > 0, key
  assert sorted(checkpointing.Checkpointer.from_config(config).all_steps()) == [20, 40]
  saved = startup.load_config([None, os.path.join(config.run_dir, "config.yml")], env={}, num_devices=1)
  assert saved.base_emb_dim == 64 and saved.dataset_path == corpus

  from tensorflow.python.summary.summary_iterator import summary_iterator  # noqa: PLC0415

  tags = set()
  for event_file in Path(config.tensorboard_dir).glob("events.out.tfevents.*"):
    for event in summary_iterator(str(event_file)):
      tags.update(v.tag for v in event.summary.value)
  for tag in ("train/loss", "train/perplexity", "train/learning_rate", "train/grad_norm", "train/param_norm",
              "train/step_time", "train/tokens_per_s", "train/tflops_per_device", "train/mfu", "eval/loss",
              "eval/perplexity"):
    assert tag in tags, tag
  assert any("config" in t for t in tags)


def test_resume_equals_an_uninterrupted_run_loss_for_loss(make_config, corpus):
  common = dict(log_period=1, enable_checkpointing=True, checkpoint_period=3, async_checkpointing=True,
                warmup_steps_fraction=0.3)
  straight = corpus_config(make_config, corpus, run_name="straight", steps=6, **common)
  train.train_and_evaluate(straight, progress=False)
  first_half = corpus_config(make_config, corpus, run_name="resumed", steps=3, learning_rate_schedule_steps=6,
                             **common)
  train.train_and_evaluate(first_half, progress=False)
  second_half = corpus_config(make_config, corpus, run_name="resumed", steps=6, **common)
  train.train_and_evaluate(second_half, progress=False)
  want = [r["train/loss"] for r in rows(straight.run_dir)]
  got = [r["train/loss"] for r in rows(second_half.run_dir)]
  assert len(want) == len(got) == 6
  np.testing.assert_array_equal(got, want)


def test_restore_onto_another_mesh_and_load_parameters(make_config, corpus):
  common = dict(enable_checkpointing=True, log_period=1, steps=4)
  one = corpus_config(make_config, corpus, run_name="mesh", num_devices=1, per_device_batch_size=8.0,
                      steps=2, learning_rate_schedule_steps=4, **{k: v for k, v in common.items() if k != "steps"})
  train.train_and_evaluate(one, progress=False)
  eight = corpus_config(make_config, corpus, run_name="mesh", num_devices=8, per_device_batch_size=1.0,
                        ici_data_parallelism=2, ici_fsdp_parallelism=2, ici_tensor_parallelism=2, **common)
  train.train_and_evaluate(eight, progress=False)
  reference = corpus_config(make_config, corpus, run_name="reference", num_devices=1, per_device_batch_size=8.0,
                            **common)
  train.train_and_evaluate(reference, progress=False)
  got = [r["train/loss"] for r in rows(eight.run_dir)]
  want = [r["train/loss"] for r in rows(reference.run_dir)]
  np.testing.assert_allclose(got, want, rtol=1e-5)

  # A new run that starts from the 8-device run's parameters, on one device, sees them exactly.
  start = corpus_config(make_config, corpus, run_name="finetune", steps=1,
                        load_parameters_path=os.path.join(eight.checkpoint_dir, "4"))
  run = Run(start)
  state = run.init_state()
  saved = checkpointing.Checkpointer.from_config(reference)
  restored, _ = saved.restore(4, train_state.with_shardings(run.abstract, run.shardings))
  saved.close()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state["params"],
               restored["params"])


def test_mode_validation_evaluates_the_checkpoint(make_config, corpus):
  config = corpus_config(make_config, corpus, steps=3, enable_checkpointing=True, eval_interval=3, eval_steps=-1)
  trained = train.train_and_evaluate(config, progress=False)
  evaluated = train.evaluate_checkpoint(
      corpus_config(make_config, corpus, steps=3, enable_checkpointing=True, eval_steps=-1, mode="validation"))
  assert evaluated["step"] == 3
  np.testing.assert_allclose(evaluated["loss"], trained["eval_loss"], rtol=1e-6)
  tested = train.evaluate_checkpoint(
      corpus_config(make_config, corpus, steps=3, enable_checkpointing=True, eval_steps=-1, mode="test"))
  assert tested["tokens"] > 0 and tested["tokens"] != evaluated["tokens"]
  # Only the parameters are read: another optimizer (another state layout) evaluates the same checkpoint.
  other_optimizer = train.evaluate_checkpoint(corpus_config(
      make_config, corpus, steps=3, enable_checkpointing=True, eval_steps=-1, mode="validation", opt_type="adafactor"))
  np.testing.assert_allclose(other_optimizer["loss"], evaluated["loss"], rtol=1e-6)


def cli(*args, **kwargs):
  env = {k: v for k, v in os.environ.items() if not k.startswith("M_")}
  env["XLA_FLAGS"] = ""  # one device: the CLI runs see the machine as a user would
  return subprocess.Popen([sys.executable, "MaxText/train.py", "MaxText/configs/base_v2.yml", *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


TINY_CLI = ["base_emb_dim=32", "base_num_query_heads=2", "base_num_kv_heads=2", "base_mlp_dim=64", "vocab_size=512",
            "max_target_length=32", "per_device_batch_size=2", "eval_interval=0"]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus):
  proc = cli(f"base_output_directory={tmp_path}", "run_name=term", f"dataset_path={corpus}", "steps=100000",
             "log_period=1", "checkpoint_period=100000", *TINY_CLI)
  metrics = tmp_path / "term" / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert time.time() < deadline, "training never logged"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == errors.EXIT_PREEMPTED, err[-2000:]  # schedulers tell a preempted run from a finished one
  assert "SIGTERM: stopping at step" in out
  steps = [int(p.name) for p in (tmp_path / "term" / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and steps[0] >= 2


def test_a_checkpoint_of_another_model_is_a_one_line_error(tmp_path, corpus):
  first = cli(f"base_output_directory={tmp_path}", "run_name=r", f"dataset_path={corpus}", "steps=1", *TINY_CLI)
  _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-2000:]
  wider = [a if not a.startswith("base_mlp_dim") else "base_mlp_dim=96" for a in TINY_CLI]
  second = cli(f"base_output_directory={tmp_path}", "run_name=r", f"dataset_path={corpus}", "steps=2", *wider)
  _, err = second.communicate(timeout=300)
  assert second.returncode == 2
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: checkpoint ") and "does not fit this run's model" in last, last
  assert "Traceback" not in err
