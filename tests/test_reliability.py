"""Nothing lost (docs/reliability.md), one test per promise: divergence, damaged checkpoints, disk faults,
reruns after a lost evaluation, metrics once per step, the saved schedule, relative paths.

Everything runs in-process through `train.main` (the CLI's exit codes and one-line messages) on a 1-layer
model; the runs share one trained run (module fixture) that each test copies and then damages or resumes.
Signals and kills need processes of their own: tests/test_interrupts.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import BASE

from MaxText import errors, train
from MaxText.training import faults
from MaxText.tools.fault_injection import load_state

TINY = ["base_emb_dim=32", "base_num_decoder_layers=1", "base_num_query_heads=2", "base_num_kv_heads=2",
        "base_mlp_dim=64", "vocab_size=128", "max_target_length=16", "per_device_batch_size=2", "num_devices=1",
        "log_period=1", "enable_tensorboard=false", "dataset_type=synthetic", "learning_rate=1e-2",
        "warmup_steps_fraction=0", "checkpoint_period=1", "max_num_checkpoints_to_keep=3", "eval_interval=2",
        "eval_steps=1", "peak_tflops_per_device=1"]


def main(out: Path, run: str, *args: str, capsys) -> tuple[int, str, str]:
  """train.main in-process: (exit code, stdout, stderr)."""
  given = {a.split("=", 1)[0] for a in args}
  argv = [None, BASE, *[a for a in TINY if a.split("=", 1)[0] not in given], f"base_output_directory={out}",
          f"run_name={run}", *args]
  capsys.readouterr()
  code = train.main(argv)
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def one_error_line(err: str) -> str:
  assert "Traceback" not in err, err[-3000:]
  lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, err[-3000:]
  return lines[0]


def steps_of(run_dir: Path) -> list[int]:
  return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def rows(run_dir: Path, prefix: str = "train") -> list[dict]:
  out = []
  for line in (run_dir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if f"{prefix}/loss" in row:
      out.append(row)
  return out


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  """A finished 2-step run (checkpoints 1 and 2, an evaluation at step 2), copied by the tests."""
  out = tmp_path_factory.mktemp("good")
  code = train.main([None, BASE, *TINY, f"base_output_directory={out}", "run_name=good", "steps=2"])
  assert code == 0
  assert steps_of(out / "good") == [1, 2]
  return out / "good"


def copy_run(good: Path, tmp_path: Path, name: str = "run") -> Path:
  target = tmp_path / name
  shutil.copytree(good, target)
  return target


def params_of(step_dir: Path) -> dict:
  return {k: v for k, v in load_state(step_dir).items() if k.startswith("params/")}


# --- 1. divergence ---------------------------------------------------------------------------------------


def test_nan_policy_stop_names_the_step_and_keeps_the_good_checkpoints(good, tmp_path, capsys):
  run = copy_run(good, tmp_path)
  before = {s: params_of(run / "checkpoints" / str(s)) for s in steps_of(run)}
  # the case: resuming a good run with a learning rate that blows up
  code, _, err = main(tmp_path, "run", "steps=6", "learning_rate=1e30", capsys=capsys)
  assert code == errors.EXIT_DIVERGED
  line = one_error_line(err)
  assert line.startswith("error: step 3: ") and "nan_policy=stop" in line and "last checkpoint is step 2" in line
  assert steps_of(run) == [1, 2], "nothing was saved from the non-finite state, nothing good deleted"
  for step, params in before.items():
    after = params_of(run / "checkpoints" / str(step))
    assert all(np.array_equal(params[k], after[k]) for k in params)
  assert [r["step"] for r in rows(run)][-1] <= 3


def test_nan_policy_skip_keeps_the_state_counts_skips_and_stops_after_a_streak(good, tmp_path, capsys):
  run = copy_run(good, tmp_path)
  # a few bad steps in a row are skipped: the run finishes, the state is the last finite one
  code, _, err = main(tmp_path, "run", "steps=4", "learning_rate=1e30", "nan_policy=skip",
                      "max_consecutive_skips=5", "checkpoint_period=100", capsys=capsys)
  assert code == 0, err[-3000:]
  assert steps_of(run)[-1] == 4
  kept, last = params_of(run / "checkpoints" / "2"), params_of(run / "checkpoints" / "4")
  assert all(np.array_equal(kept[k], last[k]) for k in kept), "no non-finite update reached the state"
  assert all(np.isfinite(v).all() for v in last.values())
  skipped = {r["step"]: r.get("train/skipped_steps") for r in rows(run)}
  assert skipped[3] == 1 and skipped[4] == 1
  # a longer streak than max_consecutive_skips stops the run
  code, _, err = main(tmp_path, "run", "steps=9", "learning_rate=1e30", "nan_policy=skip",
                      "max_consecutive_skips=2", "checkpoint_period=100", capsys=capsys)
  assert code == errors.EXIT_DIVERGED
  line = one_error_line(err)
  assert "steps 5-6: 2 non-finite steps in a row" in line and "max_consecutive_skips=2" in line, line
  assert steps_of(run)[-1] == 4


# --- 2. integrity ----------------------------------------------------------------------------------------


def _largest_array_file(step_dir: Path) -> Path:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(p: Path):
  data = p.read_bytes()
  p.write_bytes(data[:len(data) // 2])


def _zero(p: Path):
  p.write_bytes(bytes(p.stat().st_size))


def _flip(p: Path):
  data = bytearray(p.read_bytes())
  data[len(data) // 2] ^= 0x10
  p.write_bytes(bytes(data))


def _remove(p: Path):
  p.unlink()


@pytest.mark.parametrize("damage,says", [(_truncate, "cannot be read ("), (_zero, "cannot be read ("),
                                         (_flip, "does not match the checksum recorded at save"),
                                         (_remove, "cannot be read (")],
                         ids=["truncated", "zeroed", "flipped", "missing"])
def test_a_damaged_latest_checkpoint_is_reported_and_the_run_falls_back(good, tmp_path, capsys, damage, says):
  run = copy_run(good, tmp_path)
  damage(_largest_array_file(run / "checkpoints" / "2"))
  code, out, err = main(tmp_path, "run", "steps=2", capsys=capsys)
  assert code == 0, err[-3000:]
  assert "Traceback" not in out + err
  said = [line for line in out.splitlines() if "checkpoint step 2" in line]
  assert len(said) == 1 and "is damaged: " in said[0] and says in said[0], out[-3000:]
  assert "restored step 1, the newest intact checkpoint" in out
  assert (run / "checkpoints" / "damaged" / "2").is_dir()
  assert steps_of(run) == [1, 2], "step 2 was trained again from step 1 and saved"
  assert [r["step"] for r in rows(run)] == [1, 2], "metrics.jsonl holds each step once"


def test_without_fallback_a_damaged_checkpoint_is_one_line_exit_2(good, tmp_path, capsys):
  run = copy_run(good, tmp_path)
  _flip(_largest_array_file(run / "checkpoints" / "2"))
  code, _, err = main(tmp_path, "run", "steps=3", "checkpoint_fallback=false", capsys=capsys)
  assert code == errors.EXIT_ERROR
  line = one_error_line(err)
  assert "checkpoint step 2" in line and "is damaged" in line and "checkpoint_fallback=true" in line
  assert steps_of(run) == [1, 2]


# --- 3. disk ---------------------------------------------------------------------------------------------


def test_a_failing_save_is_one_line_naming_the_path_and_earlier_checkpoints_stay(good, tmp_path, capsys, monkeypatch):
  run = copy_run(good, tmp_path)
  folder = run / "checkpoints"
  reached = faults.reached

  def in_the_way(kind, step):  # after step 3 is dispatched, a file takes the checkpoint folder's place
    reached(kind, step)
    if (kind, step) == ("step", 3):
      folder.rename(run / "checkpoints.moved")
      folder.write_text("in the way\n")

  monkeypatch.setattr(faults, "reached", in_the_way)
  code, _, err = main(tmp_path, "run", "steps=4", capsys=capsys)
  assert code == errors.EXIT_ERROR
  line = one_error_line(err)
  assert str(folder) in line and "checkpoint step 3" in line, line
  assert sorted(int(p.name) for p in (run / "checkpoints.moved").iterdir() if p.name.isdigit()) == [1, 2]


def test_a_disk_too_full_for_a_checkpoint_is_found_before_training(good, tmp_path, capsys, monkeypatch):
  import collections

  from MaxText import fs

  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(fs.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
  run = copy_run(good, tmp_path)
  code, _, err = main(tmp_path, "run", "steps=3", capsys=capsys)
  assert code == errors.EXIT_ERROR
  line = one_error_line(err)
  assert str(run / "checkpoints") in line and "MiB free on its disk" in line, line
  assert steps_of(run) == [1, 2]


def test_an_unwritable_metrics_file_is_one_line(good, tmp_path, capsys):
  run = copy_run(good, tmp_path)
  (run / "metrics.jsonl").unlink()
  (run / "metrics.jsonl").mkdir()  # a folder where the file goes: unwritable, even for root
  code, _, err = main(tmp_path, "run", "steps=3", capsys=capsys)
  assert code == errors.EXIT_ERROR
  line = one_error_line(err)
  assert str(run / "metrics.jsonl") in line, line


# --- 4. reruns and metrics -------------------------------------------------------------------------------


def test_a_rerun_after_a_lost_final_evaluation_runs_it(good, tmp_path, capsys):
  run = copy_run(good, tmp_path)
  metrics = run / "metrics.jsonl"
  # the run was killed after its final checkpoint and before the final evaluation was logged
  metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines() if "eval/loss" not in line))
  code, out, err = main(tmp_path, "run", "steps=2", capsys=capsys)
  assert code == 0, err[-3000:]
  assert "step 2: the final evaluation is missing" in out
  assert [r["step"] for r in rows(run, "eval")] == [2]
  code, out, _ = main(tmp_path, "run", "steps=2", capsys=capsys)
  assert code == 0 and "nothing to do" in out
  assert [r["step"] for r in rows(run, "eval")] == [2]


def test_metrics_hold_each_step_once_after_resumes(good, tmp_path, capsys):
  run = copy_run(good, tmp_path)
  for steps in (3, 4):  # each time the last checkpoint is lost, as after a kill before the final save
    code, _, err = main(tmp_path, "run", f"steps={steps}", capsys=capsys)
    assert code == 0, err[-3000:]
    shutil.rmtree(run / "checkpoints" / str(steps))
  code, _, err = main(tmp_path, "run", "steps=4", capsys=capsys)
  assert code == 0, err[-3000:]
  assert [r["step"] for r in rows(run)] == [1, 2, 3, 4]
  assert [r["step"] for r in rows(run, "eval")] == [2, 4]


# --- 5. resume semantics ---------------------------------------------------------------------------------


def test_a_longer_resume_keeps_the_saved_schedule_and_says_so(good, tmp_path, capsys):
  run = copy_run(good, tmp_path)
  code, out, err = main(tmp_path, "run", "steps=4", capsys=capsys)
  assert code == 0, err[-3000:]
  assert "steps=4: the run keeps its saved 2-step learning-rate schedule; past step 2 the learning rate" in out
  lr = {r["step"]: r["train/learning_rate"] for r in rows(run)}
  floor = 1e-2 * 0.1  # learning_rate x learning_rate_final_fraction
  assert lr[3] == pytest.approx(floor) and lr[4] == pytest.approx(floor)
  assert lr[2] < lr[1]
  # learning_rate_schedule_steps re-plans it: step 5 of a 12-step cosine lies well above the old floor
  code, out, err = main(tmp_path, "run", "steps=5", "learning_rate_schedule_steps=12", capsys=capsys)
  assert code == 0, err[-3000:]
  assert "learning_rate_schedule_steps=12 re-plans the learning-rate schedule (the checkpoint's was 2 steps)" in out
  lr = {r["step"]: r["train/learning_rate"] for r in rows(run)}
  assert lr[5] > 5 * floor


def test_a_relative_load_parameters_path_works(good, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(good.parent)
  code, _, err = main(tmp_path, "fresh", "steps=2", "load_parameters_path=good/checkpoints/2", capsys=capsys)
  assert code == 0, err[-3000:]
  config = yaml.safe_load((tmp_path / "fresh" / "config.yml").read_text())
  assert config["load_parameters_path"] == str(good / "checkpoints" / "2")
