"""`attention: splash`: the Pallas splash-attention kernel (TPU), causal with packed-document segment ids.

Under a mesh the kernel runs per shard in a `shard_map` whose specs come from the logical axis rules:
batch as `activation_batch`, query heads as `activation_heads`, key/value heads as `activation_kv_heads`
(the length is gathered: the kernel is built for whole sequences). Each shard builds its kernel for its own
head count; when the key/value heads are not split like the query heads (e.g. fewer kv heads than tensor
shards), they are repeated to one per query head first, so every shard pairs its queries with their own
kv heads. On CPU the same kernel runs in Pallas' interpret mode (slow, for tests and checks); the platform
is the mesh's, so an ahead-of-time compile for TPU on a CPU host gets the TPU kernel.

Causality is by index (the kernel's CausalMask), which equals `dot_product`'s causality by position for
the queries' own tokens except on padding rows (see `Mask.is_self_attention`). The kernel does not scale
the scores, so the queries are scaled first. Calls with a decode cache take the plain kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from MaxText.errors import ConfigError
from MaxText.models import attention
from MaxText.parallel import sharding

# The kernel computes keys in blocks whose length must be a multiple of this (TPU lanes).
LANES = 128
LARGEST_BLOCK = 512  # MaxText's default splash block


def block_length(length: int) -> int:
  """The largest multiple of LANES, at most LARGEST_BLOCK, that divides `length`."""
  return max(b for b in range(LANES, LARGEST_BLOCK + 1, LANES) if length % b == 0)


def check_config(config) -> None:
  platform = jax.devices()[0].platform
  if platform not in ("tpu", "cpu"):
    raise ConfigError(f"attention='splash' is a TPU kernel (runs interpreted on CPU for tests); on {platform} "
                      f"devices use attention=cudnn_flash, autoselected or dot_product")
  if config.max_target_length % LANES:
    raise ConfigError(f"attention='splash' works on blocks of {LANES} tokens: max_target_length="
                      f"{config.max_target_length} must be a multiple of {LANES}")


@functools.cache
def _kernel(heads: int, length: int, interpret: bool, mesh):
  """The splash kernel of one example: q [heads, length, E], k and v [kv heads, length, E]. Its mask tables
  are made under `mesh` (the shard_map's; None without one), whose axes their types then carry."""
  mask = sm.MultiHeadMask(masks=(sm.CausalMask(shape=(length, length)),) * heads)
  b = block_length(length)
  blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                         block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
  # Cached across traces, so its mask tables must be constants, not values of the trace that built it.
  with jax.ensure_compile_time_eval():
    return sk.make_splash_mha(mask=mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q_BLHE, k_BLKE, v_BLKE, segment_BL, *, scale: float, interpret: bool, mesh=None):
  """The kernel over this shard's rows and heads (vmapped over rows)."""
  L, H = q_BLHE.shape[1], q_BLHE.shape[2]
  kernel = _kernel(H, L, interpret, mesh)
  q_BHLE = jnp.swapaxes(q_BLHE * jnp.asarray(scale, q_BLHE.dtype), 1, 2)
  k_BKLE, v_BKLE = jnp.swapaxes(k_BLKE, 1, 2), jnp.swapaxes(v_BLKE, 1, 2)
  out_BHLE = jax.vmap(lambda q, k, v, s: kernel(q, k, v, SegmentIds(q=s, kv=s)))(q_BHLE, k_BKLE, v_BKLE, segment_BL)
  return jnp.swapaxes(out_BHLE, 1, 2)


def _platform() -> str:
  active = sharding.active()
  return active[0].devices.flat[0].platform if active is not None else jax.devices()[0].platform


@attention.IMPLEMENTATIONS.register("splash")
@attention.requires(check_config, bias=False)
def splash(q_BLHE, k_BSKE, v_BSKE, mask: attention.Mask, *, scale: float, bias_BHLS=None) -> jax.Array:
  """Pallas splash attention (TPU; interpreted on CPU) with segment ids, sharded by the logical rules."""
  if not mask.is_self_attention:
    return attention.dot_product(q_BLHE, k_BSKE, v_BSKE, mask, scale=scale, bias_BHLS=bias_BHLS)
  if bias_BHLS is not None:
    raise ValueError("attention='splash' takes no score bias")  # validation refuses such configs
  platform = _platform()
  if platform not in ("tpu", "cpu"):
    raise ValueError(f"attention='splash' cannot run on {platform}")
  local = functools.partial(_local, scale=scale, interpret=platform == "cpu")
  v_BSKE = v_BSKE.astype(q_BLHE.dtype)
  k_BSKE = k_BSKE.astype(q_BLHE.dtype)
  active = sharding.active()
  if active is None:
    return local(q_BLHE, k_BSKE, v_BSKE, mask.q_segment_BL)
  mesh, rules = active
  shape = dict(mesh.shape)

  def spec(names, x):
    return sharding.logical_to_spec(names, rules, shape, x.shape)

  q_spec = spec(("activation_batch", None, "activation_heads", None), q_BLHE)
  kv_spec = spec(("activation_batch", None, "activation_kv_heads", None), k_BSKE)
  if kv_spec[2] != q_spec[2]:  # a shard's query heads would not meet their own kv heads: one kv head per query head
    groups = q_BLHE.shape[2] // k_BSKE.shape[2]
    k_BSKE, v_BSKE = jnp.repeat(k_BSKE, groups, axis=2), jnp.repeat(v_BSKE, groups, axis=2)
    kv_spec = q_spec
  local = functools.partial(local, mesh=mesh)
  run = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], None)), out_specs=q_spec,
                      check_vma=False)
  return run(q_BLHE, k_BSKE, v_BSKE, mask.q_segment_BL)
