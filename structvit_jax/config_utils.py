"""Helpers for the recipe files in configs/ (which users copy): strict config-string
parsing and loading a sibling config file by path.

Recipes are loaded by path (ml_collections `config_flags` runs them with a
`SourceFileLoader`), so `configs/` need not be importable: a recipe gets the shared schema
with `import_sibling(__file__, "base")`, which works from any working directory, under
pytest and from Colab alike. This module imports only ml_collections (no JAX), so loading a
config stays fast.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import types
from typing import Any

import ml_collections

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def import_sibling(file: str, name: str) -> types.ModuleType:
  """Imports `<dirname(file)>/<name>.py` by path (cached), e.g. the base schema."""
  path = os.path.join(os.path.dirname(os.path.abspath(file)), f"{name}.py")
  module_name = "_structvit_config_" + re.sub(r"\W", "_", path)
  if module_name not in sys.modules:
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
      raise ImportError(f"cannot load config module {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
      spec.loader.exec_module(module)
    except BaseException:
      del sys.modules[module_name]
      raise
  return sys.modules[module_name]


def _typed(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):  # before int: bool is an int subclass
    low = text.lower()
    if low in _TRUE:
      return True
    if low in _FALSE:
      return False
    raise ValueError(f"config string: {key}={text!r} is not a bool ({'/'.join(_TRUE + _FALSE)})")
  if isinstance(default, (int, float)):
    try:
      return type(default)(text)
    except ValueError:
      raise ValueError(f"config string: {key}={text!r} is not a {type(default).__name__}") from None
  if isinstance(default, str):
    return text
  raise TypeError(f"config string: default of {key!r} must be bool/int/float/str, "
                  f"got {type(default).__name__}")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config string like 'd=8,stride=1,element' strictly against `defaults`.

  Items are `key=value` (typed from the default: bool, int, float or str) or a bare `key`
  (sets a bool to True). An unknown key raises ValueError listing the valid keys.
  Returns a locked ConfigDict holding every key (defaults filled in).
  """
  out = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "(none)"
      raise ValueError(f"config string: unknown key {key!r} in {arg!r}; valid keys: {valid}")
    if not sep:
      if not isinstance(defaults[key], bool):
        raise ValueError(f"config string: {key!r} needs a value ({key}=...)")
      out[key] = True
    else:
      out[key] = _typed(key, text.strip(), defaults[key])
  cfg = ml_collections.ConfigDict(out)
  cfg.lock()
  return cfg
