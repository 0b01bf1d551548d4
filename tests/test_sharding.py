"""Sharded training equals unsharded training; parameters carry the PartitionSpecs the rules promise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from MaxText.parallel import sharding
from MaxText.training import optimizers, train_state, train_step

MESH_222 = dict(num_devices=8, ici_data_parallelism=2, ici_fsdp_parallelism=2, ici_tensor_parallelism=2)


def global_batch(config, seed=0):
  """A packed batch of config.global_batch_size_to_train_on rows, as numpy."""
  rng = np.random.default_rng(seed)
  B, L = config.global_batch_size_to_train_on, config.max_target_length
  tokens = rng.integers(0, config.vocab_size, (B, L + 1), dtype=np.int32)
  cut = rng.integers(2, L - 2, (B, 1))
  segment = np.where(np.arange(L + 1)[None] < cut, 1, 2).astype(np.int32)
  segment[-1, L // 2:] = 0  # some padding: target tokens must be weighted, not rows
  position = np.where(segment == 1, np.arange(L + 1), np.arange(L + 1) - cut).astype(np.int32)
  targets_segmentation = np.where(segment[:, 1:] == segment[:, :-1], segment[:, 1:], 0)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "inputs_position": position[:, :-1],
          "inputs_segmentation": segment[:, :-1], "targets_segmentation": targets_segmentation.astype(np.int32)}


def run_one_step(config, batch, tx=None):
  """One jitted, donated train step on config's mesh; returns (params on host, metrics, state)."""
  mesh = sharding.make_mesh(config)
  rules = config.logical_axis_rules
  spec = train_state.model_spec(config)
  default_tx, schedule = optimizers.create(config, spec.roles)
  tx = tx or default_tx
  abstract = train_state.abstract_state(config, spec, tx)
  shardings = train_state.state_shardings(spec, abstract, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  with sharding.use_mesh(mesh, rules):
    state = train_state.create_sharded(config, spec, tx, shardings)
    step = jax.jit(train_step.make_train_step(config, spec, tx, schedule), in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    global_arrays = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}
    state, metrics = step(state, global_arrays)
  return jax.device_get(state["params"]), jax.device_get(metrics), state


def assert_trees_close(a, b, atol=1e-5, rtol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=rtol), a, b)


def test_eight_device_step_equals_one_device_step(make_config):
  one = make_config(num_devices=1, per_device_batch_size=8.0)
  eight = make_config(per_device_batch_size=1.0, **MESH_222)
  assert one.global_batch_size_to_train_on == eight.global_batch_size_to_train_on == 8
  batch = global_batch(one)
  # SGD(lr=1) makes the new parameters params - grads: the whole step, compared element by element.
  sgd = optax.sgd(1.0)
  params1, _, _ = run_one_step(one, batch, sgd)
  params8, _, _ = run_one_step(eight, batch, sgd)
  assert_trees_close(params8, params1)
  # Under AdamW the loss, gradient norm and both moments agree. Adam's first update is g/(|g|+eps), which
  # turns a 1e-8 reassociation difference in a 1e-7 gradient into a 1e-2 change of that one update, so the
  # moments (0.1 g and 0.05 g^2) are the meaningful element-wise comparison.
  _, metrics1, state1 = run_one_step(one, batch)
  _, metrics8, state8 = run_one_step(eight, batch)
  np.testing.assert_allclose(metrics8["loss"], metrics1["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics8["grad_norm"], metrics1["grad_norm"], rtol=1e-5)
  adam1, adam8 = jax.device_get(state1["opt_state"][1]), jax.device_get(state8["opt_state"][1])
  assert_trees_close(adam8.mu, adam1.mu, atol=1e-9)
  assert_trees_close(adam8.nu, adam1.nu, atol=1e-12)

  specs = jax.tree.map(lambda x: x.sharding.spec, state8["params"])
  assert specs["layers"]["attention"]["wq"] == P(None, "fsdp", "tensor", None)
  assert specs["layers"]["attention"]["wo"] == P(None, "tensor", None, "fsdp")
  assert specs["layers"]["attention"]["wk"] == P(None, "fsdp", "tensor", None)
  assert specs["layers"]["mlp"]["wi_0"] == P(None, "tensor", "fsdp")  # MLP weights are stored [out, in]
  assert specs["layers"]["mlp"]["wo"] == P(None, "fsdp", "tensor")
  assert specs["embed"]["embedding"] == P("tensor", "fsdp")
  assert specs["unembed"] == P("tensor", "fsdp")
  assert specs["final_norm"]["scale"] == P(None)
  adam = state8["opt_state"][1]
  assert adam.mu["layers"]["attention"]["wq"].sharding.spec == P(None, "fsdp", "tensor", None)
  # Nothing is whole on one device: a 4-way sharded weight holds a quarter of it per device.
  wq = state8["params"]["layers"]["attention"]["wq"]
  assert wq.addressable_shards[0].data.size == wq.size // 4


def test_adafactor_state_is_sharded_and_its_step_equals_one_device(make_config):
  """Adafactor's factored moments are smaller than their parameters: replicated, the rest as the params."""
  one = make_config(num_devices=1, per_device_batch_size=8.0, opt_type="adafactor")
  eight = make_config(per_device_batch_size=1.0, opt_type="adafactor", **MESH_222)
  batch = global_batch(one)
  params1, metrics1, _ = run_one_step(one, batch)
  params8, metrics8, state8 = run_one_step(eight, batch)
  np.testing.assert_allclose(metrics8["loss"], metrics1["loss"], rtol=1e-5)
  assert_trees_close(params8, params1, atol=1e-6)
  factored = state8["opt_state"][1]
  wq = factored.v_row["layers"]["attention"]["wq"]
  assert wq.shape != state8["params"]["layers"]["attention"]["wq"].shape
  assert wq.sharding.spec == P()


def test_parameters_are_created_sharded(make_config):
  config = make_config(**MESH_222)
  spec = train_state.model_spec(config)
  tx, _ = optimizers.create(config, spec.roles)
  abstract = train_state.abstract_state(config, spec, tx)
  mesh = sharding.make_mesh(config)
  shardings = train_state.state_shardings(spec, abstract, mesh, config.logical_axis_rules)
  lowered = jax.jit(lambda: train_state.init_state(config, spec, tx), out_shardings=shardings).lower()
  text = lowered.as_text()
  assert "sharding" in text
  state = lowered.compile()()
  embedding = state["params"]["embed"]["embedding"]
  assert len({s.device for s in embedding.addressable_shards}) == 8
  assert embedding.addressable_shards[0].data.shape == (config.vocab_size // 2, config.base_emb_dim // 2)


def test_indivisible_dimensions_fall_back_to_replication():
  rules = (("kv_heads", ("tensor",)), ("embed", ("fsdp",)))
  assert sharding.logical_to_spec(("embed", "kv_heads"), rules, {"fsdp": 2, "tensor": 2}, (8, 1)) == P("fsdp", None)
  assert sharding.logical_to_spec(("embed", "kv_heads"), rules, {"fsdp": 2, "tensor": 2}, (8, 2)) == P("fsdp", "tensor")
  with pytest.raises(sharding.ShardingError, match="logical axis 'mystery' has no rule"):
    sharding.logical_to_spec(("mystery",), rules)


def test_a_mesh_axis_is_used_once_per_array():
  rules = (("activation_batch", ("data", "fsdp")), ("embed", ("fsdp",)), ("mlp", ("tensor",)))
  assert sharding.logical_to_spec(("activation_batch", "embed"), rules) == P(("data", "fsdp"), None)


@pytest.mark.parametrize("mesh,unroll", [(dict(num_devices=1), False), (dict(num_devices=1), True), (MESH_222, False)])
def test_gradient_accumulation_equals_one_big_batch(make_config, mesh, unroll):
  """Scanned or unrolled (gradient_accumulation_unroll: the micro-batches computed side by side)."""
  devices = mesh["num_devices"]
  big = make_config(per_device_batch_size=16.0 / devices, **mesh)
  accumulated = make_config(per_device_batch_size=4.0 / devices, gradient_accumulation_steps=4,
                            gradient_accumulation_unroll=unroll, **mesh)
  assert big.global_batch_size_to_train_on == accumulated.global_batch_size_to_train_on == 16
  batch = global_batch(big, seed=3)
  sgd = optax.sgd(1.0)  # params - grads, so equal params mean equal gradients
  params_big, metrics_big, _ = run_one_step(big, batch, sgd)
  params_acc, metrics_acc, _ = run_one_step(accumulated, batch, sgd)
  np.testing.assert_allclose(metrics_acc["loss"], metrics_big["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics_acc["tokens"], metrics_big["tokens"])
  assert_trees_close(params_acc, params_big, atol=1e-6)
  # The real optimizer sees the same gradients too.
  _, adam_big, _ = run_one_step(big, batch)
  _, adam_acc, _ = run_one_step(accumulated, batch)
  np.testing.assert_allclose(adam_acc["grad_norm"], adam_big["grad_norm"], rtol=1e-5)


def test_z_loss_is_added_to_the_objective(make_config):
  """The z-loss is reported apart from the loss and trains the model: under SGD(1) the step with it moves
  the parameters by exactly the extra gradient of multiplier * mean(logsumexp(logits)^2)."""
  plain_config = make_config(num_devices=1, per_device_batch_size=2.0)
  z_config = make_config(num_devices=1, per_device_batch_size=2.0, z_loss_multiplier=1e-2)
  batch = global_batch(plain_config)
  sgd = optax.sgd(1.0)
  params_plain, plain, _ = run_one_step(plain_config, batch, sgd)
  params_z, with_z, _ = run_one_step(z_config, batch, sgd)
  assert plain["z_loss"] == 0.0 and with_z["z_loss"] > 0.0
  np.testing.assert_allclose(with_z["loss"], plain["loss"], rtol=1e-6)

  spec = train_state.model_spec(z_config)
  init = train_state.init_params(z_config, spec)
  mask = batch["targets_segmentation"] != 0

  def z_term(params):
    logits, _ = train_state.bind(spec, params)(batch["inputs"], batch["inputs_position"],
                                                batch["inputs_segmentation"])
    logz = jax.nn.logsumexp(logits, axis=-1)
    return 1e-2 * jnp.sum(jnp.where(mask, logz**2, 0.0)) / jnp.sum(mask)

  extra = jax.grad(z_term)(init)
  assert_trees_close(jax.tree.map(lambda a, b: a - b, params_plain, params_z), extra, atol=1e-6, rtol=1e-4)
