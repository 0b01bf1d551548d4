"""Scale-out proven on one box: any mesh gives the same losses, a checkpoint restores onto another mesh and
another process count, 2 processes equal 1, and FSDP holds 1/N of the state per device."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from MaxText import startup
from MaxText.parallel import sharding_report
from MaxText.training.run import Run
from tests.conftest import BASE, TINY
from tests.scale_out_steps import initial_state, run_steps

ROOT = Path(__file__).resolve().parents[1]

# The parameters' PartitionSpecs each mesh must give (TINY: width 32, 4 query heads of 8, 2 KV heads, MLP 64,
# vocabulary 128; a mesh axis that does not divide a dimension leaves it whole, e.g. 4 heads over tensor=8).
EXPECTED_SPECS = {
    (8, 1, 1): {"wq": [None] * 4, "wi_0": [None] * 3, "embedding": [None, None]},
    (1, 8, 1): {"wq": [None, "fsdp", None, None], "wi_0": [None, None, "fsdp"], "embedding": [None, "fsdp"]},
    (1, 1, 8): {"wq": [None] * 4, "wi_0": [None, "tensor", None], "embedding": ["tensor", None]},
    (2, 2, 2): {"wq": [None, "fsdp", "tensor", None], "wi_0": [None, "tensor", "fsdp"], "embedding": ["tensor", "fsdp"]},
}


def mesh(data, fsdp, tensor):
  return dict(num_devices=data * fsdp * tensor, ici_data_parallelism=data, ici_fsdp_parallelism=fsdp,
              ici_tensor_parallelism=tensor)


def test_every_mesh_of_eight_devices_gives_the_same_losses_and_its_shardings(make_config):
  state = initial_state(make_config(per_device_batch_size=1.0, **mesh(8, 1, 1)))
  results = {shape: run_steps(make_config(per_device_batch_size=1.0, **mesh(*shape)), 0, 2, state=state)
             for shape in EXPECTED_SPECS}
  reference = results[(8, 1, 1)]["losses"]
  for shape, result in results.items():
    assert result["mesh"] == dict(zip(("data", "fsdp", "tensor"), shape))
    np.testing.assert_allclose(result["losses"], reference, rtol=1e-5, err_msg=str(shape))
    specs = result["specs"]
    got = {"wq": specs["layers"]["attention"]["wq"], "wi_0": specs["layers"]["mlp"]["wi_0"],
           "embedding": specs["embed"]["embedding"]}
    assert got == EXPECTED_SPECS[shape], shape


def test_a_checkpoint_saved_with_fsdp4_continues_with_tensor4_as_if_nothing_changed(make_config, tmp_path):
  fsdp = make_config(per_device_batch_size=2.0, **mesh(1, 4, 1))
  state = initial_state(fsdp)
  straight = run_steps(fsdp, 0, 4, state=state, save_dir=str(tmp_path / "ckpt"), save_step=2)
  assert straight["specs"]["layers"]["mlp"]["wi_0"] == [None, None, "fsdp"]
  tensor = make_config(per_device_batch_size=2.0, **mesh(1, 1, 4))
  second = run_steps(tensor, 2, 4, restore_dir=str(tmp_path / "ckpt"))
  assert second["specs"]["layers"]["mlp"]["wi_0"] == [None, "tensor", None]
  np.testing.assert_allclose(second["losses"], straight["losses"][2:], rtol=1e-5)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_equal_one_and_their_checkpoint_continues_on_one(make_config, tmp_path):
  """2 processes x 2 devices give the losses of 1 process x 4 devices on the same global batches (the same
  (data=2, fsdp=2) mesh, split over the processes on the data axis), from the same initial state restored
  from a checkpoint one process wrote; their step-3 checkpoint, restored by one process, continues with the
  losses of the uninterrupted single-process run."""
  one = make_config(per_device_batch_size=2.0, **mesh(2, 2, 1))
  state, ckpt = initial_state(one), str(tmp_path / "ckpt")
  run_steps(one, 0, 0, state=state, save_dir=ckpt)

  port, out = free_port(), tmp_path / "two.json"
  env = {k: v for k, v in os.environ.items() if not k.startswith("M_")}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  keys = [f"{k}={v}" for k, v in {**TINY, "num_devices": -1, "per_device_batch_size": 2.0}.items()]
  procs = [subprocess.Popen(
      [sys.executable, "tests/scale_out_steps.py", str(out), "0", "3", ckpt, ckpt, *keys,
       "ici_fsdp_parallelism=2", "dcn_data_parallelism=2", f"coordinator_address=localhost:{port}",
       "num_processes=2", f"process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  straight = run_steps(one, 0, 5, state=state)["losses"]  # while the two processes compile
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  two = json.loads(out.read_text())
  assert two["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  np.testing.assert_allclose(two["losses"], straight[:3], rtol=1e-5)
  continued = run_steps(one, 3, 5, restore_dir=ckpt)
  np.testing.assert_allclose(continued["losses"], straight[3:], rtol=1e-5)


def test_fsdp8_holds_an_eighth_of_llama2medium_and_its_adam_state_per_device():
  config = startup.load_config([None, BASE], env={}, model_name="Llama2Medium", num_devices=8,
                               ici_fsdp_parallelism=8, per_device_batch_size=1.0)
  run = Run(config)  # abstract: shapes and shardings, nothing allocated
  whole = sharding_report.total_bytes(run.abstract)
  per_device = sharding_report.bytes_per_device(run.abstract, run.shardings)
  assert whole > 3 * 4 * 400e6  # parameters and two Adam moments in float32
  assert whole / 8 <= per_device <= whole / 8 * 1.02
  # Independently of the shardings: every parameter with an `embed` axis splits 8 ways, the rest (norm
  # gains) stays whole; Adam's moments follow their parameter.
  expected = 0
  for shape, axes in zip(jax.tree.leaves(run.spec.shapes), jax.tree.leaves(run.spec.logical_axes,
                                                                          is_leaf=lambda x: isinstance(x, tuple))):
    expected += shape.size * shape.dtype.itemsize // (8 if "embed" in axes else 1)
  assert sharding_report.bytes_per_device(run.spec.shapes, run.shardings["params"]) == expected


def test_print_sharding_lists_every_parameter(make_config):
  run = Run(make_config(**mesh(1, 2, 2)))
  text = sharding_report.format_parameters(run.spec, run.abstract, run.shardings)
  lines = text.splitlines()
  assert len(lines) == 2 + len(jax.tree.leaves(run.spec.shapes)) + 2
  row = next(line for line in lines if line.startswith("layers/mlp/wi_0 "))
  # 2 layers x 64 x 32 float32 over tensor=2 and fsdp=2: 4 KiB per device.
  assert row.split() == ["layers/mlp/wi_0", "2x64x32", "layers,mlp,embed", "(None,", "'tensor',", "'fsdp')",
                         "4.00", "KiB"]
  assert lines[-1].startswith("train state (parameters + optimizer): ")
