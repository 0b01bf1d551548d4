"""convert_checkpoint.py against transformers and the MUDDFormer release, on random tiny models saved in temporary
folders (no hub: HF_HUB_OFFLINE=1): HF Llama in, our logits equal to HF's, out again and loaded by transformers,
fine-tuned from; a release-format MUDDFormer checkpoint in, our logits equal to a re-implementation of the
release; the checker's verdicts; unsupported HF settings as one-line errors."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from MaxText import convert_checkpoint, startup, train
from MaxText.checkpoint import tensor_files
from MaxText.training.run import Run
from tests import reference_mudd_release

transformers.logging.set_verbosity_error()

LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=256,
             # wavelengths below 16 kept, 16..64 interpolated, above 64 scaled: every branch of llama3 runs
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=64))


def save_llama(folder, tied: bool, seed: int = 0) -> transformers.LlamaForCausalLM:
  """A random tiny Llama whose every weight (norm gains too) is drawn, so a swapped tensor shows."""
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, tie_word_embeddings=tied))
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model.eval()


def hf_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def run_main(capsys, *argv) -> tuple[int, str, str]:
  capsys.readouterr()  # what ran before (transformers' progress bars) is not the command's
  code = convert_checkpoint.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def tokens_file(tmp_path, vocab: int, shape=(2, 24), seed=0):
  path = tmp_path / "tokens.npy"
  np.save(path, np.random.RandomState(seed).randint(0, vocab, shape))
  return path


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied_from_pytorch_bin"])
def test_llama_in_equals_hf_logits_scanned_or_not_and_out_again(tmp_path, capsys, tied):
  hf_dir, out, back = tmp_path / "hf", tmp_path / "converted", tmp_path / "exported"
  model = save_llama(hf_dir, tied)
  if tied:  # the older format: a pickled state dict (read with torch.load, weights only, memory-mapped)
    torch.save(model.state_dict(), hf_dir / "pytorch_model.bin")
    (hf_dir / "model.safetensors").unlink()
  code, _, err = run_main(capsys, "to_maxtext", "--hf_path", hf_dir, "--output_path", out)
  assert code == 0, err
  text = (out / "config.yml").read_text()
  assert "rope_type: llama3" in text and f"logits_via_embedding: {str(tied).lower()}" in text
  assert "base_num_kv_heads: 2" in text and f"load_parameters_path: {out}" in text
  tokens = tokens_file(tmp_path, 128)
  for scan in ("false", "true"):
    code, printed, err = run_main(capsys, "check", out / "config.yml", "num_devices=1", f"scan_layers={scan}",
                                  "--tokens", tokens, "--hf_path", hf_dir)
    assert code == 0, err
    assert float(printed.strip().splitlines()[-1]) <= 1e-4

  code, _, err = run_main(capsys, "to_hf", "--output_path", back, out / "config.yml", "num_devices=1")
  assert code == 0, err
  exported = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
  assert exported.config.tie_word_embeddings == tied and exported.config.num_key_value_heads == 2
  assert exported.config.rope_parameters["rope_type"] == "llama3"
  ids = np.load(tokens)
  np.testing.assert_array_equal(hf_logits(exported, ids), hf_logits(model, ids))  # float32 both ways: exact


def first_batch_hf_loss(model, batch) -> float:
  """HF's mean next-token loss over the batch's target tokens, each packed document run on its own."""
  total, count = 0.0, 0
  for row in range(batch["inputs"].shape[0]):
    segments = batch["inputs_segmentation"][row]
    for s in sorted(set(segments[segments != 0].tolist())):
      where = np.flatnonzero(segments == s)
      logits = torch.as_tensor(hf_logits(model, batch["inputs"][row, where][None])[0], dtype=torch.float64)
      keep = batch["targets_segmentation"][row, where] != 0
      targets = torch.as_tensor(batch["targets"][row, where], dtype=torch.long)
      nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none").numpy()
      total += float(nll[keep].sum())
      count += int(keep.sum())
  return total / count


def test_fine_tuning_from_a_converted_llama_starts_at_hfs_loss(tmp_path, capsys):
  hf_dir, out = tmp_path / "hf", tmp_path / "converted"
  model = save_llama(hf_dir, tied=False)
  assert run_main(capsys, "to_maxtext", "--hf_path", hf_dir, "--output_path", out)[0] == 0
  # 8 devices, FSDP over all of them: every parameter is read straight into its shards.
  config = startup.load_config(
      [None, str(out / "config.yml")], env={}, run_name="ft", base_output_directory=str(tmp_path / "runs"),
      dataset_type="synthetic", steps=3, log_period=1, eval_interval=0, enable_checkpointing=False,
      enable_tensorboard=False, per_device_batch_size=1.0, max_target_length=32, learning_rate=1e-3,
      warmup_steps_fraction=0.0)
  assert config.num_devices == 8
  run = Run(config)
  state = run.init_state()
  assert len(state["params"]["layers"]["mlp"]["wi_0"].sharding.device_set) == 8
  batch = next(run.data(config.train_split))
  result = train.train_and_evaluate(config, progress=False)
  assert result["step"] == 3
  rows = [json.loads(line) for line in open(os.path.join(config.run_dir, "metrics.jsonl"))]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) == 3 and np.isfinite(losses).all()
  np.testing.assert_allclose(losses[0], first_batch_hf_loss(model, batch), atol=1e-4)


RELEASE = dict(model_type="muddformer", architectures=["MUDDFormer"], block_size=64, vocab_size=96, n_layer=4,
               n_head=4, n_local_heads=4, dim=64, intermediate_size=344, head_dim=16, rope_base=10000, norm_eps=1e-6,
               use_qk_norm=True, dense=True, dynamic_dense=True, dense_type="qkvr", sepln=True, expand_last=True,
               round64=True, tie_word_embeddings=False, torch_dtype="float32")


def save_release(folder, cfg: dict, **kw) -> dict:
  """A random checkpoint in the release's format: its names, shapes and config.json (2 safetensors shards)."""
  state = reference_mudd_release.random_state(cfg, **kw)
  folder.mkdir()
  names = list(state)
  half = len(names) // 2
  index = {}
  for k, part in enumerate((names[:half], names[half:]), start=1):
    file = f"model-{k:05d}-of-00002.safetensors"
    safetensors.torch.save_file({n: state[n].contiguous() for n in part}, str(folder / file))
    index.update(dict.fromkeys(part, file))
  (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
  (folder / "config.json").write_text(json.dumps(cfg))
  return state


@pytest.mark.parametrize("variant, atol", [("random", 1e-4), ("near_identity", 1e-5), ("plain", 1e-5)])
def test_release_checkpoint_equals_the_reference_implementation(tmp_path, capsys, variant, atol):
  cfg = dict(RELEASE, dense=variant != "plain")
  release, out, back = tmp_path / "release", tmp_path / "converted", tmp_path / "exported"
  state = save_release(release, cfg, seed=1, near_identity=variant == "near_identity")
  code, _, err = run_main(capsys, "to_maxtext", "--hf_path", release, "--output_path", out)
  assert code == 0, err
  ids = np.random.RandomState(0).randint(0, 96, (2, 24))
  np.save(tmp_path / "tokens.npy", ids)
  np.save(tmp_path / "golden.npy", reference_mudd_release.logits(state, cfg, torch.as_tensor(ids)).numpy())
  code, printed, err = run_main(capsys, "check", out / "config.yml", "num_devices=1", "--tokens", tmp_path / "tokens.npy",
                                "--golden_logits", tmp_path / "golden.npy", "--atol", atol)
  assert code == 0, printed + err
  assert float(printed.strip().splitlines()[-1]) <= atol

  # Out again: the release's names and shapes, every tensor as it came in (the fused wqkv as wq, wk, wv).
  assert run_main(capsys, "to_hf", "--output_path", back, out / "config.yml", "num_devices=1",
                  "--max_shard_size", "200KB")[0] == 0
  assert (back / "model.safetensors.index.json").is_file()
  exported = tensor_files.open_folder(back)
  for name, tensor in state.items():
    if name.endswith("wqkv.weight"):
      H, E = cfg["n_head"], cfg["dim"] // cfg["n_head"]
      got = np.concatenate([exported[name.replace("wqkv", w)] for w in ("wq", "wk", "wv")])
      np.testing.assert_array_equal(got, tensor.numpy().reshape(3 * H * E, -1))
    else:
      np.testing.assert_array_equal(exported[name], tensor.numpy(), err_msg=name)
  written = json.loads((back / "config.json").read_text())
  for key in ("n_layer", "dim", "intermediate_size", "use_qk_norm", "round64", "expand_last", "dense"):
    assert written[key] == cfg[key], key


def test_the_checker_fails_when_a_weight_is_perturbed(tmp_path, capsys):
  hf_dir, out = tmp_path / "hf", tmp_path / "converted"
  model = save_llama(hf_dir, tied=False)
  assert run_main(capsys, "to_maxtext", "--hf_path", hf_dir, "--output_path", out)[0] == 0
  tokens = tokens_file(tmp_path, 128)
  np.save(tmp_path / "golden.npy", hf_logits(model, np.load(tokens)))
  check = ("check", out / "config.yml", "num_devices=1", "--tokens", tokens, "--golden_logits", tmp_path / "golden.npy")
  assert run_main(capsys, *check)[0] == 0

  stored = tensor_files.open_parameters(out)
  tensors = {name: stored[name] for name in stored}
  tensors["layers/mlp/wo"][1, 3, 5] += 0.05
  writer = tensor_files.ShardedWriter(out, tensor_files.PARAMS_PREFIX)
  for name, value in tensors.items():
    writer.add(name, value)
  writer.close()
  code, printed, _ = run_main(capsys, *check)
  assert code == 1
  assert float(printed.strip().splitlines()[-1]) > 1e-4


@pytest.mark.parametrize("change, key", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "gpt2"}, "model_type"),
])
def test_an_unsupported_hf_setting_is_a_one_line_error(tmp_path, capsys, change, key):
  hf_dir = tmp_path / "hf"
  save_llama(hf_dir, tied=False)
  hf = json.loads((hf_dir / "config.json").read_text())
  hf.pop("rope_parameters", None)
  hf.update(change)
  (hf_dir / "config.json").write_text(json.dumps(hf))
  code, _, err = run_main(capsys, "to_maxtext", "--hf_path", hf_dir, "--output_path", tmp_path / "out")
  assert code == 2
  assert len(err.strip().splitlines()) == 1 and f"'{key}'" in err, err


def test_an_unsupported_release_setting_is_a_one_line_error(tmp_path, capsys):
  for change, key in (({"n_local_heads": 2}, "n_local_heads"), ({"model_type": "muddpythia"}, "model_type"),
                      ({"sepln": False}, "sepln")):
    folder = tmp_path / key
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**RELEASE, **change}))
    code, _, err = run_main(capsys, "to_maxtext", "--hf_path", folder, "--output_path", tmp_path / "out", "--family",
                            "mudd")
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"'{key}'" in err, err


def test_safetensors_written_as_tensors_arrive_read_back_by_safetensors(tmp_path, monkeypatch):
  import ml_dtypes

  monkeypatch.setattr(tensor_files, "HEADER_RESERVE", 64)  # a header longer than its reserve moves the data once
  rng = np.random.default_rng(0)
  tensors = {f"layer_{i}/a/rather/long/parameter/name": rng.standard_normal((3, 5)).astype(np.float32)
             for i in range(4)}
  tensors["bf16"] = rng.standard_normal((2, 7)).astype(ml_dtypes.bfloat16)
  tensors["scalar"] = np.float32(3.0).reshape(())
  writer = tensor_files.ShardedWriter(tmp_path, "model", max_shard_bytes=100)
  for name, value in tensors.items():
    writer.add(name, value)
  files = writer.close()
  assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
  ours = tensor_files.open_folder(tmp_path)
  theirs = {}
  for f in files:
    theirs.update(safetensors.torch.load_file(str(f)))
  assert set(ours) == set(theirs) == set(tensors)
  for name, value in tensors.items():
    np.testing.assert_array_equal(ours[name], value)
    np.testing.assert_array_equal(theirs[name].float().numpy(), value.astype(np.float32))
  lazy = ours.lazy("layer_2/a/rather/long/parameter/name")
  np.testing.assert_array_equal(lazy[1], tensors["layer_2/a/rather/long/parameter/name"][1])
  np.testing.assert_array_equal(lazy.read((slice(1, 3), slice(2, 4))), tensors["layer_2/a/rather/long/parameter/name"][1:3, 2:4])
