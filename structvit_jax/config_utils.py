"""Helpers for the recipe files in configs/: strict config-string parsing and loading a
sibling config file by path.

Recipes are loaded by path (ml_collections `config_flags` runs them with a
`SourceFileLoader`), so `configs/` need not be importable: a recipe gets the shared schema
with `import_sibling(__file__, "base")`, which works from any working directory, under
pytest and from Colab alike. This module imports only ml_collections (no JAX), so loading a
config stays fast.
"""

from __future__ import annotations

import ast
import difflib
import importlib.machinery
import importlib.util
import os
import re
import sys
import types
from typing import Any

import ml_collections

from structvit_jax.cli import UserError

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


def parse_overrides(items: list[str]) -> dict[str, Any]:
  """`--set FIELD=VALUE` flags -> get_model overrides; values are Python literals, or bare
  strings such as aggregation=element."""
  out = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set d=8")
    key, value = item.split("=", 1)
    try:
      out[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key.strip()] = value
  return out


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path[:arg]` -> get_config(arg) of that file (as ml_collections' --config flag loads
  it), with one clear UserError for a missing file, a syntax error, a failing import, no
  get_config or a bad config string."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    hint = ("a directory, not a config file" if os.path.isdir(path) else "no such file")
    raise UserError(f"--config={spec}: {path}: {hint} (give a recipe file such as "
                    f"configs/demo.py; paths are relative to {os.getcwd()})")
  module_name = "_structvit_config_check_" + re.sub(r"\W", "_", os.path.abspath(path))
  try:
    loader = importlib.machinery.SourceFileLoader(module_name, path)
    spec_ = importlib.util.spec_from_loader(module_name, loader)
    module = importlib.util.module_from_spec(spec_)
    loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"--config={spec}: syntax error in {e.filename or path} line {e.lineno}: "
                    f"{e.msg}") from e
  except Exception as e:  # noqa: BLE001  (whatever the file raises while it is imported)
    raise UserError(f"--config={spec}: {path} failed to load: {type(e).__name__}: {e}") from e
  if not callable(getattr(module, "get_config", None)):
    raise UserError(f"--config={spec}: {path} has no get_config() (a config file defines "
                    "get_config(arg=None) returning an ml_collections.ConfigDict)")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except ValueError as e:  # parse_arg: unknown key or bad value in the config string
    raise UserError(f"--config={spec}: {e}") from e
  return config


def _leaf_paths(node: Any, prefix: str = "") -> list[str]:
  out = []
  for key, value in node.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out += _leaf_paths(value, path + ".")
    else:
      out.append(path)
  return out


def check_overrides(config: ml_collections.ConfigDict, fields: list[str],
                    flag: str = "config") -> None:
  """Raises a UserError naming the valid (and the nearest) fields for a `--config.x.y`
  override whose field does not exist in `config`."""
  for field in fields:
    node: Any = config
    parts = field.split(".")
    for i, part in enumerate(parts):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      if isinstance(node, ml_collections.ConfigDict):
        prefix = ".".join(parts[:i])
        valid = sorted(node.keys())
        near = difflib.get_close_matches(field, _leaf_paths(config), n=3, cutoff=0.6)
        raise UserError(
            f"--{flag}.{field}: unknown config field {part!r}"
            + (f" in {prefix}" if prefix else "")
            + (f"; did you mean {', '.join(near)}?" if near else "")
            + f" valid fields{' of ' + prefix if prefix else ''}: {', '.join(valid)}")
      raise UserError(f"--{flag}.{field}: {'.'.join(parts[:i])} is a value, not a group "
                      "of fields")


def check_config_argv(argv: list[str], flag: str = "config") -> None:
  """Loads `--config=FILE[:arg]` from argv and checks every `--config.field=...` override
  against it, before absl parses the flags (whose own errors are tracebacks)."""
  spec, fields = None, []
  for a in argv[1:]:
    if a == "--":
      break
    name = a.lstrip("-").split("=", 1)[0]
    if a.startswith("-") and name == flag and "=" in a:
      spec = a.split("=", 1)[1]
    elif a.startswith("-") and name.startswith(flag + "."):
      fields.append(name[len(flag) + 1:])
    elif a.startswith("-") and name.startswith("no" + flag + "."):  # --noconfig.flag
      fields.append(name[len(flag) + 3:])
  if spec is None:
    return  # absl names the missing required flag
  check_overrides(load_config_file(spec), fields, flag)
