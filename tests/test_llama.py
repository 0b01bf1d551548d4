"""Transformer++ numerics: reference parity, causality, scan/unrolled and remat equivalence, accounting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from MaxText import models
from MaxText.training import train_state, train_step
from tests import reference_llama
from tests.checks import assert_causal


def packed_inputs(config, batch=2, seed=0):
  """Tokens with two documents per row: positions restart and segment ids change mid-row."""
  L = config.max_target_length
  tokens = jax.random.randint(jax.random.key(seed), (batch, L), 0, config.vocab_size)
  cut = L // 2 - 1
  segment_ids = jnp.where(jnp.arange(L) < cut, 1, 2)[None].repeat(batch, 0).astype(jnp.int32)
  positions = jnp.where(jnp.arange(L) < cut, jnp.arange(L), jnp.arange(L) - cut)[None].repeat(batch, 0)
  return tokens, positions.astype(jnp.int32), segment_ids


def init(config):
  spec = train_state.model_spec(config)
  return spec, train_state.init_params(config, spec)


@pytest.mark.parametrize("overrides", [
    {}, {"logits_via_embedding": True}, {"base_num_kv_heads": 1}, {"attention": "dot_product"},
    {"scan_layers": True}])
def test_logits_match_plain_jnp_reference(make_config, overrides):
  config = make_config(**overrides)
  spec, params = init(config)
  tokens, positions, segment_ids = packed_inputs(config)
  got, _ = train_state.bind(spec, params)(tokens, positions, segment_ids)
  want = reference_llama.logits(params, config, tokens, positions, segment_ids)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_documents_do_not_see_each_other(make_config):
  """With packing, the second document's logits equal those of the document run alone."""
  config = make_config()
  spec, params = init(config)
  model = train_state.bind(spec, params)
  tokens, positions, segment_ids = packed_inputs(config, batch=1)
  cut = int(jnp.sum(segment_ids == 1))
  packed, _ = model(tokens, positions, segment_ids)
  alone, _ = model(tokens[:, cut:], positions[:, cut:], jnp.ones_like(segment_ids[:, cut:]))
  np.testing.assert_allclose(packed[:, cut:], alone, atol=1e-5, rtol=1e-5)


def test_causality_gradient_is_zero_for_future_inputs(make_config):
  config = make_config(logits_via_embedding=False)
  spec, params = init(config)
  assert_causal(config, spec, params, t=config.max_target_length // 2)


def loss_and_grads(config, params, batch):
  spec = train_state.model_spec(config)
  fn = lambda p: train_step.loss_sums(train_state.bind(spec, p), batch, 0.0)[0]
  return jax.jit(jax.value_and_grad(fn))(params)


def synthetic_batch(config, seed=1):
  tokens, positions, segment_ids = packed_inputs(config, batch=2, seed=seed)
  targets = jnp.roll(tokens, -1, axis=1)
  return {"inputs": tokens, "targets": targets, "inputs_position": positions,
          "inputs_segmentation": segment_ids, "targets_segmentation": segment_ids}


@pytest.mark.parametrize("variant", [
    {"scan_layers": True}, {"remat_policy": "full", "scan_layers": True}, {"remat_policy": "minimal"},
    {"remat_policy": "save_qkv_proj"}])
def test_scan_unrolled_and_remat_give_equal_loss_and_gradients(make_config, variant):
  base = make_config(base_num_decoder_layers=3, scan_layers=False)
  _, params = init(base)
  batch = synthetic_batch(base)
  loss0, grads0 = loss_and_grads(base, params, batch)
  loss1, grads1 = loss_and_grads(make_config(base_num_decoder_layers=3, **variant), params, batch)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads1, grads0)


def test_cached_prefill_and_decode_equal_the_full_forward(make_config):
  config = make_config()
  spec, params = init(config)
  model = train_state.bind(spec, params)
  L = config.max_target_length
  tokens = jax.random.randint(jax.random.key(3), (2, L), 0, config.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (2, L))
  ones = jnp.ones((2, L), jnp.int32)
  full, _ = model(tokens, positions, ones)
  cache = model.init_cache(2, L + 4)
  prefill = L // 2
  logits, aux = model(tokens[:, :prefill], positions[:, :prefill], ones[:, :prefill], cache=cache)
  steps = [logits]
  cache = aux["cache"]
  for t in range(prefill, L):
    logits, aux = model(tokens[:, t:t + 1], positions[:, t:t + 1], ones[:, t:t + 1], cache=aux["cache"])
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def test_bf16_activations_keep_float32_logits_and_params(make_config):
  config = make_config(dtype="bfloat16")
  spec, params = init(config)
  tokens, positions, segment_ids = packed_inputs(config)
  logits, _ = train_state.bind(spec, params)(tokens, positions, segment_ids)
  assert logits.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  want = reference_llama.logits(params, config, tokens, positions, segment_ids)
  np.testing.assert_allclose(logits, want, atol=0.05, rtol=0.05)
  config = make_config(weight_dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(init(config)[1]))


def test_init_std_and_roles(make_config):
  config = make_config(base_emb_dim=256, base_mlp_dim=512, vocab_size=512, init_weights_std=0.006)
  spec, params = init(config)
  assert np.std(np.asarray(params["layers"]["mlp"]["wi_0"])) == pytest.approx(0.006, rel=0.02)
  assert np.all(np.asarray(params["final_norm"]["scale"]) == 1.0)
  assert spec.roles["embed"]["embedding"] == "embedding" and spec.roles["unembed"] == "readout"
  assert spec.roles["layers"]["attention"]["wq"] == "hidden"
  assert spec.roles["layers"]["pre_mlp_norm"]["scale"] == "gain"
  assert spec.logical_axes["layers"]["attention"]["wq"] == ("layers", "embed", "heads", "head_dim")


def test_flops_per_token_hand_count(make_config):
  config = make_config(base_emb_dim=64, base_num_query_heads=4, base_num_kv_heads=2, base_mlp_dim=128,
                       base_num_decoder_layers=3, vocab_size=100, max_target_length=32)
  D, N, F, V, L = 64, 3, 128, 100, 32  # head dim 16: 4 query heads (64 wide), 2 kv heads (32 wide)
  # q and o: D x (4*16) each; k and v: D x (2*16) each; SwiGLU: three D x F matrices.
  matmul_params = N * (2 * D * 64 + 2 * D * 32 + 3 * D * F)
  expected = 6 * matmul_params + 6 * N * L * 64 + 6 * D * V
  assert models.get_family("llama2").flops_per_token(config) == expected
  spec = train_state.model_spec(config)
  counted = spec.num_params - V * D - (2 * N + 1) * D - V * D  # no embeddings, no gains
  assert counted == matmul_params
