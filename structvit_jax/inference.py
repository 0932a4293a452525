"""Exported models: `save_export` writes one, `load` opens it as a `Predictor`.

Export layout (written by `python -m structvit_jax.export` and `structvit_jax.convert`):

  EXPORT_DIR/params/     Orbax StandardCheckpointer save of {'params', 'batch_stats'}
  EXPORT_DIR/model.json  {"format": "structvit_jax.export/1", "model": preset name,
                          "kwargs": get_model overrides (num_classes included, dtype a string),
                          "input": {"kind": "image"|"video", "image_size", "num_frames",
                                    "mean", "std", "crop_ratio", "sampling", "sampling_rate",
                                    "test_clips", "test_crops"},
                          "class_names": [...] or null, "source": free text,
                          "serving": {"stablehlo": {...}, "onnx": {...}} (what was written)}
  EXPORT_DIR/README.md   the model card (serving_export.model_card)
  EXPORT_DIR/model.stablehlo, model.onnx  serving artefacts (serving_export.py; optional:
                          exports before them have none, and load() does not need them)

`load(dir, backend="stablehlo")` runs model.stablehlo instead (`ExportedPredictor`).
`Predictor.logits(x)` runs the model in eval mode on preprocessed float arrays (NHWC images,
NTHWC clips); `predict(inputs)` adds the eval preprocessing (files or uint8 arrays). A video
is scored as evaluation scores it: the softmax averaged over its test_clips x test_crops
views (1 x 1 in exports that do not record them; `views=` chooses others).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from structvit_jax import checksums
from structvit_jax import paths

FORMAT = "structvit_jax.export/1"
_INPUT_KEYS = ("kind", "image_size", "mean", "std")  # num_frames: 0 (images) if absent
_VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".gif")

Input = str | os.PathLike | np.ndarray
Views = str | tuple[int, int]  # 'eval' (the export's), 'single' (1 x 1), (clips, crops), 'CxK'


class InputError(ValueError):
  """An input that cannot be read or has the wrong shape; the message names it."""


# ----------------------------------------------------------------------------- writing


def _check_input_spec(spec: dict[str, Any]) -> dict[str, Any]:
  missing = [k for k in _INPUT_KEYS if k not in spec]
  if missing:
    raise ValueError(f"input spec lacks {missing}; needs {list(_INPUT_KEYS)}")
  if spec["kind"] not in ("image", "video"):
    raise ValueError(f"input kind must be 'image' or 'video', got {spec['kind']!r}")
  out = dict(spec, image_size=int(spec["image_size"]),
             num_frames=int(spec.get("num_frames", 0)),
             mean=[float(m) for m in spec["mean"]], std=[float(s) for s in spec["std"]])
  if out["kind"] == "image":
    from structvit_jax.data.spec import DEFAULT_EVAL_CROP_RATIO
    out.setdefault("crop_ratio", DEFAULT_EVAL_CROP_RATIO)
  else:
    if out["num_frames"] <= 0:
      raise ValueError("a video input spec needs num_frames > 0")
    out.setdefault("sampling", "dense")
    out.setdefault("sampling_rate", 1)
    out["test_clips"] = int(out.get("test_clips", 1))   # exports before views: one view
    out["test_crops"] = int(out.get("test_crops", 1))
    if min(out["test_clips"], out["test_crops"]) < 1:
      raise ValueError(f"test_clips and test_crops must be >= 1, got {out['test_clips']} x "
                       f"{out['test_crops']}")
    if out["sampling"] not in ("dense", "segment"):
      raise ValueError(f"sampling must be 'dense' or 'segment', got {out['sampling']!r}")
  return out


def _jsonable_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
  out = {}
  for k, v in kwargs.items():
    if k == "dtype" and not isinstance(v, str):
      v = jnp.dtype(v).name  # jnp.bfloat16 -> 'bfloat16' (get_model takes the string)
    elif isinstance(v, tuple):
      v = list(v)
    out[k] = v
  json.dumps(out)  # fail here, before anything is written, on a non-JSON value
  return out


def save_export(out_dir: str, model_name: str, kwargs: dict[str, Any], variables: Any,
                input_spec: dict[str, Any], class_names: Sequence[str] | None = None,
                source: str = "", *, stablehlo: bool = False, onnx: bool = False,
                provenance: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes an export (module docstring). variables: {'params': ..., 'batch_stats': ...}
  ('batch_stats' optional / {} for models without BatchNorm); any arrays (moved to host).
  stablehlo / onnx: also the serving artefacts model.stablehlo / model.onnx
  (serving_export.py; the export and convert CLIs write model.stablehlo by default).
  Every export gets a model card, README.md; provenance: what it says of the weights'
  origin (serving_export.model_card). Returns model.json's content."""
  import orbax.checkpoint as ocp
  from structvit_jax import serving_export
  from structvit_jax.models import get_model
  model = get_model(model_name, **kwargs)  # fail early on an unknown preset or field
  spec = _check_input_spec(input_spec)
  kwargs = _jsonable_kwargs(kwargs)
  if class_names is not None:
    class_names = [str(c) for c in class_names]
    n = kwargs.get("num_classes")
    if n is not None and len(class_names) != n:
      raise ValueError(f"{len(class_names)} class names for num_classes={n}")
  tree = {"params": jax.device_get(variables["params"]),
          "batch_stats": jax.device_get(variables.get("batch_stats") or {})}
  out_dir = paths.abspath(out_dir)
  paths.makedirs(out_dir)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out_dir, "params"), tree, force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  # The fingerprints of the arrays, before model.json (which marks a whole export).
  paths.write_atomic(f"{out_dir.rstrip('/')}/{checksums.EXPORT_FILE}",
                     json.dumps(checksums.record(checksums.fingerprints(tree)), indent=1))
  meta = {"format": FORMAT, "model": model_name, "kwargs": kwargs, "input": spec,
          "class_names": class_names, "source": source}
  meta_path = os.path.join(out_dir, "model.json")
  paths.write_text(meta_path, json.dumps(meta, indent=2))
  serving = {}
  if stablehlo:
    serving["stablehlo"] = serving_export.write_stablehlo(out_dir, model, tree, spec)
  if onnx:
    serving["onnx"] = serving_export.write_onnx(out_dir, model, tree, spec, model_name)
  for name, file in (("stablehlo", serving_export.STABLEHLO_FILE),
                     ("onnx", serving_export.ONNX_FILE)):
    if name not in serving:  # a re-export without a format leaves none of the old one
      for f in paths.listdir(out_dir):
        if f == file or f.startswith(file + "."):
          paths.remove(os.path.join(out_dir, f))
  if serving:
    meta["serving"] = serving
    paths.write_text(meta_path, json.dumps(meta, indent=2))
  params_bytes = sum(paths.epath(os.path.join(d, f)).stat().length if paths.is_remote(d)
                     else os.path.getsize(os.path.join(d, f))
                     for d, _, files in paths.walk(os.path.join(out_dir, "params"))
                     for f in files)
  card = serving_export.model_card(meta, serving_export.model_stats(model, tree, spec),
                                   provenance or {}, {"params": params_bytes})
  paths.write_text(os.path.join(out_dir, serving_export.CARD_FILE), card)
  return meta


# ----------------------------------------------------------------------------- reading


def restore_export_arrays(export_dir: str) -> dict[str, Any]:
  """An export's arrays, checked against its checksums.json (an export without one, written
  before checksums were kept, is read with one warning: unverified). A damaged export is one
  checkpoint.CheckpointError naming the array or the cause."""
  from absl import logging
  from structvit_jax import checkpoint as ckpt_lib
  try:
    tree = ckpt_lib.restore_arrays(os.path.join(paths.abspath(export_dir), "params"))
    verified = checksums.check_export(export_dir, tree)
  except checksums.Mismatch as e:
    raise ckpt_lib.CheckpointError(f"export {export_dir} is unusable: {e}") from None
  except Exception as e:  # noqa: BLE001
    raise ckpt_lib.CheckpointError(f"export {export_dir} is unusable: its arrays do not "
                                   f"restore ({ckpt_lib.short_cause(e)})") from None
  if not verified:
    logging.warning("Export %s has no %s (written before checksums were kept): unverified.",
                    export_dir, checksums.EXPORT_FILE)
  return tree


BACKENDS = ("flax", "stablehlo")


def load(export_dir: str, backend: str = "flax") -> "Predictor":
  """Opens an export written by `save_export` (from export.py or convert.py). backend:
  'flax' (the Orbax params and this package's model code) or 'stablehlo' (the export's
  model.stablehlo through serving.py: an `ExportedPredictor`, same preprocessing)."""
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; valid: {', '.join(BACKENDS)}")
  meta_path = os.path.join(export_dir, "model.json")
  if not paths.isfile(meta_path):
    raise FileNotFoundError(f"{export_dir} is not a structvit_jax export: no model.json "
                            f"(write one with python -m structvit_jax.export)")
  meta = json.loads(paths.read_text(meta_path))
  if meta.get("format") != FORMAT:
    raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
  if backend == "stablehlo":
    from structvit_jax import serving
    return ExportedPredictor(serving.load(export_dir), _check_input_spec(meta["input"]),
                             meta.get("class_names"), meta)
  from structvit_jax.models import get_model
  tree = restore_export_arrays(export_dir)
  variables = {"params": tree["params"]}
  if tree.get("batch_stats"):  # absent or {} for models without BatchNorm
    variables["batch_stats"] = tree["batch_stats"]
  model = get_model(meta["model"], **meta["kwargs"])
  return Predictor(model, variables, _check_input_spec(meta["input"]),
                   meta.get("class_names"), meta)


# ----------------------------------------------------------------------------- preprocessing


def _image(x: Input, spec: dict[str, Any]) -> np.ndarray:
  """uint8 HxWx3 (array, or decoded with PIL) -> resize + centre crop (timm eval)."""
  from PIL import Image
  from structvit_jax.data.transforms import ResizeCenterCrop, decode_jpeg
  if isinstance(x, np.ndarray):
    if x.ndim != 3 or x.shape[-1] != 3 or x.dtype != np.uint8:
      raise InputError(f"an image array must be uint8 HxWx3, got {x.dtype} {x.shape}")
    im = Image.fromarray(x)
  else:
    try:
      with open(x, "rb") as f:
        im = decode_jpeg(f.read())  # the pipeline's decoder: any PIL format, to RGB
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      raise InputError(f"cannot read image {os.fspath(x)}: {type(e).__name__}: {e}") from None
  # PIL skips resampling when the size already matches (crop_ratio 1 on synthetic data).
  im = ResizeCenterCrop(spec["image_size"], spec["crop_ratio"]).map({"image": im})["image"]
  return np.asarray(im, np.uint8)


def _video(x: Input, spec: dict[str, Any], clips: int = 1, crops: int = 1) -> np.ndarray:
  """uint8 TxHxWx3 (array = all frames of a video, a file decoded with PyAV, or a frame
  folder) -> the
  clips x crops test views [V, T, S, S, 3] of the eval pipeline (video.ClipConfig)."""
  from structvit_jax.data import video
  if isinstance(x, np.ndarray) and (x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8
                                    or not len(x)):
    raise InputError(f"a clip array must be uint8 TxHxWx3, got {x.dtype} {x.shape}")
  cfg = video.ClipConfig(spec["num_frames"], spec["image_size"], spec["sampling"],
                         spec["sampling_rate"], clips, crops)
  if isinstance(x, np.ndarray):
    return cfg.test_views(x)
  try:
    return cfg.test_views(os.fspath(x))
  except video.BAD_ERRORS as e:
    raise InputError(f"cannot read video {os.fspath(x)}: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- predictor


class Predictor:
  """An exported model in eval mode: `logits`, `predict`, `top_k`."""

  def __init__(self, model: Any, variables: dict[str, Any], input_spec: dict[str, Any],
               class_names: Sequence[str] | None, meta: dict[str, Any] | None = None):
    self.model, self.variables, self.input_spec = model, variables, input_spec
    self.meta = meta or {}
    n = int(getattr(model, "num_classes", 0)) or None
    self.class_names = (list(class_names) if class_names is not None
                        else [f"class_{i}" for i in range(n or 0)])
    # jax.jit caches one executable per input shape; the batches in predict are padded to
    # a few sizes so a stream of inputs compiles only a handful of times.
    self._apply = jax.jit(lambda v, x: model.apply(v, x, train=False).astype(jnp.float32))

  @property
  def input_shape(self) -> tuple[int, ...]:
    s = self.input_spec
    hw = (s["image_size"], s["image_size"], 3)
    return hw if s["kind"] == "image" else (s["num_frames"], *hw)

  def logits(self, x: Any) -> np.ndarray:
    """float32 logits [N, classes] of preprocessed inputs (NHWC images / NTHWC clips)."""
    x = jnp.asarray(x, jnp.float32)
    if x.shape[1:] != self.input_shape:
      shape = ", ".join(map(str, self.input_shape))
      raise ValueError(f"expected preprocessed inputs [N, {shape}], got {x.shape}")
    return np.asarray(self._apply(self.variables, x))

  def preprocess_one(self, x: Input) -> np.ndarray:
    """One file path or uint8 array -> float32 model input; InputError if unreadable."""
    return self._normalize(self.read(x))

  def _normalize(self, x: np.ndarray) -> np.ndarray:
    from structvit_jax.data.ops import Normalize  # the eval pipeline's exact op
    return Normalize(self.input_spec["mean"], self.input_spec["std"]).map(
        {"image": x})["image"]

  def view_grid(self, views: Views = "eval") -> tuple[int, int]:
    """(clips, crops) of `views` (a video's test views; (1, 1) for images): 'eval' the
    export's (as evaluation), 'single' 1 x 1 (the centre clip and crop), or (clips,
    crops) / 'CxK'."""
    spec = self.input_spec
    if views == "eval":
      grid = (spec.get("test_clips", 1), spec.get("test_crops", 1))
    elif views == "single":
      grid = (1, 1)
    else:
      try:
        grid = tuple(int(v) for v in (views.lower().split("x") if isinstance(views, str)
                                      else views))
        if len(grid) != 2 or min(grid) < 1:
          raise ValueError
      except (AttributeError, TypeError, ValueError):
        raise ValueError(f"views={views!r}: 'eval', 'single', or clips x crops such as "
                         f"'4x3' (both >= 1)") from None
    return grid if spec["kind"] == "video" else (1, 1)

  def read_views(self, x: Input, views: Views = "eval") -> np.ndarray:
    """`read` for every view of `view_grid(views)`: uint8 [V, ...] in the eval pipeline's
    view order (clip * crops + crop); an image has one view."""
    clips, crops = self.view_grid(views)
    if self.input_spec["kind"] == "image" or (clips, crops) == (1, 1):
      return self.read(x)[None]
    self._check_file(x)
    return _video(x, self.input_spec, clips, crops)

  def preprocess_views(self, x: Input, views: Views = "eval") -> np.ndarray:
    """float32 model inputs [V, ...] of every view of one input (read_views, normalised)."""
    return self._normalize(self.read_views(x, views))

  def read(self, x: Input) -> np.ndarray:
    """One file path or uint8 array -> the uint8 image / clip the model sees (resized,
    cropped, frames sampled; a video's centre clip and crop), before normalisation;
    InputError if unreadable."""
    spec = self.input_spec
    self._check_file(x)
    return _image(x, spec) if spec["kind"] == "image" else _video(x, spec)[0]

  def _check_file(self, x: Input) -> None:
    spec = self.input_spec
    if not isinstance(x, np.ndarray):
      if not os.path.exists(x):
        raise InputError(f"cannot read {os.fspath(x)}: no such file")
      if spec["kind"] == "video" and os.path.isdir(x):
        return  # a frame folder (SSv1's <id>/00001.jpg ...; data/video.py)
      if not os.path.isfile(x):
        raise InputError(f"cannot read {os.fspath(x)}: not a file")
      if spec["kind"] == "image" and os.fspath(x).lower().endswith(_VIDEO_EXTS):
        raise InputError(f"{os.fspath(x)}: a video file, but this model takes images")

  def preprocess(self, inputs: Sequence[Input]) -> np.ndarray:
    return np.stack([self.preprocess_one(x) for x in inputs])

  def logits_batched(self, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """logits of any number of inputs, in padded batches (sizes: powers of 2 <= batch_size)."""
    out = []
    for i in range(0, len(x), batch_size):
      chunk = x[i:i + batch_size]
      n = len(chunk)
      padded = min(batch_size, 1 << max(0, math.ceil(math.log2(n))))
      if padded > n:  # eval mode: examples do not interact, so padding changes nothing
        chunk = np.concatenate([chunk, np.zeros((padded - n, *chunk.shape[1:]), chunk.dtype)])
      out.append(self.logits(chunk)[:n])
    return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

  def predict(self, inputs: Sequence[Input] | Input, batch_size: int = 32,
              views: Views = "eval") -> np.ndarray:
    """Probabilities [N, classes] of file paths or uint8 arrays (HxWx3 images / TxHxWx3
    clips, a clip holding all frames of a video), with the eval preprocessing; a video's
    are the softmax averaged over its views (view_grid)."""
    if isinstance(inputs, (str, os.PathLike)) or (isinstance(inputs, np.ndarray)
                                                   and inputs.dtype == np.uint8
                                                   and inputs.ndim == len(self.input_shape)):
      inputs = [inputs]
    x = [self.preprocess_views(v, views) for v in inputs]
    return self.mean_probs(self.logits_batched(np.concatenate(x), batch_size) if x else
                           np.zeros((0, len(self.class_names)), np.float32), len(x))

  @staticmethod
  def mean_probs(logits: np.ndarray, n: int) -> np.ndarray:
    """Probabilities [n, classes] of logits [n * V, classes] (V views per input, in order):
    the softmax averaged over each input's views (SlowFast/UniFormer sum them; the mean
    ranks alike and stays a distribution)."""
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    return probs.reshape(n, -1, probs.shape[-1]).mean(1) if n else probs

  def top_k(self, inputs: Sequence[Input] | Input, k: int = 5, views: Views = "eval"
            ) -> list[list[tuple[str, float]]]:
    """For each input, the k most probable (class name, probability), best first."""
    return self.top_k_of(self.predict(inputs, views=views), k)

  def top_k_of(self, probs: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(self.class_names[j], float(p[j])) for j in row] for p, row in zip(probs, order)]


class ExportedPredictor(Predictor):
  """A Predictor that runs the export's model.stablehlo (serving.ServedModel) instead of the
  Flax model: the same reading, resizing, cropping and view averaging, the normalisation
  inside the artefact. `logits` takes what `read` / `read_views` give: uint8 inputs."""

  def __init__(self, served: Any, input_spec: dict[str, Any],
               class_names: Sequence[str] | None, meta: dict[str, Any] | None = None):
    super().__init__(None, None, input_spec,
                     served.class_names if class_names is None else class_names, meta)
    self.served = served
    if served.input_shape != self.input_shape:
      raise ValueError(f"model.stablehlo takes {served.input_shape}, model.json's input "
                       f"is {self.input_shape}")

  def logits(self, x: Any) -> np.ndarray:
    """float32 logits [N, classes] of uint8 inputs [N, *input_shape] (resized and cropped,
    not normalised: `read` / `read_views`)."""
    return self.served(np.asarray(x))

  def _normalize(self, x: np.ndarray) -> np.ndarray:
    return x  # inside the artefact
