"""Training speed of every family at its CPU preset and of nanoGPT's Shakespeare config, in one command.

  python benchmarks/run.py                    # CPU presets (2 cores: about 10 minutes)
  python benchmarks/run.py --preset gpu       # GPU presets in bf16 (needs a GPU)
  python benchmarks/run.py --cases Llama2Small,nanogpt_shakespeare --windows 6

Each case is the real command line, `python MaxText/train.py ...`, run in a child process exactly as a
user runs it (input pipeline, host loop, metric fetches included), with no evaluation or checkpoint. The
child logs a metric row every `--window` steps; the step time is the median over the windows after the
first (which holds the warm-up). Compile time is the child's own report; peak host memory is the child's
maximum resident set (wait4). MFU is against a float32 (or bf16 on GPU) matmul peak measured by this
process just before and just after each case, so peak and steps see the same load and the ratio stays
believable on a busy machine (on GPUs and TPUs the peak comes from the table in metrics.py).
Prints a table and writes benchmarks/results/run_<preset>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"

# nanoGPT's character-level Shakespeare config on a CPU, as its README gives it: 4 layers, 4 heads, width
# 128, 64-token context, batch 12, no dropout; bytes instead of its 65 characters (260 ids). The batch of 12
# is two micro-batches of 6 whose gradients XLA computes at once (gradient_accumulation_unroll), one on each
# core: the same sum over the same 12 rows, about 10% faster on 2 cores than one batch of 12.
NANOGPT_SHAKESPEARE = ["model_name=GPTTiny", "base_emb_dim=128", "base_num_decoder_layers=4",
                       "base_num_query_heads=4", "base_num_kv_heads=4", "base_mlp_dim=512", "vocab_size=260",
                       "tokenizer_type=byte", "max_target_length=64", "per_device_batch_size=6",
                       "gradient_accumulation_steps=2", "gradient_accumulation_unroll=true",
                       "learning_rate=1e-3", "adam_b2=0.99", "warmup_steps_fraction=0.05", "use_bias=false"]

PRESETS = {
    "cpu": {
        "Llama2Small": ["model_name=Llama2Small"],
        "MUDDLlama2Small": ["model_name=MUDDLlama2Small"],
        "GPTTiny": ["model_name=GPTTiny"],
        "MuTransformerW256": ["model_name=MuTransformerW256"],
        "TransformerVQSmall": ["model_name=TransformerVQSmall"],
        "nanogpt_shakespeare": NANOGPT_SHAKESPEARE,
    },
    "gpu": {
        "Llama2Medium": ["model_name=Llama2Medium", "dtype=bfloat16", "per_device_batch_size=16",
                         "max_target_length=2048"],
        "MUDDLlama2Medium": ["model_name=MUDDLlama2Medium", "dtype=bfloat16", "per_device_batch_size=16",
                             "max_target_length=2048"],
        "GPT2Small": ["model_name=GPT2Small", "dtype=bfloat16", "per_device_batch_size=32",
                      "max_target_length=1024"],
    },
}


def byte_corpus(cache: Path) -> Path:
  """A byte-level dataset of a few standard-library modules (the nanoGPT case needs byte data; what the
  text says does not matter for speed)."""
  from MaxText.input_pipeline import default_corpus, preparation  # noqa: PLC0415 (after the argument parsing)

  out = cache / "stdlib_bytes"
  if not (out / preparation.INFO_FILE).is_file():
    stdlib = default_corpus.stdlib_dir()
    files = ",".join(str(stdlib / f"{m}.py") for m in ("argparse", "typing", "inspect", "pathlib", "subprocess"))
    preparation.prepare(files, str(out), tokenizer="byte", contiguous=True, validation_fraction=0.05,
                         test_fraction=0.0, document_chars=50_000, progress=False)
  return out


def measure_peak(dtype: str) -> float:
  from MaxText.observe import metrics  # noqa: PLC0415
  from MaxText.parallel import distributed  # noqa: PLC0415

  distributed.skip_absent_tpu()  # as train.py does: libtpu (installed for AOT compiles) stays unloaded here

  return metrics.measure_matmul_peak(dtype)


def run_case(name: str, args: list[str], *, window: int, windows: int, workdir: Path, data: Path) -> dict:
  """One case in a child process; returns its step times, compile time and peak memory."""
  steps = window * windows
  run_args = [*args, f"steps={steps}", f"log_period={window}", "eval_interval=0", "enable_checkpointing=false",
              "enable_tensorboard=false", f"base_output_directory={workdir}", f"run_name={name}",
              f"learning_rate_schedule_steps={max(steps, 100)}"]
  if "tokenizer_type=byte" in args:
    run_args.append(f"dataset_path={data}")
  env = {k: v for k, v in os.environ.items() if not k.startswith("M_")}
  log = workdir / f"{name}.log"
  with open(log, "w") as f:
    proc = subprocess.Popen([sys.executable, str(ROOT / "MaxText" / "train.py"),
                             str(ROOT / "MaxText" / "configs" / "base_v2.yml"), *run_args],
                            stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    # wait4, not wait: the child's own resource usage, whose maximum resident set is its peak host memory.
    _, status, usage = os.wait4(proc.pid, 0)
  text = log.read_text()
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f"{name} failed:\n{text[-3000:]}")
  rows = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
  rows = [r for r in rows if "train/step_time" in r]
  compiled = re.search(r"compiled the train step in ([0-9.]+) s", text)
  config = _config(run_args)  # the child's config, for its FLOPs and shapes
  from MaxText import models  # noqa: PLC0415
  from MaxText.training import train_state  # noqa: PLC0415

  return {"step_times": [r["train/step_time"] for r in rows], "losses": [r["train/loss"] for r in rows],
          "compile_s": float(compiled.group(1)) if compiled else None,
          "params": train_state.model_spec(config).num_params,
          "flops_per_token": models.get_family(config.decoder_block).flops_per_token(config),
          "batch": config.global_batch_size_to_train_on, "length": config.max_target_length,
          "max_rss_mib": usage.ru_maxrss / 1024}


def _config(run_args: list[str]):
  from MaxText import startup  # noqa: PLC0415
  from MaxText.config import loader  # noqa: PLC0415

  return startup.load_config([None, str(loader.BASE_CONFIG), *run_args], env={}, num_devices=1)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  parser.add_argument("--cases", default="", help="comma-separated subset of the preset's cases")
  parser.add_argument("--window", type=int, default=10, help="steps per metric row")
  parser.add_argument("--windows", type=int, default=6, help="metric rows per case (the first is warm-up)")
  parser.add_argument("overrides", nargs="*", help="key=value applied to every case (e.g. steps_per_loop=4)")
  args = parser.parse_args()
  cases = PRESETS[args.preset]
  names = [c for c in args.cases.split(",") if c] or list(cases)
  dtype = "bfloat16" if args.preset == "gpu" else "float32"
  rows = []
  with tempfile.TemporaryDirectory(prefix="maxtext-bench-") as tmp:
    data = byte_corpus(Path(tmp))
    for name in names:
      before = measure_peak(dtype)
      result = run_case(name, [*cases[name], *args.overrides], window=args.window, windows=args.windows,
                        workdir=Path(tmp), data=data)
      after = measure_peak(dtype)
      steady = result["step_times"][1:]
      step_s = statistics.median(steady)
      tokens = result["batch"] * result["length"]
      peak = (before + after) / 2
      tflops = tokens * result["flops_per_token"] / step_s / 1e12
      rows.append({"case": name, **result, "step_s": step_s, "tokens_per_s": tokens / step_s, "tflops": tflops,
                   "peak_tflops": peak / 1e12, "peak_before": before / 1e12, "peak_after": after / 1e12,
                   "mfu": tflops * 1e12 / peak})
      print(f"{name}: {step_s * 1e3:.1f} ms/step, {tokens / step_s:,.0f} tokens/s, MFU {rows[-1]['mfu']:.1%}",
            flush=True)
  header = ("case", "params", "batch x len", "compile s", "step ms (median)", "tokens/s", "TFLOP/s",
            "peak TFLOP/s", "MFU", "peak host MiB")
  table = [header] + [(
      r["case"], f"{r['params'] / 1e6:.1f}M", f"{r['batch']} x {r['length']}", f"{r['compile_s']:.1f}",
      f"{r['step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.3f}", f"{r['peak_tflops']:.3f}",
      f"{r['mfu']:.1%}", f"{r['max_rss_mib']:,.0f}") for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in table]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  print("\n".join(lines))
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"run_{args.preset}.json"
  path.write_text(json.dumps({
      "date": time.strftime("%Y-%m-%d"), "rows": rows, "overrides": args.overrides,
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()[0]}},
      indent=2))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
