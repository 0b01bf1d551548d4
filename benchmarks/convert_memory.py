"""Peak host memory of checkpoint conversion on a synthesized >= 1B-parameter bf16 Hugging Face checkpoint.

  python benchmarks/convert_memory.py [--workdir /tmp/convert_bench] [--keep]

Writes a random Llama checkpoint of Llama-3.2-1B's shape (1.24B parameters, GQA, llama3 RoPE scaling, tied
embeddings; bfloat16, two safetensors shards and an index) without loading any model, then runs, each in
a fresh process that reports its own peak resident memory (VmHWM of /proc/self/status at its end; a
parent's ru_maxrss would count the memory the process had before its exec):
  1. to_maxtext --weight_dtype bfloat16   (bf16 in, bf16 out: input and output the same size)
  2. to_maxtext (float32 parameters, the default for fine-tuning)
  3. to_hf --dtype bfloat16 from 1.'s output
Each must peak at no more than 1.5x the larger of its input and output; the process's own baseline
(Python, JAX, the model's abstract shapes) is included. Prints a table and writes
benchmarks/results/convert_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from MaxText.checkpoint import tensor_files

RESULTS = ROOT / "benchmarks" / "results" / "convert_memory.json"
LIMIT = 1.5
# Llama-3.2-1B's config.json (published values), written as transformers 4 does.
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}


def synthesize(folder: Path, seed: int = 0) -> int:
  """Write the random bf16 checkpoint tensor by tensor; returns its parameter count."""
  import ml_dtypes  # noqa: PLC0415

  c = CONFIG
  D, F, N, H, K, E, V = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
                         c["num_key_value_heads"], c["head_dim"], c["vocab_size"])
  shapes = {"model.embed_tokens.weight": (V, D)}
  for i in range(N):
    p = f"model.layers.{i}."
    shapes.update({p + "input_layernorm.weight": (D,), p + "self_attn.q_proj.weight": (H * E, D),
                   p + "self_attn.k_proj.weight": (K * E, D), p + "self_attn.v_proj.weight": (K * E, D),
                   p + "self_attn.o_proj.weight": (D, H * E), p + "post_attention_layernorm.weight": (D,),
                   p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                   p + "mlp.down_proj.weight": (D, F)})
  shapes["model.norm.weight"] = (D,)
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  writer = tensor_files.ShardedWriter(folder, "model", max_shard_bytes=2 << 30)
  total = 0
  for name, shape in shapes.items():
    if name.endswith("norm.weight"):
      value = np.ones(shape, ml_dtypes.bfloat16)
    else:
      value = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    writer.add(name, value)
    total += value.size
    del value
  writer.close()
  (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
  return total


def folder_bytes(folder: Path, pattern: str) -> int:
  return sum(p.stat().st_size for p in folder.glob(pattern))


def peak_rss() -> int:
  """This process's peak resident memory in bytes (VmHWM)."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) * 1024
  raise RuntimeError("no VmHWM in /proc/self/status")


def child(argv: list[str]) -> int:
  """Run convert_checkpoint.py's main in this process, then print its peak RSS as the last line."""
  from MaxText import convert_checkpoint  # noqa: PLC0415

  code = convert_checkpoint.main(argv)
  print(json.dumps({"peak_rss_bytes": peak_rss()}), flush=True)
  return code


def measured(argv: list[str]) -> tuple[float, int]:
  """(seconds, peak RSS in bytes) of one conversion in a fresh process."""
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, __file__, "--child", *argv], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  seconds = time.perf_counter() - start
  if proc.returncode != 0:
    raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
  return seconds, json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def main() -> int:
  if sys.argv[1:2] == ["--child"]:
    return child(sys.argv[2:])
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="/tmp/convert_memory_bench")
  parser.add_argument("--keep", action="store_true", help="keep the synthesized and converted folders")
  args = parser.parse_args()
  work = Path(args.workdir)
  shutil.rmtree(work, ignore_errors=True)
  hf, ours_bf16, ours_f32, back = work / "hf", work / "ours_bf16", work / "ours_f32", work / "back"
  start = time.perf_counter()
  params = synthesize(hf)
  print(f"synthesized {params:,} bf16 parameters in {time.perf_counter() - start:.0f} s", flush=True)
  runs = [
      ("to_maxtext, bf16 -> bf16", ["to_maxtext", "--hf_path", str(hf), "--output_path", str(ours_bf16),
                                    "--weight_dtype", "bfloat16"], (hf, "*.safetensors"), (ours_bf16, "*.safetensors")),
      ("to_maxtext, bf16 -> float32", ["to_maxtext", "--hf_path", str(hf), "--output_path", str(ours_f32)],
       (hf, "*.safetensors"), (ours_f32, "*.safetensors")),
      ("to_hf, bf16 -> bf16", ["to_hf", "--output_path", str(back), str(ours_bf16 / "config.yml"),
                               "--dtype", "bfloat16"], (ours_bf16, "*.safetensors"), (back, "*.safetensors")),
  ]
  rows = []
  try:
    for label, argv, src, dst in runs:
      seconds, peak = measured(argv)
      size_in, size_out = folder_bytes(*src), folder_bytes(*dst)
      ratio = peak / max(size_in, size_out)
      rows.append({"conversion": label, "input_bytes": size_in, "output_bytes": size_out, "peak_rss_bytes": peak,
                   "ratio": ratio, "seconds": seconds, "ok": ratio <= LIMIT})
      print(f"{label}: peak {peak / 2**30:.2f} GiB, {ratio:.2f}x the larger side, {seconds:.0f} s", flush=True)
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)
  print("\n| conversion | input | output | peak RSS | peak / max(input, output) | time |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['conversion']} | {r['input_bytes'] / 2**30:.2f} GiB | {r['output_bytes'] / 2**30:.2f} GiB | "
          f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['ratio']:.2f}x | {r['seconds']:.0f} s |")
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps({"parameters": params, "limit": LIMIT, "machine": platform.platform(),
                                 "cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")
  return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
