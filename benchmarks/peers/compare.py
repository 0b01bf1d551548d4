"""Side by side with a peer on the same work, in alternating runs (this machine's speed swings by up to 1.7x,
so only figures taken in one sitting, interleaved, are compared).

  python benchmarks/peers/compare.py nanogpt --peer_dir ~/nanoGPT [--rounds 3] [--steps 200]
  python benchmarks/peers/compare.py nanogpt --peer_dir ~/nanoGPT --full      # 2000 steps, validation loss
  python benchmarks/peers/compare.py maxtext --peer_dir ~/maxtext --peer_python ~/maxtext/venv/bin/python \
      [per_device_batch_size=4 gradient_accumulation_steps=2 gradient_accumulation_unroll=true]

nanoGPT: its README's CPU command for character-level Shakespeare (4 layers, 4 heads, width 128, 64-token
context, batch 12, no dropout, eager PyTorch), against this trainer's GPT with the same shapes on the same
text as bytes (benchmarks/peers/README.md has both command lines). MaxText: its defaults (scan, full
remat) at Llama2Small's shapes on synthetic data, float32, against this trainer's Llama2Small. Each round
runs this trainer, then the peer; step times are medians after warm-up; peak memory is each process's
maximum resident set. Prints a table and writes benchmarks/results/peers_<peer>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import NANOGPT_SHAKESPEARE

RESULTS = ROOT / "benchmarks" / "results"
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--dropout=0.0"]
LLAMA2_SMALL_MAXTEXT = ["base_emb_dim=256", "base_num_query_heads=4", "base_num_kv_heads=4", "base_mlp_dim=1024",
                        "base_num_decoder_layers=4", "head_dim=64", "vocab_size=8192", "max_target_length=256",
                        "per_device_batch_size=8", "dtype=float32", "dataset_type=synthetic",
                        "enable_checkpointing=false"]


def timed(cmd: list[str], *, cwd: Path, env: dict | None = None) -> tuple[str, float, float]:
  """(output, wall seconds, peak resident MiB) of a command run to completion."""
  with tempfile.TemporaryFile("w+") as out:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    out.seek(0)
    text = out.read()
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{text[-3000:]}")
  return text, seconds, usage.ru_maxrss / 1024


def ours(args: list[str], steps: int, window: int, workdir: Path) -> dict:
  run = f"r{time.monotonic_ns()}"
  env = {k: v for k, v in os.environ.items() if not k.startswith("M_")}
  text, _, rss = timed([sys.executable, "MaxText/train.py", "MaxText/configs/base_v2.yml", *args, f"steps={steps}",
                        f"log_period={window}", "enable_checkpointing=false", "enable_tensorboard=false",
                        f"base_output_directory={workdir}", f"run_name={run}"], cwd=ROOT, env=env)
  rows = [json.loads(line) for line in (workdir / run / "metrics.jsonl").read_text().splitlines()]
  steps_s = [r["train/step_time"] for r in rows if "train/step_time" in r][1:]  # the first window warms up
  evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
  return {"step_ms": 1e3 * statistics.median(steps_s), "peak_mib": rss, "val_loss": evals[-1] if evals else None}


def nanogpt(peer_dir: Path, steps: int, full: bool) -> dict:
  args = [*NANOGPT_ARGS, f"--max_iters={steps}", f"--lr_decay_iters={steps if full else 2000}",
          f"--eval_interval={steps if full else 10 * steps}", "--always_save_checkpoint=False"]
  text, _, rss = timed([sys.executable, "train.py", *args], cwd=peer_dir)
  times = [float(t) for t in re.findall(r"^iter \d+: loss [0-9.]+, time ([0-9.]+)ms", text, re.MULTILINE)][10:]
  val = re.findall(r"^step \d+: train loss [0-9.]+, val loss ([0-9.]+)", text, re.MULTILINE)
  return {"step_ms": statistics.median(times), "peak_mib": rss, "val_loss": float(val[-1]) if full and val else None}


def maxtext(peer_dir: Path, python: str, steps: int, workdir: Path) -> dict:
  env = {**os.environ, "PYTHONPATH": str(peer_dir / "src"), "JAX_PLATFORMS": "cpu"}
  text, _, rss = timed([python, "-m", "maxtext.trainers.pre_train.train", "src/maxtext/configs/base.yml",
                        f"run_name=peer{time.monotonic_ns()}", f"base_output_directory={workdir}", f"steps={steps}",
                        f"log_period={steps}", *LLAMA2_SMALL_MAXTEXT], cwd=peer_dir, env=env)
  seconds = [float(s) for s in re.findall(r"completed step: \d+, seconds: ([0-9.]+)", text)][3:]
  return {"step_ms": 1e3 * statistics.median(seconds), "peak_mib": rss, "val_loss": None}


def shakespeare_bytes(peer_dir: Path, cache: Path) -> Path:
  """nanoGPT's input.txt, prepared as bytes with the same 90/10 train/validation cut nanoGPT makes."""

  from MaxText.input_pipeline import preparation  # noqa: PLC0415

  text = peer_dir / "data" / "shakespeare_char" / "input.txt"
  if not text.is_file():
    raise SystemExit(f"{text} is missing: put tinyshakespeare's input.txt there and run its prepare.py")
  out = cache / "shakespeare_bytes"
  preparation.prepare(str(text), str(out), tokenizer="byte", contiguous=True, validation_fraction=0.1,
                       test_fraction=0.0, document_chars=100_000, progress=False)
  return out


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("peer", choices=("nanogpt", "maxtext"))
  parser.add_argument("--peer_dir", required=True, type=Path)
  parser.add_argument("--peer_python", default=sys.executable, help="the Python with the peer's dependencies")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=0, help="steps per run (default 200 nanoGPT, 30 MaxText)")
  parser.add_argument("--full", action="store_true", help="nanoGPT: 2000 steps with a final validation loss")
  parser.add_argument("overrides", nargs="*", help="key=value for this trainer's runs")
  args = parser.parse_intermixed_args()  # key=value overrides before or after the options
  peer_dir = args.peer_dir.expanduser().resolve()
  steps = args.steps or (2000 if args.full else 200 if args.peer == "nanogpt" else 30)
  rounds = []
  with tempfile.TemporaryDirectory(prefix="maxtext-peers-") as tmp:
    workdir = Path(tmp)
    if args.peer == "nanogpt":
      data = shakespeare_bytes(peer_dir, workdir)
      mine = [*NANOGPT_SHAKESPEARE, f"dataset_path={data}", "add_bos=false", "add_eos=false",
              f"eval_interval={steps if args.full else 0}", "eval_steps=20", *args.overrides]
    else:
      mine = ["model_name=Llama2Small", "dataset_type=synthetic", "eval_interval=0", *args.overrides]
    for i in range(args.rounds):
      a = ours(mine, steps, 10 if args.peer == "nanogpt" else 5, workdir)
      b = (nanogpt(peer_dir, steps, args.full) if args.peer == "nanogpt"
           else maxtext(peer_dir, args.peer_python, steps, workdir))
      rounds.append({"ours": a, "peer": b, "speedup": b["step_ms"] / a["step_ms"]})
      print(f"round {i + 1}: ours {a['step_ms']:.1f} ms/step, {args.peer} {b['step_ms']:.1f} ms/step -> "
            f"{rounds[-1]['speedup']:.2f}x" + (f"; val loss {a['val_loss']:.4f} vs {b['val_loss']:.4f}"
                                                if a["val_loss"] is not None and b["val_loss"] is not None else ""),
            flush=True)
  speedups = [r["speedup"] for r in rounds]
  summary = {"peer": args.peer, "steps": steps, "rounds": rounds, "median_speedup": statistics.median(speedups),
             "date": time.strftime("%Y-%m-%d"), "load_average": os.getloadavg()[0], "overrides": args.overrides}
  print(f"median speed-up over {args.peer}: {summary['median_speedup']:.2f}x (rounds: "
        f"{', '.join(f'{s:.2f}' for s in speedups)}); peak memory ours "
        f"{statistics.median(r['ours']['peak_mib'] for r in rounds):,.0f} MiB, {args.peer} "
        f"{statistics.median(r['peer']['peak_mib'] for r in rounds):,.0f} MiB")
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"peers_{args.peer}{'_full' if args.full else ''}.json"
  path.write_text(json.dumps(summary, indent=2))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
