"""Run an export's StableHLO artefact with only `jax` and `numpy` installed.

Every export (`python -m structvit_jax.export`, `python -m structvit_jax.convert`) holds
`model.stablehlo`: the eval forward as a serialised `jax.export.Exported`, weights inside,
lowered for cpu, cuda and tpu. It takes uint8 inputs in the export's eval layout, already
resized and cropped ([N, S, S, 3] images, [N, T, S, S, 3] clips, any N), normalises them
inside, and returns float32 logits [N, classes]:

    from structvit_jax import serving      # imports jax and numpy only (no Flax, no model code)
    model = serving.load("EXPORT")
    logits = model(batch)                  # batch: uint8 [N, *model.input_shape]

This module imports nothing else from structvit_jax, so it can also be copied on its own
into a serving stack. Plain jax does the same in two lines:

    exported = jax.export.deserialize(open("EXPORT/model.stablehlo", "rb").read())
    logits = exported.call(batch)

It runs on the platforms it was lowered for, under jax.export's compatibility guarantees
(best with the exporter's jaxlib; model.json records its jax version): docs/serving.md.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from jax import export as jax_export
import numpy as np

STABLEHLO_FILE = "model.stablehlo"


class ServedModel:
  """A deserialised export: call it on uint8 inputs for float32 logits."""

  def __init__(self, exported: jax_export.Exported, meta: dict[str, Any] | None = None):
    self.exported = exported
    self.meta = meta or {}
    aval = exported.in_avals[0]
    self.input_shape = tuple(int(d) for d in aval.shape[1:])  # after the symbolic batch
    self.input_dtype = np.dtype(aval.dtype)
    n = int(exported.out_avals[0].shape[-1])
    self.class_names = list(self.meta.get("class_names") or [f"class_{i}" for i in range(n)])

  @property
  def platforms(self) -> tuple[str, ...]:
    return tuple(self.exported.platforms)

  def __call__(self, x: Any) -> np.ndarray:
    """float32 logits [N, classes] of uint8 inputs [N, *input_shape]."""
    x = np.asarray(x)
    if x.dtype != self.input_dtype or x.shape[1:] != self.input_shape:
      shape = ", ".join(map(str, self.input_shape))
      raise ValueError(f"expected {self.input_dtype} inputs [N, {shape}], got {x.dtype} "
                       f"{list(x.shape)}")
    return np.asarray(self.exported.call(x))

  def top_k(self, x: Any, k: int = 5) -> list[list[tuple[str, float]]]:
    """For each input, the k most probable (class name, probability), best first."""
    probs = np.asarray(jax.nn.softmax(self(x), axis=-1))
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(self.class_names[j], float(p[j])) for j in row] for p, row in zip(probs, order)]


def load(export_dir: str) -> ServedModel:
  """Opens EXPORT_DIR/model.stablehlo (class names from model.json beside it, if there)."""
  path = os.path.join(export_dir, STABLEHLO_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: exports written before this format have "
                            f"none; export again with python -m structvit_jax.export")
  with open(path, "rb") as f:
    exported = jax_export.deserialize(bytearray(f.read()))
  meta_path = os.path.join(export_dir, "model.json")
  meta = {}
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
  return ServedModel(exported, meta)
