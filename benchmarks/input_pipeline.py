"""The input pipeline alone: token rate with the global shuffle against the trainer's, and its host memory.

  python benchmarks/input_pipeline.py [--work_dir /tmp/maxtext-input-bench] [--seconds 5] [--skip_memory]

Sources: `tfrecord` (the embedded default corpus) and `hf` (the same corpus's text as jsonl files,
tokenized while indexing with the same SentencePiece model); the old window shuffle is timed too. Each
source is indexed first (its token store, once), then timed for `--seconds` on Llama2Small's batch
(8 x 256, the trainer's CPU shape) and on an accelerator-sized batch (256 x 2048). The trainer's
Llama2Small step is timed in the same run (benchmarks/train_throughput.py's `measure`), so the ratio is
side by side. Memory: in fresh processes, the peak of the process's own (anonymous) memory while
indexing, and while reading 200 shuffled batches from the built store, on the default corpus and on one
10x larger (ten copies of it as TFRecords). File pages the reader maps in are page cache (shared,
evictable), reported apart. Prints tables; writes benchmarks/results/input_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "input_pipeline.json"


def status_kib(field: str) -> int:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1])
  return 0


class AnonPeak:
  """The peak of RssAnon (the process's own memory, not mapped files), sampled every 20 ms."""

  def __init__(self):
    self.peak, self._stop = status_kib("RssAnon"), False
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop:
      self.peak = max(self.peak, status_kib("RssAnon"))
      time.sleep(0.02)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop = True
    self._thread.join()
    self.peak = max(self.peak, status_kib("RssAnon"))


def config_for(source: dict, work: Path, *, batch: int, length: int, shuffle: str = "global",
               stores: str = "cache"):
  from MaxText import startup  # noqa: PLC0415
  from MaxText.config import loader  # noqa: PLC0415

  return startup.load_config([None, str(loader.BASE_CONFIG)], env={}, num_devices=1, per_device_batch_size=batch,
                             max_target_length=length, data_shuffle=shuffle, dataset_cache_dir=str(work / stores),
                             **source)


def rate(config, seconds: float) -> tuple[float, float]:
  """(index seconds, tokens per second) of the training iterator after its first batch."""
  from MaxText import input_pipeline  # noqa: PLC0415

  start = time.perf_counter()
  data = input_pipeline.create_iterator(config, config.train_split)
  next(data)
  index_s = time.perf_counter() - start
  start, batches = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    next(data)
    batches += 1
  tokens = batches * config.global_batch_size_to_train_on * config.max_target_length
  return index_s, tokens / (time.perf_counter() - start)


def prepare_sources(work: Path) -> dict[str, dict]:
  """The default corpus as TFRecords, the same text as jsonl files, and a TFRecord copy 10x larger."""
  from MaxText.input_pipeline import default_corpus, tfrecord_files  # noqa: PLC0415

  corpus = default_corpus.ensure_default_corpus()
  sources = {"tfrecord": dict(dataset_type="tfrecord", dataset_path=str(corpus))}
  jsonl = work / "jsonl"
  if not (jsonl / "done").exists():
    jsonl.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in default_corpus.stdlib_dir().rglob("*.py")
                   if not any(d in p.parts for d in ("site-packages", "dist-packages", "__pycache__")))
    with open(jsonl / "train.jsonl", "w") as f:
      f.writelines(json.dumps({"text": p.read_text(encoding="utf-8", errors="replace")}) + "\n" for p in files)
    (jsonl / "done").write_text("")
  sources["hf"] = dict(dataset_type="hf", hf_path=str(jsonl / "train.jsonl"), tokenizer_path=str(corpus / "tokenizer.model"))
  big = work / "tfrecord_x10"
  if not (big / "done").exists():
    big.mkdir(parents=True, exist_ok=True)
    docs = [d for f in sorted(corpus.glob("train-*.tfrecord")) for d in tfrecord_files.read_documents(str(f))]
    for copy in range(10):
      tfrecord_files.write_documents(str(big / f"train-{copy:05d}-of-00010.tfrecord"), docs)
    (big / "done").write_text("")
  sources["tfrecord_x10"] = dict(dataset_type="tfrecord", dataset_path=str(big),
                                 tokenizer_path=str(corpus / "tokenizer.model"))
  return sources


def memory_child(source_json: str, work: str, phase: str) -> dict:
  """In a fresh process: the process's own (anonymous) memory while indexing (phase "index", the store
  is deleted first) or while reading 200 shuffled batches of an existing store (phase "read")."""
  import shutil  # noqa: PLC0415

  import numpy as np  # noqa: PLC0415, F401 (counted in the baseline)

  from MaxText import input_pipeline  # noqa: PLC0415

  source, work_dir = json.loads(source_json), Path(work)
  config = config_for(source, work_dir, batch=8, length=256)
  base = status_kib("RssAnon")
  if phase == "index":
    stores = work_dir / "memory_stores"
    shutil.rmtree(stores, ignore_errors=True)
    config = config_for(source, work_dir, batch=8, length=256, stores="memory_stores")
    with AnonPeak() as indexing:
      data = input_pipeline.create_iterator(config, config.train_split)
    return {"baseline_mib": base / 1024, "peak_mib": indexing.peak / 1024}
  data = input_pipeline.create_iterator(config, config.train_split)
  opened = status_kib("RssAnon")
  with AnonPeak() as reading:
    for _ in range(200):
      next(data)
  store = data._rows.store
  return {"baseline_mib": base / 1024, "opened_mib": opened / 1024, "peak_mib": reading.peak / 1024,
          "file_pages_mib": status_kib("RssFile") / 1024, "tokens": store.num_tokens,
          "documents": store.num_documents, "store_mib": sum(f.stat().st_size for f in store.folder.iterdir()) / 2**20}


def measure_memory(sources: dict, work: Path) -> list[dict]:
  rows = []
  for name in ("tfrecord", "tfrecord_x10"):
    row = {"corpus": name}
    for phase in ("read", "index"):
      out = subprocess.run([sys.executable, __file__, "--memory_child", json.dumps(sources[name]), "--phase", phase,
                            "--work_dir", str(work)], capture_output=True, text=True, check=True,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
      row[phase] = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append(row)
  return rows


def table(header, rows) -> str:
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in [header] + rows]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines)


def print_memory(memory: list[dict]):
  if not memory:
    return
  print()
  print(table(("corpus", "tokens", "store MiB", "indexing: before / peak MiB", "reading: opened / peak MiB",
               "mapped store pages MiB"),
              [(m["corpus"], f"{m['read']['tokens']:,}", f"{m['read']['store_mib']:.0f}",
                f"{m['index']['baseline_mib']:.0f} / {m['index']['peak_mib']:.0f}",
                f"{m['read']['opened_mib']:.0f} / {m['read']['peak_mib']:.0f}",
                f"{m['read']['file_pages_mib']:.0f}") for m in memory]))
  print("(anonymous memory: the process's own; mapped store pages are page cache, shared and evictable)")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--work_dir", default="/tmp/maxtext-input-bench")
  parser.add_argument("--seconds", type=float, default=5.0)
  parser.add_argument("--trainer_steps", type=int, default=5)
  parser.add_argument("--skip_memory", action="store_true")
  parser.add_argument("--skip_rates", action="store_true", help="only the memory table (keeps the rates in the JSON)")
  parser.add_argument("--memory_child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--phase", default="read", help=argparse.SUPPRESS)
  args = parser.parse_args()
  work = Path(args.work_dir)
  if args.memory_child:
    print(json.dumps(memory_child(args.memory_child, str(work), args.phase)))
    return 0

  import train_throughput  # noqa: PLC0415 (benchmarks/train_throughput.py)

  sources = prepare_sources(work)
  if args.skip_rates:
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    memory = measure_memory(sources, work)
    print_memory(memory)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({**previous, "memory": memory}, indent=2))
    print(f"wrote {RESULTS}")
    return 0
  trainer = train_throughput.measure("Llama2Small", args.trainer_steps, [])
  rows = []
  for name, shuffle in (("tfrecord", "global"), ("hf", "global"), ("tfrecord", "window")):
    for batch, length in ((8, 256), (256, 2048)):
      index_s, tokens_per_s = rate(config_for(sources[name], work, batch=batch, length=length, shuffle=shuffle),
                                   args.seconds)
      rows.append({"source": name, "shuffle": shuffle, "batch": batch, "length": length, "first_batch_s": index_s,
                   "tokens_per_s": tokens_per_s, "over_trainer": tokens_per_s / trainer["tokens_per_s"]})
  print(f"trainer: Llama2Small, {trainer['batch']} x {trainer['length']}, {trainer['step_s']:.3f} s/step, "
        f"{trainer['tokens_per_s']:,.0f} tokens/s\n")
  print(table(("source", "shuffle", "batch x length", "first batch s", "tokens/s", "pipeline / trainer"),
              [(r["source"], r["shuffle"], f"{r['batch']} x {r['length']}", f"{r['first_batch_s']:.1f}",
                f"{r['tokens_per_s']:,.0f}", f"{r['over_trainer']:,.0f}x") for r in rows]))
  results = {"trainer": {k: trainer[k] for k in ("model", "batch", "length", "step_s", "tokens_per_s")},
             "rates": rows, "memory": [], "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                     "load_average": os.getloadavg()[0]}}
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps(results, indent=2))
  if not args.skip_memory:
    results["memory"] = measure_memory(sources, work)
    print_memory(results["memory"])
    RESULTS.write_text(json.dumps(results, indent=2))
  print(f"\n{os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.2f}")
  print(f"wrote {RESULTS}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
