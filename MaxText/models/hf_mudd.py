"""MUDD <-> the released PyTorch MUDDFormer (Caiyun-AI/MUDDFormer, `modeling_muddformer.py`, model_type
"muddformer"; MUDDFormer-2.8B): config keys and tensor names (docs/checkpoints.md has the table).

The release is expressible exactly by MUDD keys: streams q,k,v,r without pre/post norms, exact-erf GELU in
the weight generator, qk-norm (RMSNorm over head_dim, one [head_dim] gain), one pre-attention norm at layer 0,
FFN widths scaled with depth as rounded (no total check), generator widths (n // 64 + 1) * 64 (`round64`)
with the last layer's x4 (`expand_last`), a bf16-rounded RoPE table, untied output. Its plain variant
(`dense: false` or `dense_type: "l"`, a fused `wqkv`) is `mudd_streams: ""`.

Layouts (torch Linear weights are [out, in]; ours are per layer, `layer_<i>/...`):
  layers.i.attention.wq [H*E, D] <-> attention/wq [D, H, E]      (wk, wv with K; or one fused wqkv, read only)
  layers.i.attention.wo [D, H*E] <-> attention/wo [H, E, D]
  dynamic_dense.i.w1 [M, D] <-> dense/w1 [D, M]      dynamic_dense.i.w2 [C*J, M] <-> dense/w2 [M, C, J]
  dense_bs.i [C, J] = dense/bias                      feed_forward.w1, w3, w2 = mlp/wi_0, wi_1, wo
The release's RoPE writes its rotated halves interleaved, a permutation shared by queries and keys that
leaves every score unchanged, so no weight is permuted.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from MaxText.errors import ConfigError
from MaxText.models import conversion, mudd_dense
from MaxText.models.conversion import Rule

MODEL_TYPE = "muddformer"
ARCHITECTURE = "MUDDFormer"
RELEASE_STREAMS = "q,k,v,r"
PLAIN_STREAMS = ""


def _find_multiple(n: int, k: int) -> int:
  return n if n % k == 0 else n + k - n % k


def config_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Our model keys for a release config.json (its class defaults where a key is absent)."""

  def unsupported(key, why):
    return ConfigError(f"HF config key {key!r}={hf.get(key)!r} cannot be expressed by decoder_block mudd: {why}")

  model_type = hf.get("model_type", MODEL_TYPE)
  if model_type != MODEL_TYPE:
    why = ("MUDDPythia (LayerNorm, biases, parallel residual, partial RoPE) is not a MUDD model"
           if model_type == "muddpythia" else "only the MUDDFormer release (model_type muddformer) converts to mudd")
    raise unsupported("model_type", why)
  for key in ("use_parallel_residual", "use_linear_bias"):
    if hf.get(key):
      raise unsupported(key, "the release's MUDDFormer has neither")
  D, H, L = int(hf.get("dim", 2560)), int(hf.get("n_head", 32)), int(hf.get("n_layer", 32))
  K = int(hf.get("n_local_heads", -1))
  K = H if K == -1 else K
  if K != H:
    raise unsupported("n_local_heads", "the release never repeats key/value heads, so it runs only with n_head")
  if D % H:
    raise unsupported("dim", f"not a multiple of n_head={H}")
  if L < 2:
    raise unsupported("n_layer", "the release scales FFN widths by i / (n_layer - 1)")
  F = hf.get("intermediate_size")
  F = _find_multiple(int(2 * (4 * D) / 3), 256) if F is None else int(F)
  dense = bool(hf.get("dense", True)) and hf.get("dense_type", "qkvr") != "l"
  if dense:
    if hf.get("dense_type", "qkvr") != "qkvr":
      raise unsupported("dense_type", "the release runs only 'qkvr' (four streams) and 'l' (plain)")
    if not hf.get("dynamic_dense", True):
      raise unsupported("dynamic_dense", "the release's static-only dense path does not run")
    if not hf.get("sepln", True):
      raise unsupported("sepln", "one norm shared by the q, k and v streams of a layer is not a MUDD setting")
  rope_base = float(hf.get("rope_base", 10000))
  if rope_base != int(rope_base):
    raise unsupported("rope_base", "must be a whole number")
  return {
      "decoder_block": "mudd",
      "base_emb_dim": D,
      "base_num_decoder_layers": L,
      "base_num_query_heads": H,
      "base_num_kv_heads": K,
      "head_dim": D // H,  # the release ignores its head_dim key
      "base_mlp_dim": F,
      "vocab_size": int(hf.get("vocab_size", 50432)),
      "normalization_layer_epsilon": float(hf.get("norm_eps", 1e-6)),
      "rope_max_timescale": int(rope_base),
      "rope_table_dtype": "bfloat16",
      "qk_rmsnorm": bool(hf.get("use_qk_norm", False)),
      "mudd_streams": RELEASE_STREAMS if dense else PLAIN_STREAMS,
      "mudd_dynamic": True,
      "mudd_prepostnorm": False,
      "mudd_generator_activation": "gelu_exact",
      "mudd_generator_round64": bool(hf.get("round64", False)),
      "mudd_last_layer_hidden_expand": 4 if hf.get("expand_last", False) else 1,
      "mudd_layer0_shared_norm": True,
      "mlp_dim_scale_with_depth": True,
      "mlp_dim_scale_exact_total": False,
      "mlp_activations": ["silu", "linear"],
      "logits_via_embedding": False,
      "scan_layers": False,
  }


def hf_config(config) -> dict[str, Any]:
  """The release's config.json of a mudd config; a setting the release cannot express is a ConfigError."""

  def unsupported(key, why):
    return ConfigError(f"config key {key!r}={getattr(config, key)!r} has no MUDDFormer-release form: {why}")

  streams = config.mudd_streams.replace(" ", "")
  if streams not in (RELEASE_STREAMS, PLAIN_STREAMS):
    raise unsupported("mudd_streams", "the release has the streams q,k,v,r or none")
  dense = streams == RELEASE_STREAMS
  checks = [
      ("mudd_prepostnorm", not config.mudd_prepostnorm, "the release has no pre/post aggregation norms"),
      ("mudd_dynamic", config.mudd_dynamic or not dense, "the release's dense weights are dynamic"),
      ("mudd_generator_activation", config.mudd_generator_activation == "gelu_exact" or not dense,
       "the release's generator uses the exact (erf) GELU"),
      ("mudd_layer0_shared_norm", config.mudd_layer0_shared_norm or not dense,
       "the release has one pre-attention norm at layer 0"),
      ("mudd_last_layer_hidden_expand", config.mudd_last_layer_hidden_expand in (1, 4), "expand_last is x4 or x1"),
      ("mlp_dim_scale_with_depth", config.mlp_dim_scale_with_depth, "the release always scales FFN widths with depth"),
      ("mlp_activations", tuple(config.mlp_activations) == ("silu", "linear"), "the release's FFN is SwiGLU"),
      ("base_num_kv_heads", config.base_num_kv_heads == config.base_num_query_heads,
       "the release never repeats key/value heads"),
      ("head_dim", config.head_dim * config.base_num_query_heads == config.base_emb_dim,
       "the release's head_dim is dim // n_head"),
      ("rope_type", config.rope_type == "default", "the release has no RoPE scaling"),
      ("rope_table_dtype", config.rope_table_dtype == "bfloat16", "the release's cos/sin table is bfloat16"),
      ("logits_via_embedding", not config.logits_via_embedding, "the release's output is untied"),
      ("use_norm_gains", config.use_norm_gains, "the release's norms have gains"),
      ("parametrization", config.parametrization == "sp" and config.output_logits_multiplier == 1.0,
       "the release has no attention or output multipliers"),
  ]
  for key, ok, why in checks:
    if not ok:
      raise unsupported(key, why)
  return {
      "architectures": [ARCHITECTURE],
      "auto_map": {"AutoConfig": "configuration_muddformer.MUDDFormerConfig",
                   "AutoModelForCausalLM": "modeling_muddformer.MUDDFormer"},
      "model_type": MODEL_TYPE,
      "block_size": config.max_target_length,
      "vocab_size": config.vocab_size,
      "n_layer": config.base_num_decoder_layers,
      "n_head": config.base_num_query_heads,
      "n_local_heads": config.base_num_kv_heads,
      "dim": config.base_emb_dim,
      "head_dim": config.head_dim,
      "intermediate_size": config.base_mlp_dim,
      "rope_base": config.rope_max_timescale,
      "norm_eps": config.normalization_layer_epsilon,
      "use_qk_norm": config.qk_rmsnorm,
      "dense": dense,
      "dynamic_dense": True,
      "dense_type": "qkvr" if dense else "l",
      "sepln": True,
      "expand_last": config.mudd_last_layer_hidden_expand == 4,
      "round64": config.mudd_generator_round64,
      "use_layer_cache": True,
      "stack_hidden": False,
      "tie_word_embeddings": False,
      "torch_dtype": config.weight_dtype,
  }


def rules(config) -> list[Rule]:
  """One rule per tensor (layers differ in shape, so every layer is spelled out)."""
  D, H, K, E = config.base_emb_dim, config.base_num_query_heads, config.base_num_kv_heads, config.head_dim
  N = config.base_num_decoder_layers

  def heads_in(n):  # [n*E, D] -> [D, n, E]
    return lambda w: w.T.reshape(D, n, E)

  def heads_out(n):  # [D, n, E] -> [n*E, D]
    return lambda w: w.reshape(D, n * E).T

  def transpose(w):
    return w.T

  table = [Rule("embed/embedding", "tok_embeddings.weight")]
  for i in range(N):
    ours, theirs = f"layer_{i}/", f"layers.{i}."
    if mudd_dense.shared_attention_input(config, i):
      table.append(Rule(ours + "pre_attention_norm/scale", theirs + "attention_norm.weight"))
    else:
      table += [Rule(ours + f"pre_{name}_norm/scale", theirs + f"attention_norms.{j}.weight")
                for j, name in enumerate(("query", "key", "value"))]
    table += [
        Rule(ours + "attention/wq", theirs + "attention.wq.weight", heads_in(H), heads_out(H)),
        Rule(ours + "attention/wk", theirs + "attention.wk.weight", heads_in(K), heads_out(K)),
        Rule(ours + "attention/wv", theirs + "attention.wv.weight", heads_in(K), heads_out(K)),
        Rule(ours + "attention/wo", theirs + "attention.wo.weight",
             lambda w: w.T.reshape(H, E, D), lambda w: w.reshape(H * E, D).T),
    ]
    if config.qk_rmsnorm:
      table += [Rule(ours + "attention/q_norm/scale", theirs + "attention.q_norm.weight"),
                Rule(ours + "attention/k_norm/scale", theirs + "attention.k_norm.weight")]
    table += [
        Rule(ours + "pre_mlp_norm/scale", theirs + "ffn_norm.weight"),
        Rule(ours + "mlp/wi_0", theirs + "feed_forward.w1.weight"),
        Rule(ours + "mlp/wi_1", theirs + "feed_forward.w3.weight"),
        Rule(ours + "mlp/wo", theirs + "feed_forward.w2.weight"),
    ]
    C, J = len(mudd_dense.layer_groups(config, i)), i + 2
    if C:
      M = mudd_dense.generator_width(config, i)
      table += [
          Rule(ours + "dense/w1", f"dynamic_dense.{i}.w1.weight", transpose, transpose),
          Rule(ours + "dense/w2", f"dynamic_dense.{i}.w2.weight",
               lambda w, C=C, J=J, M=M: w.reshape(C, J, M).transpose(2, 0, 1),
               lambda w, C=C, J=J, M=M: w.transpose(1, 2, 0).reshape(C * J, M)),
          Rule(ours + "dense/bias", f"dense_bs.{i}"),
      ]
  table += [Rule("final_norm/scale", "norm.weight"), Rule("unembed", "output.weight")]
  return table


class _Unfused(Mapping):
  """The release's tensors, with a fused `attention.wqkv` (the plain variant) also seen as wq, wk and wv."""

  def __init__(self, tensors: Mapping[str, Any], config):
    self.tensors = tensors
    E = config.head_dim
    q, kv = config.base_num_query_heads * E, config.base_num_kv_heads * E
    self.rows = {"wq": (0, q), "wk": (q, q + kv), "wv": (q + kv, q + 2 * kv)}

  def _fused(self, name: str):
    for part, (start, stop) in self.rows.items():
      suffix = f".attention.{part}.weight"
      if name.endswith(suffix):
        fused = name[: -len(suffix)] + ".attention.wqkv.weight"
        if fused in self.tensors:
          return fused, start, stop
    return None

  def __contains__(self, name) -> bool:
    return name in self.tensors or self._fused(name) is not None

  def __getitem__(self, name: str):
    if name in self.tensors:
      return self.tensors[name]
    found = self._fused(name)
    if found is None:
      raise KeyError(name)
    fused, start, stop = found
    return np.asarray(self.tensors[fused])[start:stop]

  def __iter__(self):
    return iter(self.tensors)

  def __len__(self) -> int:
    return len(self.tensors)


def from_hf(config, tensors: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
  return conversion.read(rules(config), _Unfused(tensors, config), config.base_num_decoder_layers)


def to_hf(config, params) -> Iterator[tuple[str, np.ndarray]]:
  hf_config(config)  # refuses what the release cannot express before any tensor is written
  return conversion.write(rules(config), params, config.base_num_decoder_layers)
