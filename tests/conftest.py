"""Test set-up: 8 simulated CPU devices (set before JAX loads) and tiny configs built the CLI's way."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import atexit
import shutil
import tempfile

import jax
import pytest

from MaxText import startup
from MaxText.config import loader

# Many tests compile identical programs (same tiny model, new closure); a per-session persistent cache
# turns those recompiles into lookups. Fresh per session, so no state leaks between runs.
_cache_dir = tempfile.mkdtemp(prefix="maxtext-test-jax-cache-")
atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _cache_dir)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

BASE = str(loader.BASE_CONFIG)

# A model small enough that a jitted step takes milliseconds, with GQA so both attention paths run.
TINY = dict(
    base_emb_dim=32, base_num_decoder_layers=2, base_num_query_heads=4, base_num_kv_heads=2, base_mlp_dim=64,
    vocab_size=128, max_target_length=16, per_device_batch_size=1.0, num_devices=1, steps=4, log_period=1,
    eval_interval=0, enable_checkpointing=False, enable_tensorboard=False, dataset_type="synthetic",
    learning_rate=1e-2, warmup_steps_fraction=0.0, init_weights_std=0.02)


@pytest.fixture
def make_config(tmp_path):
  """make_config('key=value', ..., key=value): a tiny Config through startup.load_config, as the CLI makes it."""

  def make(*args, **overrides):
    values = {**TINY, "base_output_directory": str(tmp_path / "runs"),
              "dataset_cache_dir": str(tmp_path / "cache"), **overrides}
    return startup.load_config([None, BASE, *args], env={}, **values)

  return make
