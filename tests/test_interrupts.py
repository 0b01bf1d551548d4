"""Signals, kills and a disk fault mid-run, in processes of their own (docs/reliability.md): a second SIGINT
while a checkpoint is being written, a checkpoint folder replaced by a file while the run saves (one line,
no hang at exit), and the fault-injection tool (kills at random points, reruns, bit-identical end)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BASE

from MaxText import errors, train
from MaxText.tools import fault_injection
from MaxText.training import faults

ROOT = Path(__file__).resolve().parents[1]
TINY = ["base_emb_dim=32", "base_num_decoder_layers=1", "base_num_query_heads=2", "base_num_kv_heads=2",
        "base_mlp_dim=64", "vocab_size=128", "max_target_length=16", "per_device_batch_size=2", "log_period=1",
        "enable_tensorboard=false", "dataset_type=synthetic", "eval_interval=0", "peak_tflops_per_device=1",
        "checkpoint_period=1", "max_num_checkpoints_to_keep=2"]


def committed(run_dir: Path) -> list[int]:
  folder = run_dir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def launch(args: list[str]) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if not k.startswith("M_") and k != faults.ENV}
  env["XLA_FLAGS"] = ""
  return subprocess.Popen([sys.executable, "MaxText/train.py", BASE, *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoints(proc: subprocess.Popen, run_dir: Path, count: int) -> None:
  deadline = time.time() + 240
  while len(committed(run_dir)) < count:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, "no checkpoint was written"
    time.sleep(0.1)


def test_a_save_that_fails_mid_run_is_one_line_and_the_process_exits(tmp_path):
  proc = launch([*TINY, f"base_output_directory={tmp_path}", "run_name=disk", "steps=1000000"])
  run_dir = tmp_path / "disk"
  wait_for_checkpoints(proc, run_dir, 2)
  folder = run_dir / "checkpoints"
  folder.rename(run_dir / "checkpoints.moved")  # the disk goes away under the run: a file takes its place
  folder.write_text("in the way\n")
  _, err = proc.communicate(timeout=120)  # no hang at exit
  assert proc.returncode == errors.EXIT_ERROR, err[-3000:]
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: cannot write checkpoint step ") and str(folder) in last, last
  moved = sorted(int(p.name) for p in (run_dir / "checkpoints.moved").iterdir() if p.name.isdigit())
  assert len(moved) >= 2


def test_a_second_sigint_during_a_save_stops_at_once_and_keeps_the_checkpoints(tmp_path, capsys):
  args = [*TINY, f"base_output_directory={tmp_path}", "run_name=sig", "steps=1000000"]
  proc = launch(args)
  wait_for_checkpoints(proc, tmp_path / "sig", 2)  # a checkpoint per step: a save is (nearly) always in flight
  proc.send_signal(signal.SIGINT)  # the first asks for a checkpoint after this step...
  time.sleep(0.02)
  proc.send_signal(signal.SIGINT)  # ...the second, while it is written, stops at once
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == errors.EXIT_PREEMPTED, err[-3000:]  # schedulers tell it from success (0)
  assert "Traceback" not in err
  assert err.strip().splitlines()[-1].startswith("stopped: SIGINT again: stopped at once"), err[-3000:]
  # the checkpoints left behind verify: rerunning restores the newest one, with nothing reported damaged
  kept = committed(tmp_path / "sig")
  assert kept
  capsys.readouterr()
  code = train.main([None, BASE, *args[:-1], "steps=1"])
  out = capsys.readouterr().out
  assert code == 0
  assert "damaged" not in out and f"run already trained to step {kept[-1]} >= steps=1" in out, out[-3000:]


@pytest.mark.slow
def test_fault_injection_three_kills_end_bit_identical(tmp_path):
  report = fault_injection.run(3, seed=0, workdir=tmp_path, overrides=[], progress=lambda text: None)
  assert report["problems"] == []
  assert report["ok"] and report["landed"] == 3
  assert (tmp_path / "report.json").is_file()
