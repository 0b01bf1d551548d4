"""train_compile.py: the real train step compiled for a Cloud TPU slice on this CPU host (libtpu describes
the slice; no TPU is attached), with the memory each chip needs."""

import importlib.util
import os

import pytest

from MaxText import startup, train_compile
from MaxText.errors import ConfigError
from MaxText.observe import metrics
from MaxText.parallel import sharding_report, topology
from MaxText.training.run import Run

BASE = "MaxText/configs/base_v2.yml"
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (requirements.txt) is not installed")


@pytest.fixture
def tpu_env():
  """topology.devices sets libtpu's variables for the process; put them back as they were."""
  names = ("ALLOW_MULTIPLE_LIBTPU_LOAD", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES")
  saved = {name: os.environ.get(name) for name in names}
  yield
  for name, value in saved.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value


def compile_report(*args):
  config, tpu, devices = startup.load_topology_config([None, BASE, *args], env={})
  run = Run(config, devices)
  return run, train_compile.report(run, tpu)


@pytest.mark.parametrize("name, chips, shape, topology_name", [
    ("v5p-8", 4, (2, 2, 1), "v5:2x2x1"), ("v5p-128", 64, (4, 4, 4), "v5:4x4x4"), ("v4-32", 16, (2, 2, 4), "v4:2x2x4"),
    ("v4-8", 4, (2, 2, 1), "v4:2x2x1"), ("v5e-256", 256, (16, 16), "v5e:16x16"), ("v5litepod-8", 8, (2, 4), "v5e:2x4"),
    ("v6e-8", 8, (2, 4), "v6e:2x4"), ("v6e-1", 1, (1, 1), "v6e:1x1"), ("v5p-1024", 512, (8, 8, 8), "v5:8x8x8"),
])
def test_cloud_tpu_names_give_chips_and_torus_shapes(name, chips, shape, topology_name):
  tpu = topology.parse(name)
  assert (tpu.chips, tpu.shape, tpu.topology) == (chips, shape, topology_name)


@pytest.mark.parametrize("name, message", [
    ("v5p-6", "'v5p-6' is not a v5p slice this table knows (v5p-8, v5p-16"),
    ("v3-8", "unknown TPU generation 'v3' (known: v4-N, v5p-N, v5e-N, v6e-N)"),
    ("tpu", "is not a Cloud TPU slice name like v5p-8"),
])
def test_an_unknown_slice_is_a_one_line_error(name, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    topology.parse(name)


@needs_libtpu
def test_every_generation_has_its_device_kind_in_the_peak_flops_table(tpu_env):
  for generation, peak in (("v4", 275.0), ("v5p", 459.0), ("v5e", 197.0), ("v6e", 918.0)):
    smallest = topology.names(generation)[0]
    devices = topology.devices(smallest)
    assert len(devices) == topology.parse(smallest).chips  # one JAX device per chip, v4 and v5p included
    assert metrics.table_peak_tflops(devices[0].device_kind, "bfloat16") == peak, devices[0].device_kind


@needs_libtpu
def test_llama2tiny_compiles_for_two_v5e_slices_and_reports_memory_per_chip(tpu_env):
  run, r = compile_report("model_name=Llama2Tiny", "compile_topology=v5e-4", "compile_topology_num_slices=2",
                          "per_device_batch_size=1", "print_sharding=true")
  assert r["fits"] and r["chips"] == 8 and r["device_kind"] == "TPU v5 lite"
  # The slices are joined on the dcn axis: each data index is one slice.
  assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  for i in range(2):
    assert {d.slice_index for d in run.mesh.devices[i].flat} == {i}
  memory = r["memory"]
  assert memory["total"] == (memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
                             + memory["generated_code"])
  assert 0 < memory["total"] < r["hbm_bytes_per_chip"] == 16 * 2**30
  # The arguments are the sharded train state, donated (so the new state takes no memory of its own; a
  # little more than its bytes, as TPU layouts pad arrays to tiles), and this chip's rows of the batch.
  assert memory["arguments"] - memory["aliased"] == 5 * 4 * 1 * 128
  assert r["state_bytes_per_device"] <= memory["aliased"] < 1.15 * r["state_bytes_per_device"]
  assert r["largest"][0]["spec"] == "(None, 'fsdp')" and r["largest"][0]["shape"] == [8192, 128]
  text = train_compile.format_report(r)
  assert "memory per chip:" in text and "temporaries (activations, gradients)" in text
  assert train_compile.verdict(r).startswith("fits: Llama2Tiny needs 0.0")


@needs_libtpu
def test_mudd_llama2tiny_compiles_for_a_v5p8(tpu_env):
  _, r = compile_report("model_name=MUDDLlama2Tiny", "compile_topology=v5p-8", "per_device_batch_size=1")
  assert r["fits"] and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and r["device_kind"] == "TPU v5"
  assert r["memory"]["arguments"] - r["memory"]["aliased"] == 5 * 4 * 1 * 128
  assert r["memory"]["temporaries"] > 0


@needs_libtpu
def test_a_model_too_big_for_the_slice_does_not_fit_in_one_line(tpu_env, capsys):
  # 8.2B parameters with Adam in float32 on 4 chips of 16 GiB: 23 GiB of state per chip.
  code = train_compile.main([None, BASE, "model_name=Llama2Tiny", "compile_topology=v5e-4", "scan_layers=true",
                             "vocab_size=4000000", "base_emb_dim=1024"])
  out, err = capsys.readouterr()
  assert code == 1
  assert "train state (parameters + optimizer): 22.99 GiB per chip" in out
  assert err.count("\n") == 1 and "Traceback" not in err
  assert err.startswith("error: Llama2Tiny does not fit v5e-4 (its train state alone takes 22.99 GiB per chip): "
                        "the TPU compiler ran out of HBM")


def test_a_bad_compile_topology_exits_2_in_one_line(capsys):
  assert train_compile.main([None, BASE, "compile_topology=v5p-7"]) == 2
  assert train_compile.main([None, BASE]) == 2
  err = capsys.readouterr().err.splitlines()
  assert err == ["error: compile_topology 'v5p-7' is not a v5p slice this table knows (v5p-8, v5p-16, v5p-32, "
                 "v5p-64, v5p-128, v5p-256, v5p-512, v5p-1024, v5p-2048, v5p-4096, v5p-8192)",
                 "error: train_compile.py needs compile_topology=<Cloud TPU slice>, e.g. compile_topology=v5p-8"]


def test_compiled_memory_reads_the_cpu_compilers_analysis_too():
  import jax
  import jax.numpy as jnp

  compiled = jax.jit(lambda x: (x * 2).sum(), donate_argnums=0).lower(jnp.ones((256, 256))).compile()
  memory = sharding_report.compiled_memory(compiled)
  assert memory["arguments"] == 256 * 256 * 4 and memory["outputs"] == 4
