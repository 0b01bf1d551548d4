"""dtype=bfloat16 with weight_dtype=float32: float32 master weights and optimizer state, bfloat16 matmuls
(forward and backward), float32 norms, softmax, logits and loss; a step's loss is close to float32's."""

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from MaxText.training import train_state, train_step
from MaxText.training.run import Run
from tests.checks import fast_init
from tests.test_llama import synthetic_batch
from tests.test_sharding import run_one_step

MIXED = dict(dtype="bfloat16", weight_dtype="float32")


def equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs inside it (scan, remat, custom rules, conditionals)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex.core.ClosedJaxpr):
          yield from equations(sub.jaxpr)
        elif isinstance(sub, jex.core.Jaxpr):
          yield from equations(sub)


def operand_dtypes(jaxpr, primitive: str) -> set[tuple[str, ...]]:
  return {tuple(str(v.aval.dtype) for v in e.invars) for e in equations(jaxpr) if e.primitive.name == primitive}


def test_master_weights_and_adam_moments_stay_float32(make_config):
  run = Run(make_config(**MIXED))
  for leaf in jax.tree.leaves(run.abstract["params"]) + jax.tree.leaves(run.abstract["opt_state"]):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf
  assert sum(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(run.abstract["opt_state"])) >= 2 * len(
      jax.tree.leaves(run.abstract["params"]))  # both Adam moments of every parameter


@pytest.mark.parametrize("chunks", [1, 4])
def test_matmuls_run_in_bfloat16_and_the_rest_in_float32(make_config, chunks):
  """The whole gradient program: every matmul takes bfloat16 operands, forward and backward (the logits'
  and attention scores' float32 results included); every norm, softmax and the loss work in float32."""
  config = make_config(attention="dot_product", num_vocab_tiling=chunks, **MIXED)
  spec = train_state.model_spec(config)
  params = jax.eval_shape(lambda: fast_init(config, spec))
  batch = synthetic_batch(config)

  def loss(p):
    return train_step.loss_sums(train_state.bind(spec, p), batch, 0.0, chunks)[0]

  program = jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr
  assert operand_dtypes(program, "dot_general") == {("bfloat16", "bfloat16")}
  for primitive in ("exp", "log", "rsqrt"):  # softmax and logsumexp, the loss, RMSNorm
    assert operand_dtypes(program, primitive) == {("float32",)}, primitive
  assert program.outvars[0].aval.dtype == jnp.float32
  assert all(v.aval.dtype == jnp.float32 for v in program.outvars[1:])  # gradients of float32 parameters
  logits, _ = jax.eval_shape(lambda p: train_state.bind(spec, p)(batch["inputs"], batch["inputs_position"],
                                                                   batch["inputs_segmentation"]), params)
  assert logits.dtype == jnp.float32


def test_the_default_kernel_runs_its_forward_matmuls_in_bfloat16(make_config):
  """autoselected is jax.nn.dot_product_attention, whose backward (XLA's) multiplies float32 score
  gradients; its forward matmuls are bfloat16."""
  config = make_config(**MIXED)
  spec = train_state.model_spec(config)
  params = jax.eval_shape(lambda: fast_init(config, spec))
  batch = synthetic_batch(config)
  forward = jax.make_jaxpr(lambda p: train_step.loss_sums(train_state.bind(spec, p), batch, 0.0)[0])(params).jaxpr
  assert operand_dtypes(forward, "dot_general") == {("bfloat16", "bfloat16")}


def test_a_bfloat16_step_is_close_to_float32(make_config):
  """The same initial parameters (float32 in both) and batch: one step's loss and gradient norm agree to
  bfloat16 accuracy, and the parameters stay float32."""
  one_layer = dict(base_num_decoder_layers=1)  # layers are unrolled: one compiles in half the time
  batch = {k: np.asarray(v) for k, v in synthetic_batch(make_config(**one_layer), seed=5).items()}
  params, metrics, state = run_one_step(make_config(**one_layer, **MIXED), batch)
  want_params, want_metrics, _ = run_one_step(make_config(**one_layer), batch)
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
  assert all(leaf.dtype in (np.float32, np.int32) for leaf in jax.tree.leaves(jax.device_get(state["opt_state"])))
  np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-2)
  np.testing.assert_allclose(metrics["grad_norm"], want_metrics["grad_norm"], rtol=5e-2)
  assert not np.allclose(metrics["loss"], want_metrics["loss"], rtol=1e-7)  # it did compute in bfloat16
