"""Every per-dataset fact, in one table: config.data.name -> its builder (a module loaded on
first use, so naming a dataset imports neither PyAV nor tfds), its kind, how it is
evaluated, whether it joins token labels, its class names (config_checks.py checks a
config against them).

Adding a dataset: one builder module with `build_dataset(data, split, train) -> DatasetSpec`
and one `DATASETS` entry here (docs/input_pipeline.md, "Adding a dataset")."""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Callable

import ml_collections

from structvit_jax.data.spec import DatasetSpec


def _classes_txt(data: ml_collections.ConfigDict) -> list[str] | None:
  """DATA_DIR/classes.txt, written next to the lists by data/video_lists.py (label order)."""
  try:
    with open(os.path.join(data.data_dir, "classes.txt"), encoding="utf-8") as f:
      return [l.strip() for l in f if l.strip()] or None
  except OSError:  # not on the exporting machine, or lists made by hand
    return None


def _tfds_label_names(data: ml_collections.ConfigDict) -> list[str] | None:
  try:  # the data may not be on the exporting machine: names are optional
    import tensorflow_datasets as tfds
    from structvit_jax.data import builders
    prepared = builders.find_prepared(data.data_dir, data.tfds_name or data.name)
    if prepared is not None:
      return list(tfds.builder_from_directory(prepared).info.features["label"].names)
  except Exception:  # noqa: BLE001
    pass
  return None


@dataclasses.dataclass(frozen=True)
class Dataset:
  builder: str                # module with build_dataset(data, split, train) -> DatasetSpec
  kind: str                   # 'image' | 'video'
  builtin: bool = False       # procedural: sizes from the config, eval = the drawn pixels
  views: bool = False         # eval scores each video's test views (evaluation.MultiViewVideo)
  token_labels: bool = False  # joins config.data.token_label_dir (docs/token_labeling.md)
  num_classes: int = 0        # default class count (config.data.num_classes overrides)
  # "module:NAME" of a tuple of names, or a function of config.data (None: unknown).
  class_names: str | Callable[[ml_collections.ConfigDict], list[str] | None] | None = None


_VIDEO = dict(builder="structvit_jax.data.video", kind="video", views=True,
              class_names=_classes_txt)  # list file + folder, PyAV (SSv1: frame folders, PIL)
_TFDS = dict(builder="structvit_jax.data.images", kind="image", token_labels=True,
             class_names=_tfds_label_names)  # tfds ArrayRecord (prepare.py, or tfds's own)

DATASETS: dict[str, Dataset] = {
    "synthetic_image": Dataset("structvit_jax.data.synthetic", "image", builtin=True,
                               class_names="structvit_jax.data.synthetic:IMAGE_CLASSES"),
    "synthetic_video": Dataset("structvit_jax.data.synthetic", "video", builtin=True,
                               class_names="structvit_jax.data.synthetic:MOTIONS"),
    "synthetic_motion": Dataset("structvit_jax.data.motion", "video", builtin=True,
                                class_names="structvit_jax.data.motion:DIRECTIONS"),
    "kinetics400": Dataset(num_classes=400, **_VIDEO),
    "ssv1": Dataset(num_classes=174, **_VIDEO),
    "ssv2": Dataset(num_classes=174, **_VIDEO),
    "diving48": Dataset(num_classes=48, **_VIDEO),
    "finegym": Dataset(num_classes=288, **_VIDEO),
    "imagenet2012": Dataset(**_TFDS),
    "image_folder": Dataset(**_TFDS),
}


def names(where: Callable[[Dataset], bool] = lambda d: True) -> list[str]:
  """The dataset names (with `where`: those it holds for), sorted."""
  return sorted(n for n, d in DATASETS.items() if where(d))


def get(name: str) -> Dataset:
  if name not in DATASETS:
    raise ValueError(f"unknown dataset config.data.name={name!r}; valid names: "
                     f"{', '.join(names())}")
  return DATASETS[name]


def get_dataset(config: ml_collections.ConfigDict, split: str, train: bool) -> DatasetSpec:
  """The dataset `config.data.name`, split `split` (a split name such as 'train')."""
  builder = importlib.import_module(get(config.data.name).builder)
  return builder.build_dataset(config.data, split, train)


def class_names(data: ml_collections.ConfigDict) -> list[str] | None:
  """config.data's class names when the dataset can say (the built-in label tuples, tfds
  label names, a video dataset's DATA_DIR/classes.txt), else None."""
  found = get(data.name).class_names
  if isinstance(found, str):
    module, attr = found.split(":")
    return list(getattr(importlib.import_module(module), attr))
  return found(data) if found is not None and data.get("data_dir") else None
