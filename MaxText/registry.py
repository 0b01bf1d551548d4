"""One pattern for every kind of extension: a name -> object table filled by a decorator.

    ACTIVATIONS = Registry("mlp_activations", "MLP activation")

    @ACTIVATIONS.register("silu")
    def silu(x): ...

    ACTIVATIONS.get("silu")   # the function; an unknown name is a one-line ConfigError listing the known ones

The config key a registry serves (`decoder_block`, `dataset_type`, `tokenizer_type`, `opt_type`, ...)
takes its choices from it, so adding a choice is one decorated class or function in one file.
A registry whose entries live in several modules gets a `load` callable that imports them on first use
(e.g. every module of a package), so a new file is found without editing any list.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from MaxText.errors import ConfigError

T = TypeVar("T")

_ALL: dict[str, Registry] = {}


class Registry(Generic[T]):
  """Entries registered under names, for the config key `key`."""

  def __init__(self, key: str, what: str, *, load: Callable[[], None] | None = None):
    if key in _ALL:
      raise ValueError(f"a registry for config key {key!r} exists already")
    self.key, self.what = key, what
    self._entries: dict[str, T] = {}
    self._load = load
    _ALL[key] = self

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator: `@REGISTRY.register("name")` on a class or function."""

    def add(entry: T) -> T:
      if name in self._entries and self._entries[name] is not entry:
        raise ValueError(f"{self.what} {name!r} is registered twice")
      self._entries[name] = entry
      return entry

    return add

  def _loaded(self) -> dict[str, T]:
    if self._load is not None:
      load, self._load = self._load, None
      load()
    return self._entries

  def names(self) -> list[str]:
    """The registered names, in registration order (the order some registries need, e.g. lax.switch)."""
    return list(self._loaded())

  def __contains__(self, name: str) -> bool:
    return name in self._loaded()

  def items(self) -> list[tuple[str, T]]:
    return list(self._loaded().items())

  def check(self, name: str) -> None:
    """A one-line ConfigError unless `name` is registered."""
    entries = self._loaded()
    if name not in entries:
      close = difflib.get_close_matches(str(name), list(entries), n=3, cutoff=0.6)
      hint = f" (did you mean {', '.join(close)}?)" if close else ""
      plural = self.what[:-1] + "ies" if self.what.endswith("y") else self.what + "s"
      raise ConfigError(f"unknown {self.key} {name!r}{hint}; registered {plural}: {', '.join(entries)}")

  def get(self, name: str) -> T:
    self.check(name)
    return self._entries[name]


def registries() -> dict[str, Registry]:
  """Every registry created so far, by the config key it serves."""
  return dict(_ALL)
