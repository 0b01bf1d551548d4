"""`attention: cudnn_flash`: cuDNN's fused flash attention on NVIDIA GPUs, through
`jax.nn.dot_product_attention(implementation="cudnn")`, in bfloat16.

Packed documents: jax.nn's cuDNN path has no segment-id argument in this JAX version, so the same-document
mask goes in as `mask` (JAX turns it into an additive bias that cuDNN reads) and causality as `is_causal`,
which cuDNN applies itself. Causality by index equals causality by position for the queries' own tokens
(see `Mask.is_self_attention`) except on padding rows (segment 0), which only padding attends to, so the
tokens that are scored see exactly what `dot_product` gives them. Calls with a decode cache (keys are cache
slots) take the plain kernel.

Only the validation check and the masking can run without a GPU: the tests run `fused` with
`implementation="xla"`, the same call on the same arguments.
"""

from __future__ import annotations

import jax

from MaxText.errors import ConfigError
from MaxText.models import attention


def check_config(config) -> None:
  """An NVIDIA GPU that has cuDNN, bfloat16 activations, a head width cuDNN's flash kernel takes."""
  name = "attention='cudnn_flash'"
  device = jax.devices()[0]
  if device.platform != "gpu":
    raise ConfigError(f"{name} needs an NVIDIA GPU with cuDNN; this machine's devices are {device.platform} "
                      f"(use attention=autoselected or dot_product)")
  try:
    from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version  # noqa: PLC0415 (private in JAX)
  except ImportError:  # private in JAX; if it moves, the kernel's own error at trace time remains
    check_cudnn_version = None
  if check_cudnn_version is not None:
    try:
      check_cudnn_version()
    except RuntimeError as e:
      raise ConfigError(f"{name}: {e}") from None
  if config.dtype != "bfloat16":
    raise ConfigError(f"{name} computes in bfloat16: set dtype=bfloat16 (got {config.dtype}; weight_dtype may "
                      f"stay float32)")
  capability = float(getattr(device, "compute_capability", "0") or 0)
  widest = 256 if capability >= 9.0 else 128  # Hopper and later take wider heads
  if config.head_dim % 8 or config.head_dim > widest:
    raise ConfigError(f"{name} needs head_dim a multiple of 8 and at most {widest} on this GPU, got "
                      f"{config.head_dim}")


def fused(q_BLHE, k_BSKE, v_BSKE, mask: attention.Mask, *, scale: float, bias_BHLS=None,
          implementation: str) -> jax.Array:
  """jax.nn.dot_product_attention with the packed-document mask, causal, grouped heads (K divides H)."""
  if not mask.is_self_attention:
    return attention.dot_product(q_BLHE, k_BSKE, v_BSKE, mask, scale=scale, bias_BHLS=bias_BHLS)
  dt = q_BLHE.dtype
  same_doc_BLS = mask.q_segment_BL[:, :, None] == mask.k_segment_BS[:, None, :]
  bias = None if bias_BHLS is None else bias_BHLS.astype(dt)
  return jax.nn.dot_product_attention(q_BLHE, k_BSKE.astype(dt), v_BSKE.astype(dt), bias=bias,
                                      mask=same_doc_BLS[:, None], scale=scale, is_causal=True,
                                      implementation=implementation)


@attention.IMPLEMENTATIONS.register("cudnn_flash")
@attention.requires(check_config)
def cudnn_flash(q_BLHE, k_BSKE, v_BSKE, mask: attention.Mask, *, scale: float, bias_BHLS=None) -> jax.Array:
  """cuDNN flash attention (NVIDIA GPUs, bfloat16) with the packed-document mask."""
  return fused(q_BLHE, k_BSKE, v_BSKE, mask, scale=scale, bias_BHLS=bias_BHLS, implementation="cudnn")

