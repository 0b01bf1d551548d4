"""YAML + overrides -> frozen, validated Config.

The schema is `configs/base_v2.yml`: every key, its default and (through the default's type) its type.
Layers, lowest precedence first:
  base_v2.yml < configs/models/<model_name>.yml < the YAML named on the command line
  < M_<KEY> environment variables < key=value arguments (and keyword overrides in tests).
Any mistake is a `ConfigError` whose one-line message names the key; `train.py` turns it into exit code 2.

Parsing starts nothing and imports no other module of MaxText but `errors`: keys whose choices come from a
registry (decoder_block, dataset_type, opt_type, ...) and the checks that need a model or a mesh are
`validation.validate`'s, and joining a multi-process job is `startup.load_config`'s, which entry points call.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from MaxText.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base_v2.yml"
MODELS_DIR = CONFIG_DIR / "models"
ENV_PREFIX = "M_"

# Values computed from the others; they cannot be set.
DERIVED_KEYS = {
    "micro_batch_size": int,  # sequences per micro-batch over all devices
    "global_batch_size_to_train_on": int,  # sequences per optimizer step over all devices
    "eval_batch_size": int,  # sequences per eval batch over all devices
    "num_slices": int,  # groups of devices joined by the data-centre network (processes, or TPU slices)
    "ici_parallelism": tuple,  # resolved mesh shape inside a slice, in mesh_axes order
    "dcn_parallelism": tuple,  # resolved mesh shape across slices, in mesh_axes order
    "run_dir": str,
    "checkpoint_dir": str,
    "tensorboard_dir": str,
    # learning_rate_schedule_steps was -1: the schedule's length is `steps`, so a resumed run keeps the length
    # its checkpoint saved rather than re-stretching it to a new `steps` (docs/reliability.md)
    "schedule_follows_steps": bool,
}
# Keys settable only through the command line / keywords / environment, not by a preset.
RUN_KEYS = ("run_name", "base_output_directory", "model_name")
# Keys added on top of base_v2.yml: num_devices is a resolved key (-1 = all devices).
EXTRA_KEYS = {"num_devices": -1}
# Keys that name files or folders: relative ones resolve against the working directory (a URL such as
# gs://... is left alone), so a run's config.yml means the same from anywhere. dataset_path is a comma list.
PATH_KEYS = ("base_output_directory", "dataset_path", "tokenizer_path", "dataset_cache_dir", "tfds_data_dir",
             "load_parameters_path")
# The optimizer step is an int32 on the device: keys that count steps stay below 2**31.
STEP_KEYS = ("steps", "log_period", "checkpoint_period", "eval_interval", "learning_rate_schedule_steps",
             "max_consecutive_skips")
INT32_MAX = 2**31 - 1


def _closest(name: str, candidates) -> str:
  close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
  return f" (did you mean {', '.join(close)}?)" if close else ""


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


def _read_yaml(path: Path | str, what: str) -> dict:
  try:
    if "://" in str(path):  # a run in a bucket: read through the filesystem layer (TensorFlow's gfile)
      from MaxText import fs  # noqa: PLC0415 (only then; parsing local files imports nothing)

      text = fs.read_text(str(path))
    else:
      text = Path(path).read_bytes().decode("utf-8")
  except OSError as e:
    raise ConfigError(f"cannot read {what} {str(path)!r}: {e.strerror}") from None
  except UnicodeDecodeError as e:
    raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start})") from None
  try:
    data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
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


def schema() -> dict[str, Any]:
  """Every settable key and its default."""
  defaults = _read_yaml(BASE_CONFIG, "base config")
  defaults.update(EXTRA_KEYS)
  return defaults


def key_docs() -> list[tuple[str, str, str]]:
  """(group, key, comment) for every key of base_v2.yml, in file order; a comment continued on the
  following lines (an indented `# ...`) is joined to its key's."""
  docs, group = [], ""
  for line in BASE_CONFIG.read_text().splitlines():
    header = re.match(r"^# --- (.+) ---$", line)
    if header:
      group = header.group(1)
      continue
    m = re.match(r"^([a-z_][a-z0-9_]*):(.*?)(?:\s+#\s*(.*))?$", line)
    if m:
      docs.append((group, m.group(1), (m.group(3) or "").strip()))
      continue
    more = re.match(r"^\s+(?:[^#]*\s)?#\s*(.*)$", line)
    if more and docs and more.group(1).strip():
      g, key, comment = docs[-1]
      docs[-1] = (g, key, f"{comment} {more.group(1).strip()}".strip())
  return docs


def help_text(choices: Mapping[str, Sequence[str]] | None = None, width: int = 110) -> str:
  """Every key with its default and comment, in aligned columns, comments wrapped to `width`.

  `choices` (key -> registered names, from `validation.choices()`) is appended to the keys they serve.
  """
  defaults = schema()
  choices = dict(choices or {})
  lines = [
      "usage: python MaxText/train.py MaxText/configs/base_v2.yml [key=value ...]",
      "       python MaxText/train.py --list-models | --help",
      "       python MaxText/train.py MaxText/configs/base_v2.yml model_name=NAME --count-params",
      "",
      "Keys (value shown is the default; precedence: base_v2.yml < model preset < your YAML",
      "< M_<KEY> environment < key=value):",
  ]
  docs = key_docs() + [("Devices", "num_devices", "use the first N devices; -1 = all")]
  cells = []
  for group, key, comment in docs:
    default = yaml.safe_dump(defaults[key], default_flow_style=True, width=10_000).strip()
    default = default.removesuffix("\n...").removesuffix("...").strip()
    if len(default) > 40:
      default = default[:37] + "..."
    if key in choices:
      comment = f"{comment} [{' | '.join(choices[key])}]".strip()
    cells.append((group, f"  {key}={default}", comment))
  # One comment column for all keys; a longer key=default puts its comment on the lines below it.
  column = min(max(len(left) for _, left, _ in cells), 36) + 2
  group = None
  for g, left, comment in cells:
    if g != group:
      lines += ["", f"{g}:"]
      group = g
    wrapped = textwrap.wrap(comment, max(width - column, 30))
    if len(left) + 2 > column:
      lines.append(left)
    else:
      lines.append(f"{left:<{column}}{wrapped.pop(0) if wrapped else ''}".rstrip())
    lines += [" " * column + more for more in wrapped]
  return "\n".join(lines)


def preset_names() -> list[str]:
  return sorted(p.stem for p in MODELS_DIR.glob("*.yml"))


def _describe(kind) -> str:
  return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          list: "a list"}[kind]


def coerce(key: str, value: Any, default: Any, source: str):
  """Check `value` against the type of `default`; return it in canonical form (lists become tuples)."""
  kind = type(default)

  def fail():
    shown = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    raise ConfigError(f"config key {key!r} expects {_describe(kind)}, got {shown!r} ({source})")

  if kind is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
      return value.lower() == "true"
    fail()
  if kind is int:
    if isinstance(value, bool):
      fail()
    out = None
    if isinstance(value, int):
      out = value
    elif isinstance(value, float) and value.is_integer():
      out = int(value)
    elif isinstance(value, str):
      try:
        out = int(value)  # exact, however long
      except ValueError:
        try:
          f = float(value)
        except ValueError:
          fail()
        if not f.is_integer():
          fail()
        out = int(f)
    if out is None:
      fail()
    if not -2**63 <= out < 2**63:
      raise ConfigError(f"config key {key!r} is {value} ({source}), beyond a 64-bit integer")
    return out
  if kind is float:
    if isinstance(value, bool):
      fail()
    if isinstance(value, (int, float)):
      out = float(value)
    elif isinstance(value, str):
      try:
        out = float(value)  # pyyaml reads "3e-4" as a string
      except ValueError:
        fail()
    else:
      fail()
    if not math.isfinite(out):
      fail()
    return out
  if kind is str:
    if value is None:
      return ""
    if isinstance(value, (dict, list)):
      fail()
    return str(value)
  if kind is list:
    if isinstance(value, tuple):
      value = list(value)
    if not isinstance(value, list):
      fail()

    def freeze(v):
      return tuple(freeze(x) for x in v) if isinstance(v, (list, tuple)) else v

    if default and value:
      inner = type(default[0])
      for item in value:
        ok = isinstance(item, (list, tuple)) if inner is list else isinstance(item, inner)
        if not ok and not (inner is float and isinstance(item, int)):
          fail()
    return freeze(value)
  raise ConfigError(f"config key {key!r} has an unsupported default type {kind.__name__}")


def _parse_cli_value(key: str, raw: str, default: Any):
  if isinstance(default, str):
    return raw  # strings are taken verbatim: prompt="def f(x):" must not become a YAML mapping
  try:
    return yaml.safe_load(raw) if raw != "" else None
  except yaml.YAMLError:
    return raw  # coerce() reports it with the key's expected type


def parse_argv(argv: Sequence[str], defaults: Mapping[str, Any]) -> tuple[Path | None, dict[str, str]]:
  """argv = [program, config.yml?, key=value, ...] -> (yaml path, raw overrides)."""
  args = list(argv[1:])
  yml = None
  if args and "=" not in args[0]:
    yml = Path(args.pop(0))
  overrides: dict[str, str] = {}
  for arg in args:
    if "=" not in arg:
      hint = " (the config YAML must come first)" if arg.endswith((".yml", ".yaml")) else ""
      raise ConfigError(f"argument {arg!r} is not key=value{hint}")
    key, raw = arg.split("=", 1)
    key = key.strip().removeprefix("--")
    if key not in defaults:
      raise ConfigError(f"unknown config key {key!r} on the command line{_closest(key, defaults)}")
    if key in overrides:
      raise ConfigError(f"config key {key!r} is given twice on the command line")
    overrides[key] = raw
  return yml, overrides


def _apply(layer: Mapping[str, Any], values: dict, defaults: Mapping[str, Any], source: str, parse_str=False):
  for key, value in layer.items():
    if key in DERIVED_KEYS:
      raise ConfigError(f"config key {key!r} is derived and cannot be set ({source})")
    if key not in defaults:
      raise ConfigError(f"unknown config key {key!r} in {source}{_closest(key, defaults)}")
    if parse_str:
      value = _parse_cli_value(key, value, defaults[key])
    values[key] = coerce(key, value, defaults[key], source)


def load(argv: Sequence[str], env: Mapping[str, str] | None = None, *, for_run: bool = False,
         **kwargs) -> dict[str, Any]:
  """Layer every source into a dict of typed but not yet derived values.

  `for_run`: a command about an existing run (decode, evaluation) also reads the resolved config.yml
  that run wrote, as a layer between the YAML file and the environment, so `run_name=R` brings the
  trained model's keys; mesh, distributed and mode keys stay this command's, which may run elsewhere.
  """
  values = _load(argv, env, None, kwargs)
  if for_run:
    layer = _run_layer(values)
    if layer is not None:
      values = _load(argv, env, layer, kwargs)
  return values


# Keys of a run's config.yml that describe the machine or the command rather than the trained model.
_NOT_FROM_RUN_GROUPS = ("Sharding", "Distributed")
_NOT_FROM_RUN_KEYS = ("num_devices", "mode")


def _run_layer(values: Mapping[str, Any]) -> dict[str, Any] | None:
  base = values["base_output_directory"]
  if "://" in base:
    from MaxText import fs  # noqa: PLC0415 (see _read_yaml)

    path = fs.join(base, values["run_name"], "config.yml")
    if not fs.isfile(path):
      return None
  else:
    path = Path(os.path.expanduser(base)) / values["run_name"] / "config.yml"
    if not path.is_file():
      return None
  machine = {key for group, key, _ in key_docs() if group in _NOT_FROM_RUN_GROUPS} | set(_NOT_FROM_RUN_KEYS)
  return {k: v for k, v in _read_yaml(path, "run config").items() if k not in machine}


def _load(argv: Sequence[str], env: Mapping[str, str] | None, run_layer: Mapping[str, Any] | None,
          kwargs: Mapping[str, Any]) -> dict[str, Any]:
  run_layer = dict(run_layer or {})
  env = os.environ if env is None else env
  defaults = schema()
  yml, cli = parse_argv(argv, defaults)
  values = {k: coerce(k, v, v, "base_v2.yml") for k, v in defaults.items()}

  user_layer = {}
  if yml is not None and yml.resolve() != BASE_CONFIG:
    user_layer = _read_yaml(yml, "config file")
  env_layer = {}
  for name, raw in env.items():
    if name.startswith(ENV_PREFIX):
      key = name[len(ENV_PREFIX):].lower()
      if key not in defaults:
        raise ConfigError(f"unknown config key {key!r} from environment variable {name}{_closest(key, defaults)}")
      env_layer[key] = raw
  for key in kwargs:
    if key not in defaults and key not in DERIVED_KEYS:
      raise ConfigError(f"unknown config key {key!r} in keyword overrides{_closest(key, defaults)}")

  # The preset is chosen by the highest layer that names a model.
  model_name = values["model_name"]
  for layer in (user_layer, run_layer, env_layer, cli, kwargs):
    if "model_name" in layer:
      raw = layer["model_name"]
      model_name = str(raw) if raw is not None else ""
  if model_name != "default":
    path = MODELS_DIR / f"{model_name}.yml"
    # Only a preset's own name: a path ("../x", "/tmp/y") would load any YAML file as a preset.
    if model_name not in preset_names():
      raise ConfigError(
          f"unknown model_name {model_name!r}{_closest(model_name, preset_names())}; "
          f"registered: {', '.join(preset_names())}")
    preset = _read_yaml(path, "model preset")
    for key in RUN_KEYS:
      if key in preset:
        raise ConfigError(f"model preset {path.name} must not set {key!r}")
    _apply(preset, values, defaults, f"model preset {path.name}")

  _apply(user_layer, values, defaults, f"config file {yml}")
  _apply(run_layer, values, defaults, "the run's config.yml")
  _apply(env_layer, values, defaults, "environment", parse_str=True)
  _apply(cli, values, defaults, "command line", parse_str=True)
  _apply(kwargs, values, defaults, "keyword overrides")
  values["model_name"] = model_name
  return values


def _resolve_parallelism(v: dict, num_devices: int, num_slices: int) -> tuple[tuple, tuple]:
  axes = v["mesh_axes"]
  if len(set(axes)) != len(axes) or not axes:
    raise ConfigError(f"config key 'mesh_axes' must be distinct names, got {list(axes)}")
  shapes = []
  for prefix, total in (("ici", num_devices // num_slices), ("dcn", num_slices)):
    sizes = []
    for axis in axes:
      key = f"{prefix}_{axis}_parallelism"
      if key not in v:
        raise ConfigError(f"mesh axis {axis!r} has no config key {key!r}")
      n = v[key]
      if n == 0 or n < -1:
        raise ConfigError(f"config key {key!r} must be a positive integer or -1 (fill), got {n}")
      sizes.append(n)
    fill = [i for i, n in enumerate(sizes) if n == -1]
    if len(fill) > 1:
      names = ", ".join(f"{prefix}_{axes[i]}_parallelism" for i in fill)
      raise ConfigError(f"only one of {names} may be -1 (fill)")
    known = math.prod(n for n in sizes if n != -1)
    if fill:
      if total % known:
        raise ConfigError(
            f"{prefix}_*_parallelism: {known} ways do not divide the {total} "
            f"{'devices per slice' if prefix == 'ici' else 'slices'}")
      sizes[fill[0]] = total // known
    if math.prod(sizes) != total:
      shown = " x ".join(f"{prefix}_{a}_parallelism={n}" for a, n in zip(axes, sizes))
      raise ConfigError(
          f"mesh {shown} = {math.prod(sizes)} does not match the "
          f"{total} {'devices per slice' if prefix == 'ici' else 'slices'}")
    shapes.append(tuple(sizes))
  return shapes[0], shapes[1]


def absolute_path(path: str) -> str:
  """`path` made absolute against the working directory (with ~ expanded); "" and URLs (gs://...) as given."""
  if not path or "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def _plain_name(name: str) -> bool:
  return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _check_numerics(v: dict[str, Any]) -> None:
  """Values that parse but make the first step NaN or write nothing useful: each is a one-line error."""
  for key in ("adam_b1", "adam_b2"):
    if not 0.0 <= v[key] < 1.0:
      raise ConfigError(f"config key {key!r} must lie in [0, 1) (1 divides by zero in Adam's bias correction), "
                        f"got {v[key]}")
  for key in ("adam_eps", "adam_eps_root"):
    if v[key] < 0:
      raise ConfigError(f"config key {key!r} must not be negative, got {v[key]}")
  if v["opt_type"] == "adamw" and v["adam_eps"] == 0 and v["adam_eps_root"] == 0:
    raise ConfigError("config keys 'adam_eps' and 'adam_eps_root' are both 0: a parameter whose gradient is "
                      "exactly 0 (an unused embedding row) would be updated by 0/0 = NaN")
  for key in ("init_weights_std", "normalization_layer_epsilon", "rope_max_timescale", "vq_pe_wavelength"):
    if not v[key] > 0:
      raise ConfigError(f"config key {key!r} must be positive, got {v[key]}")
  if v["data_shuffle_seed"] < 0:
    raise ConfigError(f"config key 'data_shuffle_seed' must not be negative, got {v['data_shuffle_seed']}")
  if v["max_consecutive_skips"] < 1:
    raise ConfigError(f"config key 'max_consecutive_skips' must be at least 1, got {v['max_consecutive_skips']}")


def _derived_values(v: dict[str, Any], num_devices: int, num_slices: int) -> dict[str, Any]:
  """Checks across keys that need nothing but the values, and the values computed from them."""
  v = dict(v)

  def positive(*keys):
    for key in keys:
      if not v[key] > 0:
        raise ConfigError(f"config key {key!r} must be positive, got {v[key]}")

  positive("profiler_steps")
  if v["skip_first_n_steps_for_profiler"] < 0:
    raise ConfigError(f"config key 'skip_first_n_steps_for_profiler' must not be negative, got "
                      f"{v['skip_first_n_steps_for_profiler']}")
  positive("steps", "log_period", "base_emb_dim", "base_num_decoder_layers", "base_num_query_heads",
           "base_num_kv_heads", "vocab_size", "max_target_length", "gradient_accumulation_steps",
           "per_device_batch_size", "learning_rate")
  for key in ("checkpoint_period", "eval_interval", "base_mlp_dim", "head_dim", "adam_weight_decay",
              "gradient_clipping_threshold", "z_loss_multiplier", "max_num_checkpoints_to_keep",
              "eval_per_device_batch_size", "peak_tflops_per_device"):
    if v[key] < 0:
      raise ConfigError(f"config key {key!r} must not be negative, got {v[key]}")
  for key in ("warmup_steps_fraction", "learning_rate_final_fraction", "wsd_decay_steps_fraction"):
    if not 0.0 <= v[key] <= 1.0:
      raise ConfigError(f"config key {key!r} must lie in [0, 1], got {v[key]}")
  # Fixed choices; keys served by a registry (decoder_block, dataset_type, ...) are validation.validate's.
  choices = {
      "dtype": ("float32", "bfloat16"), "weight_dtype": ("float32", "bfloat16"),
      "mode": ("train", "validation", "test"), "jax_distributed_initialization": ("auto", "on", "off"),
      "parametrization": ("sp", "mup"), "data_shuffle": ("global", "window"),
      "rope_table_dtype": ("float32", "bfloat16"), "profiler": ("", "xplane"),
      "nan_policy": ("stop", "skip"),
  }
  for key, allowed in choices.items():
    if v[key] not in allowed:
      shown = ", ".join(a or '""' for a in allowed)
      raise ConfigError(f"config key {key!r} must be one of {shown}; got {v[key]!r}{_closest(v[key], allowed)}")
  for key in STEP_KEYS:
    if v[key] > INT32_MAX:
      raise ConfigError(f"config key {key!r} must be at most {INT32_MAX} (the step counter is a 32-bit integer), "
                        f"got {v[key]}")
  for key, what in (("run_name", "a folder name"), ("metrics_file", "a file name")):
    if not _plain_name(v[key]):
      raise ConfigError(f"config key {key!r} must be {what} inside the run folder (no '/', '..' or absolute "
                        f"path), got {v[key]!r}")
  if not v["base_output_directory"].strip():
    raise ConfigError("config key 'base_output_directory' must name a folder (it is empty)")
  _check_numerics(v)
  if not v["mlp_activations"] or len(v["mlp_activations"]) > 2:
    raise ConfigError("config key 'mlp_activations' must list one or two activations")
  positive("max_prefill_predict_length", "max_decode_length", "decode_sampling_temperature",
           "decode_sampling_top_k")
  if not 0.0 < v["decode_sampling_nucleus_p"] <= 1.0:
    raise ConfigError(f"config key 'decode_sampling_nucleus_p' must lie in (0, 1], got {v['decode_sampling_nucleus_p']}")
  if v["num_epochs"] == 0 or v["num_epochs"] < -1:
    raise ConfigError(f"config key 'num_epochs' must be positive or -1 (repeat forever), got {v['num_epochs']}")

  heads, kv_heads, width = v["base_num_query_heads"], v["base_num_kv_heads"], v["base_emb_dim"]
  if v["head_dim"] == 0:
    if width % heads:
      raise ConfigError(
          f"base_num_query_heads={heads} does not divide base_emb_dim={width}; set head_dim explicitly")
    v["head_dim"] = width // heads
  if v["num_vocab_tiling"] < 1 or v["max_target_length"] % v["num_vocab_tiling"]:
    raise ConfigError(f"config key 'num_vocab_tiling' must be a positive divisor of max_target_length="
                      f"{v['max_target_length']}, got {v['num_vocab_tiling']}")
  if v["num_vocab_tiling"] > 1 and v["record_activations"]:
    raise ConfigError("record_activations measures the whole logits: set num_vocab_tiling=1")
  if heads % kv_heads:
    raise ConfigError(f"base_num_kv_heads={kv_heads} must divide base_num_query_heads={heads}")

  if v["num_devices"] == -1:
    v["num_devices"] = num_devices
  elif not 0 < v["num_devices"] <= num_devices:
    raise ConfigError(f"config key 'num_devices' must be -1 or in 1..{num_devices}, got {v['num_devices']}")
  elif v["num_devices"] != num_devices and num_slices > 1:
    raise ConfigError("config key 'num_devices' cannot select a subset of devices in a multi-process run")
  if v["num_devices"] % num_slices:
    raise ConfigError(f"{v['num_devices']} devices do not split evenly over {num_slices} slices")
  v["num_slices"] = num_slices
  v["ici_parallelism"], v["dcn_parallelism"] = _resolve_parallelism(v, v["num_devices"], num_slices)
  for rule in v["logical_axis_rules"]:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"config key 'logical_axis_rules' entry {list(rule)} must be [logical_name, mesh_axes]")
    mesh = (rule[1],) if isinstance(rule[1], str) else rule[1]
    for axis in mesh:
      if axis not in v["mesh_axes"]:
        raise ConfigError(f"logical_axis_rules maps {rule[0]!r} to {axis!r}, which is not in mesh_axes")

  def whole(per_device, what):
    n = per_device * v["num_devices"]
    if not float(n).is_integer() or n < 1:
      raise ConfigError(f"{what}={per_device} x {v['num_devices']} devices is not a whole number of sequences")
    return int(n)

  v["micro_batch_size"] = whole(v["per_device_batch_size"], "per_device_batch_size")
  v["global_batch_size_to_train_on"] = v["micro_batch_size"] * v["gradient_accumulation_steps"]
  eval_pdb = v["eval_per_device_batch_size"] or v["per_device_batch_size"]
  v["eval_batch_size"] = whole(eval_pdb, "eval_per_device_batch_size")
  v["schedule_follows_steps"] = v["learning_rate_schedule_steps"] == -1
  if v["learning_rate_schedule_steps"] == -1:
    v["learning_rate_schedule_steps"] = v["steps"]
  elif v["learning_rate_schedule_steps"] <= 0:
    raise ConfigError("config key 'learning_rate_schedule_steps' must be positive or -1")
  if v["eval_steps"] == 0 or v["eval_steps"] < -1:
    raise ConfigError(f"config key 'eval_steps' must be positive or -1 (whole split), got {v['eval_steps']}")

  for key in PATH_KEYS:
    v[key] = ",".join(absolute_path(p.strip()) for p in v[key].split(",")) if key == "dataset_path" else \
        absolute_path(v[key])
  run_dir = os.path.join(v["base_output_directory"], v["run_name"])
  v["run_dir"] = run_dir
  v["checkpoint_dir"] = os.path.join(run_dir, "checkpoints")
  v["tensorboard_dir"] = os.path.join(run_dir, "tensorboard")
  return v


def _make_config_class():
  fields = [(k, type(coerce(k, d, d, "base_v2.yml"))) for k, d in schema().items()]
  fields += [(k, t) for k, t in DERIVED_KEYS.items()]
  cls = dataclasses.make_dataclass("Config", fields, frozen=True)
  cls.__doc__ = "Frozen, validated configuration of one run (see configs/base_v2.yml)."

  def to_dict(self) -> dict[str, Any]:
    def thaw(x):
      return [thaw(i) for i in x] if isinstance(x, tuple) else x
    return {f.name: thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}

  def to_yaml(self) -> str:
    """Settable keys as YAML (so the file is itself a valid config), derived values as comments."""
    values = self.to_dict()
    settable = {k: v for k, v in values.items() if k not in DERIVED_KEYS}
    text = yaml.safe_dump(settable, sort_keys=False, default_flow_style=None, width=120)
    derived = "".join(f"# {k}: {values[k]}\n" for k in DERIVED_KEYS)
    return text + "# --- derived (not settable) ---\n" + derived

  cls.to_dict, cls.to_yaml = to_dict, to_yaml
  return cls


Config = _make_config_class()


def derive(values: Mapping[str, Any], num_devices: int, num_slices: int = 1) -> Config:
  """The frozen Config of `load`'s values on a machine of `num_devices` devices in `num_slices` slices."""
  return Config(**_derived_values(dict(values), num_devices, num_slices))


def initialize(argv: Sequence[str], env: Mapping[str, str] | None = None, *, for_run: bool = False,
               device_count: int | None = None, num_slices: int = 1, **kwargs) -> Config:
  """Parse argv (= [program, config.yml, key=value, ...]) into a Config; `load` then `derive`.

  It starts nothing: in a multi-process job, join the job first (`startup.load_config` does, and runs
  `validation.validate` after); `device_count` defaults to this process's `jax.device_count()`.
  """
  values = load(argv, env, for_run=for_run, **kwargs)
  if device_count is None:
    import jax  # noqa: PLC0415 (only when the caller gives no count)

    device_count = jax.device_count()
  return derive(values, device_count, num_slices)
