"""Train (or evaluate) a model.

  python MaxText/train.py MaxText/configs/base_v2.yml run_name=demo [key=value ...]
  python MaxText/train.py --help | --list-models
  python MaxText/train.py MaxText/configs/base_v2.yml model_name=Llama2Medium --count-params

Running the same command again resumes from the run's latest checkpoint. `mode=validation` or
`mode=test` evaluates the latest checkpoint on that split instead of training. The loop is
`training/loop.py`; this file is the command line.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python MaxText/train.py` puts MaxText/ itself on the path, not the repo
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from MaxText import errors, models, startup
from MaxText.config import loader, render, validation
from MaxText.errors import ConfigError
from MaxText.training import train_state
from MaxText.training.evaluation import evaluate_checkpoint
from MaxText.training.loop import StopFlag, train_and_evaluate

__all__ = ["evaluate_checkpoint", "main", "train_and_evaluate"]
OPTIONS = ("--help", "--list-models", "--count-params")


def list_models() -> str:
  """The presets as a markdown table: every preset with its family, shape and parameter count."""
  rows = [("model_name", "family", "layers", "width", "heads", "parameters")]
  for name in loader.preset_names():
    config = startup.load_config([None, str(loader.BASE_CONFIG)], model_name=name, num_devices=1,
                                 per_device_batch_size=1.0, ici_fsdp_parallelism=-1)
    spec = train_state.model_spec(config)
    rows.append((f"`{name}`", config.decoder_block, str(config.base_num_decoder_layers), str(config.base_emb_dim),
                 str(config.base_num_query_heads), f"{spec.num_params / 1e6:,.1f}M"))
  lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def count_params(config) -> str:
  """Parameters of the configured model (total, embedding tables, the rest) and its FLOPs per token."""
  spec = train_state.model_spec(config)
  sizes = jax.tree.map(lambda x: x.size, spec.shapes)
  embedding = sum(n for n, role in zip(jax.tree.leaves(sizes), jax.tree.leaves(spec.roles)) if role == "embedding")
  flops = models.get_family(config.decoder_block).flops_per_token(config)
  return "\n".join([f"model {config.model_name} ({config.decoder_block})",
                    f"  parameters      {spec.num_params:>16,}",
                    f"  input embedding {embedding:>16,}",
                    f"  the rest        {spec.num_params - embedding:>16,}",
                    f"  training FLOPs per token at length {config.max_target_length}: {flops:,.0f}"])


@startup.cli
def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  flags = [a for a in argv[1:] if a.startswith("--") and "=" not in a]
  if "--help" in flags or "-h" in argv[1:]:
    print(render.help_text(validation.choices()))
    return errors.EXIT_OK
  if "--list-models" in flags:
    print(list_models())
    return errors.EXIT_OK
  unknown = [f for f in flags if f not in OPTIONS]
  if unknown:
    raise ConfigError(f"unknown option {unknown[0]!r} (options: {', '.join(OPTIONS)})")
  argv = [a for a in argv if a != "--count-params"]
  # Evaluating an existing run: its config.yml supplies the keys the command line does not.
  config = startup.load_config(argv, for_run=loader.load(argv)["mode"] != "train")
  if "--count-params" in flags:
    print(count_params(config))
  elif config.mode == "train":
    with StopFlag():  # installed until the checkpoints are closed, not only around the loop
      if train_and_evaluate(config).get("stopped_by"):
        return errors.EXIT_PREEMPTED
  else:
    evaluate_checkpoint(config)
  return errors.EXIT_OK


if __name__ == "__main__":
  startup.exit_now(main())
