"""Transformer++ <-> Hugging Face `LlamaForCausalLM`: config keys and tensor names.

Both config.json forms are read: transformers 4's `rope_theta` + `rope_scaling` and transformers 5's
`rope_parameters`; RoPE scaling of type llama3 maps to rope_type llama3 (layers.rope_llama3).
HF stores every projection as a torch Linear weight [out, in] and applies RoPE to the two halves of each
head (rotate_half), the layout `layers.rope` uses, so the maps are transposes and reshapes only:
  q_proj [H*E, D] <-> wq [D, H, E]      k_proj, v_proj [K*E, D] <-> wk, wv [D, K, E]
  o_proj [D, H*E] <-> wo [H, E, D]      gate_proj, up_proj [F, D] = wi_0, wi_1      down_proj [D, F] = wo
An HF setting this model cannot express is a one-line ConfigError naming the HF key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from MaxText.errors import ConfigError
from MaxText.models import conversion
from MaxText.models.conversion import Rule

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"
# HF rope_scaling fields of rope_type llama3 -> our keys.
LLAMA3_KEYS = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
               "high_freq_factor": "rope_high_freq_factor",
               "original_max_position_embeddings": "rope_original_max_position"}


def rope_keys(hf: Mapping[str, Any], unsupported) -> dict[str, Any]:
  """Our RoPE keys from either form of an HF config: `rope_theta` + `rope_scaling` (transformers 4), or
  `rope_parameters` holding both (transformers 5)."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {}) or params
  key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  out = {"rope_max_timescale": _whole(theta, "rope_theta")}
  kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
  if kind == "default":
    out["rope_type"] = "default"
  elif kind == "llama3":
    missing = [k for k in LLAMA3_KEYS if k not in scaling]
    if missing:
      raise unsupported(key, f"rope_type llama3 needs {', '.join(missing)}")
    out["rope_type"] = "llama3"
    for theirs, ours in LLAMA3_KEYS.items():
      out[ours] = int(scaling[theirs]) if ours == "rope_original_max_position" else float(scaling[theirs])
  else:
    raise unsupported(key, f"rope_type {kind!r} is not supported (default and llama3 are)")
  if float(scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
    raise unsupported("partial_rotary_factor", "RoPE rotates the whole head")
  return out


def hf_rope(config) -> dict[str, Any]:
  """config.json's RoPE entries of a config, in the transformers 4 form (transformers 5 reads it too)."""
  scaling = None
  if config.rope_type == "llama3":
    scaling = {"rope_type": "llama3", **{theirs: getattr(config, ours) for theirs, ours in LLAMA3_KEYS.items()}}
  elif config.rope_type != "default":
    raise ConfigError(f"config key 'rope_type'={config.rope_type!r} has no Hugging Face form")
  return {"rope_theta": float(config.rope_max_timescale), "rope_scaling": scaling}


def config_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Our model keys for an HF Llama config.json."""

  def unsupported(key, why):
    return ConfigError(f"HF config key {key!r}={hf.get(key)!r} cannot be expressed by decoder_block llama2: {why}")

  if hf.get("model_type", "llama") != "llama":
    raise unsupported("model_type", "only Llama checkpoints convert to llama2")
  if hf.get("hidden_act", "silu") != "silu":
    raise unsupported("hidden_act", "the MLP is SwiGLU (silu)")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key, False):
      raise unsupported(key, "Transformer++ has no biases")
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
    if key not in hf:
      raise ConfigError(f"HF config has no {key!r}")
  heads = int(hf["num_attention_heads"])
  return {
      "decoder_block": "llama2",
      "base_emb_dim": int(hf["hidden_size"]),
      "base_mlp_dim": int(hf["intermediate_size"]),
      "base_num_decoder_layers": int(hf["num_hidden_layers"]),
      "base_num_query_heads": heads,
      "base_num_kv_heads": int(hf.get("num_key_value_heads") or heads),
      "head_dim": int(hf.get("head_dim") or hf["hidden_size"] // heads),
      "vocab_size": int(hf["vocab_size"]),
      "normalization_layer_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
      **rope_keys(hf, unsupported),
      "logits_via_embedding": bool(hf.get("tie_word_embeddings", False)),
      "mlp_activations": ["silu", "linear"],
  }


def _whole(value, key: str) -> int:
  if float(value) != int(float(value)):
    raise ConfigError(f"HF config key {key!r}={value!r} must be a whole number here")
  return int(float(value))


def hf_config(config) -> dict[str, Any]:
  """The HF config.json of a llama2 config; a setting HF Llama cannot express is a ConfigError."""

  def unsupported(key, why):
    return ConfigError(f"config key {key!r}={getattr(config, key)!r} has no Hugging Face Llama form: {why}")

  if tuple(config.mlp_activations) != ("silu", "linear"):
    raise unsupported("mlp_activations", "HF Llama's MLP is silu(gate) * up")
  if config.parametrization != "sp" or config.output_logits_multiplier != 1.0:
    raise unsupported("parametrization", "HF Llama has no attention or output multipliers")
  if not config.use_norm_gains:
    raise unsupported("use_norm_gains", "HF Llama's norms have gains")
  if config.qk_rmsnorm:
    raise unsupported("qk_rmsnorm", "HF Llama has no query/key norm")
  if config.rope_table_dtype != "float32":
    raise unsupported("rope_table_dtype", "HF Llama computes cos/sin in float32")
  return {
      "architectures": [ARCHITECTURE],
      "model_type": "llama",
      "hidden_size": config.base_emb_dim,
      "intermediate_size": config.base_mlp_dim,
      "num_hidden_layers": config.base_num_decoder_layers,
      "num_attention_heads": config.base_num_query_heads,
      "num_key_value_heads": config.base_num_kv_heads,
      "head_dim": config.head_dim,
      "vocab_size": config.vocab_size,
      "rms_norm_eps": config.normalization_layer_epsilon,
      **hf_rope(config),
      "tie_word_embeddings": config.logits_via_embedding,
      "hidden_act": "silu",
      "attention_bias": False,
      "mlp_bias": False,
      # Informational for Llama (its RoPE needs no maximum); with llama3 scaling, the context it scales to.
      "max_position_embeddings": max(config.max_target_length, int(config.rope_original_max_position
                                                                     * config.rope_scaling_factor)
                                     if config.rope_type == "llama3" else 0),
      "initializer_range": config.init_weights_std,
      "torch_dtype": config.weight_dtype,
      "dtype": config.weight_dtype,
  }


def rules(config) -> list[Rule]:
  D, H, K, E = config.base_emb_dim, config.base_num_query_heads, config.base_num_kv_heads, config.head_dim

  def heads_in(n):  # [n*E, D] -> [D, n, E]
    return lambda w: w.T.reshape(D, n, E)

  def heads_out(n):  # [D, n, E] -> [n*E, D]
    return lambda w: w.reshape(D, n * E).T

  layer = "model.layers.{i}."
  table = [
      Rule("embed/embedding", "model.embed_tokens.weight"),
      Rule("layers/pre_attention_norm/scale", layer + "input_layernorm.weight"),
      Rule("layers/attention/wq", layer + "self_attn.q_proj.weight", heads_in(H), heads_out(H)),
      Rule("layers/attention/wk", layer + "self_attn.k_proj.weight", heads_in(K), heads_out(K)),
      Rule("layers/attention/wv", layer + "self_attn.v_proj.weight", heads_in(K), heads_out(K)),
      Rule("layers/attention/wo", layer + "self_attn.o_proj.weight",
           lambda w: w.T.reshape(H, E, D), lambda w: w.reshape(H * E, D).T),
      Rule("layers/pre_mlp_norm/scale", layer + "post_attention_layernorm.weight"),
      Rule("layers/mlp/wi_0", layer + "mlp.gate_proj.weight"),
      Rule("layers/mlp/wi_1", layer + "mlp.up_proj.weight"),
      Rule("layers/mlp/wo", layer + "mlp.down_proj.weight"),
      Rule("final_norm/scale", "model.norm.weight"),
  ]
  if not config.logits_via_embedding:
    table.append(Rule("unembed", "lm_head.weight"))
  return table


def from_hf(config, tensors: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
  return conversion.read(rules(config), tensors, config.base_num_decoder_layers)


def to_hf(config, params) -> Iterator[tuple[str, np.ndarray]]:
  hf_config(config)  # refuses what HF cannot express before any tensor is written
  return conversion.write(rules(config), params, config.base_num_decoder_layers)
