"""The training state as a plain pytree, its abstract shape and shardings, and its sharded creation.

state = {"step": int32[], "params": {...}, "opt_state": optax state}
`params` is a nested dict of arrays (nnx.to_pure_dict of the model's Params), so optax, jit donation
and Orbax all see a plain pytree; `bind` turns it back into an NNX model inside traced functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from MaxText import models
from MaxText.models import parametrization
from MaxText.parallel import sharding


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What is known about a model before any parameter exists."""

  graphdef: Any
  abstract_state: Any  # nnx.State of Params holding ShapeDtypeStructs
  shapes: dict  # params tree of ShapeDtypeStruct
  logical_axes: dict  # params tree of logical axis tuples
  roles: dict  # params tree of role strings
  fan_in: dict  # params tree of fan-in ints (None for embeddings, gains and biases)
  tags: dict = dataclasses.field(default_factory=dict)  # params tree of layers.TAGS entries or None

  @property
  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.shapes))


def _metadata(variable: nnx.Variable, name: str):
  return variable.get_metadata()[name]


def model_spec(config) -> ModelSpec:
  model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(config.init_weights_seed)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise NotImplementedError(f"{type(model).__name__} holds non-Param variables; the train state carries Params only")
  is_var = lambda x: isinstance(x, nnx.Variable)
  axes = nnx.to_pure_dict(jax.tree.map(lambda v: _metadata(v, "out_sharding"), params, is_leaf=is_var))
  roles = nnx.to_pure_dict(jax.tree.map(lambda v: _metadata(v, "role"), params, is_leaf=is_var))
  # fan_in may be None, which jax.tree treats as an empty subtree, so box it in a 1-tuple and unbox.
  fan_in = nnx.to_pure_dict(jax.tree.map(lambda v: (_metadata(v, "fan_in"),), params, is_leaf=is_var))
  fan_in = jax.tree.map(lambda box: box[0], fan_in, is_leaf=lambda x: isinstance(x, tuple))
  tags = nnx.to_pure_dict(jax.tree.map(lambda v: (v.get_metadata().get("tag"),), params, is_leaf=is_var))
  tags = jax.tree.map(lambda box: box[0], tags, is_leaf=lambda x: isinstance(x, tuple))
  spec = ModelSpec(graphdef, params, nnx.to_pure_dict(params), axes, roles, fan_in, tags)
  parametrization.check_spec(config, spec)
  return spec


def bind(spec: ModelSpec, params: dict) -> nnx.Module:
  """An NNX model whose Params hold `params` (arrays or tracers)."""
  state = jax.tree.map(lambda x: x, spec.abstract_state)  # fresh Variables; the spec stays untouched
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(spec.graphdef, state)


def init_params(config, spec: ModelSpec) -> dict:
  model = models.build(config, nnx.Rngs(config.init_weights_seed))
  # The parametrization may redraw parameters from their role and fan-in (muP) or zero some.
  return parametrization.init_params(config, spec, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def init_state(config, spec: ModelSpec, tx: optax.GradientTransformation) -> dict:
  params = init_params(config, spec)
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": tx.init(params),
  }


def abstract_state(config, spec: ModelSpec, tx) -> dict:
  return jax.eval_shape(lambda: init_state(config, spec, tx))


def param_shardings(spec: ModelSpec, mesh, rules):
  return sharding.tree_shardings(mesh, rules, spec.logical_axes, spec.shapes)


def state_shardings(spec: ModelSpec, abstract: dict, mesh, rules) -> dict:
  """Parameters by their logical axes; optimizer subtrees shaped like the parameters the same way."""
  params = param_shardings(spec, mesh, rules)
  params_def = jax.tree.structure(spec.shapes)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  # A partitioned optimizer (optax.partition) keeps per-partition trees with MaskedNode in place of the
  # parameters another partition owns; they are sharded like the parameters, MaskedNode kept as it is.
  masked = lambda x: isinstance(x, optax.MaskedNode)

  def like_params(x):
    return isinstance(x, dict) and jax.tree.structure(x, is_leaf=masked) == params_def

  def shard_like_params(x):
    # Factored statistics (adafactor's row and column second moments, and the (1,) placeholders it keeps
    # for the other form) are smaller than their parameter: O(rows + cols), replicated.
    def pick(s, shape, leaf):
      return leaf if masked(leaf) else s if tuple(leaf.shape) == tuple(shape.shape) else replicated

    return jax.tree.map(pick, params, spec.shapes, x, is_leaf=masked)

  opt = jax.tree.map(lambda x: shard_like_params(x) if like_params(x) else replicated, abstract["opt_state"],
                     is_leaf=like_params)
  return {"step": replicated, "params": params, "opt_state": opt}


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry their target sharding (the form Orbax restores into)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def create_sharded(config, spec: ModelSpec, tx, shardings: dict) -> dict:
  """Initialise every array directly into its sharding: never whole on one device."""
  return jax.jit(lambda: init_state(config, spec, tx), out_shardings=shardings)()
