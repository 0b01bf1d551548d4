"""Layers shared by the model families.

Shape letters in names (x_BLD, w_DF, ...), used across models/:
  B batch              L query length          S key length (cache slots)
  D model width        H query heads           K key/value heads        G query heads per kv head (H/K)
  E head dim           F MLP width             V vocabulary             N layers
  A all tokens of a batch, flattened (B x L)   T tokens of a sequence (VQ's whole length; a flat run of tokens)
  U static-SGU channels (D/2, GPT)             R head-QK width (GPT)
  C dense streams (MUDD)  J dense sources (MUDD)  M dense-weight generator width (MUDD)
  X blocks of L tokens (VQ)  Z codebook entries (VQ)  W relative-position window (VQ)
An activation's logical axis names (its sharding) follow from its letters: `axes("BLD")`, from AXES below.

Every parameter is made by `param`, which records its logical axis names (the only sharding vocabulary;
`sharding.py` maps them to mesh axes) and its role (embedding, hidden, readout, gain, bias), from which a
parametrization can derive init scales and learning-rate multipliers (see MaxText/models/parametrization.py).

Layers take an optional `stats` dict: when the model records activations (`record_activations`, for the
coordinate check) they put mean |activation| of their sites in it; when it is None they add no operation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from MaxText.errors import ConfigError
from MaxText.parallel.sharding import constrain
from MaxText.registry import Registry

# The logical axis of an activation dimension, by shape letter; the letters not listed are never sharded.
AXES = {"B": "activation_batch", "A": "activation_batch", "L": "activation_length", "T": "activation_length",
        "D": "activation_embed", "H": "activation_heads", "K": "activation_kv_heads", "F": "activation_mlp",
        "V": "activation_vocab"}


def axes(shape: str) -> tuple[str | None, ...]:
  """The logical axis names of an activation named by its shape letters: axes("BLD") for x_BLD."""
  return tuple(AXES.get(letter) for letter in shape)


BLD, BLHE, BLKE, BLV = axes("BLD"), axes("BLHE"), axes("BLKE"), axes("BLV")

# "codebook": running statistics (VQ k-means sums and counts) moved by their own surrogate loss, whose
# gradient is their whole update (optimizers.STATISTICS_ROLES): no Adam, decay, clipping or 1/tokens.
ROLES = ("embedding", "hidden", "readout", "gain", "bias", "codebook")
# "query": the query projection (zero_init_query); "keep_init": an init that is part of the architecture
# (e.g. a zero-initialised gate that makes a block start as the identity), which no parametrization redraws.
TAGS = ("query", "keep_init")

ACTIVATIONS: Registry[Callable[[jax.Array], jax.Array]] = Registry("mlp_activations", "MLP activation")
ACTIVATIONS.register("silu")(jax.nn.silu)
ACTIVATIONS.register("relu")(jax.nn.relu)


@ACTIVATIONS.register("gelu")
def gelu(x):
  """The tanh approximation, as flax's nn.gelu."""
  return jax.nn.gelu(x, approximate=True)


@ACTIVATIONS.register("gelu_exact")
def gelu_exact(x):
  """The erf form."""
  return jax.nn.gelu(x, approximate=False)


@ACTIVATIONS.register("squared_relu")
def squared_relu(x):
  return jnp.square(jax.nn.relu(x))


@ACTIVATIONS.register("linear")
def linear(x):
  return x


def dtypes(config) -> tuple[jnp.dtype, jnp.dtype]:
  """(activation dtype, parameter dtype) of a config."""
  return jnp.dtype(config.dtype), jnp.dtype(config.weight_dtype)


def param(rngs: nnx.Rngs | None, init, shape: Sequence[int], axes: tuple[str | None, ...], *, role: str,
          dtype, fan_in: int | None = None, tag: str | None = None) -> nnx.Param:
  """A parameter with logical axis names, a role and its fan-in; never placed eagerly (jit shards it).

  `fan_in` is the number of inputs summed per output (D for a D->F matrix, H*E for the attention output);
  matrices (roles hidden and readout) must give it, since a parametrization scales them by it.
  `tag` marks a parameter a parametrization treats specially (one of TAGS).
  """
  if role not in ROLES:
    raise ValueError(f"unknown parameter role {role!r}")
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
  if role in ("hidden", "readout") and not fan_in:
    raise ValueError(f"a {role} parameter of shape {tuple(shape)} needs its fan_in")
  if tag is not None and tag not in TAGS:
    raise ValueError(f"unknown parameter tag {tag!r}")
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False, role=role,
                   fan_in=fan_in, tag=tag)


def normal(std: float):
  return jax.nn.initializers.normal(stddev=std)


def constant(value: float):
  return lambda key, shape, dtype: jnp.full(shape, value, dtype)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32 whatever the activation dtype."""

  def __init__(self, dim: int, *, eps: float, dtype, weight_dtype, rngs: nnx.Rngs | None = None,
               use_scale: bool = True, scale_init: float = 1.0):
    self.eps, self.dtype = eps, dtype
    self.scale = param(rngs, constant(scale_init), (dim,), ("norm",), role="gain", dtype=weight_dtype) if use_scale else None

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = None if self.scale is None else self.scale[...]
    return normalize(x, scale, None, self.eps, False, self.dtype)


def normalize(x, scale, bias, eps: float, centre: bool, dtype) -> jax.Array:
  """LayerNorm (`centre`) or RMSNorm of x over its last axis in float32, times `scale`, plus `bias` (either None
  to skip), cast to `dtype`.

  The backward pass is written out (`_normalize_backward`): differentiating the forward pass as written gives
  chains of broadcasts and reductions that XLA fuses poorly (on a CPU the norms of a small GPT took a third of
  its step). The forward pass is the same arithmetic either way.
  """
  return _normalize(x, scale, bias, eps, centre, jnp.dtype(dtype), jnp.dtype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _normalize(x, scale, bias, eps, centre, dtype, x_dtype):
  return _normalize_forward(x, scale, bias, eps, centre, dtype, x_dtype)[0]


def _normalize_forward(x, scale, bias, eps, centre, dtype, x_dtype):
  del x_dtype  # the backward pass's: the dtype of x's cotangent
  x = x.astype(jnp.float32)
  if centre:
    x = x - jnp.mean(x, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  xhat = x * rstd
  y = xhat
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(dtype), (xhat, rstd, scale, bias)


def _normalize_backward(eps, centre, dtype, x_dtype, residuals, dy):
  del eps, dtype
  xhat, rstd, scale, bias = residuals
  dy = dy.astype(jnp.float32)
  leading = tuple(range(dy.ndim - 1))
  dscale = None if scale is None else jnp.sum(dy * xhat, axis=leading).astype(scale.dtype)
  dbias = None if bias is None else jnp.sum(dy, axis=leading).astype(bias.dtype)
  dxhat = dy if scale is None else dy * scale.astype(jnp.float32)
  # d/dx of x * rsqrt(mean(x^2)) is rstd * (dxhat - xhat * mean(dxhat * xhat)); centring also removes the mean.
  dx = dxhat - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True)
  if centre:
    dx = dx - jnp.mean(dxhat, axis=-1, keepdims=True)
  return (dx * rstd).astype(x_dtype), dscale, dbias


_normalize.defvjp(_normalize_forward, _normalize_backward)


# RoPE frequency rules (`rope_type`): config, head dim -> float32 [E/2] inverse frequencies, or None for the
# plain base^(-2k/E), which `rope` computes in the graph itself.
ROPE_TYPES: Registry[Callable[[Any, int], np.ndarray | None]] = Registry("rope_type", "RoPE type")


def rope_base_frequencies(base: float, head_dim: int) -> np.ndarray:
  """1 / base^(2k/E) in float32 as PyTorch code computes it (Hugging Face, the MUDDFormer release)."""
  return (1.0 / np.float32(base) ** (np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim))).astype(np.float32)


@ROPE_TYPES.register("default")
def _rope_default(config, head_dim: int):
  # In the graph (None), except with a rounded table, whose roundings follow the PyTorch frequencies.
  return None if config.rope_table_dtype == "float32" else rope_base_frequencies(config.rope_max_timescale, head_dim)


@ROPE_TYPES.register("llama3")
def rope_llama3(config, head_dim: int) -> np.ndarray:
  """Llama 3.1's frequency scaling, in float32 as Hugging Face computes it: wavelengths shorter than
  original_max / high_freq_factor are kept, longer than original_max / low_freq_factor divided by `factor`,
  and the band between interpolated smoothly."""
  base, factor = config.rope_max_timescale, config.rope_scaling_factor
  low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
  original = config.rope_original_max_position
  inv_freq = rope_base_frequencies(base, head_dim)
  wavelen = np.float32(2 * math.pi) / inv_freq
  low_wavelen, high_wavelen = original / low, original / high
  scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
  smooth = ((original / wavelen - low) / (high - low)).astype(np.float32)
  smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_frequencies(config, head_dim: int) -> np.ndarray | None:
  """The inverse frequencies of `config`'s rope_type (None: the default base^(-2k/E))."""
  return ROPE_TYPES.get(config.rope_type)(config, head_dim)


def rope(x_BLHE: jax.Array, positions_BL: jax.Array, max_timescale: float, inv_freq=None,
         table_dtype=None) -> jax.Array:
  """Rotary embedding, half-split (non-interleaved): pairs (x_k, x_{k+E/2}) rotate by pos / base^(2k/E).

  `inv_freq` ([E/2], float32) replaces base^(-2k/E) (RoPE scaling); `table_dtype` rounds cos and sin to
  that dtype before the float32 rotation (bfloat16: the MUDDFormer release's table).
  """
  E = x_BLHE.shape[-1]
  half = E // 2
  if inv_freq is None:
    inv_freq = max_timescale ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / E)
  else:
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
  angle_BL11E = (positions_BL.astype(jnp.float32)[:, :, None] * inv_freq)[:, :, None, None, :]
  cos, sin = jnp.cos(angle_BL11E), jnp.sin(angle_BL11E)
  if table_dtype is not None:
    cos, sin = cos.astype(table_dtype).astype(jnp.float32), sin.astype(table_dtype).astype(jnp.float32)
  # View x as its two halves [.., 2, E/2]: the rotation is x*cos + swap(x)*(-sin, +sin), with the swap a
  # reverse of the size-2 axis rather than a concatenation (cheaper forward and backward on CPU).
  x_BLH2E = x_BLHE.astype(jnp.float32).reshape(*x_BLHE.shape[:-1], 2, half)
  sign_21 = jnp.array([[-1.0], [1.0]], jnp.float32)
  out = x_BLH2E * cos + jnp.flip(x_BLH2E, axis=-2) * (sign_21 * sin)
  return out.reshape(x_BLHE.shape).astype(x_BLHE.dtype)


class Embed(nnx.Module):
  """Token embedding table [V, D]; `attend` projects back to vocabulary logits (tied output)."""

  def __init__(self, vocab: int, dim: int, *, init, dtype, weight_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = param(rngs, init, (vocab, dim), ("vocab", "embed"), role="embedding", dtype=weight_dtype)

  def __call__(self, tokens_BL: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens_BL, axis=0).astype(self.dtype)

  def attend(self, x_BLD: jax.Array) -> jax.Array:
    w_VD = self.embedding[...].astype(x_BLD.dtype)
    return einsum_f32("bld,vd->blv", x_BLD, w_VD)


class MLP(nnx.Module):
  """Gated MLP: wo( act0(x wi_0) * act1(x wi_1) ); one activation gives a plain act(x wi_0) MLP."""

  def __init__(self, dim: int, hidden: int, activations: Sequence[str], *, init, out_init=None, dtype,
               weight_dtype, rngs: nnx.Rngs, use_bias: bool = False):
    if hidden < 1:
      raise ConfigError(f"config key 'base_mlp_dim' must be positive for a model with an MLP, got {hidden}")
    self.dtype, self.activations, self.use_bias = dtype, tuple(activations), use_bias
    zeros = constant(0.0)
    for i in range(len(self.activations)):  # named wi_0, wi_1 as in MaxText, not a list
      setattr(self, f"wi_{i}", param(rngs, init, (hidden, dim), ("mlp", "embed"), role="hidden", dtype=weight_dtype,
                                     fan_in=dim))
      if use_bias:
        setattr(self, f"bi_{i}", param(rngs, zeros, (hidden,), ("mlp",), role="bias", dtype=weight_dtype))
    self.wo = param(rngs, out_init or init, (dim, hidden), ("embed", "mlp"), role="hidden", dtype=weight_dtype,
                    fan_in=hidden)
    if use_bias:
      self.bo = param(rngs, zeros, (dim,), ("embed",), role="bias", dtype=weight_dtype)

  def __call__(self, x_BLD: jax.Array, stats: dict | None = None) -> jax.Array:
    # Computed feature-major on A = B*L tokens: h_FA = act(w_FD @ x_DA), out_DA = w_DF @ h_FA. The math is
    # the plain MLP's, but with the tokens minor, XLA's CPU backend transposes only the small D-wide
    # tensors; token-major, it transposes the F-wide gradient with the activation's derivative fused in
    # and evaluated in strided order, which made the whole train step 1.3x slower.
    B, L, D = x_BLD.shape
    x_DA = constrain(x_BLD.reshape(B * L, D).T, axes("DA"))
    h_FA = None
    for i, name in enumerate(self.activations):
      a_FA = getattr(self, f"wi_{i}")[...].astype(self.dtype) @ x_DA
      if self.use_bias:
        a_FA = a_FA + getattr(self, f"bi_{i}")[...].astype(self.dtype)[:, None]
      a_FA = ACTIVATIONS.get(name)(a_FA)
      h_FA = a_FA if h_FA is None else h_FA * a_FA
    h_FA = constrain(h_FA, axes("FA"))
    if stats is not None:
      stats["mlp_hidden"] = mean_abs(h_FA)
    out_DA = self.wo[...].astype(self.dtype) @ h_FA
    if self.use_bias:
      out_DA = out_DA + self.bo[...].astype(self.dtype)[:, None]
    return out_DA.T.reshape(B, L, D)


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """The float32 result of a matmul of `a` and `b` (accumulated in float32), e.g. logits or attention scores.

  With bfloat16 operands the backward pass would otherwise multiply the float32 cotangent by a bfloat16
  operand, a float32 matmul; here the cotangent is cast to the operands' dtype first, so a bfloat16 model
  runs every matmul in bfloat16, forward and backward. Float32 operands take the plain einsum.
  """
  if a.dtype == jnp.float32 and b.dtype == jnp.float32:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
  return _einsum_f32(spec, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_f32(spec, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_forward(spec, a, b):
  return _einsum_f32(spec, a, b), (a, b)


def _einsum_f32_backward(spec, residuals, ct):
  a, b = residuals
  # The same matmul with a result in the operands' dtype, whose transposes are matmuls in that dtype.
  _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a, b)
  return vjp(ct.astype(jnp.result_type(a, b)))


_einsum_f32.defvjp(_einsum_f32_forward, _einsum_f32_backward)


def output_logits(x_BLD: jax.Array, embed: Embed, unembed_VD, multiplier: float = 1.0) -> jax.Array:
  """float32 logits through the tied embedding table (`unembed_VD` None) or an untied [vocab, embed] matrix."""
  if unembed_VD is None:
    logits_BLV = embed.attend(x_BLD)
  else:
    logits_BLV = einsum_f32("bld,vd->blv", x_BLD, unembed_VD[...].astype(x_BLD.dtype))
  return logits_BLV if multiplier == 1.0 else logits_BLV * multiplier


REMAT_POLICIES: Registry[Callable[..., Callable]] = Registry("remat_policy", "remat policy")


@REMAT_POLICIES.register("none")
def _keep_everything(fn: Callable, prevent_cse: bool) -> Callable:
  del prevent_cse
  return fn


@REMAT_POLICIES.register("full")
def _save_inputs_only(fn: Callable, prevent_cse: bool) -> Callable:
  return jax.checkpoint(fn, prevent_cse=prevent_cse)


@REMAT_POLICIES.register("minimal")
def _save_projections(fn: Callable, prevent_cse: bool) -> Callable:
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable, prevent_cse=prevent_cse)


@REMAT_POLICIES.register("save_qkv_proj")
def _save_qkv(fn: Callable, prevent_cse: bool) -> Callable:
  policy = jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj")
  return jax.checkpoint(fn, policy=policy, prevent_cse=prevent_cse)


def remat(fn: Callable, policy: str, *, prevent_cse: bool) -> Callable:
  """Wrap a layer body as `remat_policy` says (the names are REMAT_POLICIES')."""
  return REMAT_POLICIES.get(policy)(fn, prevent_cse)


def make_stack(n: int, make_layer: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
  """n layers whose parameters are stacked on a leading 'layers' axis (one layout for scan and unrolled)."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def build(rngs):
    return make_layer(rngs)

  return build(rngs)


def run_stack(stack: nnx.Module, call: Callable[[nnx.Module, jax.Array, Any], tuple[jax.Array, Any]],
              x: jax.Array, per_layer: Any = None, *, scan: bool, remat_policy: str):
  """Apply stacked layers in order: `call(layer, x, per_layer_i) -> (x, out_i)`; returns (x, stacked outs).

  With scan=False the same stacked parameters are sliced layer by layer in an unrolled loop, so scanned
  and unrolled runs share checkpoints and differ only in compile time.
  """
  graphdef, state = nnx.split(stack)

  def body(x, xs):
    layer_state, extra = xs
    return call(nnx.merge(graphdef, layer_state), x, extra)

  body = remat(body, remat_policy, prevent_cse=not scan)
  if scan:
    return jax.lax.scan(body, x, (state, per_layer))
  n = jax.tree.leaves(state)[0].shape[0]
  outs = []
  for i in range(n):
    x, out = body(x, jax.tree.map(lambda a: a[i], (state, per_layer)))
    outs.append(out)
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *outs) if jax.tree.leaves(outs) else None
  return x, stacked


def mean_abs(x: jax.Array, where: jax.Array | None = None) -> jax.Array:
  """mean |x| in float32 (over the True entries of `where`): the coordinate size a coordinate check tracks."""
  a = jnp.abs(jax.lax.stop_gradient(x).astype(jnp.float32))
  if where is None:
    return jnp.mean(a)
  where = jnp.broadcast_to(where, a.shape)
  return jnp.sum(jnp.where(where, a, 0.0)) / jnp.maximum(jnp.sum(where), 1)


class LayerNorm(nnx.Module):
  """(x - mean) / std * scale + bias over the last axis, in float32 whatever the activation dtype."""

  def __init__(self, dim: int, *, eps: float, dtype, weight_dtype, rngs: nnx.Rngs | None = None,
               use_scale: bool = True, use_bias: bool = True):
    self.eps, self.dtype = eps, dtype
    # use_scale=False drops the bias too (muP presets); use_bias=False drops only the bias (nanoGPT).
    self.scale = param(rngs, constant(1.0), (dim,), ("norm",), role="gain", dtype=weight_dtype) if use_scale else None
    on = use_scale and use_bias
    self.bias = param(rngs, constant(0.0), (dim,), ("norm",), role="bias", dtype=weight_dtype) if on else None

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = None if self.scale is None else self.scale[...]
    bias = None if self.bias is None else self.bias[...]
    return normalize(x, scale, bias, self.eps, True, self.dtype)
