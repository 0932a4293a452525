"""Pretrained weights in: official PyTorch state_dicts -> our variables, inflation, resizing.

Two steps, shared by `python -m structvit_jax.convert` and `config.init_from`:

  1. `from_torch(state_dict, abstract)`: every torch key -> a flax path in our layout
     (../shared/PEER_MODELS.md §1.3, §2, §3). Our submodule names are the official keys
     (`blocks3.5.attn.qkv.weight` <-> params/blocks3_5/attn/qkv/kernel), so the table is
     derived from the target's own parameter tree by `torch_key`, and the layout from the
     leaf kind: Conv [O, I, *k] -> [*k, I, O] (depthwise [C, 1, *k] -> [*k, 1, C] is the
     same transpose), 1x1 convs that are our Dense -> w[:, :, 0, 0].T, Linear -> w.T, LN/BN
     weight -> scale, BN running stats -> batch_stats, gammas [1, C, 1, 1] -> [C]. A torch
     key with no target path is an error that lists them all.
  2. `fit(src, abstract, init_fn, ...)`: src (flax paths, any source: torch, an export, a
     training checkpoint) onto the target's shapes: 2D -> 3D inflation of conv kernels,
     TimeSformer pos/time-embedding resizing, head re-initialisation, StructSA kernels at
     the identity centre tap when the source is a UniFormer. Missing leaves and shape
     mismatches are errors that list them all.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from structvit_jax.models.structsa import centre_tap_init
from structvit_jax.models.timesformer import nearest_indices

Path = tuple[str, ...]   # (collection, *modules, leaf), e.g. ('params', 'head', 'kernel')

WRAPPERS = ("model", "model_state", "state_dict_ema", "state_dict")
IGNORED_SUFFIXES = ("num_batches_tracked",)   # BN step counters: not state we keep
HEADS = ("head", "aux_head")
STRUCTURE_LEAVES = ("u_k", "u_v")             # StructSA kernels: no UniFormer counterpart
_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}

INSTALL_TORCH = ("PyTorch is needed to read .pth checkpoints but is not installed. Install the "
                 "CPU build with:\n  pip install torch --index-url "
                 "https://download.pytorch.org/whl/cpu")


class WeightsError(ValueError):
  """A checkpoint that does not fit the model; the message lists every offending key."""


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
  # weights_only=False: official checkpoints also pickle argparse namespaces / configs.
  # Only open checkpoints you trust.
  obj = torch.load(path, map_location="cpu", weights_only=False)
  return unwrap(obj)


def unwrap(obj: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The state_dict inside an official checkpoint: {'model' | 'model_state' |
  'state_dict_ema' | 'state_dict': sd} (EMA preferred) or sd itself; strips the 'model.'
  prefix of TimeSformer's wrapper; torch tensors -> numpy."""
  sd = obj
  for k in WRAPPERS:
    if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping):
      sd = obj[k]
      break
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
  if leaf in STRUCTURE_LEAVES:
    return None
  # 'blocks3_5' -> 'blocks3.5', 'proj_0' -> 'proj.0' (Sequential / ModuleList indices).
  mods = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
  name = _LEAF_NAMES.get((collection, leaf), leaf)
  return ".".join([*mods, name])


def _to_flax(w: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
  """One torch array in our layout (shape still the source's: fit() checks it)."""
  if leaf != "kernel":
    # LN/BN vectors, biases, cls/pos/time embeddings as they are; TL CBlock gammas
    # [1, C, 1, 1] -> [C].
    return w.reshape(-1) if target_ndim == 1 else w
  if w.ndim == 2:  # Linear [out, in]
    return w.T
  w = np.transpose(w, (*range(2, w.ndim), 1, 0))  # [O, I, *k] -> [*k, I, O]
  if target_ndim == 2 and all(s == 1 for s in w.shape[:-2]):  # 1x1(x1) conv as our Dense
    w = w.reshape(w.shape[-2:])
  return w


def flat_paths(tree: Any) -> dict[Path, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(str(getattr(k, "key", k)) for k in p): v for p, v in flat}


def unflatten(flat: Mapping[Path, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return out


def from_torch(state_dict: Mapping[str, np.ndarray], abstract: Any) -> dict[Path, np.ndarray]:
  """state_dict -> {flax path: array in our layout}. abstract: the target's variables
  ({'params', 'batch_stats'}, arrays or ShapeDtypeStructs). Raises WeightsError listing every
  torch key that has no place in the target."""
  by_key = {}
  for path, leaf in flat_paths(abstract).items():
    key = torch_key(path)
    if key is not None:
      by_key[key] = (path, len(leaf.shape))
  out, unmapped = {}, []
  for key, w in state_dict.items():
    if key.endswith(IGNORED_SUFFIXES):
      continue
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


def resize_pos_embed(w: np.ndarray, n_out: int) -> np.ndarray:
  """TimeSformer pos_embed [1, 1+N, C] -> [1, 1+n_out, C]: 2-D nearest on the square grid,
  the rule our (and the official) forward pass applies to a differently-sized input, so the
  resized model at the new size computes what the old one computed on that input."""
  g0, g1 = math.isqrt(w.shape[1] - 1), math.isqrt(n_out)
  if g0 * g0 != w.shape[1] - 1 or g1 * g1 != n_out:
    raise WeightsError(f"pos_embed {w.shape} -> {n_out} patches: grids must be square")
  c = w.shape[-1]
  idx = nearest_indices(g0, g1)
  grid = w[0, 1:].reshape(g0, g0, c)[idx][:, idx].reshape(1, n_out, c)
  return np.concatenate([w[:, :1], grid], axis=1)


def resize_time_embed(w: np.ndarray, t_out: int) -> np.ndarray:
  """time_embed [1, T, C] -> [1, t_out, C], 1-D nearest (official)."""
  return w[:, nearest_indices(w.shape[1], t_out)]


def fit(src: Mapping[Path, np.ndarray], abstract: Any, init_fn: Callable[[], Any] | None = None,
        inflate_mode: str = "", drop_head: bool = False) -> dict:
  """src onto the target's structure and shapes; returns {'params', 'batch_stats'}.

  inflate_mode: '' (shapes must match), 'average' or 'centre' (2D conv kernels, and StructSA's
    U^K / U^V windows, into 3D ones).
  drop_head: head / aux_head from init_fn() (a new classifier, e.g. another class count).
  StructSA u_k / u_v absent from src (a UniFormer source) are the identity centre tap, so
  the model computes what the UniFormer did. init_fn(): the target's freshly initialised
  variables, called only when something is taken from it.
  Raises WeightsError listing every missing leaf and every shape that does not fit.
  """
  target = flat_paths(abstract)
  init = None
  out, missing, bad = {}, [], []
  # A 2-D ViT into a TimeSformer (official load_pretrained): temporal_attn / temporal_norm1
  # copied from attn / norm1; time_embed and temporal_fc keep their (zero) init.
  vit_source = any(p[-1] == "time_embed" for p in target) and \
      not any(p[-1] == "time_embed" for p in src)
  for path, leaf in target.items():
    shape = tuple(leaf.shape)
    is_head = len(path) > 2 and path[1] in HEADS
    from_init = vit_source and (path[-1] == "time_embed" or
                                any(m.endswith("temporal_fc") for m in path))
    if (is_head and drop_head) or from_init:
      init = init if init is not None else flat_paths(init_fn())
      out[path] = np.asarray(init[path])
      continue
    if vit_source and path not in src:
      twin = tuple({"temporal_attn": "attn", "temporal_norm1": "norm1"}.get(m, m) for m in path)
      if twin in src:
        src = {**src, path: src[twin]}
    if path not in src:
      if path[-1] in STRUCTURE_LEAVES:
        out[path] = np.asarray(centre_tap_init(0.0)(None, shape, np.float32))
      else:
        key = torch_key(path)
        missing.append("/".join(path) + f" {list(shape)}" + (f" (torch: {key})" if key else ""))
      continue
    w = np.asarray(src[path])
    if w.shape != shape and inflate_mode and path[-1] in ("kernel", *STRUCTURE_LEAVES) and \
        w.ndim + 1 == len(shape) and w.shape == shape[1:]:
      w = inflate(w, shape[0], inflate_mode)
    elif w.shape != shape and path[-1] == "pos_embed" and w.ndim == 3 and \
        w.shape[2] == shape[2]:
      w = resize_pos_embed(w, shape[1] - 1)
    elif w.shape != shape and path[-1] == "time_embed" and w.ndim == 3 and \
        w.shape[2] == shape[2]:
      w = resize_time_embed(w, shape[1])
    if w.shape != shape:
      hint = (" (a different class count: use drop_head / --num_classes)" if is_head else
              " (an image kernel for a video model: set inflate)"
              if w.ndim + 1 == len(shape) and not inflate_mode else "")
      bad.append(f"{'/'.join(path)}: checkpoint {list(w.shape)}, model {list(shape)}{hint}")
      continue
    out[path] = w.astype(leaf.dtype)
  errors = []
  if missing:
    errors.append(_listing("model leaves missing from the checkpoint", missing))
  if bad:
    errors.append(_listing("shapes that do not fit", bad))
  if errors:
    raise WeightsError("\n".join(errors))
  # jax arrays: model code indexes kernels with tracers (numpy arrays cannot be).
  variables = unflatten({p: jnp.asarray(v) for p, v in out.items()})
  variables.setdefault("batch_stats", {})
  return variables


# ----------------------------------------------------------------------------- sources


def infer_timesformer_kwargs(sd: Mapping[str, np.ndarray], patch_size: int = 16) -> dict:
  """attention_type, num_frames, img_size, embed_dim, depth, num_classes of a TimeSformer
  state_dict (the released checkpoints differ in these only)."""
  kw: dict[str, Any] = {}
  if any(".temporal_attn." in k for k in sd):
    kw["attention_type"] = "divided_space_time"
  elif "time_embed" in sd:
    kw["attention_type"] = "joint_space_time"
  else:
    kw["attention_type"] = "space_only"
  if "time_embed" in sd:
    kw["num_frames"] = int(sd["time_embed"].shape[1])
  if "pos_embed" in sd:
    kw["img_size"] = math.isqrt(int(sd["pos_embed"].shape[1]) - 1) * patch_size
  if "patch_embed.proj.weight" in sd:
    kw["embed_dim"] = int(sd["patch_embed.proj.weight"].shape[0])
  kw["depth"] = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  return kw


def load_source(path: str) -> dict[Path, np.ndarray] | dict[str, np.ndarray]:
  """A checkpoint for init_from: an export dir (model.json + params/), a training
  checkpoint dir (<dir>/<step>/state, the newest step; its params, not EMA) or a PyTorch
  file (returned as a torch state_dict: keys are strings, not paths)."""
  import os
  from structvit_jax import inference
  if os.path.isfile(path):
    return load_torch_file(path)
  if os.path.isfile(os.path.join(path, "model.json")):
    tree = inference.restore_arrays(os.path.join(os.path.abspath(path), "params"))
    return flat_paths({"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}})
  # A training checkpoint: <dir>/<step>/state (checkpoint.py), or a workdir holding it.
  ckdir = os.path.join(path, "checkpoints") if os.path.isdir(
      os.path.join(path, "checkpoints")) else path
  steps = sorted(int(p) for p in os.listdir(ckdir) if p.isdigit()) if os.path.isdir(ckdir) else []
  if not steps:
    raise FileNotFoundError(f"init_from: {path} is neither a file, an export (model.json) "
                            f"nor a checkpoint directory with steps")
  state_dir = os.path.join(os.path.abspath(ckdir), str(steps[-1]), "state")
  state = inference.restore_arrays(state_dir)
  get = (lambda k: state[k]) if isinstance(state, Mapping) else (lambda k: getattr(state, k))
  return flat_paths({"params": get("params"), "batch_stats": get("batch_stats") or {}})


def init_variables_from(path: str, abstract: Any, init_fn: Callable[[], Any],
                        inflate_mode: str = "", drop_head: bool = False) -> dict:
  """{'params', 'batch_stats'} for a model (abstract variables) from any checkpoint kind."""
  src = load_source(path)
  if src and isinstance(next(iter(src)), str):  # torch state_dict
    src = from_torch(src, abstract)
  return fit(src, abstract, init_fn, inflate_mode, drop_head)
