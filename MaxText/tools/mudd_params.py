"""Parameters and FLOPs of every MUDD preset against its Transformer++ twin (abstract shapes only, no init).

  python MaxText/tools/mudd_params.py [--models MUDDLlama2Medium,...]

The extra parameters split into the dense connections themselves (W1, W2, static bias and the weight
generator's norm: what the reference counts, about 2.38M for the 405M model) and the norm gains MUDD
adds around them (q/k/v pre-norms beyond the twin's one, and with pre/post DA norms the source norms and
post-norms). `eta/6` is the paper's estimate of the relative extra parameters, eta = (L + 3) / D, taken
relative to the twin's non-embedding parameters; the FLOPs column is flops_per_token at the preset length.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax

from MaxText import models, startup
from MaxText.config import loader
from MaxText.training import train_state

CONNECTION = ("w1", "w2", "bias", "generator_norm")


def config_of(name: str):
  return startup.load_config([None, str(loader.BASE_CONFIG), f"model_name={name}", "num_devices=1",
                              "per_device_batch_size=1"], env={})


def count(name: str) -> dict:
  mudd = config_of(name)
  twin = config_of(name.removeprefix("MUDD"))
  spec, twin_spec = train_state.model_spec(mudd), train_state.model_spec(twin)
  sizes = jax.tree.map(lambda s: s.size, spec.shapes)
  connection = sum(sum(jax.tree.leaves({k: v for k, v in layer.get("dense", {}).items() if k in CONNECTION}))
                   for key, layer in sizes.items() if key.startswith("layer_"))
  extra = spec.num_params - twin_spec.num_params
  twin_embedding = sum(n for n, role in zip(jax.tree.leaves(jax.tree.map(lambda s: s.size, twin_spec.shapes)),
                                            jax.tree.leaves(twin_spec.roles)) if role in ("embedding", "readout"))
  eta = (mudd.base_num_decoder_layers + 3) / mudd.base_emb_dim
  flops = models.get_family("mudd").flops_per_token(mudd)
  twin_flops = models.get_family(twin.decoder_block).flops_per_token(twin)
  return {"model": name, "twin": twin.model_name, "params": spec.num_params, "twin_params": twin_spec.num_params,
          "extra": extra, "connection": connection, "norms": extra - connection,
          "eta_over_6": eta / 6 * (twin_spec.num_params - twin_embedding), "flops_ratio": flops / twin_flops - 1}


@startup.cli
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  names = [n for n in loader.preset_names() if n.startswith("MUDD")]
  parser.add_argument("--models", default=",".join(names))
  args = parser.parse_args(argv)
  rows = [count(n) for n in args.models.split(",")]
  header = ("model", "params", "twin params", "extra", "connections (W1, W2, bias, norm)", "added norm gains",
            "eta/6 estimate", "extra FLOPs/token")
  table = [header] + [(r["model"], f"{r['params']:,}", f"{r['twin_params']:,}",
                       f"{r['extra']:,} ({r['extra'] / r['twin_params']:.2%})", f"{r['connection']:,}",
                       f"{r['norms']:,}", f"{r['eta_over_6']:,.0f}", f"{r['flops_ratio']:+.2%}") for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in table]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  startup.exit_now(main())
