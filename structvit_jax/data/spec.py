"""What a dataset builder returns (`DatasetSpec`) and the constants builders share: the
normalisation statistics, the eval crop ratio, the missing-dataset error."""

from __future__ import annotations

import dataclasses
from typing import Any

import grain

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VIDEO_MEAN, VIDEO_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)  # SlowFast/UniFormer video
DEFAULT_EVAL_CROP_RATIO = 0.875  # timm/DeiT crop_pct: shorter side to size / 0.875, centre crop

Transform = grain.transforms.Map | grain.transforms.RandomMap


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  source: Any                       # random access: __len__, __getitem__ -> dict(image, label)
  num_classes: int
  input_shape: tuple[int, ...]      # per example, after the transforms
  transforms: tuple[Transform, ...]  # grain Map / RandomMap, applied in order


class DatasetNotFoundError(FileNotFoundError):
  """A configured dataset is missing; the message says where it was expected and how to
  prepare it."""
