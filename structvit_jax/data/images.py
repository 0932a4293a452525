"""The builder of the tfds image datasets (`imagenet2012`, `image_folder`).

Read from config.data.data_dir/<tfds name>/<version>/ (ArrayRecord, written by
`python -m structvit_jax.data.prepare` or by tfds itself for the official imagenet2012).
The tfds name is config.data.tfds_name if set (image folders prepared with --name=...),
else config.data.name. Transforms: transforms.py (DeiT train / resize + centre crop eval).
"""

from __future__ import annotations

import os

import ml_collections

from structvit_jax.data import builders, token_labels, transforms
from structvit_jax.data.ops import Normalize
from structvit_jax.data.preprocessing import eval_spec
from structvit_jax.data.spec import DatasetNotFoundError, DatasetSpec


def _missing(data: ml_collections.ConfigDict, tfds_name: str, split: str, why: str
             ) -> DatasetNotFoundError:
  data_dir = data.data_dir or "DATA_DIR"
  dataset = "imagenet2012" if data.name == "imagenet2012" else "image_folder"
  raw = "RAW_IMAGENET_DIR" if dataset == "imagenet2012" else "IMAGE_FOLDER"
  name_flag = f" --name={tfds_name}" if tfds_name != dataset else ""
  return DatasetNotFoundError(
      f"dataset {data.name!r} (split {split!r}): {why}. Expected tfds ArrayRecord data in "
      f"{os.path.join(data_dir, tfds_name)}/<version>/ (with dataset_info.json). Prepare it "
      f"with: python -m structvit_jax.data.prepare --dataset={dataset} --src={raw} "
      f"--data_dir={data_dir}{name_flag}   (or point --config.data.data_dir at existing "
      f"data; for a quick run without data use the built-in synthetic datasets: "
      f"--config=configs/demo.py)")


def build_dataset(data: ml_collections.ConfigDict, split: str, train: bool) -> DatasetSpec:
  tfds_name = data.tfds_name or data.name
  if not data.data_dir:
    raise _missing(data, tfds_name, split, "config.data.data_dir is not set "
                   "(pass --config.data.data_dir=DIR)")
  prepared = builders.find_prepared(data.data_dir, tfds_name)
  if prepared is None:
    why = (f"config.data.data_dir={data.data_dir!r} does not exist"
           if not os.path.isdir(data.data_dir) else
           f"no prepared {tfds_name!r} in config.data.data_dir={data.data_dir!r}")
    raise _missing(data, tfds_name, split, why)
  try:
    source, num_classes, _ = builders.open_split(prepared, split)
  except KeyError as e:
    raise _missing(data, tfds_name, split, str(e)) from None
  if train and data.get("token_labels") and not data.get("token_label_dir"):
    raise token_labels.TokenLabelError(
        "this recipe trains with token labels but config.data.token_label_dir is not set: "
        "prepare them with python -m structvit_jax.data.token_labels --src=LABELS "
        f"--data_dir={data.data_dir} --out=DIR and pass --config.data.token_label_dir=DIR "
        "(docs/token_labeling.md), or train without them (e.g. configs/in1k_l.py:tl=False)")
  if train and data.get("token_label_dir"):  # token labeling: docs/token_labeling.md
    store = token_labels.TokenLabelStore(data.token_label_dir, split, len(source), num_classes)
    source = token_labels.WithTokenLabels(source, store)
  source = transforms.DecodedImages(source, f"{prepared}:{split}")
  size, spec = data.image_size, eval_spec(data)
  norm = lambda: Normalize(spec["mean"], spec["std"])
  if train:
    ops = transforms.deit_train(
        size, norm, scale=tuple(data.crop_scale), flip=data.random_flip,
        randaugment=data.randaugment, random_erase=data.random_erase, mean=spec["mean"])
  else:
    ops = (transforms.MaskBad(), transforms.ResizeCenterCrop(size, spec["crop_ratio"]),
           transforms.ToArray(), norm())
  return DatasetSpec(source, num_classes, (size, size, 3), ops)
