"""Config parsing: layering, types, derived values and every error path."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import yaml

from MaxText import startup
from MaxText.config import keys, loader, render, schema
from MaxText.errors import ConfigError
from tests.conftest import BASE

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "configs_before_schema"


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
  with pytest.raises(pydantic.ValidationError, match="frozen"):
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
    (["global_batch_size_to_train_on=4"], {}, {}, "config key 'global_batch_size_to_train_on' is derived"),
    (["steps"], {}, {}, "argument 'steps' is not key=value"),
    (["steps=1", "steps=2"], {}, {}, "config key 'steps' is given twice"),
    ([], {}, {"M_STEPZ": "3"}, "unknown config key 'stepz' from environment variable M_STEPZ"),
    ([], {"global_batch_size_to_train_on": 3}, {}, "is derived and cannot be set"),
    (["run_dir=/tmp/x"], {}, {}, "config key 'run_dir' is derived and cannot be set (on the command line)"),
    (["logical_axis_rules=[[embed, pipeline]]"], {}, {}, "maps 'embed' to 'pipeline', which is not in mesh_axes"),
    (["alibi=true"], {}, {}, "config key 'alibi'=True applies to decoder_block 'gpt' only"),
    (["model_name=GPTTiny", "mudd_streams=q,r"], {}, {}, "config key 'mudd_streams'='q,r' applies to decoder_block 'mudd'"),
    (["model_name=MUDDLlama2Tiny", "vq_num_codes=8"], {}, {}, "'vq_num_codes'=8 applies to decoder_block 'transformer_vq'"),
])
def test_errors_are_one_line_and_name_the_key(args, kwargs, env, fragment):
  with pytest.raises(ConfigError) as e:
    init(*args, env=env, **kwargs)
  message = str(e.value)
  assert fragment in message, message
  assert "\n" not in message


def test_bad_yaml_files(tmp_path):
  missing = tmp_path / "nope.yml"
  with pytest.raises(ConfigError, match="cannot read config file"):
    startup.load_config([None, str(missing)], env={})
  broken = tmp_path / "broken.yml"
  broken.write_text("steps: [1,\n")
  with pytest.raises(ConfigError, match="is not valid YAML"):
    startup.load_config([None, str(broken)], env={})
  unknown = tmp_path / "unknown.yml"
  unknown.write_text("stpes: 3\n")
  with pytest.raises(ConfigError, match="unknown config key 'stpes' in config file"):
    startup.load_config([None, str(unknown)], env={})


def test_every_key_is_declared_once_with_a_type_a_default_and_a_doc():
  fields = schema.fields()
  assert len(fields) > 140
  for name, field in fields.items():
    assert field.description and "\n" not in field.description, name
    assert field.default is not None, f"{name}: a null default would leave the key untyped"
  declared = [n for group in schema.groups() for n in group.model_fields if group.model_fields[n] is not None]
  owners = {n: [g.__name__ for g in schema.groups() if n in g.__dict__.get("__annotations__", {})]
            for n in declared}
  assert all(len(o) == 1 for o in owners.values()), {n: o for n, o in owners.items() if len(o) != 1}


def test_base_v2_yml_is_the_rendered_schema():
  """configs/base_v2.yml shows every key; it is rendered from the declarations (python -m MaxText.config.render
  --yaml), so the two cannot drift."""
  assert loader.BASE_CONFIG.read_text() == render.base_yaml()
  assert yaml.safe_load(loader.BASE_CONFIG.read_text()) == {k: render._thaw(v) for k, v in schema.defaults().items()}


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.yml")))
def test_a_config_written_before_the_schema_loads_to_the_same_resolved_config(name):
  """config.yml files written by the trainer before the keys were declared in config/schema.py (tests/data/
  configs_before_schema: the resolved config.yml and what the old loader made of it)."""
  want = json.loads((FIXTURES / "resolved.json").read_text())[name]
  got = startup.load_config([None, str(FIXTURES / f"{name}.yml")], env={}).to_dict()
  assert got == want


def test_help_lists_every_key_with_its_type_and_default():
  text = render.help_text()
  entries = {}  # key -> its whole entry (key=default, type, constraint and doc), joined over wrapped lines
  for line in text.splitlines():
    if m := re.match(r"^  ([a-z_0-9]+)=(.*)$", line):
      entries[m.group(1)] = m.group(2)
    elif line.startswith("    ") and entries:
      entries[list(entries)[-1]] += " " + line.strip()
  assert set(entries) == set(schema.settable_keys())
  for name in schema.settable_keys():
    field = schema.fields()[name]
    assert f"({keys.type_name(field.annotation)}" in entries[name], (name, entries[name])
  assert entries["steps"].startswith("300 ") and "(int, > 0) number of optimizer steps" in entries["steps"]
  assert "(float, in [0, 1)) Adam first-moment decay" in entries["adam_b1"]


# Twenty malformed values across the types, each one line naming the key (and where it came from).
@pytest.mark.parametrize("arg, fragment", [
    ("steps=1.5", "config key 'steps' expects an integer, got '1.5' (command line)"),
    ("steps=[3]", "config key 'steps' expects an integer, got '[3]'"),
    ("vocab_size=yes", "config key 'vocab_size' expects an integer, got 'true'"),
    ("init_weights_seed=0x", "config key 'init_weights_seed' expects an integer, got '0x'"),
    ("learning_rate=1e", "config key 'learning_rate' expects a number, got '1e'"),
    ("output_logits_multiplier=.nan", "config key 'output_logits_multiplier' expects a finite number"),
    ("z_loss_multiplier=[0.1]", "config key 'z_loss_multiplier' expects a number"),
    ("packing=0", "config key 'packing' expects true or false, got '0'"),
    ("add_bos=[true]", "config key 'add_bos' expects true or false"),
    ("max_num_checkpoints_to_keep=-1", "config key 'max_num_checkpoints_to_keep' must not be negative, got -1"),
    ("mlp_activations={silu: 1}", "config key 'mlp_activations' expects a list"),
    ("mlp_activations=[1, 2]", "config key 'mlp_activations' expects a list of strings, got '[1, 2]'"),
    ("mesh_axes=[]", "config key 'mesh_axes' must list at least 1 entries"),
    ("logical_axis_rules=[embed]", "config key 'logical_axis_rules' expects a list"),
    ("dtype=fp32", "config key 'dtype' must be one of float32, bfloat16; got 'fp32'"),
    ("data_shuffle=none", "config key 'data_shuffle' must be one of global, window"),
    ("decode_sampling_nucleus_p=1.5", "config key 'decode_sampling_nucleus_p' must lie in (0, 1], got 1.5"),
    ("num_epochs=0", "config key 'num_epochs' must be positive or -1 (repeat forever), got 0"),
    ("ici_fsdp_parallelism=-2", "config key 'ici_fsdp_parallelism' must be positive or -1"),
    ("eval_interval=-1", "config key 'eval_interval' must not be negative, got -1"),
    ("metrics_file=../m.jsonl", "config key 'metrics_file' must be a file name inside the run folder"),
    ("vq_ema_decay=1", "config key 'vq_ema_decay' must lie in [0, 1), got 1"),
])
def test_malformed_values_across_types_are_one_line_naming_the_key(arg, fragment):
  with pytest.raises(ConfigError) as e:
    init(arg)
  message = str(e.value)
  assert fragment in message and "\n" not in message, message


def test_parsing_starts_no_jax_backend_and_no_distributed_job():
  """Parsing (the declarations, the families' keys, the layers) starts nothing: joining a multi-process job must
  come before JAX counts devices, which startup.load_config arranges."""
  code = ("import jax; from jax._src import xla_bridge; from MaxText.config import loader; "
          "v = loader.load([None, 'MaxText/configs/base_v2.yml', 'model_name=MUDDLlama2Tiny', 'alibi=false'], env={}); "
          "print(xla_bridge.backends_are_initialized(), jax.distributed.is_initialized(), v['decoder_block'])")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["False", "False", "mudd"]


@pytest.mark.parametrize("name", loader.preset_names())
def test_every_preset_parses_and_names_its_command(name):
  path = loader.MODELS_DIR / f"{name}.yml"
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
