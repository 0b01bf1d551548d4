"""Transformer++'s conversion hooks to and from Hugging Face Llama names: a numpy forward pass written from
HF's layout ([out, in] Linear weights, rotate_half RoPE, repeated KV heads) over the exported tensors
equals our model, and the import gives the parameters back exactly."""

import jax
import numpy as np
import pytest

from MaxText import models
from MaxText.errors import ConfigError
from MaxText.models import conversion
from MaxText.training import train_state


def hf_llama_logits(t: dict, hf: dict, tokens: np.ndarray) -> np.ndarray:
  """float64 logits of one sequence, from HF-named tensors and an HF config dict."""
  D, H, K = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
  E, N, eps = hf["head_dim"], hf["num_hidden_layers"], hf["rms_norm_eps"]
  L = len(tokens)
  w = {k: np.asarray(v, np.float64) for k, v in t.items()}

  def rms(x, g):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

  inv_freq = 1.0 / hf["rope_theta"] ** (np.arange(0, E, 2) / E)
  angle = np.arange(L)[:, None] * inv_freq[None]
  cos, sin = np.cos(np.concatenate([angle, angle], -1)), np.sin(np.concatenate([angle, angle], -1))

  def rotate(x):  # [L, heads, E], rotate_half
    half = np.concatenate([-x[..., E // 2:], x[..., : E // 2]], -1)
    return x * cos[:, None] + half * sin[:, None]

  x = w["model.embed_tokens.weight"][tokens]
  causal = np.tril(np.ones((L, L), bool))
  for i in range(N):
    p = f"model.layers.{i}."
    h = rms(x, w[p + "input_layernorm.weight"])
    q = rotate((h @ w[p + "self_attn.q_proj.weight"].T).reshape(L, H, E))
    k = rotate((h @ w[p + "self_attn.k_proj.weight"].T).reshape(L, K, E))
    v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(L, K, E)
    k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
    s = np.einsum("lhe,mhe->hlm", q, k) / np.sqrt(E)
    s = np.where(causal, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("hlm,mhe->lhe", a, v).reshape(L, H * E)
    x = x + o @ w[p + "self_attn.o_proj.weight"].T
    h = rms(x, w[p + "post_attention_layernorm.weight"])
    gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
  x = rms(x, w["model.norm.weight"])
  head = w["model.embed_tokens.weight"] if hf["tie_word_embeddings"] else w["lm_head.weight"]
  return x @ head.T


@pytest.mark.parametrize("overrides", [
    {"base_num_kv_heads": 2, "rope_max_timescale": 500000, "normalization_layer_epsilon": 1e-5},
    {"logits_via_embedding": True, "base_num_kv_heads": 1, "head_dim": 16},
])
def test_export_matches_an_hf_layout_forward_and_imports_back_exactly(make_config, overrides):
  config = make_config(**overrides)
  family = models.get_family(config.decoder_block)
  spec = train_state.model_spec(config)
  params = jax.tree.map(np.asarray, train_state.init_params(config, spec))
  hf = family.hf_config(config)
  tensors = dict(family.to_hf(config, params))
  assert ("lm_head.weight" in tensors) != config.logits_via_embedding
  assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (config.base_num_kv_heads * config.head_dim,
                                                                     config.base_emb_dim)

  tokens = np.arange(3, 3 + config.max_target_length) % config.vocab_size
  ones = np.ones((1, len(tokens)), np.int32)
  ours, _ = train_state.bind(spec, params)(tokens[None].astype(np.int32), np.arange(len(tokens))[None], ones)
  np.testing.assert_allclose(ours[0], hf_llama_logits(tensors, hf, tokens), atol=2e-5, rtol=1e-4)

  back = conversion.tree(family.from_hf(config, tensors))
  jax.tree.map(np.testing.assert_array_equal, back, params)
  keys = family.config_from_hf(hf)
  assert all(getattr(config, k) == (tuple(v) if isinstance(v, list) else v) for k, v in keys.items()), keys


def test_an_hf_setting_the_model_cannot_express_is_a_one_line_error(make_config):
  family = models.get_family("llama2")
  hf = family.hf_config(make_config())
  for key, value in (("attention_bias", True), ("hidden_act", "gelu"), ("model_type", "gpt2")):
    with pytest.raises(ConfigError, match=f"HF config key '{key}'"):
      family.config_from_hf({**hf, key: value})
  with pytest.raises(ConfigError, match="the checkpoint has no tensor 'model.norm.weight'"):
    config = make_config()
    tensors = dict(family.to_hf(config, train_state.init_params(config, train_state.model_spec(config))))
    del tensors["model.norm.weight"]
    dict(family.from_hf(config, tensors))
  with pytest.raises(ConfigError, match="cannot convert Hugging Face checkpoints"):
    models.get_family("transformer_vq").config_from_hf(hf)
