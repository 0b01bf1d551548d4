"""The errors a user sees: one line that names the culprit (a key, a file, a checkpoint), never a traceback.

Entry points (train.py, decode.py, eval.py, the tools), wrapped by `startup.cli`, print `error: <message>`
and exit with the status below; docs/reliability.md lists them for schedulers. Every module of MaxText may
import this one; it imports nothing of the project.
"""

from __future__ import annotations

# Exit statuses of every entry point (`startup.cli`).
EXIT_OK = 0  # trained to `steps` (or nothing left to do), evaluated, decoded
EXIT_CHECK_FAILED = 1  # the command ran and its verdict is no: logits differ (convert_checkpoint check), the
#                        step does not fit the slice (train_compile), a fault-injection run diverged
EXIT_ERROR = 2  # bad input: a config key, data, a checkpoint, a disk or a path (ConfigError and subclasses)
EXIT_DIVERGED = 3  # training stopped on a non-finite loss or gradient norm (DivergenceError)
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGINT; run the same command again to resume (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # Ctrl-C outside a training loop (the shell's 128 + SIGINT)


class ConfigError(ValueError):
  """A configuration mistake; the message is one line and names the key."""


class DataError(ConfigError):
  """Unreadable or inconsistent data; the message names the file, split or dataset."""


class CheckpointError(ConfigError):
  """A checkpoint that is missing, damaged or does not fit the model; the message names the path."""


class StorageError(ConfigError):
  """A path that cannot be read or written (full disk, permissions, a file in the way, a bucket out of
  reach, a missing file); the message names the path and what was being done."""


class ShardingError(ConfigError):
  """A logical axis name without a rule, or a mesh that cannot be built; the message names the culprit."""


class PrepareError(Exception):
  """Bad input to prepare_data.py; the message names the culprit."""


class DivergenceError(Exception):
  """Training produced a non-finite loss or gradient norm (nan_policy); the message names the step."""


class Preempted(BaseException):
  """A second SIGTERM/SIGINT: stop at once. A BaseException, like KeyboardInterrupt, so that no library's
  `except Exception` in the main thread swallows it."""
