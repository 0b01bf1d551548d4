"""Decode speed of every *Tiny preset on this machine: tokens/s at batch 1 and 8, and time per token late
in a long cache against early in it.

  python benchmarks/decode_throughput.py [--models GPTTiny,Llama2Tiny] [--new-tokens 128] [--repeats 3]

Throughput: `decode.Generator` (the jitted prefill, then the `lax.while_loop` of decode steps) continues
prompts of 32 tokens by --new-tokens greedy tokens (EOS disabled, so every run decodes the same number);
generated tokens over wall time, median of --repeats runs after a compiling one, prefill included.
Position scaling: with one cache of 1024 + 64 slots, the jitted decode step is timed (median over 32
steps) while the rows sit at positions 64..95 and at 1024..1055, and the ratio is reported. The cache
has fixed shapes, so every step reads all its slots (masked) wherever the row is; the last column shows,
for comparison, the step at position 64 in a cache sized to fit (128 slots).
Parameters are freshly initialised (speed does not depend on their values), float32, one device.
Prints a table and writes benchmarks/results/decode_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

from MaxText import decode, startup
from MaxText.config import loader
from MaxText.training import train_state

RESULTS = Path(__file__).resolve().parent / "results" / "decode_throughput.json"
PROMPT_LENGTH = 32
EARLY, LATE, STEPS = 64, 1024, 32


def make(model_name: str, prefill: int, new_tokens: int, length: int):
  config = startup.load_config(
      [None, str(loader.BASE_CONFIG), f"model_name={model_name}"], env={}, num_devices=1,
      per_device_batch_size=1.0, dataset_type="synthetic", dtype="float32", weight_dtype="float32",
      max_prefill_predict_length=prefill, max_decode_length=new_tokens, decode_sampling_strategy="greedy",
      max_target_length=length)  # a learned position table must cover the longest cache
  spec = train_state.model_spec(config)
  return config, spec, jax.jit(lambda: train_state.init_params(config, spec))()


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
  return [[2] + [(7 * row + 13 * i) % (vocab - 4) + 4 for i in range(length - 1)] for row in range(batch)]


def throughput(config, spec, params, batch: int, repeats: int) -> dict:
  generator = decode.Generator(config, spec, batch=batch)
  batch_prompts = prompts(batch, PROMPT_LENGTH, config.vocab_size)
  start = time.perf_counter()
  generator(params, batch_prompts, eos_id=-1)
  compile_seconds = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = generator(params, batch_prompts, eos_id=-1)
    times.append(time.perf_counter() - start)
  tokens = sum(len(row) for row in out)
  return {"tokens_per_second": tokens / statistics.median(times), "seconds": statistics.median(times),
          "tokens": tokens, "first_call_seconds": compile_seconds}


def step_seconds(generator, params, position: int, vocab: int) -> float:
  """Median time of one decode step while the (single) row generates positions position..position+STEPS."""
  state = generator.prefill(params, prompts(1, position, vocab), eos_id=-1)
  state = generator.step(params, state)  # compiles on the first call
  jax.block_until_ready(state)
  times = []
  for _ in range(STEPS):
    start = time.perf_counter()
    state = jax.block_until_ready(generator.step(params, state))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def position_scaling(model_name: str) -> dict:
  config, spec, params = make(model_name, prefill=LATE, new_tokens=EARLY, length=LATE + EARLY)
  generator = decode.Generator(config, spec, batch=1)
  early = step_seconds(generator, params, EARLY, config.vocab_size)
  late = step_seconds(generator, params, LATE, config.vocab_size)
  small_config, small_spec, small_params = make(model_name, prefill=EARLY, new_tokens=EARLY, length=LATE + EARLY)
  fitted = step_seconds(decode.Generator(small_config, small_spec, batch=1), small_params, EARLY, config.vocab_size)
  return {"step_ms_at_64": 1e3 * early, "step_ms_at_1024": 1e3 * late, "ratio_1024_to_64": late / early,
          "step_ms_at_64_cache_128": 1e3 * fitted}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  tiny = [name for name in loader.preset_names() if name.endswith("Tiny")]
  parser.add_argument("--models", default=",".join(tiny))
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  rows = []
  for name in args.models.split(","):
    config, spec, params = make(name, prefill=PROMPT_LENGTH, new_tokens=args.new_tokens,
                                length=PROMPT_LENGTH + args.new_tokens)
    row = {"model": name, "family": config.decoder_block, "params": spec.num_params}
    for batch in (1, 8):
      row[f"batch_{batch}"] = throughput(config, spec, params, batch, args.repeats)
    row.update(position_scaling(name))
    rows.append(row)
    print(f"{name}: {row['batch_1']['tokens_per_second']:.0f} / {row['batch_8']['tokens_per_second']:.0f} tokens/s, "
          f"late/early step {row['ratio_1024_to_64']:.2f}", file=sys.stderr, flush=True)
  header = ("model", "family", "params", "tok/s b=1", "tok/s b=8", "ms/tok @64", "ms/tok @1024", "ratio",
            "ms/tok @64, cache 128")
  table = [header] + [(r["model"], r["family"], f"{r['params'] / 1e6:.1f}M",
                       f"{r['batch_1']['tokens_per_second']:.0f}", f"{r['batch_8']['tokens_per_second']:.0f}",
                       f"{r['step_ms_at_64']:.2f}", f"{r['step_ms_at_1024']:.2f}", f"{r['ratio_1024_to_64']:.2f}",
                       f"{r['step_ms_at_64_cache_128']:.2f}") for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(header))]
  print("| " + " | ".join(c.ljust(w) for c, w in zip(header, widths)) + " |")
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for line in table[1:]:
    print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |")
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps({
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": str(jax.devices()[0]),
                  "load_average": os.getloadavg()},
      "settings": {"prompt_length": PROMPT_LENGTH, "new_tokens": args.new_tokens, "repeats": args.repeats},
      "rows": rows}, indent=2))


if __name__ == "__main__":
  main()
