"""The vocabulary of the config schema: a group of keys is a pydantic model whose fields are declared with `key`.

    class Checkpointing(Group):
      '''Checkpointing'''
      checkpoint_period: StepCount = key(100, "steps between checkpoints (a final one is always saved)", ge=0)

Each key is declared once, with its type, default, constraint and one-line doc; parsing, coercion, range
checks, `--help`, the rendered base_v2.yml and the one-line errors all come from the declaration.
The types below are pydantic's, with the few conversions YAML and the command line need (YAML 1.1 reads
`1e3` as a string; a number is never a boolean; a list becomes an immutable tuple, so a config hashes).
A key whose choices are the names of a registry (`decoder_block`, `dataset_type`, ...) says so with
`registry=True`; `config/validation.py` checks it against the registry of the same name.
Families declare their own group beside their code (`models/<family>.py`, the class attribute `keys`).
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Annotated, Any

import annotated_types
import pydantic
import yaml
from pydantic_core import PydanticCustomError

from MaxText.errors import ConfigError

INT32_MAX = 2**31 - 1


def _number_not_bool(value: Any, kind: str) -> Any:
  if isinstance(value, bool):
    raise PydanticCustomError(f"{kind}_type", "not a number")
  return value


def _int_input(value: Any) -> Any:
  """Numbers as YAML gives them: `1e3` (a string to YAML 1.1) or 1000.0 is 1000; `true` is not 1."""
  value = _number_not_bool(value, "int")
  if isinstance(value, str):
    try:
      return int(value)  # exact, however long
    except ValueError:
      try:
        as_float = float(value)
      except ValueError:
        return value  # pydantic reports it
      return int(as_float) if math.isfinite(as_float) and as_float.is_integer() else value
  return value


def _bool_input(value: Any) -> Any:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    raise PydanticCustomError("bool_type", "not a boolean")
  return value


def _float_input(value: Any) -> Any:
  return _number_not_bool(value, "float")


def _str_input(value: Any) -> Any:
  """YAML gives `run_name: 007` as the number 7 and an empty value as None."""
  if value is None:
    return ""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  return value


Int = Annotated[int, pydantic.BeforeValidator(_int_input), annotated_types.Ge(-2**63), annotated_types.Lt(2**63)]
Float = Annotated[float, pydantic.BeforeValidator(_float_input), pydantic.Field(allow_inf_nan=False)]
Bool = Annotated[bool, pydantic.BeforeValidator(_bool_input)]
Str = Annotated[str, pydantic.BeforeValidator(_str_input)]
StrList = tuple[str, ...]
# A count of steps: the optimizer step is an int32 on the device.
StepCount = Annotated[Int, annotated_types.Le(INT32_MAX)]


def _positive_or_minus_one(value: int) -> int:
  if value == 0 or value < -1:
    raise PydanticCustomError("positive_or_all", "must be positive or -1")
  return value


# -1 means "all" or "fill" (say which in the key's doc); otherwise a positive count.
PositiveOrAll = Annotated[Int, pydantic.AfterValidator(_positive_or_minus_one)]


def _file_name(value: str) -> str:
  if not value or value in (".", "..") or any(c in value for c in "/\\\0"):
    raise PydanticCustomError("file_name", "must be a single name inside the run folder")
  return value


# One path component: a folder or file name inside the run folder (no '/', '..' or absolute path).
FileName = Annotated[Str, pydantic.AfterValidator(_file_name)]


def key(default: Any, doc: str, *, registry: bool = False, path: bool = False, derived: bool = False,
        **constraints) -> Any:
  """A key's declaration: default, one-line doc and pydantic constraints (gt, ge, lt, le, ...).

  `registry`: the choices are the names registered for this key; `path`: a file or folder, made absolute
  against the working directory when the config is resolved; `derived`: computed, never set by a user.
  """
  extra = {"registry": registry, "path": path, "derived": derived}
  return pydantic.Field(default, description=doc, json_schema_extra=extra, **constraints)


class Group(pydantic.BaseModel):
  """A group of keys under one concern. The docstring's first line is the group's title in `--help` and in
  base_v2.yml; `model_validator(mode="after")` methods hold the checks across its keys."""

  model_config = pydantic.ConfigDict(frozen=True, extra="forbid", validate_default=False)

  @classmethod
  def title(cls) -> str:
    return (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")


def extra(field: pydantic.fields.FieldInfo, name: str) -> bool:
  return bool((field.json_schema_extra or {}).get(name))


# --- Reading a field's declaration back, for messages and --help ---

_PLURALS = {"str": "strings", "int": "integers", "float": "numbers", "bool": "booleans"}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "tuple": "a list"}


def type_name(annotation: Any) -> str:
  """`int`, `float`, `bool`, `str`, `list[str]`, `float32 | bfloat16` (a fixed choice), ... as --help shows it."""
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if origin is typing.Literal:
    return " | ".join(str(a) or '""' for a in args)
  if origin is tuple:
    inner = [a for a in args if a is not Ellipsis]
    return f"list[{type_name(inner[0])}]" if len(inner) == 1 else "list"
  if origin in (typing.Union, types.UnionType):
    return " | ".join(type_name(a) for a in args)
  return getattr(annotation, "__name__", str(annotation))


def _kind(annotation: Any) -> str:
  name = type_name(annotation)
  return "tuple" if name.startswith("list") else name


def bounds(field: pydantic.fields.FieldInfo) -> dict[str, Any]:
  """The numeric bounds of a field: {"gt": 0, "le": 2147483647, ...} (the 64-bit guards of `Int` left out)."""
  found = {}
  for item in field.metadata:
    for name in ("gt", "ge", "lt", "le"):
      value = getattr(item, name, None)
      if value is not None and abs(value) < 2**62:
        found[name] = value
  return found


def describe_range(field: pydantic.fields.FieldInfo) -> str:
  """'must be positive', 'must lie in [0, 1)', ... from the field's bounds ('' when it has none)."""
  b = bounds(field)
  low = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
  high = ("]", b["le"]) if "le" in b else (")", b["lt"]) if "lt" in b else None
  if low and high and high[1] != INT32_MAX:
    return f"must lie in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
  if low == ("(", 0):
    return "must be positive"
  if low == ("[", 0):
    return "must not be negative"
  if low:
    return f"must be {'at least' if low[0] == '[' else 'greater than'} {_num(low[1])}"
  if high:
    return f"must be at most {_num(high[1])}"
  return ""


def _num(x) -> str:
  return str(int(x)) if float(x).is_integer() else str(x)


def closest(name: str, candidates) -> str:
  close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=3, cutoff=0.6)
  return f" (did you mean {', '.join(close)}?)" if close else ""


def _shown(value: Any) -> str:
  if isinstance(value, str):
    return repr(value)
  text = yaml.safe_dump(value if not isinstance(value, tuple) else list(value), default_flow_style=True,
                        width=10_000).strip().removesuffix("...").strip()
  return repr(text)


def error(name: str, field: pydantic.fields.FieldInfo, exc: pydantic.ValidationError, value: Any,
          source: str) -> ConfigError:
  """The one-line ConfigError of a value that failed its key's declaration."""
  problem = exc.errors(include_url=False)[0]
  kind, ctx = problem["type"], problem.get("ctx") or {}
  where = f" ({source})" if source else ""
  if kind == "value_error" and isinstance(ctx.get("error"), ConfigError):
    return ctx["error"]
  if kind == "literal_error":
    allowed = [a for a in field.annotation.__args__] if hasattr(field.annotation, "__args__") else []
    shown = ", ".join(str(a) or '""' for a in allowed)
    return ConfigError(f"config key {name!r} must be one of {shown}; got {value!r}{closest(value, allowed)}{where}")
  if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
    if "le" in bounds(field) and bounds(field)["le"] == INT32_MAX and kind == "less_than_equal":
      return ConfigError(f"config key {name!r} must be at most {INT32_MAX} (the step counter is a 32-bit integer), "
                         f"got {value}{where}")
    if abs(float(ctx.get("gt", ctx.get("ge", ctx.get("lt", ctx.get("le", 0)))))) >= 2**62:
      return ConfigError(f"config key {name!r} is {value}{where}, beyond a 64-bit integer")
    return ConfigError(f"config key {name!r} {describe_range(field)}, got {value}{where}")
  if kind == "positive_or_all":
    return ConfigError(f"config key {name!r} must be positive or -1 ({_minus_one_meaning(field)}), got {value}{where}")
  if kind == "file_name":
    what = "a folder name" if name.endswith("name") else "a file name"
    return ConfigError(f"config key {name!r} must be {what} inside the run folder (no '/', '..' or absolute "
                       f"path), got {value!r}{where}")
  if kind == "value_error":
    return ConfigError(f"config key {name!r}: {ctx.get('error', problem['msg'])}{where}")
  if kind in ("too_short", "too_long"):
    return ConfigError(f"config key {name!r} must list {_length_words(field)}, got {_shown(value)}{where}")
  expected = _TYPE_WORDS.get(_kind(field.annotation), type_name(field.annotation))
  if kind == "finite_number":
    expected = "a finite number"
  if problem["loc"] and expected == "a list":  # an item of a list
    inner = type_name(field.annotation).removeprefix("list[").removesuffix("]")
    expected = f"a list of {_PLURALS.get(inner, 'lists')}"
  return ConfigError(f"config key {name!r} expects {expected}, got {_shown(value)}{where}")


def _minus_one_meaning(field) -> str:
  doc = field.description or ""
  return doc.split("-1 = ", 1)[1].split(";")[0].split(",")[0].strip() if "-1 = " in doc else "all"


def _length_words(field) -> str:
  low = next((m.min_length for m in field.metadata if getattr(m, "min_length", None) is not None), None)
  high = next((m.max_length for m in field.metadata if getattr(m, "max_length", None) is not None), None)
  words = {1: "one", 2: "two", 3: "three"}
  if low and high:
    return f"{words.get(low, low)} or {words.get(high, high)} entries" if high == low + 1 else \
        f"{low} to {high} entries"
  return f"at least {low} entries" if low else f"at most {high} entries"
