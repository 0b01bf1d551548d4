"""Name tables between a family's parameter tree and another code base's flat {name: tensor} checkpoints.

A family's `from_hf` / `to_hf` describe their mapping as `Rule`s and let `read` and `write` walk it one
tensor at a time, so a converter holds one parameter (a stack of N layers at most) and the tensor at hand:

    Rule("layers/attention/wq", "model.layers.{i}.self_attn.q_proj.weight", to_ours, to_theirs)

`{i}` in their name marks a tensor per layer. When our path has no `{i}`, the N layers' tensors are
stacked on our leading `layers` axis (scan-ready stacks); when it has one too (`layer_{i}/...`), each
layer is a parameter of its own. `to_ours` / `to_theirs` change one layer's layout (a transpose, a
reshape); the default is the identity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from MaxText.errors import CheckpointError


def _same(x):
  return x


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: str
  theirs: str
  to_ours: Callable[[np.ndarray], np.ndarray] = _same
  to_theirs: Callable[[np.ndarray], np.ndarray] = _same


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def _get(tree: Mapping, path: str):
  for key in path.split("/"):
    if not isinstance(tree, Mapping) or key not in tree:
      raise CheckpointError(f"the parameters have no {path!r}")
    tree = tree[key]
  return tree


def _tensor(tensors: Mapping[str, Any], name: str) -> np.ndarray:
  if name not in tensors:
    raise CheckpointError(f"the checkpoint has no tensor {name!r}")
  return np.asarray(tensors[name])


def read(rules: list[Rule], tensors: Mapping[str, Any], num_layers: int) -> Iterator[tuple[str, np.ndarray]]:
  """(our parameter path, array) pairs from their tensors, one parameter at a time, each tensor read once."""
  for rule in rules:
    if "{i}" not in rule.theirs:
      yield rule.ours, rule.to_ours(_tensor(tensors, rule.theirs))
    elif "{i}" in rule.ours:
      for i in range(num_layers):
        yield rule.ours.format(i=i), rule.to_ours(_tensor(tensors, rule.theirs.format(i=i)))
    else:
      first = rule.to_ours(_tensor(tensors, rule.theirs.format(i=0)))
      stacked = np.empty((num_layers, *first.shape), first.dtype)  # filled layer by layer: no list of copies
      stacked[0] = first
      del first
      for i in range(1, num_layers):
        stacked[i] = rule.to_ours(_tensor(tensors, rule.theirs.format(i=i)))
      yield rule.ours, stacked


def tree(pairs) -> dict:
  """Nested dicts from (path "a/b/c", value) pairs (e.g. a family's from_hf)."""
  params: dict = {}
  for path, value in pairs:
    _set(params, path, value)
  return params


def write(rules: list[Rule], params: Mapping, num_layers: int) -> Iterator[tuple[str, np.ndarray]]:
  """Their (name, tensor) pairs from our parameter tree, one at a time."""
  for rule in rules:
    if "{i}" not in rule.theirs:
      yield rule.theirs, rule.to_theirs(np.asarray(_get(params, rule.ours)))
    elif "{i}" in rule.ours:
      for i in range(num_layers):
        yield rule.theirs.format(i=i), rule.to_theirs(np.asarray(_get(params, rule.ours.format(i=i))))
    else:
      stacked = _get(params, rule.ours)  # indexing a lazy stack reads one layer
      for i in range(num_layers):
        yield rule.theirs.format(i=i), rule.to_theirs(np.asarray(stacked[i]))


def names(rules: list[Rule], num_layers: int) -> list[str]:
  """Every tensor name the rules read or write."""
  out = []
  for rule in rules:
    out += [rule.theirs.format(i=i) for i in range(num_layers)] if "{i}" in rule.theirs else [rule.theirs]
  return out
