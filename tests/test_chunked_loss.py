"""Chunked cross-entropy (`num_vocab_tiling`): the loss, z-loss, family losses, evaluation sums and every
gradient equal the whole-logits computation (float32) for each family built to allow it, on one device and a
sharded mesh; families and options that cannot be chunked are one-line config errors."""

import jax
import numpy as np
import pytest

from MaxText.errors import ConfigError
from MaxText.parallel import sharding
from MaxText.training import train_state, train_step
from tests.checks import fast_init
from tests.test_llama import synthetic_batch
from tests.test_sharding import MESH_222
from tests.test_transformer_vq import VQ

FAMILIES = {
    "llama2": {},
    "gpt": dict(decoder_block="gpt", mlp_activations=["gelu"], parallel_residual=True, logits_via_embedding=True),
    "mudd": dict(decoder_block="mudd", base_num_decoder_layers=3, base_mlp_dim=256),
    "transformer_vq": VQ,
}


def sums_and_grads(config, params, batch, mesh=None):
  """(objective, sums) and the gradients of the objective, by the train step's own loss function."""
  spec = train_state.model_spec(config)

  def objective(p):
    return train_step.loss_sums(train_state.bind(spec, p), batch, config.z_loss_multiplier, config.num_vocab_tiling)

  fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
  if mesh is None:
    return jax.device_get(fn(params))
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    return jax.device_get(fn(params))


def assert_same(chunked, whole, rtol):
  (objective, sums), grads = chunked
  (want_objective, want_sums), want_grads = whole
  np.testing.assert_allclose(objective, want_objective, rtol=rtol)
  for key, value in want_sums.items():
    np.testing.assert_allclose(sums[key], value, rtol=rtol, err_msg=key)
  assert sums["z_loss_sum"] > 0
  # Some gradients are zero but for rounding (a key bias shifts every score of a row alike): the absolute
  # tolerance is relative to the largest gradient of all.
  largest = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(want_grads))
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * largest), grads, want_grads)


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in ("mudd", "transformer_vq") else f
                                    for f in sorted(FAMILIES)])  # mudd and transformer_vq: `-m slow` (10-20 s each)
def test_chunked_loss_and_gradients_equal_the_whole_logits(make_config, family):
  overrides = dict(z_loss_multiplier=1e-2, **FAMILIES[family])
  whole = make_config(**overrides)
  chunked = make_config(num_vocab_tiling=4, **overrides)
  params = fast_init(whole, train_state.model_spec(whole))
  batch = synthetic_batch(whole)
  assert_same(sums_and_grads(chunked, params, batch), sums_and_grads(whole, params, batch), rtol=2e-6)


def test_chunked_gradient_never_holds_the_whole_logits(make_config):
  """No [B, L, V] array anywhere in the chunked loss's gradient program (scan and remat bodies included)."""
  whole = make_config()
  chunked = make_config(num_vocab_tiling=4)
  spec = train_state.model_spec(whole)
  params = jax.eval_shape(lambda: fast_init(whole, spec))
  batch = synthetic_batch(whole)
  B, L = batch["inputs"].shape
  V, C = whole.vocab_size, L // 4

  def program(config):
    fn = lambda p: train_step.loss_sums(train_state.bind(spec, p), batch, 0.0, config.num_vocab_tiling)[0]
    return str(jax.make_jaxpr(jax.grad(fn))(params))

  assert f"f32[{B},{L},{V}]" in program(whole)
  chunked_program = program(chunked)
  assert f"f32[{B},{L},{V}]" not in chunked_program and f"f32[{B},{C},{V}]" in chunked_program


def test_chunked_loss_equals_the_whole_logits_on_a_sharded_mesh(make_config):
  overrides = dict(z_loss_multiplier=1e-2, per_device_batch_size=1.0, **MESH_222)
  whole = make_config(**overrides)
  chunked = make_config(num_vocab_tiling=2, **overrides)
  params = fast_init(whole, train_state.model_spec(whole))
  batch = synthetic_batch(whole, seed=3)
  batch = {k: np.concatenate([v] * 4) for k, v in batch.items()}  # 8 rows: 2 per batch shard
  mesh = sharding.make_mesh(whole)
  assert_same(sums_and_grads(chunked, params, batch, mesh), sums_and_grads(whole, params, batch, mesh), rtol=2e-6)


def test_chunked_evaluation_sums_equal_the_whole_logits(make_config):
  whole = make_config()
  chunked = make_config(num_vocab_tiling=8)
  spec = train_state.model_spec(whole)
  params = fast_init(whole, spec)
  batch = synthetic_batch(whole)
  got = jax.jit(train_step.make_eval_step(chunked, spec))(params, batch)
  want = jax.jit(train_step.make_eval_step(whole, spec))(params, batch)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=2e-6, err_msg=key)


@pytest.mark.parametrize("overrides,message", [
    (dict(decoder_block="gpt", head_qk=True), "num_vocab_tiling=4 computes the loss chunk by chunk, but head_qk adds "
                                              "logits that depend on the earlier tokens"),
    (dict(max_target_length=18), "'num_vocab_tiling' must be a positive divisor of max_target_length=18, got 4"),
    (dict(record_activations=True), "record_activations measures the whole logits"),
])
def test_what_cannot_be_chunked_is_a_one_line_error(make_config, overrides, message):
  with pytest.raises(ConfigError, match=message) as e:
    make_config(num_vocab_tiling=4, **overrides)
  assert "\n" not in str(e.value)
