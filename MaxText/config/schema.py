"""Every config key the trainer knows, declared once: groups of keys by concern, then the families' own groups.

`config_class()` is the frozen pydantic model of a whole run: these groups, every registered family's
`keys` group (declared beside the family, `models/<family>.py`), the cross-group checks and the values
derived when the config is resolved. `configs/base_v2.yml` is this file rendered as YAML
(`python -m MaxText.config.render --yaml`); a test keeps the two equal.
"""

from __future__ import annotations

import functools
import os
from typing import Annotated, Any, ClassVar, Literal

import annotated_types
import pydantic
import yaml

from MaxText import models
from MaxText.config.keys import (
  INT32_MAX,
  Bool,
  FileName,
  Float,
  Group,
  Int,
  PositiveOrAll,
  StepCount,
  Str,
  StrList,
  extra,
  key,
)
from MaxText.errors import ConfigError

Dtype = Literal["float32", "bfloat16"]
# [logical axis name, mesh axis or list of mesh axes]
AxisRule = tuple[str, str | tuple[str, ...]]


class Run(Group):
  """Run"""

  run_name: FileName = key("default_run", "name of the run; its files live in <base_output_directory>/<run_name>/")
  base_output_directory: Str = key("outputs", "parent folder of all run folders", path=True)
  model_name: Str = key("default", 'preset from configs/models/<name>.yml; "default" uses the model keys below')
  steps: StepCount = key(300, "number of optimizer steps to train for", gt=0)
  init_weights_seed: Int = key(0, "seed of parameter initialisation")
  mode: Literal["train", "validation", "test"] = key(
      "train", "train | validation | test (evaluate a checkpoint on that split)")
  nan_policy: Literal["stop", "skip"] = key(
      "stop", "a non-finite loss or gradient norm: stop (one-line error naming the step, exit 3, nothing saved) | "
      "skip (the update is not applied and counted in skipped_steps)")
  max_consecutive_skips: StepCount = key(
      10, "nan_policy=skip: stop (exit 3) after this many non-finite steps in a row", ge=1)

  @pydantic.model_validator(mode="after")
  def _output_folder(self):
    if not self.base_output_directory.strip():
      raise ConfigError("config key 'base_output_directory' must name a folder (it is empty)")
    return self


class Model(Group):
  """Model"""

  decoder_block: Str = key("llama2", "model family (models/<family>.py; presets: --list-models)", registry=True)
  base_emb_dim: Int = key(256, "model width D", gt=0)
  base_num_decoder_layers: Int = key(4, "number of decoder layers N", gt=0)
  base_num_query_heads: Int = key(4, "query heads H", gt=0)
  base_num_kv_heads: Int = key(4, "key/value heads K (K < H is grouped-query attention)", gt=0)
  base_mlp_dim: Int = key(1024, "MLP hidden width F", ge=0)
  head_dim: Int = key(0, "per-head width E; 0 = base_emb_dim / base_num_query_heads", ge=0)
  vocab_size: Int = key(8192, "vocabulary size V (the tokenizer's size must not exceed it)", gt=0)
  mlp_activations: StrList = key(("silu", "linear"), "gated MLP: act(x W0) * act(x W1); one entry = ungated",
                                 registry=True, min_length=1, max_length=2)
  normalization_layer_epsilon: Float = key(1.0e-6, "RMSNorm epsilon", gt=0)
  rope_max_timescale: Int = key(10000, "RoPE base (the largest wavelength)", gt=0)
  logits_via_embedding: Bool = key(False, "true ties the output projection to the input embedding")
  init_weights_std: Float = key(0.006, "std of the normal initialiser of embeddings and matrices", gt=0)
  dtype: Dtype = key("float32", "activation dtype: float32 | bfloat16 (logits and softmax stay float32)")
  weight_dtype: Dtype = key("float32", "parameter dtype: float32 | bfloat16")

  @pydantic.model_validator(mode="after")
  def _heads(self):
    heads, kv_heads, width = self.base_num_query_heads, self.base_num_kv_heads, self.base_emb_dim
    if self.head_dim == 0 and width % heads:
      raise ConfigError(f"base_num_query_heads={heads} does not divide base_emb_dim={width}; set head_dim explicitly")
    if heads % kv_heads:
      raise ConfigError(f"base_num_kv_heads={kv_heads} must divide base_num_query_heads={heads}")
    return self


class Attention(Group):
  """Attention"""

  attention: Str = key("autoselected", "attention kernel: autoselected (jax.nn.dot_product_attention), dot_product "
                       "(plain jnp), cudnn_flash (NVIDIA, bf16), splash (TPU; interpreted on CPU)", registry=True)


class Memory(Group):
  """Memory and compilation"""

  scan_layers: Bool = key(False, "lax.scan over layers: compile time independent of depth (use for deep models); "
                          "false unrolls the same stacked weights, ~10% faster on CPU for shallow models")
  remat_policy: Str = key("none", "what the backward pass recomputes: full keeps only layer inputs, minimal also "
                          "matmul outputs, save_qkv_proj the q/k/v projections", registry=True)
  num_vocab_tiling: Int = key(1, ">1: the loss runs the output projection and softmax over this many length chunks "
                              "(rematerialised), so the batch x length x vocab logits never exist at once; 1 = all "
                              "at once", ge=1)


class Optimizer(Group):
  """Optimizer"""

  opt_type: Str = key("adamw", "optimizer; adafactor is factored and relative to the parameter scale (uses the "
                      "adam_weight_decay, clipping and schedule keys)", registry=True)
  adam_b1: Float = key(0.9, "Adam first-moment decay", ge=0, lt=1)
  adam_b2: Float = key(0.95, "Adam second-moment decay", ge=0, lt=1)
  adam_eps: Float = key(1.0e-8, "Adam epsilon (outside the square root)", ge=0)
  adam_eps_root: Float = key(0.0, "Adam epsilon inside the square root", ge=0)
  adam_weight_decay: Float = key(0.1, "AdamW decoupled weight decay, multiplied by the learning rate", ge=0)
  weight_decay_on_gains: Bool = key(False, "also decay norm gains and biases (1-D parameters)")
  gradient_clipping_threshold: Float = key(1.0, "clip the global gradient norm to this; 0 = off", ge=0)
  gradient_accumulation_steps: Int = key(1, "micro-batches per optimizer step (token-weighted, exact)", gt=0)
  gradient_accumulation_unroll: Bool = key(
      False, "true: the micro-batches are independent computations XLA may run at once (a CPU overlaps them on its "
      "cores: ~10% faster for small models at 2 micro-batches), holding every micro-batch's activations together; "
      "false: a scan, one at a time")
  z_loss_multiplier: Float = key(0.0, "weight of the z-loss mean(logsumexp(logits)^2); 0 = off", ge=0)

  @pydantic.model_validator(mode="after")
  def _epsilon(self):
    if self.opt_type == "adamw" and self.adam_eps == 0 and self.adam_eps_root == 0:
      raise ConfigError("config keys 'adam_eps' and 'adam_eps_root' are both 0: a parameter whose gradient is "
                        "exactly 0 (an unused embedding row) would be updated by 0/0 = NaN")
    return self


class Schedule(Group):
  """Learning-rate schedule"""

  learning_rate: Float = key(3.0e-3, "peak learning rate", gt=0)
  lr_schedule_type: Str = key("cosine", "decay after the warmup; wsd is warmup-stable-decay", registry=True)
  warmup_steps_fraction: Float = key(0.05, "fraction of the schedule spent in linear warmup from 0", ge=0, le=1)
  learning_rate_schedule_steps: Annotated[PositiveOrAll, annotated_types.Le(INT32_MAX)] = key(
      -1, "length of the schedule; -1 = steps")
  learning_rate_final_fraction: Float = key(0.1, "floor of cosine/linear/wsd decay, as a fraction of the peak",
                                            ge=0, le=1)
  wsd_decay_steps_fraction: Float = key(0.2, "wsd only: fraction of the schedule spent in the final linear decay",
                                        ge=0, le=1)


class Parametrization(Group):
  """Parametrization"""

  parametrization: Literal["sp", "mup"] = key(
      "sp", "sp (families' init, one LR) | mup (init and Adam LR per parameter role and width; docs/mup.md)")
  mup_base_width: Int = key(128, "muP base width M0: width ratio w = base_emb_dim / M0; hidden and readout Adam LRs "
                            "are lr / w", gt=0)
  zero_init_query: Bool = key(False, "initialise query projections to exactly 0 (either parametrization)")
  zero_init_readout: Bool = key(False, "initialise the untied output projection to exactly 0 (either parametrization)")
  output_logits_multiplier: Float = key(1.0, "constant factor on the output logits (muP alpha_output; under mup "
                                        "with tied logits, also / w)")
  independent_weight_decay: Bool = key(False, "decay by adam_weight_decay x schedule / peak LR, not x LR, so tuning "
                                       "the LR leaves it alone")
  use_norm_gains: Bool = key(True, "learnable norm gains (and LayerNorm biases); muP presets turn them off (gains "
                             "hurt LR transfer)")
  record_activations: Bool = key(False, 'the model returns mean |activation| per site in aux["activations"] '
                                 "(coordinate check)")


class Data(Group):
  """Data"""

  dataset_type: Str = key("tfrecord", "where documents come from: TFRecord files, a TFDS dataset, a Hugging Face "
                          "dataset, or generated (synthetic)", registry=True)
  dataset_path: Str = key("", 'folder, glob or list of TFRecord files; "" = the embedded default corpus', path=True)
  train_split: Str = key("train", "split (file name prefix under dataset_path, or TFDS split) for training")
  eval_split: Str = key("validation", "split for evaluation during training and mode=validation")
  test_split: Str = key("test", "split for mode=test")
  tfds_name: Str = key("", "TFDS dataset name (dataset_type=tfds), e.g. lm1b")
  tfds_data_dir: Str = key("", 'TFDS data directory; "" = TFDS default', path=True)
  tfds_text_key: Str = key("text", "TFDS feature holding the text")
  hf_path: Str = key("", "dataset_type=hf: a save_to_disk folder, json/jsonl/parquet/csv/txt files (folder, glob, "
                     "list), or a dataset name in the local Hugging Face cache")
  hf_name: Str = key("", "dataset_type=hf: the dataset's configuration name (e.g. en for allenai/c4)")
  hf_data_column: Str = key("text", "dataset_type=hf: the column holding the text, or token ids (a list of ints per "
                            "row)")
  hf_train_split: Str = key("", 'dataset_type=hf: the dataset\'s split to train on; "" = train_split')
  hf_eval_split: Str = key("", 'dataset_type=hf: the dataset\'s split to evaluate on; "" = eval_split, else 1% of '
                           "the training documents held out")
  hf_streaming: Bool = key(False, "dataset_type=hf: read documents as a stream (no index on disk, no global shuffle: "
                           "window shuffle, resume on the same process count)")
  tokenizer_path: Str = key("", 'tokenizer file: SentencePiece model, or tokenizer.json / its folder (hf); "" = the '
                            "one next to dataset_path", path=True)
  tokenizer_type: Str = key("sentencepiece", "byte: UTF-8 bytes, id = byte + 4 after pad/unk/bos/eos (260 ids, no "
                            "file); hf: a Hugging Face tokenizer", registry=True)
  add_bos: Bool = key(True, "prepend BOS to each document when tokenizing text")
  add_eos: Bool = key(True, "append EOS to each document when tokenizing text")
  dataset_cache_dir: Str = key("", "where the default corpus is prepared and token stores are indexed (global "
                               'shuffle); "" = ~/.cache/maxtext_research', path=True)
  per_device_batch_size: Float = key(8.0, "sequences per device per micro-batch (fractional allowed if the total "
                                     "is whole)", gt=0)
  eval_per_device_batch_size: Float = key(0.0, "sequences per device per eval batch; 0 = per_device_batch_size",
                                          ge=0)
  max_target_length: Int = key(256, "tokens per training sequence L", gt=0)
  packing: Bool = key(True, "pack several documents per sequence (segment ids stop attention across them)")
  data_shuffle: Literal["global", "window"] = key(
      "global", "global: every epoch a seeded permutation of all training rows (memory O(batch)); window: the "
      "buffers below (streamed and generated data always)")
  data_shuffle_seed: Int = key(0, "seed of the shuffle", ge=0)
  shuffle_buffer_size: Int = key(1024, "data_shuffle=window: documents held in the shuffle buffer")
  packed_shuffle_buffer_size: Int = key(1024, "data_shuffle=window: packed rows held in a second shuffle buffer "
                                        "(train split), so a batch mixes documents; 0 = off")
  num_epochs: PositiveOrAll = key(-1, "passes over the training data; -1 = repeat forever")


class Evaluation(Group):
  """Evaluation"""

  eval_interval: StepCount = key(100, "steps between evaluations; 0 = off", ge=0)
  eval_steps: PositiveOrAll = key(10, "batches per evaluation; -1 = the whole split")


class Decoding(Group):
  """Decoding"""

  prompt: Str = key("def fib(n):", "text that decode.py continues")
  max_prefill_predict_length: Int = key(64, "prompts are right-padded to this many tokens (the prefill's fixed "
                                        "shape)", gt=0)
  max_decode_length: Int = key(64, "new tokens per prompt at most; the cache holds max_prefill_predict_length + "
                               "this", gt=0)
  decode_sampling_strategy: Str = key("greedy", "weighted is softmax with temperature, topk and nucleus (top-p) "
                                      "restrict it", registry=True)
  decode_sampling_temperature: Float = key(1.0, "the logits are divided by this before sampling (not used by "
                                           "greedy)", gt=0)
  decode_sampling_top_k: Int = key(40, "topk: sample among the k most likely tokens", gt=0)
  decode_sampling_nucleus_p: Float = key(0.9, "nucleus: sample among the fewest most likely tokens whose "
                                         "probabilities reach p", gt=0, le=1)
  decode_seed: Int = key(0, "seed of the sampling RNG: the same seed gives the same samples")


class Checkpointing(Group):
  """Checkpointing"""

  enable_checkpointing: Bool = key(True, "save checkpoints to <run dir>/checkpoints and resume from them")
  checkpoint_period: StepCount = key(100, "steps between checkpoints (a final one is always saved)", ge=0)
  max_num_checkpoints_to_keep: Int = key(3, "keep the newest N checkpoints; 0 = keep all", ge=0)
  async_checkpointing: Bool = key(True, "write checkpoints in the background")
  load_parameters_path: Str = key("", "start from the parameters of this checkpoint step dir (not its optimizer)",
                                  path=True)
  checkpoint_fallback: Bool = key(True, "a damaged latest checkpoint is reported, moved to checkpoints/damaged/, and "
                                  "the newest intact one restored; false: stop with the error instead")


_DEFAULT_RULES = (
    ("activation_batch", ("data", "fsdp")), ("activation_length", ()), ("activation_embed", ()),
    ("activation_heads", ("tensor",)), ("activation_kv_heads", ("tensor",)), ("activation_mlp", ("tensor",)),
    ("activation_vocab", ("tensor",)), ("embed", ("fsdp",)), ("vocab", ("tensor",)), ("mlp", ("tensor",)),
    ("heads", ("tensor",)), ("kv_heads", ("tensor",)), ("head_dim", ()), ("norm", ()), ("layers", ()),
    ("mudd_hidden", ()), ("mudd_streams", ()), ("mudd_sources", ()), ("vq_codes", ()),
)


class Sharding(Group):
  """Sharding"""

  machine: ClassVar[bool] = True  # describes where a command runs, not the model: not taken from a run's config.yml

  num_devices: PositiveOrAll = key(-1, "use the first N devices; -1 = all")
  mesh_axes: StrList = key(("data", "fsdp", "tensor"), "device mesh axis names", min_length=1)
  ici_data_parallelism: PositiveOrAll = key(1, "data-parallel ways within a slice; -1 = fill with the remaining "
                                            "devices")
  ici_fsdp_parallelism: PositiveOrAll = key(-1, "FSDP ways within a slice (parameters sharded on 'embed'); -1 = fill")
  ici_tensor_parallelism: PositiveOrAll = key(1, "tensor-parallel ways within a slice (heads, MLP and vocab)")
  dcn_data_parallelism: PositiveOrAll = key(-1, "data-parallel ways across slices (TPU) or processes (GPU, CPU); "
                                            "-1 = fill")
  dcn_fsdp_parallelism: PositiveOrAll = key(1, "FSDP ways across slices/hosts")
  dcn_tensor_parallelism: PositiveOrAll = key(1, "tensor-parallel ways across slices/hosts")
  print_sharding: Bool = key(False, "print every parameter's shape, logical axes, PartitionSpec and bytes per device")
  logical_axis_rules: tuple[AxisRule, ...] = key(
      _DEFAULT_RULES, "logical axis name -> mesh axes; first rule whose axes are free wins")

  @pydantic.model_validator(mode="after")
  def _axes(self):
    axes = self.mesh_axes
    if len(set(axes)) != len(axes):
      raise ConfigError(f"config key 'mesh_axes' must be distinct names, got {list(axes)}")
    names = set(type(self).model_fields)
    for prefix in ("ici", "dcn"):
      for axis in axes:
        if f"{prefix}_{axis}_parallelism" not in names:
          raise ConfigError(f"mesh axis {axis!r} has no config key '{prefix}_{axis}_parallelism'")
    for name, mesh in self.logical_axis_rules:
      for axis in (mesh,) if isinstance(mesh, str) else mesh:
        if axis not in axes:
          raise ConfigError(f"logical_axis_rules maps {name!r} to {axis!r}, which is not in mesh_axes")
    return self


class Distributed(Group):
  """Distributed"""

  machine: ClassVar[bool] = True

  jax_distributed_initialization: Literal["auto", "on", "off"] = key(
      "auto", "auto (init when a cluster is detected) | on | off")
  coordinator_address: Str = key("", "host:port of process 0 for an explicit multi-process launch")
  num_processes: Int = key(0, "total processes for an explicit launch; 0 = detect", ge=0)
  process_id: Int = key(-1, "this process's id for an explicit launch; -1 = detect", ge=-1)


class Compile(Group):
  """Ahead-of-time compilation (train_compile.py; docs/scale_out.md)"""

  compile_topology: Str = key("", "Cloud TPU slice to compile the train step for on this host: v4-8, v5p-8, "
                              "v5e-256, v6e-8, ...")
  compile_topology_num_slices: Int = key(1, "slices of compile_topology joined by the data-centre network (the dcn_* "
                                         "mesh axes)", gt=0)


class Logging(Group):
  """Logging and metrics"""

  log_period: StepCount = key(10, "steps between metric rows (TensorBoard, metrics.jsonl, progress line)", gt=0)
  enable_tensorboard: Bool = key(True, "write TensorBoard event files under <run dir>/tensorboard")
  metrics_file: FileName = key("metrics.jsonl", "file under the run dir that receives every metric row")
  peak_tflops_per_device: Float = key(0.0, "MFU denominator; 0 = table for known accelerators, measured on CPU", ge=0)
  profiler: Literal["", "xplane"] = key("", "xplane: trace profiler_steps train steps with jax.profiler into "
                                        "<run dir>/tensorboard (TensorBoard's profile tab); \"\" = off")
  skip_first_n_steps_for_profiler: Int = key(1, "the trace starts this many steps after the run's first step "
                                             "(compilation is before it either way)", ge=0)
  profiler_steps: Int = key(5, "train steps in the trace", gt=0)


class Derived(Group):
  """Derived (computed when the config is resolved; not settable)"""

  micro_batch_size: Int = key(0, "sequences per micro-batch over all devices", derived=True)
  global_batch_size_to_train_on: Int = key(0, "sequences per optimizer step over all devices", derived=True)
  eval_batch_size: Int = key(0, "sequences per eval batch over all devices", derived=True)
  num_slices: Int = key(1, "groups of devices joined by the data-centre network (processes, or TPU slices)",
                        derived=True)
  ici_parallelism: tuple[int, ...] = key((), "resolved mesh shape inside a slice, in mesh_axes order", derived=True)
  dcn_parallelism: tuple[int, ...] = key((), "resolved mesh shape across slices, in mesh_axes order", derived=True)
  run_dir: Str = key("", "<base_output_directory>/<run_name>", derived=True)
  checkpoint_dir: Str = key("", "<run dir>/checkpoints", derived=True)
  tensorboard_dir: Str = key("", "<run dir>/tensorboard", derived=True)
  schedule_follows_steps: Bool = key(False, "learning_rate_schedule_steps was -1: the schedule's length is `steps`, so "
                                     "a resumed run keeps the length its checkpoint saved (docs/reliability.md)",
                                     derived=True)


class Checks(Group):
  """Checks across groups (no keys)."""

  @pydantic.model_validator(mode="after")
  def _across_groups(self):
    if self.max_target_length % self.num_vocab_tiling:
      raise ConfigError(f"config key 'num_vocab_tiling' must be a positive divisor of max_target_length="
                        f"{self.max_target_length}, got {self.num_vocab_tiling}")
    if self.num_vocab_tiling > 1 and self.record_activations:
      raise ConfigError("record_activations measures the whole logits: set num_vocab_tiling=1")
    return self


class ConfigBase(Group):
  """The methods of a resolved config."""

  def to_dict(self) -> dict[str, Any]:
    def thaw(x):
      return [thaw(i) for i in x] if isinstance(x, tuple) else x
    return {name: thaw(getattr(self, name)) for name in ordered_keys(type(self))}

  def to_yaml(self) -> str:
    """Settable keys as YAML (so the file is itself a valid config), derived values as comments."""
    values = self.to_dict()
    settable = {k: v for k, v in values.items() if k not in derived_keys()}
    text = yaml.safe_dump(settable, sort_keys=False, default_flow_style=None, width=120)
    derived = "".join(f"# {k}: {values[k]}\n" for k in derived_keys())
    return text + "# --- derived (not settable) ---\n" + derived

  def replace(self, **changes):
    """A copy with `changes` applied and checked like any other layer of keys."""
    return type(self).model_validate({**{k: getattr(self, k) for k in type(self).model_fields}, **changes})


# Groups in the order --help and base_v2.yml show them; the families' groups follow Model.
CORE_GROUPS = (Run, Model, Attention, Memory)
LATER_GROUPS = (Optimizer, Schedule, Parametrization, Data, Evaluation, Decoding, Checkpointing, Sharding,
                Distributed, Compile, Logging)


def family_groups() -> list[type[Group]]:
  """Each registered family's own group, once (a family may share or extend another's)."""
  found: list[type[Group]] = []
  for _, family in models.FAMILIES.items():
    if family.keys is not None and family.keys not in found:
      found.append(family.keys)
  return found


def groups() -> list[type[Group]]:
  """Every group of settable keys, in display order."""
  return [*CORE_GROUPS, *family_groups(), *LATER_GROUPS]


@functools.cache
def config_class() -> type[ConfigBase]:
  """The frozen model of a whole config: every group, the cross-group checks and the derived values."""
  bases = (ConfigBase, *reversed(groups()), Checks, Derived)
  cls = pydantic.create_model("Config", __base__=bases, __module__=__name__)
  cls.__doc__ = "Frozen, validated configuration of one run (see MaxText/config/schema.py)."
  return cls


@functools.cache
def ordered_keys(cls: type | None = None) -> tuple[str, ...]:
  """Every key, settable ones in display order then the derived ones."""
  names = [name for group in groups() for name in _own_fields(group)]
  return tuple(dict.fromkeys(names + list(_own_fields(Derived))))


def _own_fields(group: type[Group]) -> list[str]:
  """A group's keys, those it inherits from another family's group first."""
  return list(group.model_fields)


@functools.cache
def fields() -> dict[str, pydantic.fields.FieldInfo]:
  return dict(config_class().model_fields)


@functools.cache
def derived_keys() -> tuple[str, ...]:
  return tuple(_own_fields(Derived))


def settable_keys() -> tuple[str, ...]:
  return tuple(k for k in ordered_keys() if k not in derived_keys())


def defaults() -> dict[str, Any]:
  """Every settable key and its default."""
  return {k: fields()[k].default for k in settable_keys()}


def registry_keys() -> tuple[str, ...]:
  """Keys whose choices are the names registered for them."""
  return tuple(k for k in settable_keys() if extra(fields()[k], "registry"))


def path_keys() -> tuple[str, ...]:
  return tuple(k for k in settable_keys() if extra(fields()[k], "path"))


def machine_keys() -> tuple[str, ...]:
  """Keys of the groups that describe the machine a command runs on rather than the model."""
  return tuple(k for g in groups() if getattr(g, "machine", False) for k in g.model_fields)


def group_of(name: str) -> type[Group]:
  for group in groups():
    if name in group.model_fields:
      return group
  return Derived


def absolute_path(path: str) -> str:
  """`path` made absolute against the working directory (with ~ expanded); "" and URLs (gs://...) as given."""
  if not path or "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))

