"""The model zoo: `get_model(name, **overrides)` over named presets."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from structvit_jax.models.deit import DeiT
from structvit_jax.models.structsa import StructSA, StructSAConfig, centre_tap_init
from structvit_jax.models.timesformer import TimeSformer
from structvit_jax.models.uniformer import UniFormer


_S = dict(depth=(3, 4, 8, 3), embed_dim=(64, 128, 320, 512), drop_path_rate=0.1)
_B = dict(depth=(5, 8, 20, 7), embed_dim=(64, 128, 320, 512), drop_path_rate=0.3)
# UniFormer-L is the token-labeling large_ls model: layer scale in every block, aux head.
_L = dict(depth=(5, 10, 24, 7), embed_dim=(128, 192, 448, 640), drop_path_rate=0.4,
          layer_scale="all", token_labeling=True)

PRESETS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "uniformer_s": (UniFormer, _S),
    "uniformer_s_plus": (UniFormer, dict(_S, depth=(3, 5, 9, 3), head_dim=32, conv_stem=True)),
    "uniformer_b": (UniFormer, _B),
    "uniformer_b_ls": (UniFormer, dict(_B, layer_scale="sa")),
    "uniformer_l": (UniFormer, _L),
    "structvit_s_4_2": (UniFormer, dict(_S, structsa=StructSAConfig(d=4, stride=2))),
    "structvit_s_4_1": (UniFormer, dict(_S, structsa=StructSAConfig(d=4, stride=1))),
    "structvit_s_8_1": (UniFormer, dict(_S, structsa=StructSAConfig(d=8, stride=1))),
    "structvit_b_4_2": (UniFormer, dict(_B, structsa=StructSAConfig(d=4, stride=2))),
    "structvit_b_4_1": (UniFormer, dict(_B, structsa=StructSAConfig(d=4, stride=1))),
    "structvit_b_8_1": (UniFormer, dict(_B, structsa=StructSAConfig(d=8, stride=1))),
    "structvit_l_4_1": (UniFormer, dict(_L, structsa=StructSAConfig(d=4, stride=1))),
    "deit_s": (DeiT, dict(embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1)),
    # TimeSformer ViT-B/16 (divided space-time by default; attention_type= picks the scheme)
    # at the official input settings: 8x224, HR 16x448, L 96x224 (pos/time embed grids).
    "timesformer_b": (TimeSformer, dict(num_frames=8, img_size=224)),
    "timesformer_b_hr": (TimeSformer, dict(num_frames=16, img_size=448)),
    "timesformer_b_l": (TimeSformer, dict(num_frames=96, img_size=224)),
    # Tiny presets for tests and demos (a few hundred thousand parameters).
    "structvit_tiny": (UniFormer, dict(depth=(1, 1, 1, 1), embed_dim=(16, 32, 64, 64),
                                       head_dim=32, structsa=StructSAConfig(d=2, stride=1),
                                       drop_path_rate=0.0, num_classes=10)),
    "uniformer_tiny": (UniFormer, dict(depth=(1, 1, 1, 1), embed_dim=(16, 32, 64, 64),
                                       head_dim=32, drop_path_rate=0.0, num_classes=10)),
    "deit_tiny": (DeiT, dict(patch_size=8, embed_dim=64, depth=2, num_heads=2,
                             drop_path_rate=0.0, num_classes=10)),
    "timesformer_tiny": (TimeSformer, dict(patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                           num_frames=4, img_size=32, drop_path_rate=0.0,
                                           num_classes=10)),
}


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def list_models() -> list[str]:
  return sorted(PRESETS)


def model_fields(name: str) -> list[str]:
  cls, _ = _lookup(name)
  return sorted(f.name for f in dataclasses.fields(cls)
                if f.init and f.name not in ("parent", "name"))


def _lookup(name: str):
  if name not in PRESETS:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
  return PRESETS[name]


# The StructSA model fields before StructSAConfig -> its field names. Old config.json and
# model.json files, and `--set d=8` on the command line, give them flat; get_model folds
# them into `structsa`.
_FLAT_STRUCTSA = {"implementation": "form", "structure_init_noise": "init_noise",
                  "structure_init": "init", **{k: k for k in (
    "d", "kernel_size", "stride", "aggregation", "attention_impl", "depthwise_impl")}}


def get_model(name: str, **overrides: Any) -> nn.Module:
  """Builds preset `name` with some fields overridden, e.g.
  get_model('structvit_s_4_1', num_classes=400, dtype=jnp.bfloat16, remat=True) or
  get_model('deit_s', structsa=dict(d=4, aggregation='element')). A `structsa` mapping
  (dict, ConfigDict) changes only the fields it names of the preset's StructSAConfig."""
  cls, preset = _lookup(name)
  valid = model_fields(name)
  if "structsa" in valid:
    structsa = overrides.pop("structsa", {})
    if not isinstance(structsa, StructSAConfig):
      structsa = dict(structsa.to_dict() if hasattr(structsa, "to_dict") else structsa)
      for old, new in _FLAT_STRUCTSA.items():
        if old in overrides:
          structsa.setdefault(new, overrides.pop(old))
      structsa = preset.get("structsa", StructSAConfig()).replace(**structsa)
    overrides["structsa"] = structsa
  unknown = sorted(set(overrides) - set(valid))
  if unknown:
    raise ValueError(f"{name}: unknown field(s) {unknown}; valid fields: {', '.join(valid)}")
  kwargs = {**preset, **overrides}
  if isinstance(kwargs.get("dtype"), str):
    if kwargs["dtype"] not in _DTYPES:
      raise ValueError(f"dtype={kwargs['dtype']!r}; valid: {', '.join(_DTYPES)}")
    kwargs["dtype"] = _DTYPES[kwargs["dtype"]]
  for k in ("depth", "embed_dim"):
    if isinstance(kwargs.get(k), list):
      kwargs[k] = tuple(kwargs[k])
  return cls(**kwargs)


__all__ = ["DeiT", "PRESETS", "StructSA", "StructSAConfig", "TimeSformer", "UniFormer",
           "centre_tap_init",
           "get_model", "list_models", "model_fields"]
