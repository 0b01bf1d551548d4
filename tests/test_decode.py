"""Decoding for every family: cached logits equal the full forward, generation with and without the cache,
sampling, EOS, no recompiles, and the decode / eval command lines on a trained run."""

import os
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from MaxText import decode, startup
from MaxText import eval as eval_cli
from MaxText.config import loader
from MaxText.errors import ConfigError
from MaxText.inference import sampling
from MaxText.training import train_state
from tests.checks import fast_init

BASE = str(loader.BASE_CONFIG)
# Generic shrinking that any family accepts: a small vocabulary, length and depth, float32 for exact
# comparisons, and weights large enough that the 1e-5 tolerance is small next to the logits.
SHRINK = dict(vocab_size=128, max_target_length=32, base_num_decoder_layers=2, dtype="float32",
              weight_dtype="float32", init_weights_std=0.05, num_devices=1, per_device_batch_size=1.0,
              dataset_type="synthetic", enable_checkpointing=False, enable_tensorboard=False,
              max_prefill_predict_length=8, max_decode_length=12)
GPT_ALL_FLAGS = dict(alibi=True, parallel_residual=True, static_sgu=True, sgu_band_width=5, head_qk=True,
                     head_qk_dim=32, qk_norm=True, base_num_decoder_layers=1)  # depth is tested by plain GPTTiny


def decode_cases():
  """Every preset named *Tiny when the tests are collected (so families are covered as they land; muP
  through MuTransformerTiny), plus GPT with all its extras."""
  cases = [pytest.param((name, {}), id=name) for name in loader.preset_names() if name.endswith("Tiny")]
  cases.append(pytest.param(("GPTTiny", GPT_ALL_FLAGS), id="GPTTiny-all-flags"))
  return cases


def tiny(tmp_path, name, **overrides):
  values = {**SHRINK, "base_output_directory": str(tmp_path / "runs"), **overrides}
  return startup.load_config([None, BASE, f"model_name={name}"], env={}, **values)


def init(config):
  spec = train_state.model_spec(config)
  params = fast_init(config, spec)
  if "head_q" in params:  # zero at init, which would hide head-QK from the comparison
    params["head_q"] = 0.3 * jax.random.normal(jax.random.key(7), params["head_q"].shape)
  return spec, params


@pytest.fixture(scope="module", params=decode_cases())
def family(request, tmp_path_factory):
  """(config, params, generator, full) for one case, shared by its tests so each compiles once:
  `generator` a greedy batch-2 Generator, `full(params, tokens, segments)` the jitted forward over the
  whole [2, prefill + decode length] buffer."""
  name, overrides = request.param
  config = tiny(tmp_path_factory.mktemp("runs"), name, decode_sampling_strategy="greedy", **overrides)
  spec, params = init(config)
  T = config.max_prefill_predict_length + config.max_decode_length
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
  full = jax.jit(lambda p, tokens, segments: train_state.bind(spec, p)(tokens, positions, segments)[0])
  return config, params, decode.Generator(config, spec, batch=2), full


PROMPTS = [[2, 17, 33, 4, 90, 5, 71, 8], [2, 61, 9]]  # a full prefill and a padded one


def step_by_step(generator, params):
  """Greedy decoding one jitted step at a time: (final state, the logits each new token was drawn from)."""
  state = generator.prefill(params, PROMPTS, eos_id=-1)
  logits, structure = [state["logits"]], jax.tree.map(lambda x: (x.shape, x.dtype), state)
  for _ in range(generator.decode_length - 1):
    state = generator.step(params, state)
    logits.append(state["logits"])
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == structure, "the cache must keep its shapes and dtypes"
  return state, np.stack(logits, axis=1)  # [B, decode length, V]


def test_cached_decode_logits_equal_the_full_forward_at_every_position(family):
  """A right-padded prefill of prompts of different lengths, then one token per step, each row at its own
  positions: the logits of every new position equal those of one forward pass over the final sequence."""
  config, params, generator, full = family
  state, cached = step_by_step(generator, params)
  tokens, lengths = np.asarray(state["tokens"]), np.asarray(state["lengths"])
  assert list(lengths) == [len(p) + config.max_decode_length for p in PROMPTS]
  want = np.asarray(full(params, tokens, (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int32)))
  for row, prompt in enumerate(PROMPTS):
    positions = np.arange(len(prompt) - 1, lengths[row] - 1)  # the last prompt token's, then each new token's
    np.testing.assert_allclose(cached[row], want[row, positions], atol=1e-5, rtol=1e-5, err_msg=f"row {row}")


def test_greedy_generation_is_identical_with_and_without_the_cache(family):
  config, params, generator, full = family
  state, _ = step_by_step(generator, params)  # the while_loop runs the same step (GPTTiny tests below)
  tokens, lengths = np.asarray(state["tokens"]), np.asarray(state["lengths"])
  cached = [[int(t) for t in tokens[row, len(prompt):lengths[row]]] for row, prompt in enumerate(PROMPTS)]
  # Without a cache: a full forward over the whole buffer for every new token, the argmax at each row's end.
  T = config.max_prefill_predict_length + config.max_decode_length
  tokens, lengths = np.zeros((2, T), np.int32), np.array([len(p) for p in PROMPTS])
  for row, prompt in enumerate(PROMPTS):
    tokens[row, :len(prompt)] = prompt
  for _ in range(config.max_decode_length):
    logits = np.asarray(full(params, tokens, (np.arange(T)[None] < lengths[:, None]).astype(np.int32)))
    tokens[[0, 1], lengths] = logits[[0, 1], lengths - 1].argmax(-1)
    lengths += 1
  uncached = [[int(t) for t in tokens[row, len(prompt):lengths[row]]] for row, prompt in enumerate(PROMPTS)]
  assert cached == uncached
  assert [len(row) for row in cached] == [config.max_decode_length] * 2


@pytest.fixture(scope="module")
def gpt_generator(tmp_path_factory):
  config = tiny(tmp_path_factory.mktemp("runs"), "GPTTiny", decode_sampling_top_k=20,
                decode_sampling_nucleus_p=0.95, init_weights_std=0.3)
  spec, params = init(config)
  return decode.Generator(config, spec, batch=2), params


@pytest.mark.parametrize("strategy", ["weighted", "topk", "nucleus"])
def test_sampling_is_reproducible_with_a_seed(gpt_generator, strategy):
  generator, params = gpt_generator
  prompts = [[2, 5, 6], [2, 7, 8, 9]]
  first = generator(params, prompts, seed=1, eos_id=-1, strategy=strategy, temperature=2.0)
  assert generator(params, prompts, seed=1, eos_id=-1, strategy=strategy, temperature=2.0) == first
  assert generator(params, prompts, seed=2, eos_id=-1, strategy=strategy, temperature=2.0) != first


def test_generation_compiles_once_for_any_prompts_seed_and_sampling(gpt_generator):
  generator, params = gpt_generator
  for prompts in ([[2, 3], [2, 4, 5, 6, 7, 8, 9, 10]], [[2], [2, 9]], [[2, 4, 4, 4], [2, 5, 5]]):
    for strategy in ("greedy", "nucleus"):
      generator(params, prompts, eos_id=-1, seed=len(prompts[0]), strategy=strategy, temperature=0.7)
  # The token loop traces the decode step once, inside the while_loop.
  assert generator.traces == {"prefill": 1, "loop": 1, "step": 1}
  with pytest.raises(ConfigError, match="max_prefill_predict_length=8"):
    generator(params, [[2] * 9, [2]])


def test_generation_stops_at_eos_for_each_row(gpt_generator):
  generator, params = gpt_generator
  prompts = [[2, 11, 12, 13], [2, 40]]
  free = generator(params, prompts, eos_id=-1, strategy="greedy")
  eos = free[0][3]
  stopped = generator(params, prompts, eos_id=eos, strategy="greedy")
  for row in range(2):
    want = free[row][:free[row].index(eos)] if eos in free[row] else free[row]
    assert stopped[row] == want
  state = generator.finish(params, generator.prefill(params, [prompts[0]] * 2, eos_id=eos, strategy="greedy"))
  assert int(state["step"]) == free[0].index(eos) + 1, "the loop ends once every row has produced EOS"


def test_sampling_strategies_keep_to_their_candidates():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 1000))
  keys = jax.random.split(jax.random.key(0), 4)
  draw = jax.jit(lambda key, strategy, temperature, top_k, p: sampling.sample(
      logits, key, strategy, temperature=temperature, top_k=top_k, nucleus_p=p))

  def drawn(strategy, temperature=1.0, top_k=4, p=1.0):
    index = sampling.index(strategy)
    return np.concatenate([np.asarray(draw(key, index, temperature, top_k, p)) for key in keys])

  assert set(drawn("greedy")) == {0}
  assert set(drawn("topk", top_k=2)) == {0, 1}
  assert set(drawn("nucleus", p=0.7)) == {0, 1}  # 0.5 < 0.7, and 0.5 + 0.3 reaches it
  assert set(drawn("nucleus", p=0.85)) == {0, 1, 2}
  assert set(drawn("nucleus", p=0.1)) == {0}
  assert set(drawn("weighted", temperature=1e-3)) == {0}
  counts = np.bincount(drawn("weighted"), minlength=4)
  np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.3, 0.15, 0.05], atol=0.02)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A GPT run as training leaves it: config.yml and a checkpoint at step 2 (of freshly initialised
  parameters, since what is decoded does not matter here), over a tokenizer and splits prepared from a
  few standard-library modules."""

  from MaxText.checkpoint import checkpointing  # noqa: PLC0415
  from MaxText.input_pipeline import preparation  # noqa: PLC0415
  from MaxText.training import optimizers  # noqa: PLC0415

  source = tmp_path_factory.mktemp("text")
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  for name in ("textwrap", "string", "heapq", "bisect", "fnmatch", "colorsys"):
    (source / f"{name}.txt").write_text((stdlib / f"{name}.py").read_text())
  data = tmp_path_factory.mktemp("corpus") / "data"
  preparation.prepare(str(source), str(data), vocab_size=512, validation_fraction=0.2, test_fraction=0.2,
                       num_shards=1, extensions=(".txt",), progress=False)
  config = startup.load_config(
      [None, BASE, "model_name=GPTTiny"], env={}, base_output_directory=str(tmp_path_factory.mktemp("runs")),
      run_name="r", dataset_path=str(data), vocab_size=576, base_emb_dim=32, base_mlp_dim=64,
      max_target_length=32, per_device_batch_size=1.0, num_devices=1, alibi=True, head_qk=True, head_qk_dim=16)
  spec = train_state.model_spec(config)
  tx, _ = optimizers.create(config, spec.roles)
  params = fast_init(config, spec)
  state = {"step": jnp.int32(2), "params": params, "opt_state": tx.init(params)}
  checkpointer = checkpointing.Checkpointer.from_config(config)
  checkpointer.save(2, state, {}, force=True)
  checkpointer.close()
  Path(config.run_dir, "config.yml").write_text(config.to_yaml())
  return config


def test_decode_cli_continues_the_prompt_of_a_trained_run(trained_run, capsys):
  c = trained_run
  argv = ["decode.py", BASE, f"base_output_directory={c.base_output_directory}", "run_name=r",
          "prompt=def f(x):", "max_decode_length=32", "decode_sampling_strategy=weighted"]
  # The model's 576 ids exceed the tokenizer's 512: sampling must keep to the tokenizer's, or decoding
  # the text fails.
  assert decode.main([*argv, "num_devices=1"]) == 0
  out, err = capsys.readouterr()
  assert "GPTTiny (gpt)" in err and "checkpoints/2" in err and "32 generated" in err
  # The run's config.yml supplied the model keys (the checkpoint would not fit the preset's), the command
  # line its own, and the machine keys are this command's.
  config = startup.load_config(argv, for_run=True)
  assert (config.base_emb_dim, config.alibi, config.head_qk, config.vocab_size) == (32, True, True, 576)
  assert config.max_decode_length == 32 and config.num_devices == len(jax.devices()) != c.num_devices
  assert decode.main([*argv[:-1], "decode_sampling_strategy=top"]) == 2
  assert "decode_sampling_strategy" in capsys.readouterr().err


def test_eval_cli_evaluates_the_run_on_the_validation_split(trained_run, capsys):
  c = trained_run
  argv = ["eval.py", BASE, f"base_output_directory={c.base_output_directory}", "run_name=r", "num_devices=1"]
  assert eval_cli.main(argv) == 0
  assert "validation split 'validation' at step 2: loss" in capsys.readouterr().out
  assert os.listdir(os.path.join(c.run_dir, "tensorboard"))
  assert eval_cli.main([*argv, "mode=train"]) == 2
  assert "'mode'" in capsys.readouterr().err
