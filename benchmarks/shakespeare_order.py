"""Does the data order cost loss? nanoGPT's character-level Shakespeare, three shuffles, same steps.

  python benchmarks/shakespeare_order.py --input /path/to/tinyshakespeare.txt [--steps 2000] [--out /tmp/shakespeare]

nanoGPT's `shakespeare_char` CPU settings on the GPT family: 4 layers, 4 heads, width 128, length 64,
batch 12, byte tokenizer, the text prepared with `--contiguous` (first 90% train, last 10% validation),
learning rate 1e-3 with 100 warmup steps and cosine decay to 1e-4, beta2 0.99, weight decay 0.1. Runs:
`global` (the default: every epoch a permutation of all rows), `window` (the previous default: a
1024-row buffer, which reads a single long document almost in order) and `whole` (a window buffer of
20,000 rows, more than an epoch holds). Prints the final validation loss of each (the whole split);
writes benchmarks/results/shakespeare_order.json. nanoGPT reaches 1.886 on these settings (CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "shakespeare_order.json"
RUNS = {"global": {}, "window": {"data_shuffle": "window"},
        "whole": {"data_shuffle": "window", "packed_shuffle_buffer_size": 20000}}
NANOGPT = dict(model_name="GPTTiny", base_num_decoder_layers=4, vocab_size=260, tokenizer_type="byte",
               max_target_length=64, per_device_batch_size=12.0, num_devices=1, learning_rate=1e-3,
               warmup_steps_fraction=0.05, learning_rate_final_fraction=0.1, adam_b2=0.99, adam_weight_decay=0.1,
               enable_checkpointing=False, eval_steps=-1)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True, help="tinyshakespeare.txt (nanoGPT's input.txt)")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--out", default="/tmp/shakespeare_order")
  parser.add_argument("--runs", default=",".join(RUNS))
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  from MaxText import startup, train  # noqa: PLC0415
  from MaxText.config import loader  # noqa: PLC0415
  from MaxText.input_pipeline import preparation  # noqa: PLC0415

  out = Path(args.out)
  data = out / "data"
  if not (data / preparation.INFO_FILE).exists():
    preparation.prepare(args.input, str(data), tokenizer="byte", contiguous=True, validation_fraction=0.1,
                         test_fraction=0.0, progress=False)
  rows = []
  for name in args.runs.split(","):
    config = startup.load_config(
        [None, str(loader.BASE_CONFIG)], env={},
        **{**NANOGPT, "dataset_path": str(data), "steps": args.steps, "eval_interval": args.steps,
           "log_period": max(1, args.steps // 20), "base_output_directory": str(out / "runs"),
           "run_name": f"{name}_seed{args.seed}", "dataset_cache_dir": str(out / "cache"),
           "data_shuffle_seed": args.seed, "init_weights_seed": args.seed, **RUNS[name]})
    start = time.perf_counter()
    result = train.train_and_evaluate(config, progress=False)
    rows.append({"run": name, "seed": args.seed, "steps": args.steps, "eval_loss": result["eval_loss"],
                 "seconds": time.perf_counter() - start, **RUNS[name]})
    print(f"{name:<7} seed {args.seed}: validation loss {result['eval_loss']:.4f} "
          f"({rows[-1]['seconds']:.0f} s)", flush=True)
  old = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
  keep = [r for r in old if (r["run"], r["seed"], r["steps"]) not in {(x["run"], x["seed"], x["steps"]) for x in rows}]
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps({"rows": keep + rows, "settings": NANOGPT, "load_average": os.getloadavg()[0]},
                                indent=2))
  print(f"wrote {RESULTS}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
