"""Metric rows to TensorBoard, metrics.jsonl and a progress line; FLOPs and MFU accounting."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm

from MaxText import fs
from MaxText.errors import StorageError

# Dense peak TFLOP/s per device for the matmul dtype (bfloat16; float32 runs on TF32 tensor cores on
# GPUs, at half the bfloat16 rate; TPUs run float32 matmuls as bf16 passes, counted here at the bf16 rate).
PEAK_TFLOPS = {
    "tpu v4": {"bfloat16": 275.0, "float32": 275.0},
    "tpu v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "tpu v5e": {"bfloat16": 197.0, "float32": 197.0},
    "tpu v5p": {"bfloat16": 459.0, "float32": 459.0},
    "tpu v5": {"bfloat16": 459.0, "float32": 459.0},  # how JAX names a v5p chip; after "tpu v5 lite" (v5e)
    "tpu v6 lite": {"bfloat16": 918.0, "float32": 918.0},
    "a100": {"bfloat16": 312.0, "float32": 156.0},
    "h100": {"bfloat16": 989.0, "float32": 494.5},
    "h200": {"bfloat16": 989.0, "float32": 494.5},
}


def measure_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of one large jitted matmul on the default device (the median of `repeats`)."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  matmul(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size**3 / sorted(times)[len(times) // 2]


def table_peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The table's dense peak for a device kind as JAX names it (e.g. "TPU v5 lite"), or None."""
  kind = device_kind.lower()
  for name, peaks in PEAK_TFLOPS.items():
    if name in kind:
      return peaks[dtype]
  return None


def peak_flops_per_device(config) -> tuple[float, str]:
  """(peak FLOP/s per device, where the number comes from)."""
  if config.peak_tflops_per_device > 0:
    return config.peak_tflops_per_device * 1e12, "config"
  kind = jax.devices()[0].device_kind.lower()
  if (tflops := table_peak_tflops(kind, config.dtype)) is not None:
    return tflops * 1e12, f"table ({kind})"
  # CPU (or unknown): measure. Simulated CPU devices share the same cores, so the run's local devices
  # split the measured peak among them.
  measured = measure_matmul_peak(config.dtype)
  local_devices = max(config.num_devices // jax.process_count(), 1)
  return measured / local_devices, f"measured {config.dtype} matmul on {kind}"


class _EventFiles:
  """tensorboardX's hook for a URL scheme: event files written through the filesystem layer (tensorboardX
  alone knows only local folders, and gs:// through a client library this project does not install)."""

  def directory_check(self, path: str) -> None:
    fs.makedirs(path)

  def open(self, path: str):
    return fs.open(path, "wb")


def _register_remote_event_files(directory: str) -> None:
  if fs.is_remote(directory):
    from tensorboardX import record_writer  # noqa: PLC0415 (1 s to import: only with enable_tensorboard)
    record_writer.register_writer_factory(directory.split("://", 1)[0], _EventFiles())


class MetricLogger:
  """Writes each metric row to TensorBoard and metrics.jsonl (process 0) and drives the progress line.

  `resume=True` (training): the rows and TensorBoard events of steps after `start_step` belong to steps the
  restored state has not taken (a killed run logged them after its last checkpoint); they are dropped, so
  metrics.jsonl holds each step once however often the run resumes.
  """

  def __init__(self, config, *, start_step: int, is_primary: bool, progress: bool = True, resume: bool = False):
    self.is_primary = is_primary
    self.writer = None
    self.jsonl = None
    self.bar = None
    self.kept: set[tuple[int, str]] = set()  # (step, prefix) of the rows already in metrics.jsonl
    if not is_primary:
      return
    self.path = fs.join(config.run_dir, config.metrics_file)
    try:
      fs.makedirs(config.run_dir)
      # Rows of steps the restored state has not taken are dropped (local files; a bucket's file is appended to).
      self.kept = set() if fs.is_remote(self.path) else _keep_rows(self.path, start_step if resume else None)
      self.jsonl = fs.open(self.path, "a")
    except OSError as e:
      raise StorageError(f"cannot write the metrics file {self.path}: {e.strerror or e}") from None
    if config.enable_tensorboard:
      from tensorboardX import SummaryWriter  # noqa: PLC0415 (1 s to import: only with enable_tensorboard)
      _register_remote_event_files(config.tensorboard_dir)
      # purge_step hides the events of steps the restored state has not taken
      self.writer = SummaryWriter(config.tensorboard_dir, flush_secs=30,
                                  purge_step=start_step + 1 if resume else None)
    if progress:
      self.bar = tqdm(total=config.steps, initial=start_step, desc=config.run_name, unit="step",
                      dynamic_ncols=True, file=sys.stderr, mininterval=0.5)

  def logged(self, step: int, prefix: str) -> bool:
    """Whether metrics.jsonl already holds a `prefix/...` row of `step`."""
    return (step, prefix) in self.kept

  def write_text(self, tag: str, text: str) -> None:
    if self.writer is not None:
      self.writer.add_text(tag, text, 0)

  def log(self, step: int, scalars: dict[str, float], *, prefix: str = "train") -> None:
    if not self.is_primary:
      return
    row = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in scalars.items()}}
    try:
      self.jsonl.write(json.dumps(row) + "\n")
      self.jsonl.flush()
    except OSError as e:
      raise StorageError(f"cannot write the metrics file {self.path}: {e.strerror or e}") from None
    self.kept.add((step, prefix))
    if self.writer is not None:
      for key, value in row.items():
        if key != "step" and math.isfinite(value):
          self.writer.add_scalar(key, value, step)
    if self.bar is not None:
      if prefix == "train":
        self.bar.set_postfix_str(
            f"loss={scalars['loss']:.3f} tok/s={scalars.get('tokens_per_s', 0):,.0f} mfu={scalars.get('mfu', 0):.1%}",
            refresh=False)
      else:
        self.bar.write(f"step {step}: {prefix} loss {scalars['loss']:.4f} perplexity {scalars['perplexity']:.2f}")

  def advance(self, step: int) -> None:
    if self.bar is not None:
      self.bar.update(step - self.bar.n)

  def message(self, text: str) -> None:
    if not self.is_primary:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()
    if self.jsonl is not None:
      self.jsonl.close()


def _keep_rows(path: str, last_step: int | None) -> set[tuple[int, str]]:
  """Drop the rows of steps after `last_step` (all rows kept when None) and a torn last line, rewriting
  the file only when something goes; returns the (step, prefix) of the rows kept."""
  if not os.path.exists(path):
    return set()
  kept_lines, kept, dropped = [], set(), False
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        row = json.loads(line)
        step = int(row["step"])
      except (ValueError, KeyError, TypeError):
        dropped = True
        continue
      if last_step is not None and step > last_step:
        dropped = True
        continue
      kept_lines.append(line if line.endswith("\n") else line + "\n")
      kept |= {(step, key.split("/", 1)[0]) for key in row if "/" in key}
  if dropped and last_step is not None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept_lines)
    os.replace(tmp, path)
  else:
    with open(path, "rb+") as f:  # a row torn by a kill must not swallow the next one
      if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
        f.write(b"\n")
  return kept


def throughput(tokens: float, seconds: float, flops_per_token: float, num_devices: int,
               peak_per_device: float) -> dict[str, Any]:
  """tokens/s, TFLOP/s per device and MFU for `tokens` processed in `seconds`."""
  tokens_per_s = tokens / max(seconds, 1e-9)
  tflops = tokens_per_s * flops_per_token / num_devices / 1e12
  return {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops, "mfu": tflops * 1e12 / peak_per_device}


class MetricWindow:
  """The metrics of the steps since the last log row, summed on the device (no host sync per step).

  `close(step)` ends a window; `fetch()` brings a closed window to the host. The loop fetches one step
  late, after the next step is dispatched, so the device never waits for the host.
  """

  MEAN = ("loss", "z_loss", "aux_loss", "grad_norm")  # the window's mean
  SUM = ("tokens", "skipped_steps")  # the window's total; other keys (learning rate, parameter norm) are the last step's

  def __init__(self, step: int, tokens_per_step: int, flops_per_token: float, num_devices: int, peak: float):
    self.sums, self.steps, self.closed = None, 0, None
    self.clock = (time.perf_counter(), step)
    self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
    self.num_devices, self.peak = num_devices, peak

  def add(self, metrics: dict) -> None:
    if self.sums is None:
      self.sums = metrics
    else:
      self.sums = {k: self.sums[k] + v if k in self.MEAN + self.SUM else v for k, v in metrics.items()}
    self.steps += 1

  def close(self, step: int) -> None:
    self.closed = (step, self.sums, self.steps)
    self.sums, self.steps = None, 0

  def restart_clock(self, step: int) -> None:
    """Leave time spent outside training steps (evaluation) out of the throughput."""
    self.clock = (time.perf_counter(), step)

  def fetch(self) -> dict | None:
    """The closed window as a metric row with throughput, or None if no window is closed."""
    if self.closed is None:
      return None
    step, sums, count = self.closed
    self.closed = None
    row = {k: float(v) / count if k in self.MEAN else float(v) for k, v in jax.device_get(sums).items()}
    now = time.perf_counter()
    steps_done, elapsed = step - self.clock[1], now - self.clock[0]
    self.clock = (now, step)
    row["perplexity"] = math.exp(min(row["loss"], 50.0))
    row["step_time"] = elapsed / max(steps_done, 1)
    row.update(throughput(self.tokens_per_step * steps_done, elapsed, self.flops_per_token,
                                  self.num_devices, self.peak))
    return {"step": step, **row}
