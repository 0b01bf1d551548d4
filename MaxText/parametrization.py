"""How a parametrization scales a model, decided from parameter roles and widths, never by family.

Families ask this module for the attention logit scale and the output logit multiplier; everything
else a parametrization changes (init std, per-parameter learning rates) is derived from the `role` and
`fan_in` every parameter records (see models/layers.py).
"""

from __future__ import annotations


def attention_scale(config, head_dim: int) -> float:
  """Multiplier of q.k in attention logits: 1/sqrt(head_dim) in the standard parametrization."""
  del config
  return head_dim**-0.5


def logits_multiplier(config) -> float:
  """Multiplier of the output logits (1.0: none)."""
  del config
  return 1.0
