"""Evaluate a run's checkpoint on a split: loss and perplexity, printed and written to TensorBoard.

  python MaxText/eval.py MaxText/configs/base_v2.yml run_name=R               # the validation split
  python MaxText/eval.py MaxText/configs/base_v2.yml run_name=R mode=test eval_steps=-1

The same as `train.py ... mode=validation|test`: the run's config.yml supplies the model and data keys
(command-line keys win), the latest checkpoint (or `load_parameters_path`) the parameters, and the rows go
to the run's metrics.jsonl and TensorBoard under the mode's name.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python MaxText/eval.py` puts MaxText/ itself on the path, not the repo
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from MaxText import startup
from MaxText.errors import ConfigError
from MaxText.training.evaluation import evaluate_checkpoint


@startup.cli(usage=__doc__)
def main(argv: list[str]) -> int:
  if not any(arg.split("=", 1)[0].removeprefix("--") == "mode" for arg in argv[1:]):
    argv.append("mode=validation")
  config = startup.load_config(argv, for_run=True)
  if config.mode == "train":
    raise ConfigError("config key 'mode' must be validation or test for eval.py")
  evaluate_checkpoint(config)
  return 0


if __name__ == "__main__":
  startup.exit_now(main())
