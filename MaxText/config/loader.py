"""YAML files, presets, the environment and the command line -> one resolved, frozen Config.

Layers, lowest precedence first:
  the declared defaults (config/schema.py; configs/base_v2.yml shows them) < configs/models/<model_name>.yml
  < the YAML named on the command line < M_<KEY> environment variables < key=value arguments
  (< keyword overrides, in tests and tools).
Every value is checked against its key's declaration in the layer that sets it, so an error names the key
and where it came from, in one line (`ConfigError`; entry points exit 2).

`load` reads the layers into typed values and starts nothing; `derive` resolves them on a machine of N devices
(batch sizes, the mesh shape, absolute paths) into the frozen Config. `startup.load_config` joins a
multi-process job between the two, then runs `validation.validate`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import pydantic
import yaml

from MaxText import fs
from MaxText.config import keys, schema
from MaxText.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
BASE_CONFIG = CONFIG_DIR / "base_v2.yml"
MODELS_DIR = CONFIG_DIR / "models"
ENV_PREFIX = "M_"
# Keys settable only through the command line / keywords / environment, not by a preset.
RUN_KEYS = ("run_name", "base_output_directory", "model_name")
# A command about an existing run takes the model from its config.yml, but not these (they belong to the command).
_NOT_FROM_RUN_KEYS = ("mode",)


class _DuplicateKey(Exception):
  def __init__(self, key, line: int):
    super().__init__(key)
    self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
  """SafeLoader that refuses a mapping key given twice (plain YAML keeps the last one silently)."""

  def construct_mapping(self, node, deep=False):
    if isinstance(node, yaml.MappingNode):
      seen = set()
      for key_node, _ in node.value:
        key = self.construct_object(key_node, deep=True)
        try:
          duplicate = key in seen
        except TypeError:  # an unhashable key: SafeLoader reports it itself
          continue
        if duplicate:
          raise _DuplicateKey(key, key_node.start_mark.line + 1)
        seen.add(key)
    return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path | str, what: str) -> dict:
  """A YAML mapping from a local file or a URL, with one-line errors naming `what` and the path."""
  try:
    text = fs.read_text(str(path)) if fs.is_remote(str(path)) else Path(path).read_bytes().decode("utf-8")
  except OSError as e:
    raise ConfigError(f"cannot read {what} {str(path)!r}: {e.strerror}") from None
  except UnicodeDecodeError as e:
    raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start})") from None
  try:
    data = yaml.load(text, Loader=_UniqueKeyLoader)
  except _DuplicateKey as e:
    raise ConfigError(f"{what} {str(path)!r} line {e.line}: key {e.key!r} is given twice") from None
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f" line {mark.line + 1}" if mark else ""
    raise ConfigError(f"{what} {str(path)!r} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise ConfigError(f"{what} {str(path)!r} must be a mapping of key: value")
  return data


def preset_names() -> list[str]:
  return sorted(p.stem for p in MODELS_DIR.glob("*.yml"))


@functools.cache
def _adapter(name: str) -> pydantic.TypeAdapter:
  field = schema.fields()[name]
  annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
  return pydantic.TypeAdapter(annotation)


def check_value(name: str, value: Any, source: str) -> Any:
  """`value` checked against the declaration of key `name`, in its canonical form (lists become tuples)."""
  try:
    return _adapter(name).validate_python(value)
  except pydantic.ValidationError as e:
    raise keys.error(name, schema.fields()[name], e, value, source) from None


def _is_text(name: str) -> bool:
  return schema.fields()[name].annotation is str


def _parse_cli_value(name: str, raw: str):
  if _is_text(name):
    return raw  # strings are taken verbatim: prompt="def f(x):" must not become a YAML mapping
  try:
    return yaml.safe_load(raw) if raw != "" else None
  except yaml.YAMLError:
    return raw  # the key's declaration reports it with the expected type


def _unknown(name: str, source: str) -> ConfigError:
  if name in schema.derived_keys():
    return ConfigError(f"config key {name!r} is derived and cannot be set ({source})")
  return ConfigError(f"unknown config key {name!r} {source}{keys.closest(name, schema.settable_keys())}")


def parse_argv(argv: Sequence[str]) -> tuple[Path | None, dict[str, str]]:
  """argv = [program, config.yml?, key=value, ...] -> (yaml path, raw overrides)."""
  args = list(argv[1:])
  yml = None
  if args and "=" not in args[0]:
    yml = Path(args.pop(0))
  overrides: dict[str, str] = {}
  settable = set(schema.settable_keys())
  for arg in args:
    if "=" not in arg:
      hint = " (the config YAML must come first)" if arg.endswith((".yml", ".yaml")) else ""
      raise ConfigError(f"argument {arg!r} is not key=value{hint}")
    name, raw = arg.split("=", 1)
    name = name.strip().removeprefix("--")
    if name not in settable:
      raise _unknown(name, "on the command line")
    if name in overrides:
      raise ConfigError(f"config key {name!r} is given twice on the command line")
    overrides[name] = raw
  return yml, overrides


def _apply(layer: Mapping[str, Any], values: dict, source: str, parse_str: bool = False) -> None:
  settable = set(schema.settable_keys())
  for name, value in layer.items():
    if name not in settable:
      raise _unknown(name, f"in {source}" if not source.startswith("from ") else source)
    if parse_str:
      value = _parse_cli_value(name, value)
    values[name] = check_value(name, value, source)


def load(argv: Sequence[str], env: Mapping[str, str] | None = None, *, for_run: bool = False,
         **kwargs) -> dict[str, Any]:
  """Layer every source into a dict of checked values (not yet resolved on a machine); starts nothing.

  `for_run`: a command about an existing run (decode, evaluation) also reads the resolved config.yml
  that run wrote, as a layer between the YAML file and the environment, so `run_name=R` brings the
  trained model's keys; the machine's keys (mesh, distributed) and `mode` stay this command's.
  """
  values = _load(argv, env, None, kwargs)
  if for_run:
    layer = _run_layer(values)
    if layer is not None:
      values = _load(argv, env, layer, kwargs)
  return values


def _run_layer(values: Mapping[str, Any]) -> dict[str, Any] | None:
  path = fs.join(fs.expand(values["base_output_directory"]), values["run_name"], "config.yml")
  if not fs.isfile(path):
    return None
  machine = set(schema.machine_keys()) | set(_NOT_FROM_RUN_KEYS)
  return {k: v for k, v in read_yaml(path, "run config").items() if k not in machine}


def _load(argv: Sequence[str], env: Mapping[str, str] | None, run_layer: Mapping[str, Any] | None,
          kwargs: Mapping[str, Any]) -> dict[str, Any]:
  run_layer = dict(run_layer or {})
  env = os.environ if env is None else env
  yml, cli = parse_argv(argv)
  values = schema.defaults()

  user_layer = {}
  if yml is not None and yml.resolve() != BASE_CONFIG:
    user_layer = read_yaml(yml, "config file")
  env_layer = {}
  settable = set(schema.settable_keys())
  for var, raw in env.items():
    if var.startswith(ENV_PREFIX):
      name = var[len(ENV_PREFIX):].lower()
      if name not in settable:
        raise ConfigError(f"unknown config key {name!r} from environment variable {var}"
                          f"{keys.closest(name, settable)}")
      env_layer[name] = raw
  for name in kwargs:
    if name not in settable and name not in schema.derived_keys():
      raise _unknown(name, "in keyword overrides")

  # The preset is chosen by the highest layer that names a model.
  model_name = values["model_name"]
  for layer in (user_layer, run_layer, env_layer, cli, kwargs):
    if "model_name" in layer:
      raw = layer["model_name"]
      model_name = str(raw) if raw is not None else ""
  if model_name != "default":
    # Only a preset's own name: a path ("../x", "/tmp/y") would load any YAML file as a preset.
    if model_name not in preset_names():
      raise ConfigError(f"unknown model_name {model_name!r}{keys.closest(model_name, preset_names())}; "
                        f"registered: {', '.join(preset_names())}")
    path = MODELS_DIR / f"{model_name}.yml"
    preset = read_yaml(path, "model preset")
    for name in RUN_KEYS:
      if name in preset:
        raise ConfigError(f"model preset {path.name} must not set {name!r}")
    _apply(preset, values, f"model preset {path.name}")

  _apply(user_layer, values, f"config file {yml}")
  _apply(run_layer, values, "the run's config.yml")
  _apply(env_layer, values, "environment", parse_str=True)
  _apply(cli, values, "command line", parse_str=True)
  _apply(kwargs, values, "keyword overrides")
  values["model_name"] = model_name
  return values


def _resolve_parallelism(v: dict, num_devices: int, num_slices: int) -> tuple[tuple, tuple]:
  axes = v["mesh_axes"]
  shapes = []
  for prefix, total in (("ici", num_devices // num_slices), ("dcn", num_slices)):
    sizes = [v[f"{prefix}_{axis}_parallelism"] for axis in axes]
    fill = [i for i, n in enumerate(sizes) if n == -1]
    if len(fill) > 1:
      names = ", ".join(f"{prefix}_{axes[i]}_parallelism" for i in fill)
      raise ConfigError(f"only one of {names} may be -1 (fill)")
    known = math.prod(n for n in sizes if n != -1)
    what = "devices per slice" if prefix == "ici" else "slices"
    if fill:
      if total % known:
        raise ConfigError(f"{prefix}_*_parallelism: {known} ways do not divide the {total} {what}")
      sizes[fill[0]] = total // known
    if math.prod(sizes) != total:
      shown = " x ".join(f"{prefix}_{a}_parallelism={n}" for a, n in zip(axes, sizes))
      raise ConfigError(f"mesh {shown} = {math.prod(sizes)} does not match the {total} {what}")
    shapes.append(tuple(sizes))
  return shapes[0], shapes[1]


def _whole(per_device: float, num_devices: int, what: str) -> int:
  n = per_device * num_devices
  if not float(n).is_integer() or n < 1:
    raise ConfigError(f"{what}={per_device} x {num_devices} devices is not a whole number of sequences")
  return int(n)


def derive(values: Mapping[str, Any], num_devices: int, num_slices: int = 1):
  """The frozen Config of `load`'s values on a machine of `num_devices` devices in `num_slices` slices."""
  build(values)  # the checks across keys, on the values as given, before anything is computed from them
  v = dict(values)
  if v["head_dim"] == 0 and v["base_emb_dim"] % v["base_num_query_heads"] == 0:
    v["head_dim"] = v["base_emb_dim"] // v["base_num_query_heads"]  # else the Model group's check says why not
  if v["num_devices"] == -1:
    v["num_devices"] = num_devices
  elif v["num_devices"] > num_devices:
    raise ConfigError(f"config key 'num_devices' must be -1 or in 1..{num_devices}, got {v['num_devices']}")
  elif v["num_devices"] != num_devices and num_slices > 1:
    raise ConfigError("config key 'num_devices' cannot select a subset of devices in a multi-process run")
  if v["num_devices"] % num_slices:
    raise ConfigError(f"{v['num_devices']} devices do not split evenly over {num_slices} slices")
  v["num_slices"] = num_slices
  v["ici_parallelism"], v["dcn_parallelism"] = _resolve_parallelism(v, v["num_devices"], num_slices)
  v["micro_batch_size"] = _whole(v["per_device_batch_size"], v["num_devices"], "per_device_batch_size")
  v["global_batch_size_to_train_on"] = v["micro_batch_size"] * v["gradient_accumulation_steps"]
  v["eval_batch_size"] = _whole(v["eval_per_device_batch_size"] or v["per_device_batch_size"], v["num_devices"],
                                "eval_per_device_batch_size")
  v["schedule_follows_steps"] = v["learning_rate_schedule_steps"] == -1
  if v["schedule_follows_steps"]:
    v["learning_rate_schedule_steps"] = v["steps"]
  for name in schema.path_keys():
    parts = v[name].split(",") if name == "dataset_path" else [v[name]]
    v[name] = ",".join(schema.absolute_path(p.strip()) for p in parts)
  v["run_dir"] = os.path.join(v["base_output_directory"], v["run_name"])
  v["checkpoint_dir"] = os.path.join(v["run_dir"], "checkpoints")
  v["tensorboard_dir"] = os.path.join(v["run_dir"], "tensorboard")
  return build(v)


def build(values: Mapping[str, Any]):
  """The Config of fully resolved values (a derived config's own, or a copy's); the checks across keys run."""
  try:
    return schema.config_class()(**values)
  except pydantic.ValidationError as e:
    problem = e.errors(include_url=False)[0]
    cause = (problem.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
      raise cause from None
    name = problem["loc"][0] if problem["loc"] else ""
    if name in schema.fields():
      raise keys.error(name, schema.fields()[name], e, values.get(name), "") from None
    raise ConfigError(f"config: {problem['msg']}") from None


def initialize(argv: Sequence[str], env: Mapping[str, str] | None = None, *, for_run: bool = False,
               device_count: int | None = None, num_slices: int = 1, **kwargs):
  """Parse argv (= [program, config.yml, key=value, ...]) into a Config; `load` then `derive`.

  It starts nothing: in a multi-process job, join the job first (`startup.load_config` does, and runs
  `validation.validate` after); `device_count` defaults to this process's `jax.device_count()`.
  """
  values = load(argv, env, for_run=for_run, **kwargs)
  if device_count is None:
    import jax  # noqa: PLC0415 (counting devices starts JAX's backends: only when the caller gives no count)

    device_count = jax.device_count()
  return derive(values, device_count, num_slices)
