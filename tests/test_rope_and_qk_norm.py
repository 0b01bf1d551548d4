"""The model keys behind checkpoint conversion, each on its own: RoPE scaling of type llama3, the bf16-rounded
RoPE table, qk_rmsnorm, and the MUDDFormer release's MUDD keys (exact GELU, one layer-0 norm, FFN widths
without the total check, unrounded generator widths, the MUDDFormer2B8 preset)."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from MaxText import startup
from MaxText.errors import ConfigError
from MaxText.models import layers, mudd_dense
from MaxText.training import train_state
from tests import reference_llama
from tests.conftest import BASE
from tests.test_llama import init, packed_inputs


def llama3_inv_freq_float64(base, E, factor, low, high, original):
  """Llama 3.1's frequencies from its definition, in float64 (an independent spelling of the rule)."""
  out = []
  for k in range(E // 2):
    f = base ** (-2.0 * k / E)
    wavelength = 2 * math.pi / f
    if wavelength < original / high:
      out.append(f)
    elif wavelength > original / low:
      out.append(f / factor)
    else:
      s = (original / wavelength - low) / (high - low)
      out.append((1 - s) * f / factor + s * f)
  return np.array(out)


def test_llama3_frequencies_follow_the_rule_and_equal_transformers(make_config):
  config = make_config(rope_type="llama3", rope_max_timescale=500000, head_dim=64, base_emb_dim=256,
                       rope_scaling_factor=32.0, rope_original_max_position=8192)
  got = layers.rope_frequencies(config, 64)
  want = llama3_inv_freq_float64(500000, 64, 32.0, 1.0, 4.0, 8192)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  bands = [(2 * math.pi / f < 8192 / 4) for f in want], [(2 * math.pi / f > 8192) for f in want]
  assert any(bands[0]) and any(bands[1]) and not all(a or b for a, b in zip(*bands)), "all three bands occur"

  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, rope_theta=500000.0,
                                max_position_embeddings=131072,
                                rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=8192))
  hf_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
  np.testing.assert_allclose(got, hf_freq.numpy(), rtol=3e-7)  # float32 pow of numpy and torch: an ulp apart


def test_llama3_model_equals_the_reference_with_its_frequencies(make_config, monkeypatch):
  config = make_config(rope_type="llama3", rope_max_timescale=500000, rope_original_max_position=8)
  spec, params = init(config)
  tokens, positions, segment_ids = packed_inputs(config)
  got, _ = train_state.bind(spec, params)(tokens, positions, segment_ids)
  E = config.head_dim
  inv = llama3_inv_freq_float64(500000, E, 8.0, 1.0, 4.0, 8)

  def rope_scaled(x, positions, base):  # the reference's complex rotation, by the scaled frequencies
    z = (x[..., : E // 2] + 1j * x[..., E // 2:]) * jnp.exp(
        1j * positions[..., None].astype(jnp.float32) * jnp.asarray(inv, jnp.float32))[:, :, None, :]
    return jnp.concatenate([z.real, z.imag], axis=-1).astype(jnp.float32)

  monkeypatch.setattr(reference_llama, "rope_complex", rope_scaled)
  want = reference_llama.logits(params, config, tokens, positions, segment_ids)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  plain = make_config(rope_max_timescale=500000)
  unscaled, _ = train_state.bind(train_state.model_spec(plain), params)(tokens, positions, segment_ids)
  assert float(jnp.max(jnp.abs(unscaled - got))) > 1e-4, "the scaling changes the logits"


def test_bfloat16_rope_table_rounds_cos_and_sin():
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
  positions = jnp.arange(5)[None] * 37
  inv = layers.rope_base_frequencies(10000, 8)
  got = layers.rope(x, positions, 10000, inv_freq=inv, table_dtype=jnp.bfloat16)
  angle = np.float32(positions[0, :, None]) * inv
  cos = np.cos(angle).astype(ml_dtypes.bfloat16).astype(np.float32)[None, :, None]
  sin = np.sin(angle).astype(ml_dtypes.bfloat16).astype(np.float32)[None, :, None]
  a, b = np.asarray(x[..., :4]), np.asarray(x[..., 4:])
  want = np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)
  np.testing.assert_allclose(got, want, atol=1e-6)
  exact = layers.rope(x, positions, 10000, inv_freq=inv)
  assert float(jnp.max(jnp.abs(exact - got))) > 1e-4


def test_qk_rmsnorm_has_one_gain_per_head_dim_and_normalises_each_head(make_config):
  config = make_config(qk_rmsnorm=True, normalization_layer_epsilon=1e-12)
  spec, params = init(config)
  attention = spec.shapes["layers"]["attention"]
  E = config.head_dim
  assert attention["q_norm"]["scale"].shape == (config.base_num_decoder_layers, E)
  assert attention["k_norm"]["scale"].shape == (config.base_num_decoder_layers, E)
  tokens, positions, segment_ids = packed_inputs(config)
  model = lambda p: train_state.bind(spec, p)(tokens, positions, segment_ids)[0]
  base = model(params)
  # Normalised per head, queries and keys forget any scale of their projections.
  scaled = jax.tree.map(lambda x: x, params)
  scaled["layers"]["attention"]["wq"] = params["layers"]["attention"]["wq"] * 7.0
  scaled["layers"]["attention"]["wk"] = params["layers"]["attention"]["wk"] * 0.25
  np.testing.assert_allclose(model(scaled), base, atol=1e-5, rtol=1e-5)
  # The gains multiply the normalised queries (doubling the q gain doubles every attention score).
  doubled = jax.tree.map(lambda x: x, params)
  doubled["layers"]["attention"]["q_norm"]["scale"] = params["layers"]["attention"]["q_norm"]["scale"] * 2.0
  assert float(jnp.max(jnp.abs(model(doubled) - base))) > 1e-5


def test_shared_keys_belong_to_llama2_and_mudd_only(make_config):
  make_config(decoder_block="mudd", qk_rmsnorm=True, rope_type="llama3")
  for key, value in (("qk_rmsnorm", True), ("rope_type", "llama3"), ("rope_table_dtype", "bfloat16")):
    with pytest.raises(ConfigError, match=f"config key '{key}'.*applies to decoder_block"):
      make_config(decoder_block="gpt", **{key: value})
  with pytest.raises(ConfigError, match="rope_type"):
    make_config(rope_type="yarn")
  with pytest.raises(ConfigError, match="rope_low_freq_factor"):
    make_config(rope_type="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=1.0)


MUDD = dict(decoder_block="mudd", base_num_decoder_layers=4, base_num_kv_heads=4, base_emb_dim=64)


def test_release_mlp_widths_need_no_total_and_generator_widths_may_stay_unrounded(make_config):
  with pytest.raises(ConfigError, match="gives a total of"):
    make_config(**MUDD, mlp_dim_scale_with_depth=True, base_mlp_dim=344)
  config = make_config(**MUDD, mlp_dim_scale_with_depth=True, base_mlp_dim=344, mlp_dim_scale_exact_total=False)
  assert mudd_dense.mlp_widths(config) == [128, 256, 384, 512]  # the release's widths for F=344, 4 layers
  with pytest.raises(ConfigError, match="a width of 0"):
    make_config(**MUDD, mlp_dim_scale_with_depth=True, base_mlp_dim=128, mlp_dim_scale_exact_total=False)
  rounded = [mudd_dense.generator_width(config, i) for i in range(4)]
  plain = make_config(**MUDD, mudd_generator_round64=False, mudd_last_layer_hidden_expand=4)
  assert rounded == [64, 64, 64, 64]
  assert [mudd_dense.generator_width(plain, i) for i in range(4)] == [8, 12, 16, 20]
  spec = train_state.model_spec(plain)
  assert spec.shapes["layer_3"]["dense"]["w1"].shape == (64, 20)


def test_layer0_shared_norm_and_exact_gelu(make_config):
  config = make_config(**MUDD, mudd_layer0_shared_norm=True, mudd_generator_activation="gelu_exact")
  spec, params = init(config)
  assert "pre_attention_norm" in spec.shapes["layer_0"] and "pre_query_norm" not in spec.shapes["layer_0"]
  assert "pre_query_norm" in spec.shapes["layer_1"]
  # Layer 0's three inputs are all the embedding: one norm whose gain is each of the three gives the same logits.
  separate = make_config(**MUDD, mudd_generator_activation="gelu_exact")
  spec3 = train_state.model_spec(separate)
  params3 = {**params, "layer_0": {k: v for k, v in params["layer_0"].items() if k != "pre_attention_norm"}}
  for name in ("pre_query_norm", "pre_key_norm", "pre_value_norm"):
    params3["layer_0"][name] = params["layer_0"]["pre_attention_norm"]
  tokens, positions, segment_ids = packed_inputs(config)
  # Generator weights away from zero, so the activation matters.
  for i in range(4):
    params[f"layer_{i}"]["dense"]["w2"] = jax.random.normal(jax.random.key(i), params[f"layer_{i}"]["dense"]["w2"].shape)
    params3[f"layer_{i}"]["dense"]["w2"] = params[f"layer_{i}"]["dense"]["w2"]
  one, aux = train_state.bind(spec, params)(tokens, positions, segment_ids)
  three, _ = train_state.bind(spec3, params3)(tokens, positions, segment_ids)
  np.testing.assert_allclose(one, three, atol=1e-6)
  tanh_config = make_config(**MUDD, mudd_layer0_shared_norm=True)
  tanh, aux_tanh = train_state.bind(train_state.model_spec(tanh_config), params)(tokens, positions, segment_ids)
  assert float(jnp.max(jnp.abs(aux["dense_weights"][0] - aux_tanh["dense_weights"][0]))) > 1e-6
  with pytest.raises(ConfigError, match="mudd_generator_activation"):
    make_config(**MUDD, mudd_generator_activation="gelu_erf")


def test_muddformer_2b8_preset_has_the_releases_shapes():
  config = startup.load_config([None, BASE], env={}, model_name="MUDDFormer2B8", num_devices=1)
  spec = train_state.model_spec(config)
  assert spec.num_params == 2_804_871_709  # the release's 513 tensors, counted from its shapes
  widths = mudd_dense.mlp_widths(config)
  assert widths[0] == 3456 and widths[-1] == 10368 and sum(widths) == 32 * 6912
  assert [mudd_dense.generator_width(config, i) for i in (0, 13, 14, 29, 30, 31)] == [64, 64, 128, 128, 192, 192]
  assert spec.shapes["layer_0"]["attention"]["q_norm"]["scale"].shape == (80,)
  assert "pre_attention_norm" in spec.shapes["layer_0"] and "pre_value_norm" in spec.shapes["layer_31"]
