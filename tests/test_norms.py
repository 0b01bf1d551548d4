"""The norms' written-out backward pass (layers.normalize) equals float64 autodiff of the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from MaxText.models import layers


def plain(x, scale, bias, eps, centre):
  """The textbook formula, differentiated by JAX."""
  if centre:
    x = x - jnp.mean(x, axis=-1, keepdims=True)
  y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y


@pytest.mark.parametrize("centre", [True, False], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("affine", ["scale_and_bias", "scale", "none"])
def test_gradients_equal_float64_autodiff(centre, affine):
  rng = np.random.default_rng(0)
  x = (3.0 * rng.normal(size=(2, 7, 24)) + 1.5).astype(np.float32)  # an offset mean exercises the centring
  scale = rng.normal(size=24).astype(np.float32) if affine != "none" else None
  bias = rng.normal(size=24).astype(np.float32) if affine == "scale_and_bias" else None
  w = rng.normal(size=x.shape)
  params = [a for a in (scale, bias) if a is not None]

  def ours(x, *p):
    s, b = (list(p) + [None, None])[:2]
    return jnp.sum(layers.normalize(x, s, b, 1e-5, centre, jnp.float32) * w.astype(np.float32))

  def reference(x, *p):
    s, b = (list(p) + [None, None])[:2]
    return jnp.sum(plain(x, s, b, 1e-5, centre) * w)

  argnums = tuple(range(1 + len(params)))
  got = jax.jit(jax.grad(ours, argnums=argnums))(x, *params)
  with jax.enable_x64():
    want = jax.grad(reference, argnums=argnums)(x.astype(np.float64), *[p.astype(np.float64) for p in params])
  for g, r in zip(got, want):
    r = np.asarray(r)
    assert np.max(np.abs(np.asarray(g) - r)) <= 1e-5 * np.max(np.abs(r))
  # The forward pass is the plain formula in float32.
  np.testing.assert_allclose(layers.normalize(x, scale, bias, 1e-5, centre, jnp.float32),
                             plain(x, scale, bias, 1e-5, centre), rtol=1e-6, atol=1e-6)


def test_bfloat16_activations_get_bfloat16_gradients_and_the_gains_keep_their_dtype():
  x = jax.random.normal(jax.random.key(0), (4, 16), jnp.bfloat16)
  scale = jnp.ones((16,), jnp.float32)
  bias = jnp.zeros((16,), jnp.float32)
  y, vjp = jax.vjp(lambda x, s, b: layers.normalize(x, s, b, 1e-6, True, jnp.bfloat16), x, scale, bias)
  dx, ds, db = vjp(jnp.ones_like(y))
  assert y.dtype == dx.dtype == jnp.bfloat16 and ds.dtype == db.dtype == jnp.float32


def test_rematerialised_norm_gives_the_same_gradient():
  x = jax.random.normal(jax.random.key(1), (3, 32), jnp.float32)
  scale = jax.random.normal(jax.random.key(2), (32,), jnp.float32)
  f = lambda x, s: jnp.sum(jnp.sin(layers.normalize(x, s, None, 1e-6, False, jnp.float32)))
  np.testing.assert_allclose(jax.grad(jax.checkpoint(f), argnums=(0, 1))(x, scale)[1],
                             jax.grad(f, argnums=(0, 1))(x, scale)[1], rtol=1e-6)
