"""TimeSformer's weight-adaptation rules (docs/official_weights.md): a 2-D ViT into divided
space-time attention, pos/time-embedding resizing, the get_model fields of a state_dict."""

import math
from typing import Any, Callable, Mapping

import numpy as np

from structvit_jax import weights
from structvit_jax.models.timesformer import TimeSformer, nearest_indices

_TWINS = {"temporal_attn": "attn", "temporal_norm1": "norm1"}


def from_vit(path: weights.Path, shape: tuple[int, ...], src: Mapping[weights.Path, Any],
             init: Callable[[], dict]) -> Any:
  """A 2-D ViT (no time_embed) into a TimeSformer (or a video DeiT): temporal_attn /
  temporal_norm1 copied from attn / norm1; temporal_fc keeps its (zero) init and time_embed
  starts at zero (TimeSformer's init; the video DeiT draws its own at random), so frames
  look alike to the model as they did to the image model."""
  if any(p[-1] == "time_embed" for p in src):
    return None
  if path[-1] == "time_embed":
    return np.zeros(shape, np.float32)
  if any(m.endswith("temporal_fc") for m in path):
    return init()[path]
  return src.get(tuple(_TWINS.get(m, m) for m in path))


def resize(path: weights.Path, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
  """time_embed [1, T, C]: 1-D nearest (official). pos_embed [1, 1+N, C]: 2-D nearest on the
  square grid, as the forward pass does, so the resized model computes what the old did."""
  if path[-1] not in ("pos_embed", "time_embed") or w.ndim != 3 or w.shape[2] != shape[2]:
    return None
  if path[-1] == "time_embed":
    return w[:, nearest_indices(w.shape[1], shape[1])]
  (g0, g1), n_out = (math.isqrt(w.shape[1] - 1), math.isqrt(shape[1] - 1)), shape[1] - 1
  if g0 * g0 != w.shape[1] - 1 or g1 * g1 != n_out:
    raise weights.WeightsError(f"pos_embed {w.shape} -> {n_out} patches: grids must be square")
  idx = nearest_indices(g0, g1)
  grid = w[0, 1:].reshape(g0, g0, -1)[idx][:, idx].reshape(1, n_out, -1)
  return np.concatenate([w[:, :1], grid], axis=1)


def infer_timesformer_kwargs(sd: Mapping[str, np.ndarray], patch_size: int = 16) -> dict:
  """attention_type, num_frames, img_size, embed_dim, depth of a TimeSformer state_dict (the
  released checkpoints differ in these only)."""
  kw: dict[str, Any] = {"attention_type": "divided_space_time" if any(
      ".temporal_attn." in k for k in sd) else "joint_space_time" if "time_embed" in sd
      else "space_only"}
  if "time_embed" in sd:
    kw["num_frames"] = int(sd["time_embed"].shape[1])
  if "pos_embed" in sd:
    kw["img_size"] = math.isqrt(int(sd["pos_embed"].shape[1]) - 1) * patch_size
  if "patch_embed.proj.weight" in sd:
    kw["embed_dim"] = int(sd["patch_embed.proj.weight"].shape[0])
  kw["depth"] = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  return kw


RULES = weights.Family(
    models=(TimeSformer,), heads=("head",), fill=from_vit, resize=resize,
    infer_kwargs=lambda sd, fields: infer_timesformer_kwargs(sd, fields.get("patch_size", 16)))
