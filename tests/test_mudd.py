"""MUDDFormer: reference numerics, identity with its Transformer++ twin at init, the ablation switches,
causality, decoding, remat, sharding, one optimiser step, end-to-end training, accounting."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from MaxText import models, startup, train
from MaxText.config import loader
from MaxText.errors import ConfigError
from MaxText.models import mudd_dense
from MaxText.parallel import sharding
from MaxText.training import train_state, train_step
from tests import reference_llama, reference_mudd
from tests.checks import assert_causal
from tests.test_llama import packed_inputs, synthetic_batch
from tests.test_sharding import MESH_222, assert_trees_close, global_batch

# Three layers, so one connection mixes four streams over more than two states; MLP 256 re-allocates to
# 128, 256, 384.
MUDD = dict(decoder_block="mudd", base_num_decoder_layers=3, base_mlp_dim=256)


def init(config):
  spec = train_state.model_spec(config)
  return spec, train_state.init_params(config, spec)


def forward(spec, params, tokens, positions, segment_ids, cache=None):
  """The model's (logits, aux), jitted: op-by-op dispatch of an unrolled model is slow on a busy CPU."""
  call = lambda p, *args: train_state.bind(spec, p)(*args[:3], cache=args[3])
  return jax.jit(call)(params, tokens, positions, segment_ids, cache)


def reference(params, config, *inputs):
  return jax.jit(lambda p, *a: reference_mudd.logits(p, config, *a))(params, *inputs)


def random_params(spec, seed=0):
  """Parameters drawn in numpy (no init program to compile), every one of them non-trivial: W2 and the
  static bias away from their zero / one-hot init, gains around 1, matrices at 0.5/sqrt(fan-in)."""
  rng = np.random.default_rng(seed)

  def draw(shape, role, fan_in):
    x = rng.standard_normal(shape.shape)
    if role == "gain":
      x = 1.0 + 0.1 * x
    elif role == "bias":  # the static connection weights: near one-hot on the newest state, as trained ones
      x = 0.2 * x
      x[..., -1] += 1.0
    else:  # half the variance-preserving scale keeps float32 round-off from growing through the layers
      x = 0.5 * x * (fan_in or shape.shape[-1]) ** -0.5
    return jnp.asarray(x, shape.dtype)

  return jax.tree.map(draw, spec.shapes, spec.roles, spec.fan_in, is_leaf=lambda x: x is None)


ABLATIONS = {
    "multiway dynamic": {},
    "prepostnorm, re-allocation": {"mudd_prepostnorm": True, "mlp_dim_scale_with_depth": True},
    "static (DenseFormer)": {"mudd_streams": "qkvr", "mudd_dynamic": False},
    "dynamic single stream": {"mudd_streams": "qkvr"},
    "multiway static, GQA": {"mudd_dynamic": False, "base_num_kv_heads": 1},
    "no Q stream": {"mudd_streams": "k,v,r", "mudd_prepostnorm": True},
    "no R stream": {"mudd_streams": "q,k,v"},
    "T++ with re-allocation": {"mudd_streams": "", "mlp_dim_scale_with_depth": True},
}


@pytest.mark.parametrize("name", ABLATIONS)
def test_logits_match_plain_jnp_reference(make_config, name):
  config = make_config(**{**MUDD, **ABLATIONS[name]})
  spec = train_state.model_spec(config)
  params = random_params(spec)
  tokens, positions, segment_ids = packed_inputs(config)
  got, aux = forward(spec, params, tokens, positions, segment_ids)
  want, want_weights = reference(params, config, tokens, positions, segment_ids)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert len(aux["dense_weights"]) == len(want_weights)
  for w, want_w in zip(aux["dense_weights"], want_weights):
    np.testing.assert_allclose(jnp.broadcast_to(w, want_w.shape), want_w, atol=1e-5, rtol=1e-5)


def as_initialised(config, twin: dict, mudd: dict) -> dict:
  """MUDD parameters that share every block weight, embedding and norm with the Transformer++ twin, with
  W2 = 0 and the static bias (and post-norm gain) as initialised; W1 and the other norms stay random.
  test_connection_shapes_init_and_roles checks that the model initialises them so."""
  out = jax.tree.map(lambda x: x, mudd)
  for key in ("embed", "final_norm", "unembed"):
    out[key] = twin[key]
  for i in range(config.base_num_decoder_layers):
    layer = jax.tree.map(lambda a: a[i], twin["layers"])
    mine = out[f"layer_{i}"]
    for key in ("attention", "mlp", "pre_mlp_norm"):
      mine[key] = layer[key]
    for key in ("pre_attention_norm", "pre_query_norm", "pre_key_norm", "pre_value_norm"):
      if key in mine:
        mine[key] = layer["pre_attention_norm"]
    dense = mine.get("dense", {})
    if "w2" in dense:
      dense["w2"] = jnp.zeros_like(dense["w2"])
    if "bias" in dense:
      one_hot = jnp.zeros_like(dense["bias"]).at[:, -1].set(1.0)
      dense["bias"] = jnp.zeros_like(one_hot) if config.mudd_prepostnorm else one_hot
    if "post_norm" in dense:
      dense["post_norm"]["scale"] = jnp.full_like(dense["post_norm"]["scale"], 1e-3)
  return out


@pytest.mark.parametrize("overrides", [
    {}, {"mudd_prepostnorm": True}, {"mudd_streams": "qkvr", "mudd_dynamic": False},
    {"mudd_streams": "k,v,r", "mudd_prepostnorm": True}])
def test_at_init_the_logits_equal_the_transformer_pp_twin(make_config, overrides):
  """W2 = 0 and the static bias as the reference initialises it: every stream is the layer output."""
  mudd_config = make_config(**{**MUDD, **overrides})
  twin_config = make_config(base_num_decoder_layers=3, base_mlp_dim=256)
  twin_spec, spec = train_state.model_spec(twin_config), train_state.model_spec(mudd_config)
  twin = random_params(twin_spec, seed=1)
  params = as_initialised(mudd_config, twin, random_params(spec, seed=2))
  tokens, positions, segment_ids = packed_inputs(mudd_config)
  got, _ = forward(spec, params, tokens, positions, segment_ids)
  want, _ = forward(twin_spec, twin, tokens, positions, segment_ids)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
  plain = jax.jit(lambda p, *a: reference_llama.logits(p, twin_config, *a))(twin, tokens, positions, segment_ids)
  np.testing.assert_allclose(got, plain, atol=1e-5, rtol=1e-5)


def test_connection_shapes_init_and_roles(make_config):
  config = make_config(**MUDD)
  spec, params = init(config)
  tokens, positions, segment_ids = packed_inputs(config, batch=2)
  _, aux = forward(spec, params, tokens, positions, segment_ids)
  L, D = config.max_target_length, config.base_emb_dim
  assert [w.shape for w in aux["dense_weights"]] == [(2, L, 4, 2), (2, L, 4, 3), (2, L, 1, 4)]
  for i, (C, M) in enumerate([(4, 64), (4, 64), (1, 64)]):  # (4*2 // 64 + 1) * 64, ..., last: 1*4*4 -> 64
    dense = params[f"layer_{i}"]["dense"]
    assert dense["w1"].shape == (D, M) and dense["w2"].shape == (M, C, i + 2)
    assert np.all(np.asarray(dense["w2"]) == 0.0)
    np.testing.assert_array_equal(dense["bias"], np.eye(i + 2)[-1][None].repeat(C, 0))  # one-hot: current layer
    assert "generator_norm" not in dense, "without pre/post norms the generator's norm has no gain"
  w1 = np.concatenate([np.ravel(params[f"layer_{i}"]["dense"]["w1"]) for i in range(3)])
  assert np.std(w1) == pytest.approx(D**-0.5, rel=0.05)
  assert spec.logical_axes["layer_0"]["dense"]["w1"] == ("embed", "mudd_hidden")
  assert spec.logical_axes["layer_0"]["dense"]["w2"] == ("mudd_hidden", "mudd_streams", "mudd_sources")
  assert spec.roles["layer_0"]["dense"]["bias"] == "bias" and spec.tags["layer_0"]["dense"]["w2"] == "keep_init"
  assert spec.tags["layer_0"]["attention"]["wq"] == "query"
  prepost = make_config(**MUDD, mudd_prepostnorm=True)
  _, params = init(prepost)
  dense = params["layer_1"]["dense"]
  assert np.all(np.asarray(dense["bias"]) == 0.0)
  np.testing.assert_allclose(dense["post_norm"]["scale"], 1e-3)
  assert np.all(np.asarray(dense["source_norm"]["scale"]) == 1.0) and "scale" in dense["generator_norm"]
  assert "post_norm" in params["layer_2"]["dense"]


def test_405m_preset_sizes_match_the_reference():
  config = startup.load_config([None, str(loader.BASE_CONFIG), "model_name=MUDDLlama2Medium", "num_devices=1"],
                               env={})
  widths = mudd_dense.mlp_widths(config)
  assert widths[0] == 1408 and widths[-1] == 4224 and sum(widths) == 24 * 2816
  assert [mudd_dense.generator_width(config, i) for i in (0, 13, 14, 22, 23)] == [64, 64, 128, 128, 128]
  spec = train_state.model_spec(config)
  sizes = jax.tree.map(lambda s: s.size, spec.shapes)
  dense = sum(sum(jax.tree.leaves({k: v for k, v in sizes[f"layer_{i}"]["dense"].items()
                                   if k in ("w1", "w2", "bias", "generator_norm")})) for i in range(24))
  assert dense == pytest.approx(2.38e6, rel=0.01)  # W1 + W2 + static bias + generator norm, as the reference
  # + two more attention pre-norms, the source norm and the post-norm per layer, the embedding's source norm
  assert spec.num_params - 411_616_256 == dense + 4 * 24 * 1024 + 1024


def test_outputs_depend_only_on_earlier_tokens_of_the_same_document(make_config):
  config = make_config(**MUDD, mudd_prepostnorm=True)
  spec = train_state.model_spec(config)
  params = random_params(spec)
  assert_causal(config, spec, params, t=config.max_target_length // 2)
  tokens, positions, segment_ids = packed_inputs(config, batch=1)
  cut = int(jnp.sum(segment_ids == 1))
  packed, _ = forward(spec, params, tokens, positions, segment_ids)
  alone, _ = forward(spec, params, tokens[:, cut:], positions[:, cut:], jnp.ones_like(segment_ids[:, cut:]))
  np.testing.assert_allclose(packed[:, cut:], alone, atol=1e-5, rtol=1e-5)


def test_cached_prefill_and_decode_equal_the_full_forward(make_config):
  config = make_config(**MUDD, mudd_prepostnorm=True, base_num_kv_heads=1)
  spec = train_state.model_spec(config)
  params = random_params(spec)
  L = config.max_target_length
  tokens = jax.random.randint(jax.random.key(3), (2, L), 0, config.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (2, L))
  ones = jnp.ones((2, L), jnp.int32)
  full, _ = forward(spec, params, tokens, positions, ones)
  prefill = L // 2
  cache = train_state.bind(spec, params).init_cache(2, L + 4)
  logits, aux = forward(spec, params, tokens[:, :prefill], positions[:, :prefill], ones[:, :prefill], cache)
  steps = [logits]
  for t in range(prefill, L):
    logits, aux = forward(spec, params, tokens[:, t:t + 1], positions[:, t:t + 1], ones[:, t:t + 1], aux["cache"])
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def loss_and_grads(config, params, batch):
  spec = train_state.model_spec(config)
  fn = lambda p: train_step.loss_sums(train_state.bind(spec, p), batch, 0.0)[0]
  return jax.jit(jax.value_and_grad(fn))(params)


def test_full_remat_gives_equal_loss_and_gradients(make_config):
  base = make_config(**MUDD, mudd_prepostnorm=True)
  params = random_params(train_state.model_spec(base))
  batch = synthetic_batch(base)
  loss0, grads0 = loss_and_grads(base, params, batch)
  loss1, grads1 = loss_and_grads(make_config(**MUDD, mudd_prepostnorm=True, remat_policy="full"), params, batch)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads1, grads0)


def test_bf16_activations_keep_float32_logits_and_params(make_config):
  config = make_config(**MUDD, mudd_prepostnorm=True, dtype="bfloat16")
  spec = train_state.model_spec(config)
  params = random_params(spec)
  tokens, positions, segment_ids = packed_inputs(config)
  logits, aux = forward(spec, params, tokens, positions, segment_ids)
  assert logits.dtype == jnp.float32 and aux["dense_weights"][0].dtype == jnp.bfloat16
  want, _ = reference(params, config, tokens, positions, segment_ids)
  np.testing.assert_allclose(logits, want, atol=0.05, rtol=0.05)


def test_one_step_moves_the_weight_generator(make_config):
  """W2 = 0 blocks W1's gradient on the first step; the second step moves W1 by its gradient."""
  config = make_config(**MUDD)
  spec = train_state.model_spec(config)
  tx = optax.adam(1e-2)  # no weight decay, which would move W1 without a gradient
  params = random_params(spec)
  for i in range(config.base_num_decoder_layers):
    params[f"layer_{i}"]["dense"]["w2"] = jnp.zeros_like(params[f"layer_{i}"]["dense"]["w2"])
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  step = jax.jit(train_step.make_train_step(config, spec, tx, optax.constant_schedule(1e-2)))
  batch = synthetic_batch(config)
  before = state["params"]["layer_1"]["dense"]
  once, _ = step(state, batch)
  after_one = once["params"]["layer_1"]["dense"]
  assert np.all(np.asarray(after_one["w2"]) != 0.0), "every entry of W2 gets a gradient"
  np.testing.assert_array_equal(after_one["w1"], before["w1"])
  twice, _ = step(once, batch)
  moved = np.asarray(twice["params"]["layer_1"]["dense"]["w1"]) != np.asarray(before["w1"])
  assert moved.mean() > 0.9
  assert np.any(np.asarray(twice["params"]["layer_1"]["dense"]["bias"]) != np.asarray(before["bias"]))


def sgd_step_on_mesh(config, params, batch):
  """One train step with SGD(1) on config's mesh from `params`: it returns params - grads, sharded."""
  mesh, rules = sharding.make_mesh(config), config.logical_axis_rules
  spec, tx = train_state.model_spec(config), optax.sgd(1.0)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  shardings = train_state.state_shardings(spec, jax.eval_shape(lambda: state), mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  with sharding.use_mesh(mesh, rules):
    step = jax.jit(train_step.make_train_step(config, spec, tx, optax.constant_schedule(1.0)),
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None))
    state, _ = step(jax.device_put(state, shardings), jax.device_put(batch, batch_sharding))
  return state["params"]


def test_eight_device_step_equals_one_device_step(make_config):
  common = dict(**MUDD, mudd_prepostnorm=True, mlp_dim_scale_with_depth=True)
  one = make_config(num_devices=1, per_device_batch_size=8.0, **common)
  eight = make_config(per_device_batch_size=1.0, **MESH_222, **common)
  params = random_params(train_state.model_spec(one))  # W2 != 0, so W1 and its norm get gradients too
  batch = global_batch(one)
  params1 = sgd_step_on_mesh(one, params, batch)
  params8 = sgd_step_on_mesh(eight, params, batch)
  assert_trees_close(jax.device_get(params8), jax.device_get(params1))
  specs = jax.tree.map(lambda x: x.sharding.spec, params8)
  assert specs["layer_0"]["dense"]["w1"] == P("fsdp", None)
  assert specs["layer_0"]["dense"]["w2"] == P(None, None, None)
  assert specs["layer_0"]["attention"]["wq"] == P("fsdp", "tensor", None)
  assert specs["layer_2"]["mlp"]["wi_0"] == P("tensor", "fsdp")
  assert params8["layer_0"]["dense"]["w1"].addressable_shards[0].data.shape == (16, 64)


def test_a_tiny_mudd_model_trains_checkpoints_and_resumes(make_config):
  # The same schedule length in both runs, so the resumed run compiles the same program (a cache hit).
  common = dict(**MUDD, learning_rate=1e-2, learning_rate_schedule_steps=42, per_device_batch_size=8.0,
                max_target_length=32, enable_checkpointing=True, checkpoint_period=40, peak_tflops_per_device=1.0)
  config = make_config(steps=40, log_period=10, **common)
  result = train.train_and_evaluate(config, progress=False)
  assert result["step"] == 40
  with open(f"{config.run_dir}/metrics.jsonl") as f:
    rows = [row for row in map(json.loads, f) if "train/loss" in row]
  first, last = rows[0]["train/loss"], rows[-1]["train/loss"]
  assert last < np.log(config.vocab_size) - 1.0 and last < first - 0.3, (first, last)
  resumed = train.train_and_evaluate(make_config(steps=42, log_period=1, **common), progress=False)
  assert resumed["step"] == 42 and resumed["loss"] < first


@pytest.mark.parametrize("overrides, fragment", [
    ({"scan_layers": True}, "config key 'scan_layers' must be false for decoder_block 'mudd'"),
    ({"mudd_streams": "q,q,k"}, "config key 'mudd_streams' must be comma-separated groups"),
    ({"mudd_streams": "q,,k"}, "config key 'mudd_streams' must be comma-separated groups"),
    ({"mudd_streams": "qx"}, "config key 'mudd_streams' must be comma-separated groups"),
    ({"mlp_dim_scale_with_depth": True, "base_mlp_dim": 128}, "base_mlp_dim=128 over 3 layers, rounded to 128, gives a width of 0"),
    ({"mlp_dim_scale_with_depth": True, "base_mlp_dim": 3456, "base_num_decoder_layers": 34}, "gives a total of"),
    ({"mudd_last_layer_hidden_expand": 0}, "config key 'mudd_last_layer_hidden_expand' must be positive"),
])
def test_config_mistakes_are_one_line_errors(make_config, overrides, fragment):
  with pytest.raises(ConfigError) as e:
    make_config(**{**MUDD, **overrides})
  assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_flops_per_token_hand_count(make_config):
  config = make_config(**MUDD, base_emb_dim=64, base_num_query_heads=4, base_num_kv_heads=2,
                       mlp_dim_scale_with_depth=True, vocab_size=100, max_target_length=32)
  D, V, L = 64, 100, 32
  blocks = sum(2 * D * 64 + 2 * D * 32 + 3 * D * F for F in (128, 256, 384))
  generators = D * 64 + 64 * 4 * 2 + D * 64 + 64 * 4 * 3 + D * 64 + 64 * 1 * 4  # W1 + W2 per layer
  mixing = D * (4 * 2 + 4 * 3 + 1 * 4)
  expected = 6 * (blocks + generators + mixing) + 6 * 3 * L * 64 + 6 * D * V
  assert models.get_family("mudd").flops_per_token(config) == expected
