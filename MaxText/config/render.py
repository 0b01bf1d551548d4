"""Two views of the declared keys: the `--help` text and `configs/base_v2.yml`.

    python -m MaxText.config.render --yaml > MaxText/configs/base_v2.yml   # after declaring or changing a key

base_v2.yml is the schema rendered as YAML, so a user reads every key, its default and its doc in the file
MaxText users start from; a test keeps it equal to this rendering.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Mapping, Sequence

import yaml

from MaxText.config import keys, schema

_YAML_HEADER = """\
# python MaxText/train.py MaxText/configs/base_v2.yml run_name=demo
#
# Every key the trainer knows, grouped by concern, with its default and a one-line comment. The keys are
# declared, with their types and constraints, in MaxText/config/schema.py (and each model family's in
# MaxText/models/<family>.py); this file is rendered from there (python -m MaxText.config.render --yaml).
# `key=value` on the command line, `M_<KEY>=value` in the environment, your own YAML file, or a preset in
# configs/models/<model_name>.yml override them.
# Precedence, lowest to highest: this file < model preset < your YAML (the config file named first on the
# command line, when it is not this one) < M_<KEY> environment < command line.
# Keys whose value names a registered extension (decoder_block, dataset_type, tokenizer_type, opt_type, ...)
# accept the names registered in code; `python MaxText/train.py --help` lists them.
"""
_COMMENT_COLUMN = 34
_WIDTH = 120


def _flow(value) -> str:
  if isinstance(value, tuple):
    value = _thaw(value)
  text = yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True).strip()
  text = text.removesuffix("...").strip()
  return f'"{value}"' if isinstance(value, str) and text in ("''", value) else text


def _thaw(value):
  return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def _sections():
  """(group title, [key, ...]) in display order, each key once (a family extending another's group shows
  only its own keys)."""
  seen: set[str] = set()
  for group in schema.groups():
    names = [n for n in group.model_fields if n not in seen]
    seen.update(names)
    if names:
      yield group.title(), names


def base_yaml() -> str:
  """configs/base_v2.yml: every settable key with its default and doc, by group."""
  fields = schema.fields()
  lines = [_YAML_HEADER.rstrip("\n")]
  for title, names in _sections():
    lines += ["", f"# --- {title} ---"]
    for name in names:
      default, doc = fields[name].default, fields[name].description or ""
      if name == "logical_axis_rules":  # one rule per line
        lines.append(f"{name}: [".ljust(_COMMENT_COLUMN) + f"# {doc}")
        lines += [f"  {_flow(rule)}," for rule in default]
        lines.append("]")
        continue
      left = f"{name}: {_flow(default)}"
      room = _WIDTH - max(len(left) + 1, _COMMENT_COLUMN) - 2
      wrapped = textwrap.wrap(doc, max(room, 40))
      lines.append(f"{left.ljust(_COMMENT_COLUMN - 1)} # {wrapped[0]}" if wrapped else left)
      lines += [" " * _COMMENT_COLUMN + f"#   {more}" for more in wrapped[1:]]
  return "\n".join(lines) + "\n"


def constraint(field) -> str:
  """`> 0`, `in [0, 1)`, `-1 or > 0`, ... from the declaration ('' when there is none)."""
  parts = []
  b = keys.bounds(field)
  if any(getattr(m, "func", None) is keys._positive_or_minus_one for m in field.metadata):
    parts.append("-1 or > 0")
  elif b:
    low = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    high = ("]", b["le"]) if "le" in b and b["le"] != keys.INT32_MAX else (")", b["lt"]) if "lt" in b else None
    if low and high:
      parts.append(f"in {low[0]}{keys._num(low[1])}, {keys._num(high[1])}{high[0]}")
    elif low:
      parts.append(f"{'>=' if low[0] == '[' else '>'} {keys._num(low[1])}")
    elif high:
      parts.append(f"{'<=' if high[0] == ']' else '<'} {keys._num(high[1])}")
  lengths = [getattr(m, n) for m in field.metadata for n in ("min_length", "max_length")
             if getattr(m, n, None) is not None]
  if lengths:
    parts.append(f"{'-'.join(map(str, lengths))} items")
  return ", ".join(parts)


def help_text(choices: Mapping[str, Sequence[str]] | None = None, width: int = 110) -> str:
  """Every key with its default, type, constraint and doc, in aligned columns, docs wrapped to `width`.

  `choices` (key -> registered names, from `validation.choices()`) is appended to the keys they serve.
  """
  fields = schema.fields()
  choices = dict(choices or {})
  lines = [
      "usage: python MaxText/train.py MaxText/configs/base_v2.yml [key=value ...]",
      "       python MaxText/train.py --list-models | --help",
      "       python MaxText/train.py MaxText/configs/base_v2.yml model_name=NAME --count-params",
      "",
      "Keys as key=default (type[, constraint]) doc; precedence: base_v2.yml < model preset < your YAML",
      "< M_<KEY> environment < key=value:",
  ]
  cells = []
  for title, names in _sections():
    for name in names:
      field = fields[name]
      default = field.default if isinstance(field.default, str) and field.default else _flow(field.default)
      if len(default) > 40:
        default = default[:37] + "..."
      kind = ", ".join(p for p in (keys.type_name(field.annotation), constraint(field)) if p)
      doc = f"({kind}) {field.description or ''}"
      if name in choices:
        doc = f"{doc} [{' | '.join(choices[name])}]"
      cells.append((title, f"  {name}={default}", doc))
  # One doc column for all keys; a longer key=default puts its doc on the lines below it.
  column = min(max(len(left) for _, left, _ in cells), 36) + 2
  group = None
  for title, left, doc in cells:
    if title != group:
      lines += ["", f"{title}:"]
      group = title
    wrapped = textwrap.wrap(doc, max(width - column, 30))
    if len(left) + 2 > column:
      lines.append(left)
    else:
      lines.append(f"{left:<{column}}{wrapped.pop(0) if wrapped else ''}".rstrip())
    lines += [" " * column + more for more in wrapped]
  return "\n".join(lines)


if __name__ == "__main__":
  if sys.argv[1:] == ["--yaml"]:
    sys.stdout.write(base_yaml())
  else:
    from MaxText.config import validation

    print(help_text(validation.choices()))
