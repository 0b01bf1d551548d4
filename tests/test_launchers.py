"""The launchers' dry runs print the commands a user would run; GPU processes get GPUs of their own."""

import subprocess
import sys
from pathlib import Path

import pytest

from MaxText.parallel import distributed

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["run_name=mudd", "model_name=MUDDLlama2Medium", "dataset_path=gs://bucket/pile",
              "base_output_directory=gs://bucket/runs"]


def dry_run(script: str, *args: str) -> list[str]:
  out = subprocess.run([sys.executable, f"MaxText/launch/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


def bash_argv(line: str) -> list[str]:
  """The argv bash makes of a printed line (so the quoting is checked by the shell that will read it)."""
  out = subprocess.run(["bash", "-c", f"set -- {line}; for a in \"$@\"; do printf '%s\\0' \"$a\"; done"],
                       capture_output=True, text=True, check=True)
  return out.stdout.split("\0")[:-1]


def remote_argv(command: str) -> list[str]:
  """What the worker's shell runs for an ssh --command: here, the words of the tmux call."""
  out = subprocess.run(["bash", "-c", f"tmux() {{ printf '%s\\0' \"$@\"; }}; cd() {{ :; }}; {command}"],
                       capture_output=True, text=True, check=True)
  return out.stdout.split("\0")[:-1]


def test_tpu_pod_launch_creates_installs_and_starts_in_tmux_on_every_worker():
  lines = dry_run("tpu_pod.py", "--tpu", "mudd", "--zone", "us-east5-a", "--accelerator_type", "v5p-8",
                  "--repo", "https://example.org/maxtext.git", "--commit", "abc123", "--dry_run", "launch", "--",
                  *TRAIN_ARGS, "prompt=it's \"quoted\" $HOME")
  assert len(lines) == 3
  create, install, start = (bash_argv(line) for line in lines)
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "mudd", "--zone=us-east5-a",
                    "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5"]
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mudd", "--zone=us-east5-a", "--worker=all"]
  assert install[:-1] == ssh and start[:-1] == ssh
  script = install[-1].removeprefix("--command=")
  assert "git clone --quiet https://example.org/maxtext.git maxtext" in script
  assert "checkout --quiet abc123" in script and "pip install --quiet -r requirements_tpu.txt" in script
  tmux_calls = remote_argv(start[-1].removeprefix("--command="))
  assert tmux_calls[:4] == ["new-session", "-d", "-s", "maxtext"]
  runner = tmux_calls[4]
  # The shell tmux starts sees exactly the trainer's argv, odd characters included.
  trainer = subprocess.run(["bash", "-c", "python3() { printf '%s\\0' \"$@\"; }; " + runner.split(" & ")[0]],
                           capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
  assert trainer == ["MaxText/train.py", "MaxText/configs/base_v2.yml", *TRAIN_ARGS, "prompt=it's \"quoted\" $HOME"]
  assert "echo $! > ~/maxtext.pid" in runner
  assert tmux_calls[5:] == ["pipe-pane", "-o", "-t", "maxtext", "cat >> ~/maxtext.log"]


@pytest.mark.parametrize("action, expected", [
    ("attach", "gcloud compute tpus tpu-vm ssh mudd --zone=z --worker=0 -- -t 'tmux attach -t maxtext'"),
    ("logs", "gcloud compute tpus tpu-vm ssh mudd --zone=z --worker=0 '--command=tail -n 100 ~/maxtext.log'"),
    ("stop", "gcloud compute tpus tpu-vm ssh mudd --zone=z --worker=all "
             "'--command=kill -TERM $(cat ~/maxtext.pid) 2>/dev/null || true'"),
    ("kill", "gcloud compute tpus tpu-vm ssh mudd --zone=z --worker=all "
             "'--command=tmux kill-session -t maxtext 2>/dev/null || true'"),
    ("delete", "gcloud compute tpus tpu-vm delete mudd --zone=z --quiet"),
])
def test_tpu_pod_attach_logs_stop_and_delete(action, expected):
  assert [" ".join(bash_argv(line)) for line in dry_run("tpu_pod.py", "--tpu", "mudd", "--zone", "z", "--dry_run",
                                                        action)] == [" ".join(bash_argv(expected))]


def test_tpu_pod_rejects_an_unknown_slice_in_one_line():
  out = subprocess.run([sys.executable, "MaxText/launch/tpu_pod.py", "--tpu", "t", "--zone", "z", "--accelerator_type",
                        "v5p-6", "--dry_run", "create"], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert out.stderr.strip() == ("error: --accelerator_type 'v5p-6' is not a v5p slice this table knows (v5p-8, "
                                "v5p-16, v5p-32, v5p-64, v5p-128, v5p-256, v5p-512, v5p-1024, v5p-2048, v5p-4096, "
                                "v5p-8192)")


def test_slurm_script_runs_one_process_per_gpu_and_checkpoints_before_the_time_limit(tmp_path):
  lines = dry_run("slurm.py", "--nodes", "2", "--gpus_per_node", "8", "--partition", "gpu", "--time", "24:00:00",
                  "--workdir", str(tmp_path), "--dry_run", "--", *TRAIN_ARGS)
  script = "\n".join(lines[1:-1]) + "\n"
  assert lines[0] == f"# {tmp_path}/slurm_logs/maxtext.sbatch"
  assert lines[-1] == f"sbatch {tmp_path}/slurm_logs/maxtext.sbatch"
  for directive in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--time=24:00:00",
                    "--signal=TERM@120", f"--chdir={tmp_path}", f"--output={tmp_path}/slurm_logs/%x-%j.out"):
    assert f"#SBATCH {directive}\n" in script, directive
  assert script.splitlines()[-1] == ("srun --kill-on-bad-exit=1 env PYTHONUNBUFFERED=1 python3 MaxText/train.py "
                                     "MaxText/configs/base_v2.yml " + " ".join(TRAIN_ARGS))
  path = tmp_path / "job.sbatch"
  path.write_text(script)
  subprocess.run(["bash", "-n", str(path)], check=True)
  assert not (tmp_path / "slurm_logs").exists()  # a dry run writes nothing


def test_mpirun_runs_one_process_per_gpu_on_every_host():
  [line] = dry_run("mpirun.py", "--hosts", "gpu1,gpu2", "--gpus_per_host", "8", "--workdir", "/repo", "--dry_run",
                   "--", *TRAIN_ARGS)
  assert bash_argv(line) == ["mpirun", "-np", "16", "--host", "gpu1:8,gpu2:8", "--map-by", "ppr:8:node",
                             "--bind-to", "none", "--wdir", "/repo", "-x", "PATH", "-x", "LD_LIBRARY_PATH",
                             "-x", "PYTHONPATH", "-x", "PYTHONUNBUFFERED=1", "python3", "MaxText/train.py",
                             "MaxText/configs/base_v2.yml", *TRAIN_ARGS]


def test_a_trainer_argument_that_is_not_key_value_is_refused():
  out = subprocess.run([sys.executable, "MaxText/launch/mpirun.py", "--hosts", "h", "--gpus_per_host", "1", "--dry_run",
                        "--", "steps"], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode != 0 and "'steps' is not key=value" in out.stderr


@pytest.mark.parametrize("env, gpus, expected", [
    ({"SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "8"}, 8, [3]),  # one process per GPU
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 8, [4, 5, 6, 7]),  # 2 per host
    ({"SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "1"}, 8, list(range(8))),  # one per host: every GPU
    ({"SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "1(x2)"}, 4, [0, 1, 2, 3]),
    ({"SLURM_LOCALID": "5", "SLURM_NTASKS_PER_NODE": "8"}, 1, None),  # srun already gave it its own GPU
    ({"SLURM_LOCALID": "5", "SLURM_NTASKS_PER_NODE": "8"}, 0, None),  # no GPU: nothing to bind
    ({}, 8, None),  # no launcher: JAX's defaults
])
def test_each_gpu_process_drives_its_own_gpus(env, gpus, expected):
  assert distributed.local_device_ids(env, gpus) == expected


def test_gpus_that_do_not_split_over_the_processes_are_an_error():
  with pytest.raises(ValueError, match="6 GPUs do not split evenly over the 4 processes"):
    distributed.local_device_ids({"OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 6)
  assert distributed.local_gpu_count({"CUDA_VISIBLE_DEVICES": "2,3"}) == 2
  assert distributed.local_gpu_count({"CUDA_VISIBLE_DEVICES": ""}) == 0
