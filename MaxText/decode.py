r"""Generate text from a trained run: a prefill of the prompts, then one token at a time from the KV cache.

  python MaxText/decode.py MaxText/configs/base_v2.yml run_name=R prompt="def fib(n):"
  python MaxText/decode.py MaxText/configs/base_v2.yml run_name=R prompt="import " \
      decode_sampling_strategy=nucleus decode_sampling_nucleus_p=0.9 decode_sampling_temperature=0.8

The run's config.yml supplies the model, data and tokenizer keys (command-line keys still win); the
parameters come from the run's latest checkpoint, else `load_parameters_path`. The prompt and its
continuation go to stdout, a summary line to stderr. In Python:

  from MaxText.decode import generate
  continuations = generate(config, params, [[2, 17, 5], [2, 9]])  # token ids, ragged batch

Shapes are fixed, so nothing recompiles per token or per call: prompts are right-padded to
`max_prefill_predict_length`, the cache holds that plus `max_decode_length` slots, the prefill and the
decode step are jitted once per batch size, and the token loop is a `lax.while_loop` that ends when every
row has produced EOS or `max_decode_length` tokens. Each row has its own positions, so prompts of
different lengths decode side by side.
"""

from __future__ import annotations

import collections
import functools
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # `python MaxText/decode.py` puts MaxText/ itself on the path, not the repo
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from MaxText import (
  input_pipeline,
  startup,
)
from MaxText.checkpoint import checkpointing
from MaxText.errors import ConfigError
from MaxText.inference import sampling
from MaxText.input_pipeline.tokenizer import EOS_ID
from MaxText.parallel import sharding
from MaxText.training import train_state


class Generator:
  """The jitted prefill, decode step and token loop of one model and batch size.

  State (a pytree carried through the loop): tokens [B, T] (prompt then generated tokens, T = prefill +
  decode length), lengths [B] (tokens so far per row), logits [B, V] (float32, those the last token was
  drawn from), done [B] (EOS seen), step, the sampling settings (rng, eos and the decode_sampling_* values,
  all traced, so changing them does not recompile) and the cache. Every row advances one position per
  step even after its EOS, so a cache only ever sees increasing positions; the host cuts each row at its
  first EOS.
  """

  def __init__(self, config, spec=None, *, batch: int, valid_vocab: int | None = None):
    self.config, self.batch = config, batch
    self.spec = spec if spec is not None else train_state.model_spec(config)
    self.prefill_length = config.max_prefill_predict_length
    self.decode_length = config.max_decode_length
    self.total_length = self.prefill_length + self.decode_length
    self.valid_vocab = valid_vocab
    self.traces = collections.Counter()  # how often each function was traced (= compiled)
    self._prefill = jax.jit(self._prefill_fn)
    self._step = jax.jit(self._step_fn, donate_argnums=1)
    self._loop = jax.jit(self._loop_fn, donate_argnums=1)

  def _model(self, params):
    return train_state.bind(self.spec, params)

  def _next_token(self, state, logits_BV):
    """Sample every row's next token and append it at the row's length."""
    if self.valid_vocab is not None and self.valid_vocab < logits_BV.shape[-1]:
      # Padded vocabulary rows were never targets; a tokenizer could not decode them.
      logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < self.valid_vocab, logits_BV, -jnp.inf)
    s = state["sampling"]
    token_B = sampling.sample(logits_BV, jax.random.fold_in(s["rng"], state["step"]), s["strategy"],
                              temperature=s["temperature"], top_k=s["top_k"], nucleus_p=s["nucleus_p"])
    rows_B = jnp.arange(self.batch)
    tokens_BT = state["tokens"].at[rows_B, state["lengths"]].set(token_B, mode="drop")
    return {**state, "tokens": tokens_BT, "lengths": state["lengths"] + 1, "step": state["step"] + 1,
            "done": state["done"] | (token_B == s["eos"]), "logits": logits_BV.astype(jnp.float32)}

  def _prefill_fn(self, params, tokens_BT, lengths_B, sampling):
    self.traces["prefill"] += 1
    state = {"tokens": tokens_BT, "lengths": lengths_B, "done": jnp.zeros((self.batch,), bool),
             "step": jnp.zeros((), jnp.int32), "sampling": sampling}
    P = self.prefill_length
    model = self._model(params)
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (self.batch, P))
    segments_BP = (positions_BP < lengths_B[:, None]).astype(jnp.int32)  # padding is segment 0: never attended
    cache = model.init_cache(self.batch, self.total_length)
    logits_BPV, aux = model(tokens_BT[:, :P], positions_BP, segments_BP, cache=cache)
    last_BV = jnp.take_along_axis(logits_BPV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return self._next_token({**state, "cache": aux["cache"]}, last_BV)

  def _step_fn(self, params, state):
    self.traces["step"] += 1
    position_B1 = (state["lengths"] - 1)[:, None]
    token_B1 = jnp.take_along_axis(state["tokens"], position_B1, axis=1)
    logits_B1V, aux = self._model(params)(token_B1, position_B1, jnp.ones_like(token_B1), cache=state["cache"])
    return self._next_token({**state, "cache": aux["cache"]}, logits_B1V[:, 0])

  def _loop_fn(self, params, state):
    self.traces["loop"] += 1

    def running(state):
      return (state["step"] < self.decode_length) & ~jnp.all(state["done"])

    return jax.lax.while_loop(running, lambda s: self._step_fn(params, s), state)

  def sampling(self, *, seed: int | None = None, eos_id: int = EOS_ID, **settings) -> dict:
    """The traced sampling settings: the config's decode_sampling_* values unless given (strategy=...,
    temperature=..., top_k=..., nucleus_p=...)."""
    c = self.config
    values = {"strategy": c.decode_sampling_strategy, "temperature": c.decode_sampling_temperature,
              "top_k": c.decode_sampling_top_k, "nucleus_p": c.decode_sampling_nucleus_p}
    unknown = set(settings) - set(values)
    if unknown:
      raise TypeError(f"unknown sampling settings {sorted(unknown)}; known: {sorted(values)}")
    values.update(settings)
    return {"strategy": jnp.int32(sampling.index(values["strategy"])),
            "temperature": jnp.float32(values["temperature"]), "top_k": jnp.int32(values["top_k"]),
            "nucleus_p": jnp.float32(values["nucleus_p"]), "eos": jnp.int32(eos_id),
            "rng": jax.random.key(c.decode_seed if seed is None else seed)}

  def prefill(self, params, prompts: Sequence[Sequence[int]], *, seed: int | None = None, eos_id: int = EOS_ID,
              **settings):
    """The state after the prefill and the first sampled token (settings: see `sampling`)."""
    if len(prompts) != self.batch:
      raise ValueError(f"this generator decodes batches of {self.batch} prompts, got {len(prompts)}")
    tokens_BT = np.zeros((self.batch, self.total_length), np.int32)
    for row, prompt in enumerate(prompts):
      if not 0 < len(prompt) <= self.prefill_length:
        raise ConfigError(f"a prompt of {len(prompt)} tokens does not fit max_prefill_predict_length="
                          f"{self.prefill_length} (and must not be empty)")
      tokens_BT[row, :len(prompt)] = prompt
    lengths_B = np.asarray([len(p) for p in prompts], np.int32)
    return self._prefill(params, tokens_BT, lengths_B, self.sampling(seed=seed, eos_id=eos_id, **settings))

  def step(self, params, state):
    """One more token per row (the state is donated)."""
    return self._step(params, state)

  def finish(self, params, state):
    """Decode until every row has seen EOS or max_decode_length tokens were generated."""
    return self._loop(params, state)

  def __call__(self, params, prompts: Sequence[Sequence[int]], *, seed: int | None = None, eos_id: int = EOS_ID,
               **settings) -> list[list[int]]:
    """The generated tokens of each prompt, up to (not including) its first EOS."""
    state = self.finish(params, self.prefill(params, prompts, seed=seed, eos_id=eos_id, **settings))
    tokens_BT, lengths_B = jax.device_get((state["tokens"], state["lengths"]))
    out = []
    for row, prompt in enumerate(prompts):
      new = [int(t) for t in tokens_BT[row, len(prompt):lengths_B[row]]]
      out.append(new[:new.index(eos_id)] if eos_id in new else new)
    return out


@functools.lru_cache(maxsize=16)
def _generator(config, batch: int, valid_vocab: int | None) -> Generator:
  return Generator(config, batch=batch, valid_vocab=valid_vocab)


def generate(config, params, prompts: Sequence[Sequence[int]], *, seed: int | None = None, eos_id: int = EOS_ID,
             valid_vocab: int | None = None, **settings) -> list[list[int]]:
  """Continue each prompt (a list of token ids); one list of new tokens per prompt.

  Sampling follows the config's decode_sampling_* keys unless overridden (strategy=, temperature=, top_k=,
  nucleus_p=). Generators are kept per (config, batch size), so repeated calls reuse their compilation.
  """
  generator = _generator(config, len(prompts), valid_vocab)
  return generator(params, prompts, seed=seed, eos_id=eos_id, **settings)


def load_params(config, spec, mesh) -> tuple[Any, str]:
  """(parameters, where from): the run's latest checkpoint, else load_parameters_path; placed by the
  parameters' logical shardings on `mesh`."""
  shardings = train_state.param_shardings(spec, mesh, config.logical_axis_rules)
  params, _, source = checkpointing.run_parameters(config, train_state.with_shardings(spec.shapes, shardings),
                                                   "decoding", say=lambda text: print(text, file=sys.stderr))
  return params, source


def decode_prompt(config) -> dict[str, Any]:
  """Load the run's parameters and tokenizer, continue `config.prompt`; returns the text and statistics."""
  tokenizer = input_pipeline.get_tokenizer(config)
  bos = [tokenizer.bos_id] if config.add_bos and tokenizer.bos_id is not None else []  # T5's tokenizer has none
  ids = bos + tokenizer.encode(config.prompt)
  mesh = sharding.make_mesh(config)
  spec = train_state.model_spec(config)
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    params, source = load_params(config, spec, mesh)
    generator = Generator(config, spec, batch=1, valid_vocab=tokenizer.vocab_size)
    start = time.perf_counter()
    new = generator(params, [ids], eos_id=tokenizer.eos_id)[0]
    seconds = time.perf_counter() - start
  # The whole text is decoded at once: a continuation decoded on its own can lose the space it starts with.
  return {"text": tokenizer.decode(new), "full_text": tokenizer.decode(ids + new), "tokens": new,
          "prompt_tokens": len(ids), "seconds": seconds, "checkpoint": source}


@startup.cli(usage=__doc__)
def main(argv: list[str]) -> int:
  config = startup.load_config(argv, for_run=True)
  result = decode_prompt(config)
  if jax.process_index() != 0:  # every process decodes the same prompt; one prints it
    return 0
  print(result["full_text"], flush=True)
  print(f"[{config.model_name} ({config.decoder_block}) from {result['checkpoint']}: {result['prompt_tokens']} "
        f"prompt tokens, {len(result['tokens'])} generated in {result['seconds']:.2f} s (compile included), "
        f"{config.decode_sampling_strategy}]", file=sys.stderr)
  return 0


if __name__ == "__main__":
  startup.exit_now(main())
