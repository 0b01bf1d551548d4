"""Hugging Face checkpoints in and out, and a logit checker. Works offline, from local folders only.

  python MaxText/convert_checkpoint.py to_maxtext --hf_path DIR --output_path OUT [--family NAME]
        [--weight_dtype float32|bfloat16|auto]
  python MaxText/convert_checkpoint.py to_hf --output_path DIR CONFIG.yml [key=value ...] [step=N]
        [--dtype float32|bfloat16] [--max_shard_size 5GB]
  python MaxText/convert_checkpoint.py check CONFIG.yml [key=value ...] [step=N] --tokens T.npy
        (--golden_logits L.npy | --hf_path DIR [--trust_remote_code]) [--atol 1e-4] [--save_logits OURS.npy]

to_maxtext reads DIR (config.json and model.safetensors, sharded safetensors with
model.safetensors.index.json, or pytorch_model*.bin) and writes OUT/params.safetensors (our parameter
tree, tensor by tensor) and OUT/config.yml: the model keys plus `load_parameters_path`, a config file for
train.py, decode.py and this script (`python MaxText/train.py OUT/config.yml run_name=ft dataset_path=...`
fine-tunes it). Tokenizer files found in DIR are copied and named by the config.

to_hf writes config.json and safetensors (and the tokenizer files of a Hugging Face tokenizer) for the
run a config names: its latest checkpoint (or `step=N`), else its `load_parameters_path`.

check runs the model in float32 on the token ids of T.npy (int, [batch, length]) and compares its logits
with a saved array or with transformers run on the same tokens. The last line printed is the maximum
absolute difference; the exit code is 1 above --atol, 2 on an error.

This file knows no model family: the family is `--family` or the one whose `hf_model_type()` is the HF
config's model_type, and its hooks (models/__init__.py) map the config and every tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python MaxText/convert_checkpoint.py` puts MaxText/ itself on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from MaxText import (
  models,
  startup,
)
from MaxText.checkpoint import (
  checkpointing,
  tensor_files,
)
from MaxText.config import loader
from MaxText.errors import CheckpointError, ConfigError
from MaxText.input_pipeline.tokenizer import TOKENIZERS
from MaxText.models import conversion
from MaxText.parallel import sharding
from MaxText.training import train_state

# Tokenizer files a Hugging Face folder may hold, carried along both ways.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                      "generation_config.json")
PARAMS_FILE = f"{tensor_files.PARAMS_PREFIX}.safetensors"


def _family_for(hf: Mapping[str, Any], name: str | None):
  if name:
    return models.get_family(name)
  model_type = hf.get("model_type")
  found = [family for _, family in models.FAMILIES.items() if family.hf_model_type() == model_type != ""]
  if not found:
    known = ", ".join(f"{f.hf_model_type()} ({n})" for n, f in models.FAMILIES.items() if f.hf_model_type())
    raise ConfigError(f"HF config key 'model_type'={model_type!r}: no model family converts it (known: {known}); "
                      f"name one with --family")
  return found[0]


def _config(argv_tail: list[str], **overrides):
  """The validated Config of `[config.yml, key=value, ...]` (a run's config.yml layered in, as decode.py)."""
  argv = [sys.argv[0], *argv_tail]
  return startup.load_config(argv, for_run=True, **overrides)


def _take_step(args: list[str]) -> tuple[list[str], int | None]:
  """`step=N` is this script's, not a config key."""
  rest, step = [], None
  for a in args:
    if a.startswith("step=") or a.startswith("--step="):
      try:
        step = int(a.split("=", 1)[1])
      except ValueError:
        raise ConfigError(f"step must be an integer, got {a!r}") from None
    else:
      rest.append(a)
  return rest, step


class _View(Mapping):
  """A read-only view of a name -> tensor mapping; subclasses change what reading a tensor does."""

  def __init__(self, tensors: Mapping):
    self.tensors = tensors

  def __getitem__(self, name):
    return self.tensors[name]

  def __contains__(self, name):
    return name in self.tensors

  def __iter__(self):
    return iter(self.tensors)

  def __len__(self):
    return len(self.tensors)


class _Cast(_View):
  """Their tensors, cast to `dtype` as they are read (so stacks are built in the output dtype)."""

  def __init__(self, tensors: Mapping, dtype):
    super().__init__(tensors)
    self.dtype = dtype

  def __getitem__(self, name):
    a = np.asarray(self.tensors[name])
    return a if self.dtype is None or a.dtype == self.dtype else a.astype(self.dtype)


class _Seen(_View):
  """Records which tensors a family's from_hf read."""

  def __init__(self, tensors: Mapping):
    super().__init__(tensors)
    self.seen = set()

  def __getitem__(self, name):
    self.seen.add(name)
    return self.tensors[name]


def _yaml_config(keys: dict[str, Any], header: str) -> str:
  return header + yaml.safe_dump(keys, sort_keys=False, default_flow_style=None, width=120)


def _hf_dtype(hf: Mapping[str, Any]) -> str:
  dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  return dtype if dtype in ("float32", "bfloat16") else "float32"


def to_maxtext(hf_path: str, output_path: str, family_name: str | None = None, weight_dtype: str = "float32",
               progress: bool = True) -> dict[str, Any]:
  """Convert an HF folder into OUT/params.safetensors + OUT/config.yml; returns a summary."""
  start = time.perf_counter()
  hf_dir, out = Path(hf_path).expanduser().absolute(), Path(output_path).expanduser().absolute()
  hf = tensor_files.read_config(hf_dir)
  family = _family_for(hf, family_name)
  keys = family.config_from_hf(hf)
  dtype_name = _hf_dtype(hf) if weight_dtype == "auto" else weight_dtype
  if dtype_name not in ("float32", "bfloat16"):
    raise ConfigError(f"--weight_dtype must be float32, bfloat16 or auto, got {weight_dtype!r}")
  keys["weight_dtype"] = dtype_name
  config = startup.load_config([sys.argv[0], str(loader.BASE_CONFIG)], env={}, **keys)
  tensors = tensor_files.open_folder(hf_dir)
  seen = _Seen(tensors)
  spec = train_state.model_spec(config)

  expected = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_flatten_with_path(spec.shapes)[0]}
  dtype = tensor_files.dtype_of(dtype_name)
  out.mkdir(parents=True, exist_ok=True)
  writer = tensor_files.ShardedWriter(out, tensor_files.PARAMS_PREFIX, metadata={"format": "maxtext"})
  written = []
  for path, array in family.from_hf(config, _Cast(seen, dtype)):
    if path not in expected:
      raise CheckpointError(f"{family.family_name}.from_hf made {path!r}, which the model has not")
    if tuple(array.shape) != expected[path]:
      raise CheckpointError(f"{hf_dir}: {path} comes out as {tuple(array.shape)}, the model's is {expected[path]}")
    writer.add(path, array)
    written.append(path)
    del array
    if progress:
      print(f"  {path} {expected[path]}", file=sys.stderr, flush=True)
  missing = sorted(set(expected) - set(written))
  if missing:
    raise CheckpointError(f"{hf_dir}: nothing converts to {missing[0]}")
  files = writer.close()

  copied = [name for name in HF_TOKENIZER_FILES if (hf_dir / name).is_file()]
  for name in copied:
    shutil.copyfile(hf_dir / name, out / name)
  (out / "hf_config.json").write_text(json.dumps(hf, indent=2) + "\n")
  file_keys = dict(keys)
  file_keys["load_parameters_path"] = str(out)
  if "tokenizer.json" in copied:
    file_keys.update(tokenizer_type="hf", tokenizer_path=str(out / "tokenizer.json"))
  elif "tokenizer.model" in copied:
    file_keys.update(tokenizer_type="sentencepiece", tokenizer_path=str(out / "tokenizer.model"))
  header = (f"# Converted from {hf_dir} ({hf.get('model_type')}) by MaxText/convert_checkpoint.py to_maxtext.\n"
            f"# python MaxText/train.py {out / 'config.yml'} run_name=ft dataset_path=...\n")
  (out / "config.yml").write_text(_yaml_config(file_keys, header))
  ignored = sorted(set(tensors) - seen.seen)
  summary = {"family": family.family_name, "parameters": spec.num_params, "tensors_read": len(seen.seen),
             "ignored": ignored, "files": [str(f) for f in files], "tokenizer_files": copied,
             "seconds": time.perf_counter() - start, "config": str(out / "config.yml")}
  return summary


def _host_params(config, step: int | None):
  """(parameters, where from) of the run a config names: lazy numpy leaves from a converted checkpoint, or
  the arrays of an Orbax checkpoint."""
  ckpt_dir = Path(config.checkpoint_dir)
  has_run = config.enable_checkpointing and ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
  if not has_run or step == 0:
    if step not in (None, 0) and not has_run:
      raise CheckpointError(f"step={step}: {ckpt_dir} holds no checkpoints")
    path = config.load_parameters_path
    if not path:
      raise CheckpointError(f"no checkpoint in {ckpt_dir} and no load_parameters_path")
    if tensor_files.is_parameter_folder(path):
      stored = tensor_files.open_parameters(path)
      return conversion.tree((name, stored.lazy(name)) for name in stored), path
  spec = train_state.model_spec(config)
  mesh = sharding.make_mesh(config)
  shardings = train_state.param_shardings(spec, mesh, config.logical_axis_rules)
  abstract = train_state.with_shardings(spec.shapes, shardings)
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    if has_run and step != 0:
      checkpointer = checkpointing.Checkpointer.from_config(config)
      try:
        steps = checkpointer.all_steps()
        chosen = max(steps) if step is None else step
        if chosen not in steps:
          raise CheckpointError(f"step={step}: {ckpt_dir} has steps {sorted(steps)}")
        params = checkpointer.restore_params(chosen, abstract)
      finally:
        checkpointer.close()
      return params, str(ckpt_dir / str(chosen))
    return checkpointing.load_parameters(config.load_parameters_path, abstract), config.load_parameters_path


def _tokenizer_files(config) -> list[Path]:
  """The HF tokenizer files of the run's tokenizer (a tokenizer.json and its neighbours), if it has them."""
  if config.tokenizer_type != "hf" or not config.tokenizer_path:
    return []
  folder = Path(config.tokenizer_path).expanduser().parent
  return [folder / n for n in HF_TOKENIZER_FILES if (folder / n).is_file() and n != "tokenizer.model"]


def to_hf(argv_tail: list[str], output_path: str, dtype: str | None = None, max_shard_size: str = "5GB",
          progress: bool = True) -> dict[str, Any]:
  """Write the run's parameters as an HF checkpoint folder; returns a summary."""
  start = time.perf_counter()
  argv_tail, step = _take_step(argv_tail)
  config = _config(argv_tail)
  family = models.get_family(config.decoder_block)
  hf = family.hf_config(config)  # a setting HF cannot express fails here, before anything is read
  dtype_name = dtype or config.weight_dtype
  if dtype_name not in ("float32", "bfloat16"):
    raise ConfigError(f"--dtype must be float32 or bfloat16, got {dtype_name!r}")
  for key in ("torch_dtype", "dtype"):
    if key in hf:
      hf[key] = dtype_name
  np_dtype = tensor_files.dtype_of(dtype_name)
  params, source = _host_params(config, step)
  out = Path(output_path).expanduser().absolute()
  out.mkdir(parents=True, exist_ok=True)
  writer = tensor_files.ShardedWriter(out, "model", max_shard_bytes=tensor_files.parse_size(max_shard_size))
  count = 0
  for name, array in family.to_hf(config, params):
    writer.add(name, np.asarray(array).astype(np_dtype, copy=False))
    count += 1
    if progress:
      print(f"  {name} {tuple(array.shape)}", file=sys.stderr, flush=True)
    del array
  files = writer.close()
  copied = []
  for path in _tokenizer_files(config):
    shutil.copyfile(path, out / path.name)
    copied.append(path.name)
  if copied:
    tokenizer = TOKENIZERS.get(config.tokenizer_type)(config.tokenizer_path)
    hf.setdefault("bos_token_id", tokenizer.bos_id)
    hf.setdefault("eos_token_id", tokenizer.eos_id)
  (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  return {"family": family.family_name, "source": source, "tensors": count, "files": [str(f) for f in files],
          "tokenizer_files": copied, "seconds": time.perf_counter() - start}


def our_logits(config, tokens: np.ndarray, step: int | None = None) -> np.ndarray:
  """float32 logits [B, L, V] of the run's parameters on `tokens` (one document per row)."""
  spec = train_state.model_spec(config)
  mesh = sharding.make_mesh(config)
  params, _ = _host_params(config, step)
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    shardings = train_state.param_shardings(spec, mesh, config.logical_axis_rules)
    params = jax.tree.map(lambda p, s: p if isinstance(p, jax.Array) else jax.device_put(np.asarray(p), s),
                          params, shardings)
    B, L = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    segments = jnp.ones((B, L), jnp.int32)
    fn = jax.jit(lambda p, t: train_state.bind(spec, p)(t, positions, segments)[0])
    return np.asarray(jax.device_get(fn(params, jnp.asarray(tokens, jnp.int32))), np.float32)


def hf_logits(hf_path: str, tokens: np.ndarray, trust_remote_code: bool = False) -> np.ndarray:
  """float32 logits of transformers' AutoModelForCausalLM from a local folder (never the network)."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  try:
    import torch  # noqa: PLC0415 (optional: the hf extra, only to compare with transformers)
    import transformers  # noqa: PLC0415 (optional: the hf extra, 0.8 s to import)
  except ImportError as e:
    raise ConfigError(f"--hf_path needs torch and transformers ({e.name} is not installed)") from None
  if not Path(hf_path).expanduser().is_dir():
    raise CheckpointError(f"--hf_path {hf_path!r} is not a folder")
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(Path(hf_path).expanduser()), dtype=torch.float32, local_files_only=True, trust_remote_code=trust_remote_code)
  model.eval()
  with torch.no_grad():
    out = model(torch.as_tensor(tokens, dtype=torch.long))
  logits = out.logits if hasattr(out, "logits") else out
  return logits.float().numpy()


def check(argv_tail: list[str], tokens_path: str, golden_logits: str | None = None, hf_path: str | None = None,
          atol: float = 1e-4, save_logits: str | None = None, trust_remote_code: bool = False) -> float:
  """Max |our logits - reference| on the tokens (float32 model)."""
  argv_tail, step = _take_step(argv_tail)
  if (golden_logits is None) == (hf_path is None):
    raise ConfigError("check needs exactly one of --golden_logits and --hf_path")
  try:
    tokens = np.load(os.path.expanduser(tokens_path))
  except (OSError, ValueError) as e:
    raise ConfigError(f"--tokens {tokens_path!r} is not a readable .npy file: {e}") from None
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ConfigError(f"--tokens must hold integer token ids [batch, length], got {tokens.dtype} {tokens.shape}")
  config = _config(argv_tail, dtype="float32", weight_dtype="float32")
  if tokens.min() < 0 or tokens.max() >= config.vocab_size:
    raise ConfigError(f"--tokens holds ids outside [0, vocab_size={config.vocab_size})")
  ours = our_logits(config, tokens, step)
  if save_logits:
    np.save(os.path.expanduser(save_logits), ours)
  if golden_logits is not None:
    try:
      reference = np.load(os.path.expanduser(golden_logits)).astype(np.float32)
    except (OSError, ValueError) as e:
      raise ConfigError(f"--golden_logits {golden_logits!r} is not a readable .npy file: {e}") from None
  else:
    reference = hf_logits(hf_path, tokens, trust_remote_code)
  if reference.shape[:2] != ours.shape[:2] or reference.shape[2] > ours.shape[2]:
    raise ConfigError(f"reference logits are {reference.shape}, ours {ours.shape}")
  # A vocabulary padded on our side compares on the reference's rows.
  diff = np.abs(ours[..., : reference.shape[2]] - reference)
  worst = float(diff.max())
  where = np.unravel_index(int(diff.argmax()), diff.shape)
  print(f"{config.decoder_block} logits {tuple(reference.shape)}: max |ours - reference| = {worst:.3e} at "
        f"(row {where[0]}, position {where[1]}, token {where[2]}); mean {float(diff.mean()):.3e}; atol {atol:g}; "
        f"argmax agreement {float(np.mean(ours.argmax(-1) == reference.argmax(-1))):.4f}")
  print(f"{worst:.6e}")
  return worst


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  a = sub.add_parser("to_maxtext", help="HF folder -> OUT/params.safetensors + OUT/config.yml")
  a.add_argument("--hf_path", required=True)
  a.add_argument("--output_path", required=True)
  a.add_argument("--family", default=None, help="model family (decoder_block); default: from config.json's model_type")
  a.add_argument("--weight_dtype", default="float32", help="float32 (default), bfloat16, or auto (the checkpoint's)")
  b = sub.add_parser("to_hf", help="a run (CONFIG.yml [key=value ...] [step=N]) -> HF folder")
  b.add_argument("--output_path", required=True)
  b.add_argument("--dtype", default=None, help="float32 or bfloat16; default: the run's weight_dtype")
  b.add_argument("--max_shard_size", default="5GB")
  c = sub.add_parser("check", help="compare our float32 logits with saved logits or transformers'")
  c.add_argument("--tokens", required=True)
  c.add_argument("--golden_logits", default=None)
  c.add_argument("--hf_path", default=None)
  c.add_argument("--atol", type=float, default=1e-4)
  c.add_argument("--save_logits", default=None)
  c.add_argument("--trust_remote_code", action="store_true",
                 help="let transformers run the modeling code inside --hf_path (e.g. the MUDDFormer release)")
  return parser


@startup.cli
def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args, rest = _parser().parse_known_args(argv)
  unknown = [a for a in rest if a.startswith("--") and "=" not in a]
  if unknown:
    raise ConfigError(f"unknown option {unknown[0]!r}")
  if args.command == "to_maxtext":
    if rest:
      raise ConfigError(f"to_maxtext takes no config arguments, got {rest[0]!r}")
    summary = to_maxtext(args.hf_path, args.output_path, args.family, args.weight_dtype)
    if summary["ignored"]:
      print(f"ignored {len(summary['ignored'])} tensors no parameter reads: {', '.join(summary['ignored'][:5])}"
            f"{' ...' if len(summary['ignored']) > 5 else ''}", file=sys.stderr)
    print(f"{summary['family']}: {summary['parameters']:,} parameters from {summary['tensors_read']} tensors in "
          f"{summary['seconds']:.1f} s -> {summary['config']}")
  elif args.command == "to_hf":
    summary = to_hf(rest, args.output_path, args.dtype, args.max_shard_size)
    extra = f" (+ {', '.join(summary['tokenizer_files'])})" if summary["tokenizer_files"] else ""
    print(f"{summary['family']}: {summary['tensors']} tensors from {summary['source']} in {summary['seconds']:.1f} s "
          f"-> {args.output_path}{extra}")
  else:
    worst = check(rest, args.tokens, args.golden_logits, args.hf_path, args.atol, args.save_logits,
                  args.trust_remote_code)
    return 0 if worst <= args.atol else 1
  return 0


if __name__ == "__main__":
  startup.exit_now(main())
