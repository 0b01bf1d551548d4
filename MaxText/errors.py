"""The errors a user sees: one line that names the culprit (a key, a file, a checkpoint), never a traceback.

Entry points (train.py, decode.py, eval.py, the tools) print `error: <message>` and exit with code 2 for
any of them. Every module of MaxText may import this one; it imports nothing of the project.
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A configuration mistake; the message is one line and names the key."""


class DataError(ConfigError):
  """Unreadable or inconsistent data; the message names the file, split or dataset."""


class CheckpointError(ConfigError):
  """A checkpoint that is missing, damaged or does not fit the model; the message names the path."""


class ShardingError(ConfigError):
  """A logical axis name without a rule, or a mesh that cannot be built; the message names the culprit."""


class PrepareError(Exception):
  """Bad input to prepare_data.py; the message names the culprit."""


class StorageError(ConfigError):
  """A path that cannot be read or written (a bucket out of reach, no permission, a missing file); the
  message names the path and what was being done."""
