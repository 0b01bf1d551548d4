"""The fused attention kernels equal the plain one: cuDNN flash (its masking, through the XLA implementation
of the same call, since this machine has no GPU) and Pallas splash (interpreted on CPU), on packed
documents with padding and grouped heads, one device and a sharded mesh, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from MaxText.errors import ConfigError
from MaxText.models import attention, attention_cudnn, attention_splash
from MaxText.parallel import sharding
from MaxText.training import train_state, train_step
from MaxText.training.run import Run
from tests.conftest import TINY


def packed_batch(B: int, L: int, H: int, K: int, E: int, dtype=jnp.float32):
  """q, k, v and a self-attention Mask over rows of 2-3 documents each, the last row ending in padding."""
  rng = np.random.default_rng(0)
  segment = np.zeros((B, L), np.int32)
  position = np.zeros((B, L), np.int32)
  for b in range(B):
    cuts = sorted(rng.choice(np.arange(8, L - 8), size=2, replace=False))
    end = L - 24 if b == B - 1 else L  # padding (segment 0, position 0) after the last document
    for i, (start, stop) in enumerate(zip([0, *cuts], [*cuts, end])):
      segment[b, start:stop] = i + 1
      position[b, start:stop] = np.arange(stop - start)
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (B, L, H, E), dtype)
  k = jax.random.normal(keys[1], (B, L, K, E), dtype)
  v = jax.random.normal(keys[2], (B, L, K, E), dtype)
  segment, position = jnp.asarray(segment), jnp.asarray(position)
  return q, k, v, attention.Mask(segment, position, segment, position)


def loss_and_grads(kernel, q, k, v, mask, scale):
  """A weighted sum of the outputs of real tokens (padding rows are never scored) and its gradients."""
  w = jax.random.normal(jax.random.key(2), q.shape, jnp.float32)
  real = (mask.q_segment_BL != 0)[:, :, None, None]

  def loss(q, k, v):
    out = kernel(q, k, v, mask, scale=scale)
    return jnp.sum(jnp.where(real, out.astype(jnp.float32) * w, 0.0)), out

  (value, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return value, jnp.where(real, out.astype(jnp.float32), 0.0), [g.astype(jnp.float32) for g in grads]


def assert_close(got, want, tol):
  got, want = np.asarray(got), np.asarray(want)
  scale = max(float(np.max(np.abs(want))), 1.0)
  assert np.max(np.abs(got - want)) <= tol * scale, f"max error {np.max(np.abs(got - want)):.3g} > {tol} x {scale:.3g}"


def test_cudnn_flash_masking_equals_the_plain_kernel_in_bfloat16():
  q, k, v, mask = packed_batch(B=2, L=64, H=4, K=2, E=16)
  scale = 16**-0.5
  want = loss_and_grads(attention.dot_product, q, k, v, mask, scale)  # float32 reference
  xla = lambda *a, **kw: attention_cudnn.fused(*a, **kw, implementation="xla")
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  got = loss_and_grads(xla, *bf16, mask, scale)
  assert_close(got[1], want[1], 2e-2)
  for g, w in zip(got[2], want[2]):
    assert_close(g, w, 3e-2)
  # The same call with implementation="cudnn" is what the kernel runs; this machine has no cuDNN.
  with pytest.raises(RuntimeError, match="cuDNN"):
    attention_cudnn.cudnn_flash(*bf16, mask, scale=scale)


def test_cudnn_flash_is_a_config_error_without_a_gpu(make_config):
  with pytest.raises(ConfigError, match="needs an NVIDIA GPU with cuDNN; this machine's devices are cpu") as e:
    make_config(attention="cudnn_flash", dtype="bfloat16")
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("mesh_shape,kv_heads", [((1, 1, 1), 2), ((2, 2, 2), 2), ((2, 2, 2), 1)])
def test_splash_equals_the_plain_kernel(make_config, mesh_shape, kv_heads):
  """Interpreted splash == dot_product (float32): outputs of real tokens and all gradients, with batch and
  heads sharded as the rules say on 2x2x2 (and kv heads repeated when there is one for two shards)."""
  data, fsdp, tensor = mesh_shape
  config = make_config(num_devices=data * fsdp * tensor, ici_data_parallelism=data, ici_fsdp_parallelism=fsdp,
                       ici_tensor_parallelism=tensor)
  q, k, v, mask = packed_batch(B=4, L=128, H=4, K=kv_heads, E=16)
  scale = 16**-0.5
  want = loss_and_grads(attention.dot_product, q, k, v, mask, scale)
  with sharding.use_mesh(sharding.make_mesh(config), config.logical_axis_rules):
    got = loss_and_grads(attention_splash.splash, q, k, v, mask, scale)
  assert_close(got[0], want[0], 1e-5)
  assert_close(got[1], want[1], 1e-5)
  for g, w in zip(got[2], want[2]):
    assert_close(g, w, 1e-5)


def one_train_step(config):
  """The run's own jitted train step, once, on its first batch of synthetic packed documents."""
  run = Run(config)
  with sharding.use_mesh(run.mesh, run.rules):
    state = train_state.create_sharded(config, run.spec, run.tx, run.shardings)
    batch = next(run.data(config.train_split))
    assert len(np.unique(batch["inputs_segmentation"])) > 2, "the rows should hold several documents"
    step = jax.jit(train_step.make_train_step(config, run.spec, run.tx, run.schedule))
    state, metrics = step(state, run.global_batch(batch))
  return jax.device_get(metrics), jax.device_get(state["params"])


def test_a_model_trains_with_splash_as_with_the_plain_kernel(make_config):
  tiny = dict(max_target_length=128, base_num_decoder_layers=1, num_devices=2, ici_fsdp_parallelism=2)
  metrics, params = one_train_step(make_config(attention="splash", **tiny))
  want_metrics, want_params = one_train_step(make_config(attention="dot_product", **tiny))
  np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], want_metrics["grad_norm"], rtol=1e-5)
  # Adam moves every parameter by about the learning rate whatever its gradient's size, so tiny gradients'
  # rounding shows up at that scale: the updates agree to a thousandth of a step.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * TINY["learning_rate"]),
               params, want_params)


@pytest.mark.parametrize("overrides,message", [
    (dict(max_target_length=64), "max_target_length=64 must be a multiple of 128"),
    (dict(model_name="default", decoder_block="gpt", alibi=True, max_target_length=128),
     "alibi adds a bias to the attention scores, which attention='splash' cannot take"),
])
def test_splash_refuses_what_it_cannot_run(make_config, overrides, message):
  with pytest.raises(ConfigError, match=message):
    make_config(attention="splash", **overrides)


def test_splash_blocks_divide_the_length():
  assert [attention_splash.block_length(n) for n in (128, 256, 384, 512, 640, 1024, 2048)] == [
      128, 256, 384, 512, 128, 512, 512]


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["as_many_kv_heads", "grouped"])
def test_the_plain_kernel_equals_jax_dot_product_attention(kv_heads):
  """dot_product (its four-axis path when K == H, the five-axis one for grouped heads) against
  jax.nn.dot_product_attention's XLA implementation, forward and gradients; on a CPU `autoselected` is
  dot_product itself."""
  q, k, v, mask = packed_batch(B=3, L=48, H=4, K=kv_heads, E=8)
  scale = 8 ** -0.5

  def reference(q, k, v, mask, *, scale):
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense()[:, None], scale=scale, implementation="xla")

  want = loss_and_grads(reference, q, k, v, mask, scale)
  got = loss_and_grads(attention.dot_product, q, k, v, mask, scale)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(g, w, 1e-5)
  auto = loss_and_grads(attention.autoselected, q, k, v, mask, scale)
  for a, g in zip(jax.tree.leaves(auto), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, g)
