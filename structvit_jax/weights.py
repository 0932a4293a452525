"""Pretrained weights in: PyTorch state_dicts -> our variables, inflation, resizing.

Two steps, shared by `python -m structvit_jax.convert` and `config.init_from`:
  1. `from_torch(state_dict, abstract)`: every torch key -> a flax path in our layout
     (`torch_key`, `_to_flax`; names and layouts: docs/official_weights.md).
  2. `fit(src, abstract, init_fn, ...)`: src (flax paths: torch, an export, a training
     checkpoint) onto the target's structure and shapes.
Unmapped keys, missing leaves and shapes that do not fit are errors listing them all. Model
parameter names live in the families' rules (`Family`: UniFormer's and DeiT's below,
TimeSformer's and StructSA's in models/<family>_weights.py).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
from typing import Any, Callable, Mapping

from flax import traverse_util
import jax.numpy as jnp
import numpy as np

from structvit_jax import paths

Path = tuple[str, ...]   # (collection, *modules, leaf), e.g. ('params', 'head', 'kernel')

WRAPPERS = ("model", "model_state", "state_dict_ema", "state_dict")
IGNORED_SUFFIXES = ("num_batches_tracked",)   # BN step counters: not state we keep
_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}

INSTALL_TORCH = ("PyTorch is needed to read .pth checkpoints; install the CPU build with:\n"
                 "  pip install torch --index-url https://download.pytorch.org/whl/cpu")


class WeightsError(ValueError):
  """A checkpoint that does not fit the model; the message lists every offending key."""


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family's weight-adaptation rules, keyed on its parameter names: they apply where
  those occur (DeiT has TimeSformer's pos_embed). fill(path, shape, src, init): a leaf src
  lacks (init(): the target's initial leaves); resize(path, w, shape): a leaf of another
  shape; both None when not theirs. infer_kwargs(state_dict, preset fields): get_model fields."""
  heads: tuple[str, ...] = ()        # top-level classifiers: drop_head re-initialises them
  inflatable: tuple[str, ...] = ()   # leaves that `inflate` turns 2D -> 3D
  untwinned: tuple[str, ...] = ()    # leaves with no torch key
  fill: Callable[..., Any] | None = None
  resize: Callable[..., np.ndarray | None] | None = None
  models: tuple[type, ...] = ()      # classes whose state_dicts infer_kwargs reads
  torch_renames: tuple[tuple[str, str], ...] = ()  # (official key prefix, ours) where they differ
  infer_kwargs: Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], dict] | None = None


# UniFormer's rules: its classifiers, and the video model as the image model whose conv
# kernels gain a leading T axis (inflation).
UNIFORMER = Family(heads=("head", "aux_head"), inflatable=("kernel",))
# DeiT's ("DeiT on clips"): timm/DeiT's `patch_embed.proj` is our `patch_embed`; an image DeiT
# into the video DeiT inflates the patch kernel (UniFormer's rule for every `kernel`) and
# fills `time_embed` with its zero init (TimeSformer's rule for a source without one).
DEIT = Family(heads=("head",), torch_renames=(("patch_embed.proj.", "patch_embed."),))


@functools.cache
def families() -> tuple[Family, ...]:  # imported on first use: the modules import this one
  return (UNIFORMER, *(importlib.import_module(f"structvit_jax.models.{m}_weights").RULES
                       for m in ("timesformer", "structsa")), DEIT)


def _names(field: str) -> set[str]:
  return {n for f in families() for n in getattr(f, field)}


def _first(hook: str, *args: Any) -> Any:  # the families' first answer other than None
  return next((r for f in families() if getattr(f, hook) and
               (r := getattr(f, hook)(*args)) is not None), None)


def _listing(title: str, items: list[str], limit: int = 60) -> str:
  more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
  return f"{title} ({len(items)}):\n  " + "\n  ".join(items[:limit]) + more


# ----------------------------------------------------------------------------- torch side


def load_torch_file(path: str) -> dict[str, np.ndarray]:
  """Reads a .pth/.pyth checkpoint on CPU and returns its unwrapped state_dict as numpy."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(INSTALL_TORCH) from e
  # weights_only=False: official checkpoints also pickle configs. Open only trusted files.
  if paths.is_remote(path):  # gs://: read whole, torch.load takes a seekable file
    import io
    path = io.BytesIO(paths.epath(path).read_bytes())
  return unwrap(torch.load(path, map_location="cpu", weights_only=False))


def unwrap(obj: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The state_dict inside a training script's checkpoint: {'model' | 'model_state' |
  'state_dict_ema' | 'state_dict': sd} (EMA preferred) or sd itself; strips a 'model.'
  prefix that every key shares (a wrapper module's); torch tensors -> numpy."""
  sd = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), Mapping)), obj)
  out = {}
  for k, v in sd.items():
    if hasattr(v, "detach"):  # torch tensor (bf16 has no numpy dtype: go through float32)
      v = v.detach().cpu()
      v = (v.float() if str(v.dtype) == "torch.bfloat16" else v).numpy()
    out[k] = np.asarray(v)
  if out and all(k.startswith("model.") for k in out):
    out = {k[len("model."):]: v for k, v in out.items()}
  return out


def torch_key(path: Path) -> str | None:
  """Official state_dict key of one of our leaves; None for leaves with no torch twin."""
  collection, *modules, leaf = path
  if leaf in _names("untwinned"):
    return None
  # 'blocks3_5' -> 'blocks3.5', 'proj_0' -> 'proj.0' (Sequential / ModuleList indices).
  mods = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
  return ".".join([*mods, _LEAF_NAMES.get((collection, leaf), leaf)])


def _to_flax(w: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
  """One torch array in our layout (shape still the source's: fit() checks it)."""
  if leaf != "kernel":  # norms, biases, embeddings as they are; [1, C, 1, 1] vectors -> [C]
    return w.reshape(-1) if target_ndim == 1 else w
  if w.ndim == 2:  # Linear [out, in]
    return w.T
  w = np.transpose(w, (*range(2, w.ndim), 1, 0))  # [O, I, *k] -> [*k, I, O]
  if target_ndim == 2 and all(s == 1 for s in w.shape[:-2]):  # 1x1(x1) conv as our Dense
    w = w.reshape(w.shape[-2:])
  return w


flat_paths = traverse_util.flatten_dict  # {Path: leaf} of a nested dict


def from_torch(state_dict: Mapping[str, np.ndarray], abstract: Any) -> dict[Path, np.ndarray]:
  """state_dict -> {flax path: array in our layout}. abstract: the target's variables
  ({'params', 'batch_stats'}, arrays or ShapeDtypeStructs). Raises WeightsError listing every
  torch key that has no place in the target."""
  by_key = {k: (p, len(leaf.shape)) for p, leaf in flat_paths(abstract).items()
            if (k := torch_key(p)) is not None}
  out, unmapped = {}, []
  renames = [r for f in families() for r in f.torch_renames]
  for key, w in state_dict.items():
    if key.endswith(IGNORED_SUFFIXES):
      continue
    key = next((ours + key[len(theirs):] for theirs, ours in renames
                if key.startswith(theirs) and key not in by_key), key)
    if key not in by_key:
      unmapped.append(f"{key} {list(np.shape(w))}")
      continue
    path, ndim = by_key[key]
    out[path] = _to_flax(np.asarray(w), path[-1], ndim)
  if unmapped:
    raise WeightsError(_listing("checkpoint keys with no place in the model (wrong preset, "
                                "--set fields or layout?)", unmapped))
  return out


# ----------------------------------------------------------------------------- fitting


def inflate(w: np.ndarray, t: int, mode: str) -> np.ndarray:
  """2D conv kernel [*k, I, O] -> 3D [t, *k, I, O]. 'average' (the official
  `inflate_weight`): every frame w / t, so a clip of identical frames gives the 2D response
  wherever the temporal window lies inside the clip. 'centre': w at t // 2, zeros
  elsewhere: exact on identical frames everywhere (zero padding never touches the tap)."""
  if mode in ("average", "avg", "mean"):
    return np.repeat(w[None], t, axis=0) / t
  if mode in ("centre", "center"):
    out = np.zeros((t, *w.shape), w.dtype)
    out[t // 2] = w
    return out
  raise ValueError(f"inflate={mode!r}; valid: 'average', 'centre' or '' (no inflation)")


def fit(src: Mapping[Path, np.ndarray], abstract: Any, init_fn: Callable[[], Any] | None = None,
        inflate_mode: str = "", drop_head: bool = False) -> dict:
  """src onto the target's structure and shapes; returns {'params', 'batch_stats'}.
  inflate_mode: '' (shapes must match), 'average' or 'centre' (inflatable 2D leaves -> 3D).
  drop_head: the heads from init_fn(), the target's initial variables (called when needed).
  The families' fill / resize hooks supply what src lacks or sizes otherwise. Raises
  WeightsError listing every missing leaf and every shape that does not fit."""
  heads, inflatable = _names("heads"), _names("inflatable")
  init = functools.cache(lambda: flat_paths(init_fn()))
  out, missing, bad = {}, [], []
  for path, leaf in flat_paths(abstract).items():
    shape = tuple(leaf.shape)
    is_head = len(path) > 2 and path[1] in heads
    w = init()[path] if is_head and drop_head else src[path] if path in src else \
        _first("fill", path, shape, src, init)
    if w is None:
      key = torch_key(path)
      missing.append("/".join(path) + f" {list(shape)}" + (f" (torch: {key})" if key else ""))
      continue
    w = np.asarray(w)
    if w.shape != shape and inflate_mode and path[-1] in inflatable and \
        w.ndim + 1 == len(shape) and w.shape == shape[1:]:
      w = inflate(w, shape[0], inflate_mode)
    elif w.shape != shape:
      resized = _first("resize", path, w, shape)
      w = w if resized is None else resized
    if w.shape != shape:
      hint = (" (a different class count: use drop_head / --num_classes)" if is_head else
              " (an image kernel for a video model: set inflate)"
              if w.ndim + 1 == len(shape) and not inflate_mode else "")
      bad.append(f"{'/'.join(path)}: checkpoint {list(w.shape)}, model {list(shape)}{hint}")
      continue
    out[path] = w.astype(leaf.dtype)
  errors = [_listing(t, got) for t, got in (("model leaves missing from the checkpoint",
                                              missing), ("shapes that do not fit", bad)) if got]
  if errors:
    raise WeightsError("\n".join(errors))
  # jax arrays: model code indexes kernels with tracers (numpy arrays cannot be).
  return {"batch_stats": {}, **traverse_util.unflatten_dict({p: jnp.asarray(v)
                                                             for p, v in out.items()})}


# ----------------------------------------------------------------------------- sources


def load_source(path: str) -> dict[Path, np.ndarray]:
  """Our variables from an export dir (model.json + params/) or a training checkpoint dir
  (<dir>/<step>/state, the newest step; its params, not EMA)."""
  from structvit_jax import checkpoint, inference, paths
  from structvit_jax.workdir import Workdir
  if paths.isfile(os.path.join(path, "model.json")):
    tree = inference.restore_export_arrays(path)
  else:  # a training checkpoint: <dir>/<step>/state (checkpoint.py), or a workdir holding it
    ckdir = Workdir(path).checkpoints_or_self()
    steps = checkpoint.list_steps(ckdir)
    if not steps:
      raise FileNotFoundError(f"init_from: {path} is neither a file, an export (model.json) "
                              f"nor a checkpoint directory with steps")
    tree = None
    for i, step in enumerate(reversed(steps)):  # the newest step that is usable
      try:
        tree = checkpoint.read_step_arrays(ckdir, step)
        break
      except checkpoint.CheckpointError as e:
        older = steps[-2 - i] if i + 1 < len(steps) else None
        if older is None:
          raise checkpoint.CheckpointError(
              f"init_from: no checkpoint in {ckdir} is usable (the oldest, step {step}: "
              f"{e})") from None
        from absl import logging
        logging.warning("init_from: checkpoint step %d in %s is unusable: %s; trying step %d.",
                        step, ckdir, e, older)
  get = tree.get if isinstance(tree, Mapping) else (lambda k: getattr(tree, k))
  return flat_paths({"params": get("params"), "batch_stats": get("batch_stats") or {}})


def init_variables_from(path: str, abstract: Any, init_fn: Callable[[], Any],
                        inflate_mode: str = "", drop_head: bool = False) -> dict:
  """{'params', 'batch_stats'} for a model (abstract variables) from a PyTorch file or one
  of ours (load_source)."""
  src = from_torch(load_torch_file(path), abstract) if paths.isfile(path) else load_source(path)
  return fit(src, abstract, init_fn, inflate_mode, drop_head)
