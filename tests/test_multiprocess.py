"""A real multi-host run: two processes on localhost joined by jax.distributed (gloo collectives)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_train_evaluate_and_checkpoint_together(tmp_path):
  port = free_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith("M_")}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # 4 devices per process, 8 in all
  args = ["MaxText/configs/base_v2.yml", "run_name=mp", f"base_output_directory={tmp_path}",
          "dataset_type=synthetic", "steps=6", "log_period=2", "eval_interval=6", "eval_steps=2",
          "checkpoint_period=3", "base_emb_dim=32", "base_num_query_heads=4", "base_num_kv_heads=2",
          "base_mlp_dim=64", "vocab_size=128", "max_target_length=16", "per_device_batch_size=1",
          "ici_fsdp_parallelism=4", "dcn_data_parallelism=2", "learning_rate=1e-2",
          f"coordinator_address=localhost:{port}", "num_processes=2"]
  procs = [subprocess.Popen([sys.executable, "MaxText/train.py", *args, f"process_id={i}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in outputs[0][0]
  assert "global batch 8 x 16 tokens" in outputs[0][0]
  rows = [json.loads(line) for line in (tmp_path / "mp" / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train] == [2, 4, 6]
  assert train[-1]["train/loss"] < train[0]["train/loss"]
  assert train[0]["train/tokens"] > 0
  assert any("eval/loss" in r for r in rows)
  steps = sorted(int(p.name) for p in (tmp_path / "mp" / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3, 6]
