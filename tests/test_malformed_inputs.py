"""Malformed input, as a new user types it: each of these >= 100 cases (config keys and values, YAML files,
data, checkpoints, the command line) must give one line `error: ...` naming the culprit and exit 2, never
a traceback and never a silent acceptance. `train.main` runs in-process; almost every case stops at config
validation, the data and checkpoint cases before the train step is compiled.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import BASE

from MaxText import errors, train

# A tiny model, one device, synthetic data: what the cases below break, one key or file at a time.
TINY = ["base_emb_dim=32", "base_num_decoder_layers=1", "base_num_query_heads=2", "base_num_kv_heads=2",
        "base_mlp_dim=64", "vocab_size=128", "max_target_length=16", "per_device_batch_size=1", "num_devices=1",
        "steps=2", "log_period=1", "eval_interval=0", "enable_tensorboard=false", "dataset_type=synthetic",
        "checkpoint_period=2"]

# (id, command-line arguments after the tiny model's, fragment of the one-line message). `{tmp}` is the
# test's folder, `{run}` a run name unique to the case. The config file argument is base_v2.yml unless the
# arguments start with `@<file>` (a file made by FILES below, in {tmp}).
KEYS = [
    # unknown keys, typos, malformed key=value
    ("typo_key", ["learnig_rate=1"], "unknown config key 'learnig_rate'"),
    ("typo_key_2", ["stpes=3"], "unknown config key 'stpes'"),
    ("empty_key", ["=3"], "unknown config key ''"),
    ("no_equals", ["steps"], "argument 'steps' is not key=value"),
    ("key_twice", ["steps=1", "steps=2"], "config key 'steps' is given twice"),
    ("derived_key", ["global_batch_size_to_train_on=4"], "global_batch_size_to_train_on"),
    ("derived_run_dir", ["run_dir=/tmp/x"], "run_dir"),
    # integers
    ("steps_word", ["steps=ten"], "config key 'steps' expects an integer"),
    ("steps_float", ["steps=2.5"], "config key 'steps' expects an integer"),
    ("steps_zero", ["steps=0"], "config key 'steps' must be positive"),
    ("steps_negative", ["steps=-3"], "config key 'steps'"),
    ("steps_bool", ["steps=true"], "config key 'steps' expects an integer"),
    ("steps_list", ["steps=[1,2]"], "config key 'steps' expects an integer"),
    ("steps_beyond_int64", ["steps=99999999999999999999"], "config key 'steps'"),
    ("steps_beyond_int32", ["steps=3000000000"], "config key 'steps' must be at most 2147483647"),
    ("steps_empty", ["steps="], "config key 'steps'"),
    ("log_period_zero", ["log_period=0"], "config key 'log_period'"),
    ("log_period_word", ["log_period=often"], "config key 'log_period' expects an integer"),
    ("checkpoint_period_negative", ["checkpoint_period=-1"], "config key 'checkpoint_period'"),
    ("checkpoint_period_huge", ["checkpoint_period=1e30"], "config key 'checkpoint_period'"),
    ("eval_interval_negative", ["eval_interval=-5"], "config key 'eval_interval'"),
    ("eval_steps_zero", ["eval_steps=0"], "config key 'eval_steps' must be positive or -1"),
    ("eval_steps_minus_two", ["eval_steps=-2"], "config key 'eval_steps' must be positive or -1"),
    ("schedule_steps_zero", ["learning_rate_schedule_steps=0"], "learning_rate_schedule_steps"),
    ("max_consecutive_skips_zero", ["max_consecutive_skips=0"], "config key 'max_consecutive_skips' must be at least 1"),
    ("data_shuffle_seed_negative", ["data_shuffle_seed=-1"], "config key 'data_shuffle_seed' must not be negative"),
    ("emb_dim_zero", ["base_emb_dim=0"], "base_emb_dim"),
    ("emb_dim_word", ["base_emb_dim=wide"], "config key 'base_emb_dim' expects an integer"),
    ("layers_zero", ["base_num_decoder_layers=0"], "base_num_decoder_layers"),
    ("heads_not_dividing", ["base_num_query_heads=3"], "base_num_query_heads=3 does not divide base_emb_dim=32"),
    ("kv_heads_not_dividing", ["base_num_kv_heads=3", "base_num_query_heads=4"], "base_num_kv_heads=3"),
    ("mlp_dim_zero", ["base_mlp_dim=0"], "base_mlp_dim"),
    ("vocab_zero", ["vocab_size=0"], "vocab_size"),
    ("length_zero", ["max_target_length=0"], "max_target_length"),
    ("batch_zero", ["per_device_batch_size=0"], "per_device_batch_size"),
    ("batch_fraction", ["per_device_batch_size=0.3", "num_devices=2"], "is not a whole number of sequences"),
    ("accumulation_zero", ["gradient_accumulation_steps=0"], "gradient_accumulation_steps"),
    ("num_devices_too_many", ["num_devices=1000"], "num_devices"),
    # floats
    ("lr_word", ["learning_rate=fast"], "config key 'learning_rate' expects a number"),
    ("lr_bool", ["learning_rate=false"], "config key 'learning_rate' expects a number"),
    ("lr_nan", ["learning_rate=nan"], "learning_rate"),
    ("lr_inf", ["learning_rate=inf"], "learning_rate"),
    ("lr_negative", ["learning_rate=-1e-3"], "learning_rate"),
    ("warmup_two", ["warmup_steps_fraction=2"], "'warmup_steps_fraction' must lie in [0, 1]"),
    ("warmup_negative", ["warmup_steps_fraction=-0.1"], "'warmup_steps_fraction' must lie in [0, 1]"),
    ("final_fraction_two", ["learning_rate_final_fraction=2"], "learning_rate_final_fraction"),
    ("adam_b1_two", ["adam_b1=2"], "config key 'adam_b1' must lie in [0, 1)"),
    ("adam_b1_one", ["adam_b1=1"], "config key 'adam_b1' must lie in [0, 1)"),
    ("adam_b2_negative", ["adam_b2=-1"], "config key 'adam_b2' must lie in [0, 1)"),
    ("adam_eps_negative", ["adam_eps=-1"], "config key 'adam_eps' must not be negative"),
    ("adam_eps_root_negative", ["adam_eps_root=-1"], "config key 'adam_eps_root' must not be negative"),
    ("adam_eps_both_zero", ["adam_eps=0", "adam_eps_root=0"], "are both 0"),
    ("init_std_negative", ["init_weights_std=-1"], "config key 'init_weights_std' must be positive"),
    ("init_std_zero", ["init_weights_std=0"], "config key 'init_weights_std' must be positive"),
    ("norm_eps_negative", ["normalization_layer_epsilon=-1"], "'normalization_layer_epsilon' must be positive"),
    ("rope_zero", ["rope_max_timescale=0"], "config key 'rope_max_timescale' must be positive"),
    ("rope_negative", ["rope_max_timescale=-10"], "config key 'rope_max_timescale' must be positive"),
    ("clip_negative", ["gradient_clipping_threshold=-1"], "gradient_clipping_threshold"),
    ("weight_decay_word", ["adam_weight_decay=lots"], "config key 'adam_weight_decay' expects a number"),
    ("temperature_zero", ["decode_sampling_temperature=0"], "decode_sampling_temperature"),
    # booleans, choices, lists
    ("bool_word", ["scan_layers=maybe"], "config key 'scan_layers' expects true or false"),
    ("bool_number", ["enable_checkpointing=2"], "config key 'enable_checkpointing' expects true or false"),
    ("bool_tensorboard", ["enable_tensorboard=yesplease"], "config key 'enable_tensorboard' expects true or false"),
    ("dtype_float16", ["dtype=float16"], "config key 'dtype' must be one of float32, bfloat16"),
    ("weight_dtype_int8", ["weight_dtype=int8"], "config key 'weight_dtype' must be one of"),
    ("mode_typo", ["mode=trian"], "config key 'mode' must be one of"),
    ("nan_policy_typo", ["nan_policy=ignore"], "config key 'nan_policy' must be one of stop, skip"),
    ("parametrization_typo", ["parametrization=ntk"], "config key 'parametrization' must be one of"),
    ("distributed_typo", ["jax_distributed_initialization=maybe"], "jax_distributed_initialization"),
    ("decoder_block_unknown", ["decoder_block=resnet"], "unknown decoder_block 'resnet'"),
    ("opt_type_unknown", ["opt_type=sgdd"], "opt_type"),
    ("schedule_unknown", ["lr_schedule_type=cosin"], "lr_schedule_type"),
    ("remat_unknown", ["remat_policy=some"], "remat_policy"),
    ("attention_unknown", ["attention=flash9"], "attention"),
    ("dataset_type_unknown", ["dataset_type=parquet"], "dataset_type"),
    ("tokenizer_type_unknown", ["tokenizer_type=wordpiece"], "tokenizer_type"),
    ("sampling_unknown", ["decode_sampling_strategy=beam"], "decode_sampling_strategy"),
    ("mlp_activations_scalar", ["mlp_activations=silu"], "config key 'mlp_activations' expects a list"),
    ("mlp_activations_unknown", ["mlp_activations=[foo]"], "foo"),
    ("mlp_activations_empty", ["mlp_activations=[]"], "mlp_activations"),
    ("mlp_activations_three", ["mlp_activations=[silu,linear,gelu]"], "mlp_activations"),
    ("mesh_axes_scalar", ["mesh_axes=data"], "config key 'mesh_axes' expects a list"),
    ("axis_rule_unknown_axis", ["logical_axis_rules=[[embed, pipeline]]"], "which is not in mesh_axes"),
    ("parallelism_mismatch", ["ici_fsdp_parallelism=2"], "does not match the 1 devices per slice"),
    ("parallelism_two_fills", ["num_devices=4", "ici_fsdp_parallelism=-1", "ici_data_parallelism=-1"], "only one of"),
    ("parallelism_not_dividing", ["num_devices=4", "ici_tensor_parallelism=3"], "3 ways do not divide the 4"),
    ("family_key_elsewhere", ["alibi=true"], "config key 'alibi'=True applies to decoder_block 'gpt' only"),
    ("yaml_flow_broken", ["mesh_axes=[data,"], "mesh_axes"),
    # names and paths that would read or write outside their folders
    ("model_name_unknown", ["model_name=Llama3Huge"], "unknown model_name 'Llama3Huge'"),
    ("model_name_relative_path", ["model_name=../x"], "unknown model_name '../x'"),
    ("model_name_absolute_path", ["model_name=/etc/hostname"], "unknown model_name '/etc/hostname'"),
    ("model_name_config_file", ["model_name=../base_v2"], "unknown model_name '../base_v2'"),
    ("run_name_dotdot", ["run_name=.."], "config key 'run_name' must be a folder name"),
    ("run_name_dot", ["run_name=."], "config key 'run_name' must be a folder name"),
    ("run_name_slash", ["run_name=a/b"], "config key 'run_name' must be a folder name"),
    ("run_name_absolute", ["run_name=/tmp/elsewhere"], "config key 'run_name' must be a folder name"),
    ("run_name_empty", ["run_name="], "config key 'run_name'"),
    ("metrics_file_absolute", ["metrics_file=/tmp/metrics.jsonl"], "config key 'metrics_file' must be a file name"),
    ("metrics_file_dotdot", ["metrics_file=../m.jsonl"], "config key 'metrics_file' must be a file name"),
    ("metrics_file_empty", ["metrics_file="], "config key 'metrics_file'"),
    ("output_dir_empty", ["base_output_directory="], "config key 'base_output_directory' must name a folder"),
    ("output_dir_blank", ["base_output_directory=  "], "config key 'base_output_directory' must name a folder"),
]

# YAML files given as the config file (argument `@name`); FILES makes them.
FILES = {
    "non_utf8.yml": b"steps: 3\nrun_name: \xff\xfe caf\xe9\n",
    "latin1.yml": "run_name: caf\u00e9\n".encode("latin-1"),
    "duplicate.yml": b"steps: 3\nlearning_rate: 1.0e-3\nsteps: 5\n",
    "duplicate_nested.yml": b"base_config: base_v2.yml\nsteps: 3\nsteps: 3\n",
    "broken.yml": b"steps: [1,\n",
    "tabs.yml": b"steps:\t\t3\n\tlearning_rate: 1\n",
    "unknown_key.yml": b"stpes: 3\n",
    "list_top.yml": b"- steps\n- 3\n",
    "scalar_top.yml": b"just a string\n",
    "wrong_type.yml": b"steps: three\n",
    "binary.yml": bytes(range(256)),
    "python_tag.yml": b"steps: !!python/object/apply:os.system ['true']\n",
}
FILE_CASES = [
    ("yaml_non_utf8", ["@non_utf8.yml"], "is not UTF-8 text"),
    ("yaml_latin1", ["@latin1.yml"], "is not UTF-8 text"),
    ("yaml_duplicate_key", ["@duplicate.yml"], "line 3: key 'steps' is given twice"),
    ("yaml_duplicate_key_2", ["@duplicate_nested.yml"], "key 'steps' is given twice"),
    ("yaml_broken", ["@broken.yml"], "is not valid YAML"),
    ("yaml_tabs", ["@tabs.yml"], "is not valid YAML"),
    ("yaml_unknown_key", ["@unknown_key.yml"], "unknown config key 'stpes' in config file"),
    ("yaml_list_at_top", ["@list_top.yml"], "list_top.yml"),
    ("yaml_scalar_at_top", ["@scalar_top.yml"], "scalar_top.yml"),
    ("yaml_wrong_type", ["@wrong_type.yml"], "config key 'steps' expects an integer"),
    ("yaml_binary", ["@binary.yml"], "binary.yml"),
    ("yaml_python_tag", ["@python_tag.yml"], "python_tag.yml"),
    ("yaml_missing", ["@missing.yml"], "cannot read config file"),
    ("yaml_is_a_folder", ["@."], "cannot read config file"),
]

# The command line itself.
CLI_CASES = [
    ("cli_unknown_option", ["--frobnicate"], "unknown option '--frobnicate'"),
    ("cli_unknown_option_2", ["--count_params"], "unknown option '--count_params'"),
    ("cli_config_twice", ["@@twice"], "the config YAML must come first"),
    ("cli_config_not_yaml", ["@@plain"], "plain"),
    ("cli_short_option", ["-x"], "argument '-x' is not key=value"),
    ("cli_stray_word", ["notes.txt"], "argument 'notes.txt' is not key=value"),
    ("cli_dashed_key_twice", ["--steps=3", "steps=1"], "config key 'steps' is given twice"),
]

# Data, checkpoints and folders: past config validation, stopped before the first step.
RUN_CASES = [
    ("data_path_missing", ["dataset_type=tfrecord", "dataset_path={tmp}/no-such-data"], "no TFRecord files for split 'train'"),
    ("data_path_empty_folder", ["dataset_type=tfrecord", "dataset_path={tmp}/empty-data"], "empty-data"),
    ("data_tokenizer_missing", ["dataset_type=tfrecord", "dataset_path={tmp}/empty-data",
                                "tokenizer_path={tmp}/none.model"], "none.model"),
    ("data_tokenizer_garbage", ["dataset_type=tfrecord", "dataset_path={tmp}/garbage-data"], "garbage-data"),
    ("data_records_garbage", ["dataset_type=tfrecord", "dataset_path={tmp}/garbage-data", "tokenizer_type=byte",
                              "vocab_size=512"], "garbage-data"),
    ("data_tfds_no_name", ["dataset_type=tfds"], "dataset_type=tfds needs tfds_name"),
    ("data_tfds_not_prepared", ["dataset_type=tfds", "tfds_name=lm1b", "tfds_data_dir={tmp}/empty-data"], "is not prepared"),
    ("load_parameters_missing", ["load_parameters_path={tmp}/no-such-checkpoint"], "no-such-checkpoint"),
    ("load_parameters_not_a_checkpoint", ["load_parameters_path={tmp}/empty-data"], "is not a checkpoint step folder"),
    ("load_parameters_a_file", ["load_parameters_path={tmp}/a-file"], "a-file"),
    ("output_dir_is_a_file", ["base_output_directory={tmp}/a-file"], "a-file"),
    ("run_dir_is_a_file", ["run_name=a-file", "base_output_directory={tmp}"], "is a file, not a folder"),
    ("checkpoints_is_a_file", ["run_name=ckfile", "base_output_directory={tmp}"], "is a file, not a folder"),
    ("checkpoint_garbage", ["run_name=garbage-ck", "base_output_directory={tmp}"], "no intact checkpoint in"),
    ("eval_without_checkpoint", ["mode=validation", "run_name=never-trained", "base_output_directory={tmp}"],
     "needs a checkpoint"),
]

CASES = KEYS + FILE_CASES + CLI_CASES + RUN_CASES


def test_the_table_holds_at_least_100_cases():
  assert len(CASES) >= 100
  assert len({case[0] for case in CASES}) == len(CASES), "case ids are unique"


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
  """The files and folders the cases point at."""
  tmp = tmp_path_factory.mktemp("malformed")
  for name, data in FILES.items():
    (tmp / name).write_bytes(data)
  (tmp / "plain").write_text("steps=3\n")
  (tmp / "empty-data").mkdir()
  (tmp / "garbage-data").mkdir()
  (tmp / "garbage-data" / "train-00000-of-00001.tfrecord").write_bytes(b"not a record" * 10)
  (tmp / "garbage-data" / "tokenizer.model").write_bytes(b"not a model")
  (tmp / "a-file").write_text("in the way\n")
  (tmp / "ckfile").mkdir()
  (tmp / "ckfile" / "checkpoints").write_text("in the way\n")
  garbage = tmp / "garbage-ck" / "checkpoints" / "2"
  for item in ("state", "data", "meta"):
    (garbage / item).mkdir(parents=True)
    (garbage / item / "_METADATA").write_bytes(b"\x00garbage")
  (garbage / "_CHECKPOINT_METADATA").write_text("{not json")
  return tmp


def _argv(args: list[str], tmp: Path, case_id: str) -> list[str]:
  config = BASE
  if args and args[0].startswith("@@"):
    twice = args[0] == "@@twice"
    config = BASE if twice else str(tmp / "plain")
    args = ([BASE] if twice else []) + args[1:]
  elif args and args[0].startswith("@"):
    config = str(tmp / args[0][1:])
    args = args[1:]
  defaults = [f"base_output_directory={tmp}/runs", f"run_name={case_id}"]
  args = [a.format(tmp=tmp, run=case_id) for a in args]
  given = {a.split("=", 1)[0] for a in args}
  return [None, config] + [a for a in TINY + defaults if a.split("=", 1)[0] not in given] + args


@pytest.mark.parametrize("case_id,args,fragment", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_one_line_and_exit_2(case_id, args, fragment, scene, capsys, monkeypatch):
  for key in [k for k in os.environ if k.startswith("M_")]:
    monkeypatch.delenv(key)
  before = sorted(p.name for p in scene.iterdir())
  code = train.main(_argv(args, scene, case_id))
  out, err = capsys.readouterr()
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == errors.EXIT_ERROR, f"exit {code}; stderr: {err[-1500:]}"
  assert "Traceback" not in err + out
  assert len(lines) >= 1 and lines[-1].startswith("error: "), err[-1500:]
  errors_printed = [line for line in lines if line.startswith("error: ")]
  assert len(errors_printed) == 1, err
  assert fragment in lines[-1], lines[-1]
  # nothing was written next to the inputs (a bad key must not leave an empty run behind)
  assert sorted(p.name for p in scene.iterdir() if p.name != "runs") == [b for b in before if b != "runs"]
