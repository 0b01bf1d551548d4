"""Transformer-VQ: block-wise attention equals quadratic attention over quantised keys, causality, the
codebook EMA through the optimizer on 1 and 8 devices, decoding from the compressed cache, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from MaxText import models, train
from MaxText.errors import ConfigError
from MaxText.models import vq_attention as vqa
from MaxText.parallel import sharding
from MaxText.training import optimizers, train_state
from tests import reference_vq
from tests.checks import assert_causal
from tests.test_sharding import MESH_222, global_batch, run_one_step

# One layer of two units, width 32, d_k 16, d_v 64, 16 codes, blocks and bias window of 4 tokens.
VQ = dict(decoder_block="transformer_vq", base_emb_dim=32, base_num_decoder_layers=1, base_num_query_heads=1,
          base_num_kv_heads=1, head_dim=16, vq_num_codes=16, vq_block_length=4, vq_window=4, vocab_size=128,
          max_target_length=16)


def vq_config(make_config, **overrides):
  return make_config(**{**VQ, **overrides})


def init(config):
  """The family's own initialisation, jitted with counter-based "rbg" keys (they compile fastest)."""
  spec = train_state.model_spec(config)
  rngs = lambda: nnx.Rngs(jax.random.key(0, impl="rbg"))
  return spec, jax.jit(lambda: nnx.to_pure_dict(nnx.state(models.build(config, rngs()), nnx.Param)))()


def initial_params(config):
  """The parameters run_one_step starts from: its own jitted init, so that compile is a cache hit there."""
  mesh, rules = sharding.make_mesh(config), config.logical_axis_rules
  spec = train_state.model_spec(config)
  tx, _ = optimizers.create(config, spec.roles)
  shardings = train_state.state_shardings(spec, train_state.abstract_state(config, spec, tx), mesh, rules)
  with sharding.use_mesh(mesh, rules):
    return jax.device_get(train_state.create_sharded(config, spec, tx, shardings)["params"])


def applier(spec):
  """model(params, tokens, positions, segment_ids, cache=None), jitted: eager dispatch of every small op
  would dominate these tests."""
  return jax.jit(lambda params, *args, cache=None: train_state.bind(spec, params)(*args, cache=cache))


def attend(data, kw, **more):
  return jax.jit(lambda d: vqa.attend(**d, **kw, **more))(data)


def packed_inputs(config, batch=2, seed=0):
  """Two documents per row (positions restart, segment ids change mid-row)."""
  L = config.max_target_length
  tokens = jax.random.randint(jax.random.key(seed), (batch, L), 0, config.vocab_size)
  cut = L // 2 + 1
  segment_ids = jnp.where(jnp.arange(L) < cut, 1, 2)[None].repeat(batch, 0).astype(jnp.int32)
  positions = jnp.where(jnp.arange(L) < cut, jnp.arange(L), jnp.arange(L) - cut)[None].repeat(batch, 0)
  return tokens, positions.astype(jnp.int32), segment_ids


def random_attention_inputs(T=12, E=8, F=6, Z=5, W=3, seed=0):
  keys = jax.random.split(jax.random.key(seed), 9)
  codebook_ZE = jax.random.normal(keys[0], (Z, E))
  z_BT = jax.random.randint(keys[1], (2, T), 0, Z)
  seg_BT = jnp.asarray([[1] * 5 + [2] * (T - 5), [3] * T], jnp.int32)
  return dict(q_BTE=jax.random.normal(keys[2], (2, T, E)), k_hat_BTE=codebook_ZE[z_BT],
              v_BTF=jax.random.normal(keys[3], (2, T, F)), z_BT=z_BT, seg_BT=seg_BT), dict(
                  codebook_ZE=codebook_ZE, u_E=0.3 * jax.random.normal(keys[4], (E,)),
                  vb_E=0.3 * jax.random.normal(keys[5], (E,)), rel_DE=0.3 * jax.random.normal(keys[6], (10, E)),
                  window=W, wavelength=100.0)


def test_every_block_length_equals_one_block_and_quadratic_attention():
  """The cache algebra: any block length L | T gives the single-block result, which is softmax attention
  over all quantised keys with the relative bias on the last `window` = 5 of them (so a block sees 5, 3,
  2, 2, 1 or 0 blocks before it key by key)."""
  window = 5
  data, kw = random_attention_inputs(W=window)
  T = data["q_BTE"].shape[1]
  one_block, _ = attend(data, kw, block_len=T)
  rel_WE = reference_vq.relative_table(kw["rel_DE"], window, kw["wavelength"])
  quadratic = reference_vq.attention(data["q_BTE"], data["k_hat_BTE"], data["v_BTF"], data["seg_BT"], kw["u_E"],
                                     kw["vb_E"], rel_WE)
  np.testing.assert_allclose(one_block, quadratic, atol=1e-5, rtol=1e-5)
  for L in (1, 2, 3, 4, 6):
    blocks, _ = attend(data, kw, block_len=L)
    np.testing.assert_allclose(blocks, one_block, atol=1e-5, rtol=1e-5, err_msg=f"block length {L}")


def test_continuing_from_a_ring_equals_the_whole_sequence():
  """Chunks of 5, 1, 4 and 2 tokens through the ring (W keys + statistics) equal one call over all 12."""
  data, kw = random_attention_inputs(W=3)
  data["seg_BT"] = jnp.ones_like(data["seg_BT"])  # one document per row, as a decode cache holds
  whole, _ = attend(data, kw, block_len=4)
  B, F, Z, W = 2, data["v_BTF"].shape[-1], kw["codebook_ZE"].shape[0], 3
  ring = vqa.Ring(jnp.zeros((B, W), jnp.int32), jnp.zeros((B, W, F)), jnp.zeros((B, W), jnp.int32),
                  vqa.empty_stats(B, Z, F))
  outs, start = [], 0
  for size in (5, 1, 4, 2):
    chunk = {k: v[:, start:start + size] for k, v in data.items()}
    out, ring = attend(chunk, kw, block_len=2 if size == 4 else size, ring=ring)
    outs.append(out)
    start += size
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), whole, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(ring.stats.counts.sum(axis=-1), [12 - W] * B)


def test_running_means_equal_the_plain_means():
  """exp(log count) = count, and the serial reduction's means are the plain per-code means."""
  z = jnp.asarray([[[0, 1, 1, 3]], [[2, 2, 2, 2]]])
  v = jnp.arange(8.0).reshape(2, 1, 4, 1) * jnp.ones((1, 1, 1, 2))
  history, final = vqa.cumulative_stats(vqa.empty_stats(2, 4, 2), z.reshape(2, 2, 2), v.reshape(2, 2, 2, 2),
                                        jnp.ones((2, 2, 2), jnp.int32), 4)
  np.testing.assert_array_equal(final.counts, [[1, 2, 0, 1], [0, 0, 4, 0]])
  np.testing.assert_allclose(final.means[..., 0], [[0, 1.5, 0, 3], [0, 0, 5.5, 0]])
  np.testing.assert_allclose(history.counts[:, 0], [[1, 1, 0, 0], [0, 0, 2, 0]])
  np.testing.assert_allclose(jnp.exp(jnp.log(final.counts[final.counts > 0])), final.counts[final.counts > 0])


@pytest.mark.parametrize("overrides", [{}, {"logits_via_embedding": True, "vq_final_norm": True,
                                            "vq_logits_scale": 0.5, "scan_layers": True}])
def test_logits_match_the_quadratic_reference(make_config, overrides):
  config = vq_config(make_config, **overrides)
  spec, params = init(config)
  tokens, positions, segment_ids = packed_inputs(config)
  model = applier(spec)
  got, aux = model(params, tokens, positions, segment_ids)
  want, _ = jax.jit(lambda p: reference_vq.forward(p, config, tokens, segment_ids))(params)
  assert got.dtype == jnp.float32 and aux["aux_loss"] > 0
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # A length that is not a whole number of blocks is padded at the end, which cannot change the rest; and
  # the second document alone (now at other block offsets) gives its logits in the packed row.
  cut = int(jnp.sum(segment_ids[0] == 1))
  alone, _ = model(params, tokens[:, cut:], positions[:, cut:], jnp.ones_like(segment_ids[:, cut:]))
  np.testing.assert_allclose(alone, want[:, cut:], atol=1e-5, rtol=1e-5)


def test_causality_gradient_is_zero_for_future_inputs(make_config):
  config = vq_config(make_config)
  spec, params = init(config)
  # t = 11 is in the third block: its inputs reach it through the cache, the previous block and its own.
  assert_causal(config, spec, params, t=11)


def test_commitment_and_codebook_terms_have_nonzero_gradients(make_config):
  config = vq_config(make_config)
  spec, params = init(config)
  tokens, positions, segment_ids = packed_inputs(config)

  def grads(p):
    def term(name):
      return lambda p: train_state.bind(spec, p)(tokens, positions, segment_ids)[1][name]

    def logits(p):
      return jnp.sum(train_state.bind(spec, p)(tokens, positions, segment_ids)[0])

    return [jax.grad(f)(p)["layers"] for f in (term("aux_loss"), term("codebook_loss"), logits)]

  commit, codebook, logits_only = jax.jit(grads)(params)
  assert jnp.all(jnp.any(commit["wk"] != 0, axis=(1, 2))), "the commitment loss moves every unit's keys"
  assert jnp.all(jnp.any(codebook["codebook_sum"] != 0, axis=(1, 2)))
  assert jnp.all(jnp.any(codebook["codebook_count"] != 0, axis=1))
  assert not jnp.any(codebook["wk"]), "the codebook surrogate must not move the keys"
  assert not jnp.any(logits_only["codebook_sum"]), "codewords are constants of the forward pass"
  assert jnp.any(logits_only["wk"]), "keys learn through the straight-through estimator"


def ema_target(config, params, batch):
  """gamma c + (1 - gamma) (sum over the batch's real tokens of onehot(z) k, resp. onehot(z)), per unit."""
  forward = jax.jit(lambda p: reference_vq.forward(p, config, batch["inputs"], batch["inputs_segmentation"]))
  _, keys_and_codes = forward(params)
  valid = (np.asarray(batch["inputs_segmentation"]) != 0).astype(np.float32)
  gamma, units = config.vq_ema_decay, params["layers"]
  sums, counts = [], []
  for n, (k, z) in enumerate(keys_and_codes):
    onehot = jax.nn.one_hot(z, config.vq_num_codes) * valid[..., None]
    sums.append(gamma * units["codebook_sum"][n] + (1 - gamma) * jnp.einsum("btz,bte->ze", onehot, k))
    counts.append(gamma * units["codebook_count"][n] + (1 - gamma) * onehot.sum(axis=(0, 1)))
  return np.stack(sums), np.stack(counts)


@pytest.mark.parametrize("mesh", [dict(num_devices=1, per_device_batch_size=8.0),
                                  dict(num_devices=1, per_device_batch_size=2.0, gradient_accumulation_steps=4),
                                  dict(per_device_batch_size=1.0, **MESH_222)])
def test_one_step_lands_the_codebook_on_its_ema_target(make_config, mesh):
  """With AdamW on everything else, one train step moves each codebook exactly to the EMA of the step's
  whole batch: on one device, over four accumulated micro-batches and on a 2x2x2 mesh (FSDP + tensor)."""
  config = vq_config(make_config, vq_ema_decay=0.9, **mesh)
  assert config.global_batch_size_to_train_on == 8
  batch = global_batch(config)
  params0 = initial_params(config)
  want_sum, want_count = ema_target(config, params0, batch)
  params, metrics, state = run_one_step(config, batch)
  np.testing.assert_allclose(params["layers"]["codebook_count"], want_count, atol=1e-5, rtol=1e-6)
  np.testing.assert_allclose(params["layers"]["codebook_sum"], want_sum, atol=1e-5, rtol=1e-5)
  assert np.isfinite(metrics["grad_norm"]) and metrics["aux_loss"] > 0
  assert not np.allclose(params["layers"]["wk"], params0["layers"]["wk"]), "AdamW still trains the rest"
  # The partitioned optimizer state is sharded like the parameters (its MaskedNode holes aside).
  adam = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]
  wv = state["params"]["layers"]["wv"]
  assert adam.mu["layers"]["wv"].sharding.spec == wv.sharding.spec


def test_codebook_is_its_own_optimizer_partition(make_config):
  config = vq_config(make_config, adam_weight_decay=0.5, gradient_clipping_threshold=1e-3, learning_rate=0.1)
  spec, params = init(config)
  assert spec.roles["layers"]["codebook_sum"] == "codebook" and spec.roles["layers"]["xl_u"] == "bias"
  tx, _ = optimizers.create(config, spec.roles)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: 3.0 * jnp.ones_like(p), params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  # Clipping, Adam, decay and the learning rate act on the main partition only; the codebook takes -grad.
  np.testing.assert_array_equal(updates["layers"]["codebook_sum"], -3.0)
  np.testing.assert_array_equal(updates["layers"]["codebook_count"], -3.0)
  adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1 and isinstance(adam[0].mu["layers"]["codebook_sum"], optax.MaskedNode)
  assert adam[0].mu["layers"]["wq"].shape == params["layers"]["wq"].shape


def test_decode_with_the_cache_equals_the_forward_pass(make_config):
  """A 10-token prefill (two blocks and a rest), then one token at a time; and, as decode.py does, prompts
  of 3 and 9 tokens right-padded to 10 (more padding than the window), each row then continuing at its own
  length over its padding. The logits equal one forward pass over each final sequence."""
  config = vq_config(make_config, max_target_length=24, scan_layers=True)  # decode.py's own test runs unrolled
  spec, params = init(config)
  model, cache = applier(spec), train_state.bind(spec, params).init_cache
  B, L, P = 2, 24, 10
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (B, L), 4, config.vocab_size))
  positions = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L))
  for lengths in (np.asarray([P, P]), np.asarray([3, 9])):
    segments = (positions[:, :P] < lengths[:, None]).astype(np.int32)
    logits, aux = model(params, tokens[:, :P], positions[:, :P], segments, cache=cache(B, L))
    got = [logits[np.arange(B), lengths - 1]]
    for step in range(L - P - 1):
      at = (lengths + step)[:, None].astype(np.int32)
      logits, aux = model(params, np.take_along_axis(tokens, at, 1), at, np.ones((B, 1), np.int32), cache=aux["cache"])
      got.append(logits[:, 0])
    n = lengths + L - P - 1
    full, _ = model(params, tokens, positions, (positions < n[:, None]).astype(np.int32))
    for row in range(B):
      np.testing.assert_allclose(np.stack([g[row] for g in got]), full[row, lengths[row] - 1:n[row]], atol=1e-5,
                                 rtol=1e-5, err_msg=f"prompt lengths {lengths}, row {row}")
  assert jax.tree.map(jnp.shape, aux["cache"]) == jax.tree.map(jnp.shape, cache(B, 10 * L)), \
      "the cache does not grow with the length"


def test_tiny_model_trains_resumes_and_evaluates(make_config, tmp_path):
  config = vq_config(make_config, steps=24, log_period=4, learning_rate=1e-2, per_device_batch_size=4.0,
                     max_target_length=32, vq_block_length=8, vq_window=8, enable_checkpointing=True,
                     checkpoint_period=24, eval_interval=0)
  result = train.train_and_evaluate(config, progress=False)
  assert result["step"] == 24
  losses = [r["train/loss"] for r in _rows(config.run_dir)]
  assert losses[-1] < losses[0] - 0.5 and losses[-1] < np.log(config.vocab_size) - 0.1, f"loss did not fall: {losses}"
  # The partitioned optimizer state (MaskedNode leaves) round-trips through the checkpoint.
  resumed = train.train_and_evaluate(vq_config(make_config, **{**_train_keys(config), "steps": 26}), progress=False)
  assert resumed["step"] == 26 and np.isfinite(resumed["loss"])
  # Evaluation at twice the training length: nothing in the model depends on the length.
  evaluated = train.evaluate_checkpoint(vq_config(make_config, **{**_train_keys(config), "mode": "validation",
                                                                  "max_target_length": 64, "eval_steps": 2}))
  assert evaluated["step"] == 26 and evaluated["loss"] < losses[0] and evaluated["tokens"] > 0


def _train_keys(config):
  keys = ("log_period", "learning_rate", "per_device_batch_size", "max_target_length", "vq_block_length",
          "vq_window", "enable_checkpointing", "checkpoint_period", "eval_interval", "base_output_directory")
  return {k: getattr(config, k) for k in keys}


def _rows(run_dir):
  import json  # noqa: PLC0415
  import os  # noqa: PLC0415

  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [row for row in map(json.loads, f) if "train/loss" in row]


def test_flops_per_token_hand_count(make_config):
  config = vq_config(make_config, max_target_length=32, vq_block_length=8, vq_window=8, vocab_size=100)
  D, E, F, Z, L, V, units = 32, 16, 64, 16, 8, 100, 2
  matmul_params = units * (2 * D * E + 2 * D * F + F * D)
  attention = units * ((L + L / 2) * (2 * E + F) + Z * (3 * E + 2 * F))
  assert models.get_family("transformer_vq").flops_per_token(config) == 6 * (matmul_params + attention) + 6 * D * V
  spec = train_state.model_spec(config)
  # Besides the matmuls: embeddings, the relative projection, u, v and the codebooks.
  assert spec.num_params == matmul_params + 2 * V * D + units * (D * E + 2 * E + Z * E + Z)


@pytest.mark.parametrize("overrides, fragment", [
    ({"base_num_query_heads": 2}, "base_num_query_heads=1"),
    ({"vq_ema_decay": 1.0}, "vq_ema_decay"),
    ({"vq_num_codes": 0}, "vq_num_codes"),
    ({"base_emb_dim": 33}, "even"),
])
def test_config_errors_name_the_key(make_config, overrides, fragment):
  with pytest.raises(ConfigError, match=fragment):
    vq_config(make_config, **overrides)

