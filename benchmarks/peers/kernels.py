"""The single operations of nanoGPT's Shakespeare step, in XLA (jitted JAX) and in eager PyTorch, side by side.

  python benchmarks/peers/kernels.py [--rounds 5] [--repeat 200]

The whole-step comparison (`compare.py nanogpt`) says how far apart the two trainers are; this says where:
each row is one operation at the step's shapes (12 x 64 = 768 tokens, width 128, MLP 512, 4 heads of 32,
float32), timed as the median of `--rounds` alternating rounds of `--repeat` calls, both libraries on the
machine's threads. A ratio above 1 means XLA's kernel takes longer than PyTorch's. Prints a table and writes
benchmarks/results/peers_kernels.json.
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

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
T, D, F, B, H, L, E = 768, 128, 512, 12, 4, 64, 32
GELU_C = float(np.sqrt(2.0 / np.pi))


def model_shapes() -> list[tuple[int, ...]]:
  """The parameters of nanoGPT's 4-layer model without biases (tied 65 x 128 embedding, 64 positions)."""
  per_layer = [(D,), (D, 3 * D), (D, D), (D,), (D, F), (F, D)]
  return [(65, D), (L, D), (D,)] + per_layer * 4


def cases(rng: np.random.Generator) -> list[tuple[str, callable, tuple, callable, tuple]]:
  """(name, jax function, its arguments, torch function, its arguments)."""
  def arr(*shape):
    return rng.standard_normal(shape).astype(np.float32)

  x, w_qkv, g_F, w_down, h_F = arr(T, D), arr(D, 3 * D), arr(T, F), arr(F, D), arr(T, F)
  q, k, s = arr(B, H, L, E), arr(B, H, L, E), arr(B, H, L, L)
  scale = arr(D)
  j = lambda *a: tuple(jnp.asarray(v) for v in a)
  t = lambda *a: tuple(torch.from_numpy(v) for v in a)
  mask = np.tril(np.ones((L, L), bool))

  def gelu_jax(a):
    return 0.5 * a * (1.0 + jnp.tanh(GELU_C * (a + 0.044715 * a ** 3)))

  def layer_norm_jax(a, g):
    mean = a.mean(-1, keepdims=True)
    var = ((a - mean) ** 2).mean(-1, keepdims=True)
    return (a - mean) * jax.lax.rsqrt(var + 1e-5) * g

  def softmax_jax(a):
    return jax.nn.softmax(jnp.where(mask, a, -jnp.inf), axis=-1)

  torch_mask = torch.from_numpy(mask)
  return [
      ("matmul x @ W_qkv   768x128 . 128x384", lambda a, b: a @ b, j(x, w_qkv), lambda a, b: a @ b, t(x, w_qkv)),
      ("matmul x^T @ g     128x768 . 768x512", lambda a, b: a.T @ b, j(x, g_F), lambda a, b: a.T @ b, t(x, g_F)),
      ("matmul h @ W_down  768x512 . 512x128", lambda a, b: a @ b, j(h_F, w_down), lambda a, b: a @ b,
       t(h_F, w_down)),
      ("scores q k^T       12x4 x 64x32 . 32x64", lambda a, b: jnp.einsum("bhle,bhse->bhls", a, b), j(q, k),
       lambda a, b: a @ b.transpose(-1, -2), t(q, k)),
      ("GELU (tanh)        768x512", gelu_jax, j(h_F),
       lambda a: torch.nn.functional.gelu(a, approximate="tanh"), t(h_F)),
      ("LayerNorm          768x128", layer_norm_jax, j(x, scale),
       lambda a, g: torch.nn.functional.layer_norm(a, (D,), g), t(x, scale)),
      ("causal softmax     12x4x64x64", softmax_jax, j(s),
       lambda a: torch.softmax(a.masked_fill(~torch_mask, float("-inf")), dim=-1), t(s)),
      ("column sum         768x512 -> 512", lambda a: a.sum(0), j(g_F), lambda a: a.sum(0), t(g_F)),
  ]


def adamw_case(rng: np.random.Generator):
  """One AdamW update of every parameter (optax in one jitted call; torch.optim.AdamW's default foreach)."""
  shapes = model_shapes()
  params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  grads = [rng.standard_normal(s).astype(np.float32) * 1e-3 for s in shapes]
  tx = optax.adamw(1e-3, b2=0.99, weight_decay=0.1)
  jp, jg = [jnp.asarray(p) for p in params], [jnp.asarray(g) for g in grads]
  state = tx.init(jp)

  @jax.jit
  def update(p, o, g):
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  holder = {"p": jp, "o": state}

  def jax_step():
    holder["p"], holder["o"] = update(holder["p"], holder["o"], jg)
    return holder["p"]

  tp = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
  for p, g in zip(tp, grads):
    p.grad = torch.from_numpy(g)
  opt = torch.optim.AdamW(tp, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
  n = sum(int(np.prod(s)) for s in shapes)
  return (f"AdamW update       {n:,} parameters", jax_step, opt.step)


def time_jax(f, args, repeat):
  start = time.perf_counter()
  for _ in range(repeat):
    y = f(*args)
  jax.block_until_ready(y)
  return (time.perf_counter() - start) / repeat


def time_torch(f, args, repeat):
  start = time.perf_counter()
  with torch.no_grad():
    for _ in range(repeat):
      f(*args)
  return (time.perf_counter() - start) / repeat


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--repeat", type=int, default=200)
  parser.add_argument("--out", default=str(RESULTS / "peers_kernels.json"))
  args = parser.parse_args()
  from MaxText.parallel import distributed  # noqa: PLC0415

  distributed.skip_absent_tpu()  # as train.py does: libtpu (installed for AOT compiles) stays unloaded here
  rng = np.random.default_rng(0)
  rows = []
  todo = [(name, jax.jit(jf), ja, tf, ta) for name, jf, ja, tf, ta in cases(rng)]
  name, jax_step, torch_step = adamw_case(rng)
  todo.append((name, lambda: jax_step(), (), lambda: torch_step(), ()))
  for name, jf, ja, tf, ta in todo:
    jax.block_until_ready(jf(*ja))  # compile
    tf(*ta)
    jt, tt = [], []
    for _ in range(args.rounds):
      jt.append(time_jax(jf, ja, args.repeat))
      tt.append(time_torch(tf, ta, args.repeat))
    rows.append({"op": name, "xla_us": 1e6 * statistics.median(jt), "torch_us": 1e6 * statistics.median(tt)})
    rows[-1]["ratio"] = rows[-1]["xla_us"] / rows[-1]["torch_us"]
  width = max(len(r["op"]) for r in rows)
  print(f"{'operation':{width}s}  {'XLA us':>8s}  {'torch us':>8s}  XLA/torch")
  for r in rows:
    print(f"{r['op']:{width}s}  {r['xla_us']:8.1f}  {r['torch_us']:8.1f}  {r['ratio']:.2f}")
  out = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "torch": torch.__version__,
         "threads": {"torch": torch.get_num_threads(), "cpus": os.cpu_count()},
         "machine": platform.platform(), "rounds": args.rounds, "repeat": args.repeat, "rows": rows}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(out, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
