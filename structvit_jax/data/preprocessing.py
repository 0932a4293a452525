"""The eval preprocessing, one owner: what the eval pipeline applies and what an export
records for `inference.Predictor` to replay (export.py, convert.py, visualize.py read it)."""

from __future__ import annotations

from typing import Any

import ml_collections

from structvit_jax.data import registry
from structvit_jax.data.spec import IMAGENET_MEAN, IMAGENET_STD, VIDEO_MEAN, VIDEO_STD


def default_spec(kind: str, image_size: int, num_frames: int = 0, **fields: Any
                 ) -> dict[str, Any]:
  """Input spec of a model without a training config (converted official weights, random
  presets): ImageNet mean/std for images, SlowFast's 0.45/0.225 for clips; `fields` add to
  or override it."""
  mean, std = (IMAGENET_MEAN, IMAGENET_STD) if kind == "image" else (VIDEO_MEAN, VIDEO_STD)
  return {**dict(kind=kind, image_size=int(image_size), num_frames=int(num_frames), mean=mean,
                std=std), **fields}


def eval_spec(data: ml_collections.ConfigDict) -> dict[str, Any]:
  """The eval preprocessing of config.data's dataset (synthetic.py, images.py, video.py)."""
  synthetic = registry.get(data.name).builtin
  frames = int(data.num_frames or 0)
  if frames > 0:
    # synthetic_video clips are exactly num_frames frames at image_size, normalised with
    # the video defaults: dense sampling at rate 1 and a full-size centre crop leave them as
    # the trainer's eval saw them.
    fields = (dict(mean=list(VIDEO_MEAN), std=list(VIDEO_STD), sampling="dense",
                   sampling_rate=1) if synthetic else
              dict(mean=list(data.mean), std=list(data.std), sampling=data.sampling,
                   sampling_rate=int(data.sampling_rate or 1)))
    return default_spec("video", data.image_size, frames, **fields)
  # Synthetic images are rendered at image_size and only normalised in eval: crop ratio 1
  # keeps predict() on such images identical to the trainer's eval.
  return default_spec("image", data.image_size, mean=list(IMAGENET_MEAN),
                      std=list(IMAGENET_STD),
                      crop_ratio=1.0 if synthetic else float(data.eval_crop_ratio))


def eval_views(data: ml_collections.ConfigDict) -> dict[str, int]:
  """The test views evaluation scores per video and averages ({test_clips, test_crops}) for
  the video datasets evaluated by view (evaluation.MultiViewVideo), else {} (one view); an
  export records them for `inference.Predictor` next to eval_spec."""
  if not registry.get(data.name).views or not data.num_frames:
    return {}
  return dict(test_clips=int(data.test_clips), test_crops=int(data.test_crops))
