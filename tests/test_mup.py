"""muP: the init/LR table per parameter, forward scales, zero inits, decay, the coordinate check, sp unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from MaxText import models, startup
from MaxText.config import loader
from MaxText.errors import ConfigError
from MaxText.models import parametrization
from MaxText.tools import coord_check, mup_runs
from MaxText.training import optimizers, train_state, train_step
from tests import reference_llama
from tests.test_llama import packed_inputs, synthetic_batch

# Width 64 at base width 16: w = 4. F = 128 = 2D, so the MLP output's fan-in differs from D.
MUP = dict(parametrization="mup", mup_base_width=16, base_emb_dim=64, base_num_query_heads=4, base_num_kv_heads=2,
           head_dim=16, base_mlp_dim=128, vocab_size=256)


def init(config):
  spec = train_state.model_spec(config)
  return spec, jax.jit(lambda: train_state.init_params(config, spec))()


def expected_table(D=64, H=4, E=16, F=128, w=4.0):
  """(init std, LR multiplier) of every Transformer++ parameter under muP, written out by hand (TP5 Table 3, relative form)."""
  return {
      "embed/embedding": (1.0, 1.0),
      "layers/attention/wq": (D**-0.5, 1 / w), "layers/attention/wk": (D**-0.5, 1 / w),
      "layers/attention/wv": (D**-0.5, 1 / w), "layers/attention/wo": ((H * E) ** -0.5, 1 / w),
      "layers/mlp/wi_0": (D**-0.5, 1 / w), "layers/mlp/wi_1": (D**-0.5, 1 / w), "layers/mlp/wo": (F**-0.5, 1 / w),
      "unembed": (1.0 / D, 1 / w),
      "layers/pre_attention_norm/scale": ("ones", 1.0), "layers/pre_mlp_norm/scale": ("ones", 1.0),
      "final_norm/scale": ("ones", 1.0),
  }


def flat(tree):
  return {"/".join(str(k.key) for k in path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def adam_updates(config, spec, params, grads):
  tx, _ = optimizers.create(config, spec.roles)
  return flat(jax.jit(lambda p, g: tx.update(g, tx.init(p), p)[0])(params, grads))


@pytest.mark.parametrize("name", ["sp", "mup"])
def test_init_and_lr_table_hold_for_every_parameter(make_config, name):
  config = make_config(**{**MUP, "parametrization": name}, init_weights_std=0.02, gradient_clipping_threshold=0.0,
                       adam_weight_decay=0.0, lr_schedule_type="constant")
  spec, params = init(config)
  values = flat(params)
  want = expected_table() if name == "mup" else {
      path: ("ones", 1.0) if path.endswith("scale") else (0.02, 1.0) for path in expected_table()}
  assert set(values) == set(want), "every parameter is covered by the table"
  rows = {row["param"]: row for row in parametrization.table(config, spec)}
  for path, (std, _) in want.items():
    x = np.asarray(values[path])
    if std == "ones":
      assert np.all(x == 1.0), path
    else:
      assert np.std(x) == pytest.approx(std, rel=0.1), path
      assert abs(np.mean(x)) < 3 * std / np.sqrt(x.size) + 1e-7, path
      if name == "mup":
        assert rows[path]["init_std"] == pytest.approx(std), path
  # The optimizer applies the multipliers: the same gradients give updates lr * mult * adam(g).
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), params)
  got = adam_updates(config, spec, params, grads)
  adam = optax.chain(optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps),
                     optax.scale(-config.learning_rate))
  plain = flat(adam.update(grads, adam.init(params))[0])
  for path, (_, multiplier) in want.items():
    assert rows[path]["lr_multiplier"] == pytest.approx(multiplier), path
    np.testing.assert_allclose(got[path], multiplier * plain[path], rtol=1e-6, err_msg=path)


@pytest.mark.parametrize("overrides", [{}, {"logits_via_embedding": True}, {"output_logits_multiplier": 2.5},
                                       {"use_norm_gains": False}])
def test_mup_forward_scales_attention_by_one_over_head_dim_and_multiplies_logits(make_config, overrides):
  config = make_config(**MUP, **overrides)
  spec, params = init(config)
  tokens, positions, segment_ids = packed_inputs(config)
  got, _ = train_state.bind(spec, params)(tokens, positions, segment_ids)
  # The reference divides q.k by sqrt(E); muP divides by E, i.e. queries shrunk by another sqrt(E).
  ref = jax.tree.map(lambda x: x, params)
  ref["layers"]["attention"]["wq"] = params["layers"]["attention"]["wq"] / np.sqrt(config.head_dim)
  if not config.use_norm_gains:
    N, D = config.base_num_decoder_layers, config.base_emb_dim
    ref["layers"]["pre_attention_norm"] = ref["layers"]["pre_mlp_norm"] = {"scale": jnp.ones((N, D))}
    ref["final_norm"] = {"scale": jnp.ones(D)}
  multiplier = config.output_logits_multiplier / (4.0 if config.logits_via_embedding else 1.0)
  want = multiplier * reference_llama.logits(ref, config, tokens, positions, segment_ids)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert parametrization.attention_scale(config, 16) == 1 / 16


@pytest.mark.parametrize("name", ["sp", "mup"])
def test_zero_init_options_give_exact_zeros(make_config, name):
  base = make_config(**{**MUP, "parametrization": name})
  zeroed = make_config(**{**MUP, "parametrization": name}, zero_init_query=True, zero_init_readout=True)
  _, want = init(base)
  spec, params = init(zeroed)
  assert np.all(np.asarray(params["layers"]["attention"]["wq"]) == 0.0)
  assert np.all(np.asarray(params["unembed"]) == 0.0)
  others = lambda p: {k: v for k, v in flat(p).items() if k not in ("layers/attention/wq", "unembed")}
  jax.tree.map(np.testing.assert_array_equal, others(params), others(want))
  tokens, positions, segment_ids = packed_inputs(zeroed)
  logits, _ = train_state.bind(spec, params)(tokens, positions, segment_ids)
  assert np.all(np.asarray(logits) == 0.0)
  assert {r["init_std"] for r in parametrization.table(zeroed, spec) if r["param"] in ("unembed",
                                                                                       "layers/attention/wq")} == {"zero"}


def run_steps(config, tx=None, params=None, steps=3):
  spec = train_state.model_spec(config)
  default_tx, schedule = optimizers.create(config, spec.roles)
  tx = tx or default_tx
  state = jax.jit(lambda: train_state.init_state(config, spec, tx))()
  if params is not None:
    state = {**state, "params": params, "opt_state": tx.init(params)}
  step = jax.jit(train_step.make_train_step(config, spec, tx, schedule))
  losses = []
  for i in range(steps):
    state, metrics = step(state, synthetic_batch(config, seed=i))
    losses.append(np.asarray(metrics["loss"]))
  return jax.device_get(state["params"]), losses


def test_sp_is_bit_identical_to_the_foundation_default(make_config):
  default = make_config(adam_weight_decay=0.1)
  explicit = make_config("parametrization=sp", adam_weight_decay=0.1)
  params0, losses0 = run_steps(default)
  params1, losses1 = run_steps(explicit)
  # The foundation's own path, rebuilt by hand: the family's init as drawn, clip -> Adam -> decay -> -lr.
  spec = train_state.model_spec(default)
  family_params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(models.build(default, nnx.Rngs(default.init_weights_seed)),
                                                             nnx.Param)))()
  schedule = optimizers.learning_rate_schedule(default)
  foundation_tx = optax.chain(
      optax.clip_by_global_norm(default.gradient_clipping_threshold),
      optax.scale_by_adam(b1=default.adam_b1, b2=default.adam_b2, eps=default.adam_eps, mu_dtype=jnp.float32),
      optax.add_decayed_weights(default.adam_weight_decay, mask=optimizers.decay_mask(default, spec.roles)),
      optax.scale_by_learning_rate(schedule))
  params2, losses2 = run_steps(default, foundation_tx, family_params)
  for params, losses in ((params1, losses1), (params2, losses2)):
    assert [l.tobytes() for l in losses] == [l.tobytes() for l in losses0]
    jax.tree.map(np.testing.assert_array_equal, params, params0)


@pytest.mark.parametrize("name, independent", [("sp", False), ("sp", True), ("mup", False), ("mup", True)])
def test_weight_decay_coupled_or_independent_of_the_learning_rate(make_config, name, independent):
  config = make_config(**{**MUP, "parametrization": name}, adam_weight_decay=0.1, learning_rate=0.5,
                       independent_weight_decay=independent, lr_schedule_type="constant")
  spec, params = init(config)
  zeros = jax.tree.map(jnp.zeros_like, params)  # Adam's update of a zero gradient is 0: only decay moves
  tx, _ = optimizers.create(config, spec.roles)
  new = flat(optax.apply_updates(params, tx.update(zeros, tx.init(params), params)[0]))
  old = flat(params)
  w = 4.0 if name == "mup" else 1.0
  for path, (_, multiplier) in expected_table(w=w).items():
    if path.endswith("scale"):
      np.testing.assert_array_equal(new[path], old[path])  # gains are not decayed
      continue
    factor = 0.1 if independent else 0.5 * 0.1 * (multiplier if name == "mup" else 1.0)
    np.testing.assert_allclose(new[path], old[path] * (1 - factor), rtol=1e-6, err_msg=path)


def test_recording_activations_leaves_the_logits_alone(make_config):
  config = make_config(**MUP)
  spec, params = init(config)
  tokens, positions, segment_ids = packed_inputs(config)
  plain, aux = train_state.bind(spec, params)(tokens, positions, segment_ids)
  assert "activations" not in aux
  recording = make_config(**MUP, record_activations=True)
  logits, aux = train_state.bind(train_state.model_spec(recording), params)(tokens, positions, segment_ids)
  np.testing.assert_array_equal(logits, plain)
  sites = aux["activations"]
  assert set(sites) == set(coord_check.SITES)
  assert sites["q"].shape == (config.base_num_decoder_layers,) and sites["logits"].shape == ()
  np.testing.assert_allclose(sites["logits"], np.mean(np.abs(np.asarray(plain))), rtol=1e-5)


def test_fast_coordinate_check_passes_under_mup_and_fails_under_sp(make_config):
  widths = (32, 64, 128)

  def tiny(width, name):
    return make_config(parametrization=name, mup_base_width=32, base_emb_dim=width, base_num_query_heads=width // 16,
                       base_num_kv_heads=width // 16, head_dim=16, base_mlp_dim=4 * width, mlp_activations=["relu"],
                       use_norm_gains=False, base_num_decoder_layers=1, vocab_size=128, max_target_length=16,
                       per_device_batch_size=2.0, record_activations=True, learning_rate=2.0**-6,
                       lr_schedule_type="constant", init_weights_std=0.02)

  batches = mup_runs.fetch_batches(tiny(widths[0], "sp"), "train", 3)
  records = coord_check.measure(tiny, widths, 3, batches)
  slopes = coord_check.slopes(widths, records)
  ok, lines = coord_check.verdict(slopes, coord_check.THRESHOLD)
  assert coord_check.worst(slopes["mup"])[0] <= coord_check.THRESHOLD, lines
  assert coord_check.worst(slopes["sp"])[0] > coord_check.THRESHOLD, lines
  assert ok
  # Under sp the query and logits sizes grow with width from the first update on; under muP they do not.
  assert min(slopes["sp"]["q"][1:]) > 0.4 and min(slopes["sp"]["attn_logits"][1:]) > 0.8


@pytest.mark.parametrize("args, fragment", [
    (["parametrization=mu"], "config key 'parametrization' must be one of sp, mup"),
    (["mup_base_width=0"], "config key 'mup_base_width' must be positive"),
    (["output_logits_multiplier=0"], "config key 'output_logits_multiplier' must be positive"),
    (["zero_init_readout=true", "logits_via_embedding=true"], "config key 'zero_init_readout' needs an untied readout"),
])
def test_config_errors_name_the_key(make_config, args, fragment):
  with pytest.raises(ConfigError) as e:
    make_config(*args)
  assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["MuTransformerTiny", "MuTransformerSmall", "MuTransformerMedium",
                                  "MuTransformerLarge"])
def test_mu_transformer_presets_step_widths_by_four_at_fixed_head_dim(name):
  config = startup.load_config([None, str(loader.BASE_CONFIG)], env={}, model_name=name, num_devices=1,
                               per_device_batch_size=1.0)
  index = ["Tiny", "Small", "Medium", "Large"].index(name.removeprefix("MuTransformer"))
  assert config.base_emb_dim == 128 * 4**index and config.head_dim == 128 and config.mup_base_width == 128
  assert config.parametrization == "mup" and not config.use_norm_gains
  assert config.base_num_query_heads * config.head_dim == config.base_emb_dim


# Transformer++ is checked parameter by parameter above; the others get muP through the same metadata.
FAMILIES = {
    "gpt": dict(model_name="GPTTiny", base_num_kv_heads=4, max_target_length=16, per_device_batch_size=1.0),
    "mudd": dict(decoder_block="mudd", base_num_decoder_layers=2),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gets_mup_from_its_roles(make_config, family):
  """Init and LR multipliers follow each parameter's role (TP5 Table 3); tagged keep_init stays as built."""
  sizes = dict(base_emb_dim=64, base_num_query_heads=4, head_dim=16, base_mlp_dim=256, vocab_size=256,
               mup_base_width=16, gradient_clipping_threshold=0.0, adam_weight_decay=0.0, init_weights_std=0.02)
  configs = {name: make_config(**{**sizes, **FAMILIES[family], "parametrization": name}) for name in ("sp", "mup")}
  assert configs["mup"].decoder_block == family
  spec, mup = init(configs["mup"])
  _, sp = init(configs["sp"])
  roles, fan_ins, tags = (flat(tree) for tree in (spec.roles, spec.fan_in, spec.tags))
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape), sp)
  updates = {name: adam_updates(configs[name], spec, sp, grads) for name in configs}
  for path, x in flat(mup).items():
    role, fan_in, tag = roles[path], fan_ins.get(path), tags.get(path)
    if tag == "keep_init" or role not in ("embedding", "hidden", "readout"):
      np.testing.assert_array_equal(x, flat(sp)[path], err_msg=path)
    elif x.size >= 1024:
      want = 1.0 if role == "embedding" else fan_in**-0.5 if role == "hidden" else 1.0 / fan_in
      assert np.std(np.asarray(x)) == pytest.approx(want, rel=0.1), path
    multiplier = 0.25 if role in ("hidden", "readout") else 1.0
    np.testing.assert_allclose(updates["mup"][path], multiplier * updates["sp"][path], rtol=1e-6, err_msg=path)
  recording = make_config(**{**sizes, **FAMILIES[family], "parametrization": "mup", "record_activations": True})
  tokens, positions, segment_ids = packed_inputs(recording)
  model = train_state.bind(train_state.model_spec(recording), mup)
  _, aux = jax.jit(lambda: model(tokens, positions, segment_ids))()
  assert set(coord_check.SITES) <= set(aux["activations"]), family
