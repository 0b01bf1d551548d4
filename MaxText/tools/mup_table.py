"""Print the init std and Adam LR multiplier of every parameter of a config, as the parametrization sets them.

  python MaxText/tools/mup_table.py MaxText/configs/base_v2.yml model_name=MuTransformerW512
  python MaxText/tools/mup_table.py MaxText/configs/base_v2.yml model_name=GPTTiny parametrization=mup

Only the abstract model is built (no parameter is allocated), so any preset prints at once.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from MaxText import startup
from MaxText.models import parametrization
from MaxText.training import train_state


def render(config) -> str:
  spec = train_state.model_spec(config)
  rows = parametrization.table(config, spec)
  header = ("parameter", "shape", "role", "fan_in", "tag", "init std", "LR x")
  cells = [header] + [
      (r["param"], "x".join(map(str, r["shape"])), r["role"], str(r["fan_in"] or "-"), r["tag"] or "-",
       r["init_std"] if isinstance(r["init_std"], str) else f"{r['init_std']:.4g}", f"{r['lr_multiplier']:.4g}")
      for r in rows]
  widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
  lines = [f"{config.model_name} ({config.decoder_block}), parametrization={config.parametrization}, width "
           f"{config.base_emb_dim}, width ratio w = {parametrization.width_ratio(config):g}, attention scale "
           f"{parametrization.attention_scale(config, config.head_dim):.4g}, logits x "
           f"{parametrization.logits_multiplier(config):.4g}"]
  lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


@startup.cli(usage=__doc__)
def main(argv: list[str]) -> int:
  config = startup.load_config(argv, num_devices=1, per_device_batch_size=1.0)
  print(render(config))
  return 0


if __name__ == "__main__":
  startup.exit_now(main())
