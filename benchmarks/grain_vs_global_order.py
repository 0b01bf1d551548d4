"""Grain against the project's own global order, on the same token store rows (evidence for docs/data.md).

  pip install grain==0.2.18   # not a dependency of the project: only this comparison needs it
  python benchmarks/grain_vs_global_order.py [--store <dataset_cache_dir>/token_stores/<hash>]

Both read Llama2Small-length rows (256 tokens) of the default corpus's token store (built by any run on
the default corpus, or by benchmarks/input_pipeline.py), shuffled with a seed and batched: Grain's
`MapDataset.source(rows).shuffle(seed).repeat().batch(G)` calling `__getitem__` per row, and
`global_order.GlobalIterator` gathering a batch at once. Median of 3 runs of 3 s each, interleaved. It
also prints Grain's epoch and sharding semantics. Writes benchmarks/results/grain_vs_global_order.json.
"""

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from MaxText.input_pipeline import default_corpus, token_store
from MaxText.input_pipeline.global_order import GlobalIterator
from MaxText.input_pipeline.rows import Rows

L = 256


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--store", default="")
  args = parser.parse_args()
  try:
    import grain  # noqa: PLC0415
  except ImportError:
    print("error: this comparison needs grain (pip install grain==0.2.18)", file=sys.stderr)
    return 2
  stores = [args.store] if args.store else sorted(
      glob.glob(os.path.expanduser(f"{default_corpus.DEFAULT_CACHE_DIR}/token_stores/*/store.json")))
  if not stores:
    print("error: no token store found; run benchmarks/input_pipeline.py (or any run on the default corpus) first",
          file=sys.stderr)
    return 2
  store = token_store.TokenStore(Path(stores[0]).parent if stores[0].endswith(".json") else stores[0])
  rows = Rows(store, L, packing=True, bos_id=2, eos_id=3)

  class RowSource:  # grain's random-access protocol: __len__ / __getitem__, one record at a time
    def __len__(self):
      return rows.count

    def __getitem__(self, i):
      return {k: v[0] for k, v in rows.gather(np.array([i])).items()}

  def grain_iter(G):
    return iter(grain.MapDataset.source(RowSource()).shuffle(seed=0).repeat(None).batch(G))

  def ours(G):
    return GlobalIterator(rows, name="train", global_rows=G, process_index=0, process_count=1, epochs=None,
                          shuffle_seed=0, fingerprint="x")

  def rate(it, G, seconds=3.0):
    next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      next(it)
      n += 1
    return n * G * L / (time.perf_counter() - start)

  results = []
  for G in (8, 256):
    r = {"grain": [], "ours": []}
    for _ in range(3):
      r["grain"].append(rate(grain_iter(G), G))
      r["ours"].append(rate(ours(G), G))
    row = {"batch": G, "length": L, "grain_tokens_per_s": float(np.median(r["grain"])),
           "global_order_tokens_per_s": float(np.median(r["ours"]))}
    results.append(row)
    print(f"batch {G} x {L}: grain {row['grain_tokens_per_s']:,.0f} tokens/s, global_order "
          f"{row['global_order_tokens_per_s']:,.0f} tokens/s "
          f"({row['global_order_tokens_per_s'] / row['grain_tokens_per_s']:.1f}x)")
  n = 50
  small = grain.MapDataset.range(n).shuffle(seed=0).repeat(2)
  a = [small[i] for i in range(2 * n)]
  print("grain: shuffle().repeat() reshuffles each epoch:", a[:n] != a[n:] and sorted(a[:n]) == list(range(n)))
  full = grain.MapDataset.range(16).shuffle(seed=0)
  one = [full[i] for i in range(8)]
  shards = [[full[p::2][i] for i in range(4)] for p in range(2)]
  print(f"grain: first 8 records on 1 process {one}; on 2 processes (dataset[p::2]) {shards[0]} and {shards[1]}: "
        f"the first global batch of 8 differs" if sorted(one) != sorted(shards[0] + shards[1]) else "")
  out = ROOT / "benchmarks" / "results" / "grain_vs_global_order.json"
  out.write_text(json.dumps({"rows": results, "grain": grain.__version__ if hasattr(grain, "__version__") else "",
                             "load_average": os.getloadavg()[0]}, indent=2))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
