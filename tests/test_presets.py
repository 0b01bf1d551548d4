"""Every registered preset trains: shrunk to a CPU size, with all its switches (family, optimizer,
parametrization, flags, tied or untied logits) kept as shipped.

Presets that differ only in sizes share their code paths, so one of each group of equal switches runs.
"""

import math

import pytest
import yaml

from MaxText import startup, train
from MaxText.config import loader


def _switches(name: str) -> tuple:
  """The preset's non-size settings: strings and booleans (and the MLP activations), which pick code paths."""
  values = yaml.safe_load((loader.MODELS_DIR / f"{name}.yml").read_text())
  return tuple(sorted((k, str(v)) for k, v in values.items()
                      if isinstance(v, (bool, str)) or k == "mlp_activations"))


def _one_per_switch_group() -> list[str]:
  groups = {}
  for name in loader.preset_names():
    groups.setdefault(_switches(name), name)
  return sorted(groups.values())


def _shrunk(name: str) -> dict:
  """Sizes small enough for a CPU step that every family accepts; head counts keep MHA / GQA / single-head."""
  shipped = startup.load_config([None, str(loader.BASE_CONFIG)], model_name=name, num_devices=1, env={})
  heads = 1 if shipped.base_num_query_heads == 1 else 4
  kv_heads = (heads if shipped.base_num_kv_heads == shipped.base_num_query_heads
              else 1 if shipped.base_num_kv_heads == 1 else 2)
  values = dict(base_emb_dim=64, base_num_decoder_layers=2, base_mlp_dim=128, head_dim=16, vocab_size=256,
                max_target_length=32, base_num_query_heads=heads, base_num_kv_heads=kv_heads)
  if shipped.decoder_block == "mudd":  # FFN re-allocation over depth needs room to round to 128
    values.update(base_num_decoder_layers=4, base_mlp_dim=512)
  if shipped.decoder_block == "transformer_vq":
    values.update(vq_block_length=8, vq_num_codes=16, vq_value_dim=32, vq_window=0)
  if shipped.decoder_block == "gpt":
    values.update(head_qk_dim=16, sgu_band_width=8)
  if shipped.parametrization == "mup":
    values.update(mup_base_width=32)
  return values


# The slowest groups (15-25 s each on 2 cores) run with `-m slow`; their families and switches are also
# covered by the families' own tests.
SLOW = {"MUDDFormer2B8", "MUDDLlama2DeepNarrow1B3", "MUDDLlama2Large", "TransformerVQEnwik8", "TransformerVQImageNet64"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in _one_per_switch_group()])
def test_every_kind_of_preset_trains(name, make_config):
  config = make_config(f"model_name={name}", **_shrunk(name), steps=3, per_device_batch_size=2.0)
  assert config.model_name == name
  result = train.train_and_evaluate(config, progress=False)
  assert result["step"] == 3 and math.isfinite(result["loss"]), result
