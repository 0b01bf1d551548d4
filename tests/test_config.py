"""Config parsing: layering, types, derived values and every error path."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from MaxText import pyconfig, startup
from tests.conftest import BASE

ROOT = Path(__file__).resolve().parents[1]


def init(*args, env=None, **kwargs):
  return startup.load_config([None, BASE, *args], env=env or {}, **kwargs)


def test_defaults_and_derived_values():
  c = init("num_devices=2", "gradient_accumulation_steps=3", "run_name=r1", "base_output_directory=/tmp/x")
  assert c.head_dim == c.base_emb_dim // c.base_num_query_heads
  assert c.micro_batch_size == 8 * 2
  assert c.global_batch_size_to_train_on == 8 * 2 * 3
  assert c.run_dir == "/tmp/x/r1" and c.checkpoint_dir == "/tmp/x/r1/checkpoints"
  assert c.learning_rate_schedule_steps == c.steps
  assert c.ici_parallelism == (1, 2, 1) and c.dcn_parallelism == (1, 1, 1)


def test_values_are_parsed_as_yaml_scalars_and_lists():
  c = init("learning_rate=3e-4", "steps=1e3", "scan_layers=false", "mlp_activations=[gelu]", "run_name=007")
  assert c.learning_rate == pytest.approx(3e-4) and c.steps == 1000 and c.scan_layers is False
  assert c.mlp_activations == ("gelu",) and c.run_name == "007"


def test_precedence_base_preset_env_cli(tmp_path):
  c = init("model_name=Llama2Small")
  assert c.base_emb_dim == 256 and c.vocab_size == 8192
  c = init("model_name=Llama2Small", "base_emb_dim=128", "head_dim=32")
  assert c.base_emb_dim == 128, "a key on the command line wins over the preset"
  c = init("model_name=Llama2Small", env={"M_BASE_EMB_DIM": "512", "M_STEPS": "7"})
  assert c.base_emb_dim == 512 and c.steps == 7, "M_<KEY> wins over the preset"
  c = init("model_name=Llama2Small", "steps=9", env={"M_STEPS": "7"})
  assert c.steps == 9, "the command line wins over the environment"
  user = tmp_path / "exp.yml"
  user.write_text("model_name: Llama2Small\nlearning_rate: 0.5\n")
  c = startup.load_config([None, str(user)], env={})
  assert c.model_name == "Llama2Small" and c.learning_rate == 0.5 and c.base_emb_dim == 256


def test_keyword_overrides_and_frozen():
  c = init(steps=5)
  assert c.steps == 5
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.steps = 6


@pytest.mark.parametrize("args, kwargs, env, fragment", [
    (["learnig_rate=1"], {}, {}, "unknown config key 'learnig_rate' on the command line (did you mean learning_rate"),
    (["steps=ten"], {}, {}, "config key 'steps' expects an integer, got 'ten'"),
    (["scan_layers=maybe"], {}, {}, "config key 'scan_layers' expects true or false"),
    (["learning_rate=fast"], {}, {}, "config key 'learning_rate' expects a number"),
    (["mlp_activations=silu"], {}, {}, "config key 'mlp_activations' expects a list"),
    (["base_num_query_heads=3"], {}, {}, "base_num_query_heads=3 does not divide base_emb_dim=256"),
    (["base_num_kv_heads=3"], {}, {}, "base_num_kv_heads=3 must divide base_num_query_heads=4"),
    (["num_devices=1", "ici_fsdp_parallelism=2"], {}, {}, "does not match the 1 devices per slice"),
    (["num_devices=4", "ici_fsdp_parallelism=-1", "ici_data_parallelism=-1"], {}, {}, "only one of"),
    (["num_devices=4", "ici_tensor_parallelism=3"], {}, {}, "3 ways do not divide the 4"),
    (["model_name=Llama3Huge"], {}, {}, "unknown model_name 'Llama3Huge'"),
    (["dtype=float16"], {}, {}, "config key 'dtype' must be one of float32, bfloat16"),
    (["steps=0"], {}, {}, "config key 'steps' must be positive"),
    (["warmup_steps_fraction=2"], {}, {}, "'warmup_steps_fraction' must lie in [0, 1]"),
    (["decoder_block=resnet"], {}, {}, "unknown decoder_block 'resnet'; registered model families: gpt, llama2, mudd, transformer_vq"),
    (["per_device_batch_size=0.3", "num_devices=2"], {}, {}, "is not a whole number of sequences"),
    (["global_batch_size_to_train_on=4"], {}, {}, "unknown config key 'global_batch_size_to_train_on'"),
    (["steps"], {}, {}, "argument 'steps' is not key=value"),
    (["steps=1", "steps=2"], {}, {}, "config key 'steps' is given twice"),
    ([], {}, {"M_STEPZ": "3"}, "unknown config key 'stepz' from environment variable M_STEPZ"),
    ([], {"global_batch_size_to_train_on": 3}, {}, "is derived and cannot be set"),
    (["logical_axis_rules=[[embed, pipeline]]"], {}, {}, "maps 'embed' to 'pipeline', which is not in mesh_axes"),
    (["alibi=true"], {}, {}, "config key 'alibi'=True applies to decoder_block 'gpt' only"),
    (["model_name=GPTTiny", "mudd_streams=q,r"], {}, {}, "config key 'mudd_streams'='q,r' applies to decoder_block 'mudd'"),
    (["model_name=MUDDLlama2Tiny", "vq_num_codes=8"], {}, {}, "'vq_num_codes'=8 applies to decoder_block 'transformer_vq'"),
])
def test_errors_are_one_line_and_name_the_key(args, kwargs, env, fragment):
  with pytest.raises(pyconfig.ConfigError) as e:
    init(*args, env=env, **kwargs)
  message = str(e.value)
  assert fragment in message, message
  assert "\n" not in message


def test_bad_yaml_files(tmp_path):
  missing = tmp_path / "nope.yml"
  with pytest.raises(pyconfig.ConfigError, match="cannot read config file"):
    startup.load_config([None, str(missing)], env={})
  broken = tmp_path / "broken.yml"
  broken.write_text("steps: [1,\n")
  with pytest.raises(pyconfig.ConfigError, match="is not valid YAML"):
    startup.load_config([None, str(broken)], env={})
  unknown = tmp_path / "unknown.yml"
  unknown.write_text("stpes: 3\n")
  with pytest.raises(pyconfig.ConfigError, match="unknown config key 'stpes' in config file"):
    startup.load_config([None, str(unknown)], env={})


def test_every_base_key_is_documented_and_typed():
  docs = {key for _, key, comment in pyconfig.key_docs() if comment}
  base = yaml.safe_load(pyconfig.BASE_CONFIG.read_text())
  assert set(base) == docs, "every key of base_v2.yml carries a one-line comment"
  assert all(v is not None for v in base.values()), "a null default would leave the key untyped"


@pytest.mark.parametrize("name", pyconfig.preset_names())
def test_every_preset_parses_and_names_its_command(name):
  path = pyconfig.MODELS_DIR / f"{name}.yml"
  assert path.read_text().startswith("# python MaxText/train.py"), "each config starts with its command"
  c = init(f"model_name={name}", "num_devices=1")
  assert c.model_name == name


def test_resolved_config_round_trips_as_yaml():
  c = init("steps=11")
  data = yaml.safe_load(c.to_yaml())
  assert data["steps"] == 11 and data["logical_axis_rules"][0][0] == "activation_batch"


def run_cli(*args, env_extra=None):
  import os
  env = {k: v for k, v in os.environ.items() if not k.startswith("M_")}
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "MaxText/train.py", *args], cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=300)


def test_cli_error_exits_2_without_traceback():
  out = run_cli("MaxText/configs/base_v2.yml", "learnig_rate=1")
  assert out.returncode == 2
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("error: unknown config key 'learnig_rate'")


def test_cli_help_and_list_models():
  out = run_cli("--help")
  assert out.returncode == 0 and "learning_rate=" in out.stdout and "peak learning rate" in out.stdout
  out = run_cli("--list-models")
  assert out.returncode == 0, out.stderr
  assert "Llama2Medium" in out.stdout and "411.6M" in out.stdout


def test_count_params_matches_the_reference_count():
  out = run_cli("MaxText/configs/base_v2.yml", "model_name=Llama2Medium", "--count-params")
  assert out.returncode == 0, out.stderr
  total = int(out.stdout.split("parameters")[1].split()[0].replace(",", ""))
  assert total == 411_616_256  # 24 x (4 x 1024^2 + 3 x 1024 x 2816 + 2 x 1024) + 2 x 50432 x 1024 + 1024
  assert "embedding" in out.stdout and "FLOPs per token" in out.stdout


def test_module_entry_point_works():
  import os
  out = subprocess.run([sys.executable, "-m", "MaxText.train", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={k: v for k, v in os.environ.items() if not k.startswith("M_")})
  assert out.returncode == 0 and "usage:" in out.stdout
