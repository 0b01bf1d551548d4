"""GPT family: reference parity with every flag, ALiBi, head-QK, the parallel block, the SGU kernel, accounting."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from MaxText import models
from MaxText.config import loader
from MaxText.errors import ConfigError
from MaxText.models import gpt, layers
from MaxText.training import train_state, train_step
from tests import reference_gpt
from tests.checks import assert_causal, fast_init

ALL_FLAGS = dict(alibi=True, parallel_residual=True, static_sgu=True, sgu_band_width=5, head_qk=True, qk_norm=True)


@pytest.fixture
def gpt_config(make_config):
  """A tiny GPTTiny (one layer of width 32, 4 heads, vocab 128, length 16; the reference comparison takes
  two) with weights large enough to matter."""

  def make(**overrides):
    values = dict(model_name="GPTTiny", base_num_decoder_layers=1, base_num_kv_heads=4, base_mlp_dim=128,
                  init_weights_std=0.1, head_qk_dim=16)
    values.update(overrides)
    return make_config(**values)

  return make


def init(config, randomize_head_q=False):
  spec = train_state.model_spec(config)
  params = fast_init(config, spec)
  if randomize_head_q:  # zero at init, which would hide the head-QK path from a comparison
    params["head_q"] = 0.3 * jax.random.normal(jax.random.key(7), params["head_q"].shape)
  return spec, params


def with_zero_biases(params, config):
  """`params` of a use_bias=false model plus the zero biases the reference adds (it always adds them)."""
  N, D, F = config.base_num_decoder_layers, config.base_emb_dim, config.base_mlp_dim
  H, K, E = config.base_num_query_heads, config.base_num_kv_heads, config.head_dim
  layers_ = dict(params["layers"])
  layers_["attention"] = {**params["layers"]["attention"], "bq": jnp.zeros((N, H, E)), "bk": jnp.zeros((N, K, E)),
                          "bv": jnp.zeros((N, K, E)), "bo": jnp.zeros((N, D))}
  layers_["mlp"] = {**params["layers"]["mlp"], "bi_0": jnp.zeros((N, F)), "bo": jnp.zeros((N, D))}
  for norm in ("pre_attention_norm", "pre_mlp_norm"):
    layers_[norm] = {**params["layers"][norm], "bias": jnp.zeros((N, D))}
  return {**params, "layers": layers_, "final_norm": {**params["final_norm"], "bias": jnp.zeros((D,))}}


def test_use_bias_false_drops_every_bias_and_keeps_the_gains(gpt_config):
  def names(config):
    return {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(init(config)[1])[0]}

  with_bias, without = names(gpt_config()), names(gpt_config(use_bias=False))
  dropped = sorted(with_bias - without)
  assert without < with_bias
  # bq bk bv bo, the MLP's bi_0 and bo, both LayerNorms' biases and the final one
  assert len(dropped) == 9 and all(d.endswith(("['bq']", "['bk']", "['bv']", "['bo']", "['bi_0']", "['bias']"))
                                   for d in dropped), dropped
  assert sum(n.endswith("['scale']") for n in without) == 3


def one_document(config, batch=2, seed=0):
  L = config.max_target_length
  tokens = jax.random.randint(jax.random.key(seed), (batch, L), 0, config.vocab_size)
  # Repeated tokens give head-QK something to copy.
  tokens = tokens.at[:, L // 2:].set(tokens[:, : L - L // 2])
  positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (batch, L))
  return tokens, positions, jnp.ones((batch, L), jnp.int32)


def forward(spec, tokens, positions, segment_ids):
  """The jitted logits as a function of the parameters (one compilation for any number of parameter sets)."""
  return jax.jit(lambda p: train_state.bind(spec, p)(tokens, positions, segment_ids)[0])


@pytest.mark.parametrize("flags", [
    {},  # GPT-2: learned positions, sequential block, tied readout
    {**ALL_FLAGS, "parallel_residual": False, "base_num_kv_heads": 2, "scan_layers": True,
     "logits_via_embedding": False, "attention": "dot_product", "use_norm_gains": False},
    {"use_bias": False}])  # nanoGPT's bias=False: the reference runs with zero biases
def test_logits_match_plain_jnp_reference(gpt_config, flags):
  config = gpt_config(base_num_decoder_layers=2, **flags)
  spec, params = init(config, randomize_head_q=config.head_qk)
  tokens, positions, segment_ids = one_document(config)
  got = forward(spec, tokens, positions, segment_ids)(params)
  reference_params = params if config.use_bias else with_zero_biases(params, config)
  want = jax.jit(lambda p: reference_gpt.logits(p, config, tokens))(reference_params)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_alibi_slopes_for_6_and_8_heads():
  np.testing.assert_allclose(gpt.alibi_slopes(8), [2.0 ** -k for k in range(1, 9)], rtol=1e-7)
  # 4 power-of-two slopes 2^(-8h/4), then the odd ones of the 8-head sequence, 2^-1 and 2^-3.
  np.testing.assert_allclose(gpt.alibi_slopes(6), [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3],
                             rtol=1e-7)
  for heads in range(1, 33):
    np.testing.assert_allclose(gpt.alibi_slopes(heads), reference_gpt.slopes(heads), rtol=1e-6)


def test_alibi_bias_is_minus_m_distance_up_to_a_per_row_constant():
  H, L = 6, 12
  positions = jnp.arange(L, dtype=jnp.int32)[None]
  bias = np.asarray(gpt.alibi_bias(positions, positions, H))[0]  # [H, L, L]
  m = gpt.alibi_slopes(H)
  i, j = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
  causal = j <= i
  np.testing.assert_allclose(bias[:, causal], (-m[:, None, None] * (i - j))[:, causal], rtol=1e-6)
  # The reference's single row -m (L - 1 - j) differs from it by a constant in every row, so softmax agrees.
  row = -m[:, None, None] * (L - 1 - j)
  offset = np.where(causal, bias - row, np.nan)
  np.testing.assert_allclose(np.nanmax(offset, -1), np.nanmin(offset, -1), atol=1e-5)
  scores = np.random.default_rng(0).normal(size=(H, L, L))
  softmax = lambda s: jax.nn.softmax(np.where(causal, s, -np.inf), -1)
  np.testing.assert_allclose(softmax(scores + bias), softmax(scores + row), atol=1e-6)


def test_alibi_model_evaluates_at_twice_its_training_length(gpt_config):
  config = gpt_config(alibi=True)
  spec, params = init(config)
  long_config = gpt_config(alibi=True, max_target_length=2 * config.max_target_length)
  long_spec = train_state.model_spec(long_config)
  assert jax.tree.map(lambda a: a.shape, long_spec.shapes) == jax.tree.map(lambda a: a.shape, spec.shapes)
  tokens, positions, segment_ids = one_document(long_config)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "inputs_position": positions,
           "inputs_segmentation": segment_ids, "targets_segmentation": segment_ids}
  sums = jax.jit(train_step.make_eval_step(long_config, long_spec))(params, batch)
  assert sums["tokens"] == tokens.size and math.isfinite(float(sums["nll_sum"]))
  # A learned position table, by contrast, is as long as the training sequences.
  learned = train_state.model_spec(gpt_config(max_target_length=2 * config.max_target_length))
  assert learned.shapes["position_embedding"].shape[0] == 2 * config.max_target_length


def test_learned_positions_refuse_a_cache_longer_than_their_table(gpt_config):
  model = nnx.eval_shape(lambda: models.build(gpt_config(), nnx.Rngs(0)))
  with pytest.raises(ConfigError, match="max_target_length=16"):
    model.init_cache(1, 17)


def test_head_qk_starts_switched_off_then_moves_the_logits_of_earlier_tokens_only(gpt_config):
  config = gpt_config(head_qk=True, head_qk_dim=64, init_weights_std=0.02)
  spec, params = init(config)
  assert not np.any(params["head_q"])
  k = np.asarray(params["head_k"])  # [D, R] with D < R: orthonormal rows scaled by 0.1
  np.testing.assert_allclose(k @ k.T, 0.01 * np.eye(k.shape[0]), atol=1e-6)
  L = config.max_target_length
  tokens = jnp.arange(L, dtype=jnp.int32)[None] + 10  # all distinct
  positions, segment_ids = jnp.arange(L, dtype=jnp.int32)[None], jnp.ones((1, L), jnp.int32)
  logits = forward(spec, tokens, positions, segment_ids)
  at_init = logits(params)
  plain_params = {name: value for name, value in params.items() if name not in ("head_q", "head_k")}
  plain_spec = train_state.model_spec(gpt_config(init_weights_std=0.02))
  np.testing.assert_array_equal(at_init, forward(plain_spec, tokens, positions, segment_ids)(plain_params))
  moved_params = {**params, "head_q": 0.3 * jax.random.normal(jax.random.key(7), params["head_q"].shape)}
  moved = np.abs(np.asarray(logits(moved_params) - at_init)[0]) > 0  # [L, V]
  seen = np.zeros((L, config.vocab_size), bool)
  for i in range(L):
    seen[i, np.asarray(tokens[0, : i + 1])] = True
  assert np.array_equal(moved, seen), "head-QK must touch exactly the ids of the tokens at or before each position"


def test_the_parallel_block_holds_one_layer_norm_feeding_both_branches(gpt_config):
  sequential = nnx.eval_shape(lambda: gpt.Block(gpt_config(), rngs=nnx.Rngs(0)))
  assert sum(isinstance(node, layers.LayerNorm) for _, node in nnx.iter_graph(sequential)) == 2
  config = gpt_config(parallel_residual=True, static_sgu=True, sgu_band_width=4)
  block = gpt.Block(config, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))  # see fast_init
  assert sum(isinstance(node, layers.LayerNorm) for _, node in nnx.iter_graph(block)) == 1
  x = jax.random.normal(jax.random.key(1), (1, config.max_target_length, config.base_emb_dim))
  _, positions, segment_ids = one_document(config, batch=1)
  half, t = config.base_emb_dim // 2, 8

  def parts(x):
    h = block.norm(x)
    mixed = block.mix(h, positions, segment_ids, None, None)[0]
    return block(x, positions, segment_ids)[0], x + mixed + block.mlp(h), mixed

  def sgu_t(h):  # the SGU half of the mixing at position t
    return jnp.sum(block.mix(h, positions, segment_ids, None, None)[0][0, t, :half])

  out, want, mixed = jax.jit(parts)(x)
  np.testing.assert_allclose(out, want, atol=1e-6)
  # The SGU half is not the reference's all-zero output, and it reads exactly the band t-4..t (gradients
  # pass through the fixed kernel).
  assert np.all(np.abs(np.asarray(mixed[..., :half])) > 0)
  grad = jax.jit(jax.grad(sgu_t))(block.norm(x))
  touched = np.abs(np.asarray(grad[0, :, :half])).sum(-1) > 0
  assert list(np.nonzero(touched)[0]) == [4, 5, 6, 7, 8]


def test_the_sgu_kernel_is_causal_banded_normalised_and_not_zero():
  L, width = 12, 3
  positions = jnp.arange(L, dtype=jnp.int32)[None]
  segments = jnp.ones((1, L), jnp.int32)
  kernel = np.asarray(gpt.sgu_kernel(positions, segments, positions, segments, width))[0]
  i, j = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
  band = (j <= i) & (i - j <= width)
  assert np.all(kernel[~band] == 0.0), "the kernel must not look ahead or beyond its band"
  assert np.all(kernel[band] > 0.0), "the kernel must not be the reference's all-zero one"
  np.testing.assert_allclose(kernel.sum(-1), 1.0, rtol=1e-6)
  # Within a row the weights fall as 1/(distance + 2).
  np.testing.assert_allclose(kernel[6, 6] / kernel[6, 3], (3 + 2) / (0 + 2), rtol=1e-6)
  np.testing.assert_allclose(kernel, reference_gpt.sgu_kernel(L, width), rtol=1e-6)


def test_causality_and_packed_documents_with_every_flag(gpt_config):
  config = gpt_config(**ALL_FLAGS, logits_via_embedding=False)  # a tied readout reads every embedding row
  spec, params = init(config, randomize_head_q=True)
  L = config.max_target_length
  assert_causal(config, spec, params, t=L // 2)
  # Two documents in one row: the second one's logits equal those of the document alone.
  cut = L // 2 - 1
  tokens, _, _ = one_document(config, batch=1)
  segment_ids = jnp.where(jnp.arange(L) < cut, 1, 2)[None].astype(jnp.int32)
  positions = jnp.where(jnp.arange(L) < cut, jnp.arange(L), jnp.arange(L) - cut)[None].astype(jnp.int32)
  packed = forward(spec, tokens, positions, segment_ids)(params)
  alone = forward(spec, tokens[:, cut:], positions[:, cut:], jnp.ones_like(segment_ids[:, cut:]))(params)
  np.testing.assert_allclose(packed[:, cut:], alone, atol=1e-5, rtol=1e-5)


def test_flops_per_token_hand_count(gpt_config):
  config = gpt_config(base_emb_dim=64, base_num_query_heads=4, base_mlp_dim=256, vocab_size=100,
                      max_target_length=32, base_num_decoder_layers=3, static_sgu=True, sgu_band_width=7,
                      head_qk=True, head_qk_dim=16)
  D, N, F, V, L, w, R = 64, 3, 256, 100, 32, 7, 16
  A, E = D // 2, 8  # attention on half the channels, 4 heads of 16 / 2
  matmul_params = N * (4 * A * 4 * E + 2 * D * F) + 2 * D * R
  expected = 6 * matmul_params + 6 * N * L * 4 * E + N * 2 * (w + 1) * D + 3 * L * R + 6 * D * V
  assert models.get_family("gpt").flops_per_token(config) == expected
  spec = train_state.model_spec(config)
  biases_and_norms = N * (4 * A + F + D + 4 * D) + 2 * D  # q, k, v, o biases; MLP biases; two LayerNorms
  assert spec.num_params - V * D - L * D - biases_and_norms == matmul_params


def test_gpt2_presets_have_the_published_parameter_counts(make_config):
  # 12 x (12 D^2 + 13 D) + (50257 + 1024) D + 2 D with D = 768: GPT-2's 124M.
  small = train_state.model_spec(make_config(model_name="GPT2Small", **_preset_shape("GPT2Small")))
  assert small.num_params == 124_439_808
  medium = train_state.model_spec(make_config(model_name="GPT2Medium", **_preset_shape("GPT2Medium")))
  assert medium.num_params == 354_823_168


def _preset_shape(name):
  """The preset's own model keys, so that make_config's tiny defaults do not shrink it."""
  import yaml  # noqa: PLC0415

  preset = yaml.safe_load((loader.MODELS_DIR / f"{name}.yml").read_text())
  keys = ("base_emb_dim", "base_num_decoder_layers", "base_num_query_heads", "base_num_kv_heads", "base_mlp_dim",
          "vocab_size", "max_target_length")
  return {k: preset[k] for k in keys}


@pytest.mark.parametrize("overrides, fragment", [
    ({"static_sgu": True, "base_emb_dim": 36}, "static_sgu"),
    ({"static_sgu": True, "head_dim": 7}, "head_dim=7 must be even"),
    ({"sgu_band_width": -1}, "sgu_band_width"),
    ({"head_qk_dim": 0}, "head_qk_dim"),
])
def test_config_mistakes_are_one_line_errors(gpt_config, overrides, fragment):
  with pytest.raises(ConfigError, match=fragment) as error:
    gpt_config(**overrides)
  assert "\n" not in str(error.value)
