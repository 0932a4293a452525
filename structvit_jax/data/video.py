"""Video datasets (Kinetics-400, Something-Something V1/V2, Diving-48, FineGym) from list
files, decoded inside the grain transforms (so decoding runs in grain worker processes):
video files with PyAV, frame folders (SSv1: `<id>/00001.jpg ...`) with PIL.

List files (the UniFormer / mmaction format, `relative/path.mp4 label` per line): README.md,
"Videos". Labels are the last field, so paths may contain spaces; unset
config.data.train_list / eval_list, the list of split S is DATA_DIR/S.csv. The source only
returns the path: decoding happens in the transform, per example. A path that is a
directory is a frame folder (`FrameFolderReader`): its frames are the image files named by
their number (`00001.jpg`, numbered from 1, or from 0 if there is a `0.jpg`), frame i of
the video being the i-th number; the folder is listed when the video is opened (the frame
count is never stored in the list). Everything below (sampling, views, bad data) is the
same for both kinds.

Temporal sampling (frame indices into the file's frames; L = number of frames):
- dense (K400): N frames `rate` apart, a window of W = (N-1)*rate+1 frames. Train: start
  uniform in [0, L-W]. Test clip k of K: start = floor(k*(L-W)/(K-1)) (evenly spaced, first
  and last window included; K=1: the centred window floor((L-W)/2), SlowFast's
  `use_offset` rule). Indices past the end are clamped to L-1 (as SlowFast). `rate` counts
  frames of the file (mmaction), not SlowFast's re-timed 30 fps (Kinetics is ~30 fps).
- segment (TSN; SSv2, Diving-48, FineGym): SlowFast's ssv2 `get_seq_frames`: segment i
  spans [round(s*i), round(s*(i+1))] with s = (L-1)/N; train: a uniform frame of each
  segment; test: the middle (start+end)//2; test clip k of K > 1: start + (end-start)*(2k+1)//(2K).
Spatial: train: short side to a size drawn as SlowFast (inverse-uniform in scale_jitter),
random image_size crop, RandAugment (config.data.randaugment, the same ops on every frame),
flip unless random_flip=False, normalise, random erasing (config.data.random_erase, one box
through all frames; for the trainer's uint8 input the normalisation and the erasing noise
run in the jitted step: docs/input_pipeline.md). Test (preprocessing.eval_spec): short side
to image_size, then crop k of test_crops: 1 -> centre; 3 -> left/centre/right along the long
side (SlowFast `uniform_crop`). Eval emits each video's test_clips x test_crops views as
separate examples (view = clip * test_crops + crop) with its `video_id`; the trainer averages
their softmax scores per video (SlowFast/UniFormer sum softmax scores over views).

Bad data: an unreadable or missing video is logged once per process with its path and
counted in the per-example field `bad` (int32). A frame folder is bad when it has no
frames, when its numbering has a gap (a missing frame: the whole video is bad, whichever
frames a clip would use, so the count does not depend on the sampling draw) or when a frame
it needs does not decode (a corrupt JPEG). Train: replaced by another video drawn from
the example's own rng (deterministic). Eval: the view is kept as a blank clip with mask=False
(excluded from the metrics; replacing it would evaluate a different video).
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any, Sequence

import av
from av.video.reformatter import VideoReformatter
import grain
import ml_collections
import numpy as np
from PIL import Image

from structvit_jax.data import registry
from structvit_jax.data.ops import Normalize, RandomErasing, RandomFlip, warn_bad_once
from structvit_jax.data.preprocessing import eval_spec
from structvit_jax.data.spec import DatasetNotFoundError, DatasetSpec

FRAME_EXTS = (".jpg", ".jpeg", ".png")  # frame folders: image files named by frame number
MAX_RETRIES = 10          # train: replacements tried before giving up (SlowFast NUM_RETRIES)
SEEK_MIN_FRAMES = 32      # seek first only when the first needed frame is this far in
BAD_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError, RuntimeError)


class BadVideoError(RuntimeError):
  """A video that opens but has no decodable video frames."""


# ----------------------------------------------------------------------------- list files


def read_list(list_path: str, root: str, num_classes: int) -> list[tuple[str, int]]:
  """[(absolute path, label)] from a `relative/path.mp4 label` list file."""
  entries = []
  with open(list_path) as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      parts = line.rsplit(None, 1)
      try:
        if len(parts) != 2:
          raise ValueError
        label = int(parts[1])
      except ValueError:
        raise ValueError(f"{list_path}:{lineno}: expected 'relative/path.mp4 label' "
                         f"(integer label), got {line!r}") from None
      if not 0 <= label < num_classes:
        raise ValueError(f"{list_path}:{lineno}: label {label} not in [0, {num_classes}) "
                         f"(set config.data.num_classes if the dataset has more classes)")
      entries.append((os.path.join(root, parts[0].strip()), label))
  return entries


class VideoListSource:
  """Random access over (video, view): element i is video i // num_views, view
  i % num_views. Returns the path only (decoded by the transform, in the workers)."""

  def __init__(self, entries: Sequence[tuple[str, int]], num_views: int = 1):
    self.entries, self.num_views = list(entries), num_views

  def __len__(self) -> int:
    return len(self.entries) * self.num_views

  def __getitem__(self, index: int) -> dict[str, Any]:
    video, view = divmod(int(index), self.num_views)
    path, label = self.entries[video]
    return {"path": path, "label": np.int32(label), "video_id": np.int32(video),
            "view": np.int32(view)}


# ----------------------------------------------------------------------------- sampling


def dense_indices(length: int, num: int, rate: int, rng: np.random.Generator | None = None,
                  clip: int = 0, num_clips: int = 1) -> np.ndarray:
  """`num` frame indices `rate` apart (module docstring): random window with rng, else
  test clip `clip` of `num_clips`."""
  delta = max(length - ((num - 1) * rate + 1), 0)
  if rng is not None:
    start = int(rng.integers(0, delta + 1))
  elif num_clips == 1:
    start = delta // 2
  else:
    start = (clip * delta) // (num_clips - 1)
  return np.minimum(start + rate * np.arange(num), length - 1)


def segment_indices(length: int, num: int, rng: np.random.Generator | None = None,
                    clip: int = 0, num_clips: int = 1) -> np.ndarray:
  """One frame per segment (TSN, SlowFast ssv2 `get_seq_frames`; module docstring)."""
  size = (length - 1) / num
  starts = np.round(size * np.arange(num)).astype(np.int64)
  ends = np.round(size * np.arange(1, num + 1)).astype(np.int64)
  if rng is not None:
    return rng.integers(starts, ends + 1)
  return starts + ((ends - starts) * (2 * clip + 1)) // (2 * num_clips)


def short_side_shape(height: int, width: int, short: int) -> tuple[int, int]:
  """(h, w) with the short side `short`, the aspect kept (SlowFast: floor)."""
  if height <= width:
    return short, int(math.floor(width / height * short))
  return int(math.floor(height / width * short)), short


def crop_offset(height: int, width: int, size: int, index: int, num_crops: int
                ) -> tuple[int, int]:
  """(y, x) of test crop `index` of `num_crops` (1: centre; 3: SlowFast `uniform_crop`,
  start/centre/end along the long side)."""
  y, x = int(math.ceil((height - size) / 2)), int(math.ceil((width - size) / 2))
  pos = 1 if num_crops == 1 else index
  if pos != 1:
    if height > width:
      y = 0 if pos == 0 else height - size
    else:
      x = 0 if pos == 0 else width - size
  return y, x


# ----------------------------------------------------------------------------- decoding

_local = threading.local()   # grain may run transforms in threads: one reformatter each


def _reformatter() -> VideoReformatter:
  # PyAV rebuilds the rgb conversion per frame unless the reformatter is reused
  # (docs/platform_notes.md).
  if not hasattr(_local, "reformatter"):
    _local.reformatter = VideoReformatter()
  return _local.reformatter


class _Reader:
  """A context manager that closes the reader."""

  def __enter__(self) -> "_Reader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class VideoReader(_Reader):
  """An open video: its frame count and `read(indices, short_side)`."""

  def __init__(self, path: str):
    self.path = path
    self.container = av.open(path, metadata_errors="ignore")
    if not self.container.streams.video:
      self.close()
      raise BadVideoError(f"no video stream in {path}")
    self.stream = self.container.streams.video[0]
    self.stream.codec_context.thread_count = 1  # parallelism comes from grain workers
    self.num_frames = self.stream.frames or self._count_frames()
    if self.num_frames <= 0:
      self.close()
      raise BadVideoError(f"no video frames in {path}")

  def _count_frames(self) -> int:
    # Some containers (e.g. webm) carry no frame count: count packets, without decoding.
    n = sum(1 for p in self.container.demux(self.stream) if p.size)
    self.container.seek(0)
    return n

  def close(self) -> None:
    self.container.close()

  def read(self, indices: np.ndarray, short_side: int) -> np.ndarray:
    """uint8 [len(indices), h, w, 3], the short side resized to `short_side` (bilinear,
    in swscale's RGB conversion). Indices past the real end (a frame count in the metadata
    larger than the decodable frames) get the last frame read."""
    st = self.stream
    h, w = short_side_shape(st.codec_context.height, st.codec_context.width, short_side)
    want, inverse = np.unique(np.asarray(indices), return_inverse=True)
    out = np.empty((len(want), h, w, 3), np.uint8)
    got = self._decode(want, out, h, w, seek=int(want[0]) >= SEEK_MIN_FRAMES)
    if got < 0:  # the seek landed past the first wanted frame: decode from the start
      self.container.seek(0)
      got = self._decode(want, out, h, w, seek=False)
    if got == 0:
      raise BadVideoError(f"no decodable frames in {self.path}")
    out[got:] = out[got - 1]   # metadata said more frames than there are
    return out[inverse.reshape(-1)]

  def _decode(self, want: np.ndarray, out: np.ndarray, h: int, w: int, seek: bool) -> int:
    """Fills out[j] with frame want[j]; returns how many were filled (-1: bad seek)."""
    st, fmt = self.stream, _reformatter()
    start = st.start_time or 0
    pos = 0
    if seek and st.average_rate and st.time_base:
      # The exact-frame recipe (docs/platform_notes.md): seek to the keyframe before the
      # target, then read the position of the first decoded frame from its pts.
      self.container.seek(int(int(want[0]) / st.average_rate / st.time_base) + start,
                          stream=st, backward=True, any_frame=False)
      pos = None
    j = 0
    for frame in self.container.decode(st):
      if pos is None:
        if frame.pts is None:
          return -1
        pos = round(float((frame.pts - start) * st.time_base * st.average_rate))
        if pos > want[0]:
          return -1
      while j < len(want) and want[j] == pos:
        out[j] = fmt.reformat(frame, width=w, height=h, format="rgb24",
                              interpolation="BILINEAR", threads=1).to_ndarray()
        j += 1
      if j == len(want):
        break
      pos += 1
    return j


class FrameFolderReader(_Reader):
  """A frame folder (SSv1's `<id>/00001.jpg ...`) with VideoReader's interface: its frame
  count (the folder is listed here) and `read(indices, short_side)` (PIL, bilinear).
  BadVideoError: no frames, a gap in the numbering (a missing frame), or, in `read`, a
  frame that does not decode."""

  def __init__(self, path: str):
    self.path = path
    numbers = {}
    for name in os.listdir(path):
      stem, ext = os.path.splitext(name)
      if ext.lower() in FRAME_EXTS and stem.isascii() and stem.isdigit():
        numbers.setdefault(int(stem), name)  # 00001.jpg and 1.jpg: the first listed wins
    if not numbers:
      raise BadVideoError(f"no frames ({'/'.join(FRAME_EXTS)} named by number) in {path}")
    first = 0 if 0 in numbers else 1
    last = max(numbers)
    if len(numbers) != last - first + 1:
      missing = sorted(set(range(first, last + 1)) - set(numbers))
      shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
      raise BadVideoError(f"{len(missing)} missing frame(s) in {path} (numbers {shown} of "
                          f"{first}..{last})")
    self.files = [os.path.join(path, numbers[n]) for n in range(first, last + 1)]
    self.num_frames = len(self.files)

  def close(self) -> None:
    pass

  def _frame(self, index: int, h: int | None, w: int | None, short_side: int) -> np.ndarray:
    path = self.files[index]
    try:
      with Image.open(path) as im:
        im = im.convert("RGB")  # decodes the whole file: a truncated JPEG raises here
    except Exception as e:  # noqa: BLE001  PIL raises OSError, SyntaxError, ValueError, ...
      raise BadVideoError(f"cannot decode frame {path}: {type(e).__name__}: {e}") from None
    if h is None:
      h, w = short_side_shape(im.height, im.width, short_side)
    if (im.height, im.width) != (h, w):
      im = im.resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(im, np.uint8)

  def read(self, indices: np.ndarray, short_side: int) -> np.ndarray:
    """uint8 [len(indices), h, w, 3], the short side resized to `short_side` (PIL bilinear;
    every frame to the first one's (h, w)). Each distinct index is decoded once."""
    want, inverse = np.unique(np.asarray(indices), return_inverse=True)
    if want[0] < 0 or want[-1] >= self.num_frames:
      raise ValueError(f"frame indices {want[0]}..{want[-1]} outside the {self.num_frames} "
                       f"frames of {self.path}")
    first = self._frame(int(want[0]), None, None, short_side)
    h, w = first.shape[:2]
    out = np.stack([first] + [self._frame(int(i), h, w, short_side) for i in want[1:]])
    return out[inverse.reshape(-1)]


def open_video(path: str) -> VideoReader | FrameFolderReader:
  """A reader of `path`: a frame folder if it is a directory, else a video file (PyAV)."""
  return FrameFolderReader(path) if os.path.isdir(path) else VideoReader(path)


# ----------------------------------------------------------------------------- transforms

def _log_bad(path: str, error: Exception) -> None:
  warn_bad_once(path, "unreadable video %s: %s: %s; training replaces it by another video, "
                "evaluation leaves its views out", path, type(error).__name__, error)


class ClipConfig:
  """Frame sampling and test views (module docstring), of config.data or an export's spec."""

  def __init__(self, num_frames: int, size: int, sampling: str = "dense", rate: int = 1,
               clips: int = 1, crops: int = 1):
    self.num_frames, self.size, self.sampling = int(num_frames), int(size), sampling
    self.rate, self.clips, self.crops = int(rate or 1), int(clips), int(crops)

  def indices(self, length: int, rng=None, clip: int = 0) -> np.ndarray:
    if self.sampling == "dense":
      return dense_indices(length, self.num_frames, self.rate, rng, clip, self.clips)
    return segment_indices(length, self.num_frames, rng, clip, self.clips)

  def test_view(self, video: str | np.ndarray, view: int = 0) -> np.ndarray:
    """uint8 [T, S, S, 3]: view `view` (clip * crops + crop) of a video file, or of an
    array of all a video's frames (short side resized with PIL, bilinear)."""
    clip, crop = divmod(int(view), self.crops)
    return self._crop(self._test_clip(video, clip), crop)

  def test_views(self, video: str | np.ndarray) -> np.ndarray:
    """uint8 [clips * crops, T, S, S, 3]: every test view in view order, as `test_view`;
    each clip is decoded once for all its crops."""
    clips = [self._test_clip(video, clip) for clip in range(self.clips)]
    return np.stack([self._crop(f, crop) for f in clips for crop in range(self.crops)])

  def _crop(self, frames: np.ndarray, crop: int) -> np.ndarray:
    y, x = crop_offset(frames.shape[1], frames.shape[2], self.size, crop, self.crops)
    return frames[:, y:y + self.size, x:x + self.size]

  def _test_clip(self, video: str | np.ndarray, clip: int) -> np.ndarray:
    """The frames of test clip `clip`, short side resized to the crop size."""
    if isinstance(video, np.ndarray):
      frames = video[self.indices(len(video), clip=clip)]
      h, w = short_side_shape(frames.shape[1], frames.shape[2], self.size)
      if (h, w) != frames.shape[1:3]:
        frames = np.stack([np.asarray(Image.fromarray(f).resize(
            (w, h), Image.Resampling.BILINEAR)) for f in frames])
    else:
      with open_video(video) as reader:
        frames = reader.read(self.indices(reader.num_frames, clip=clip), self.size)
    return frames


class DecodeTrainClip(grain.transforms.RandomMap):
  """path -> random clip uint8 [T, S, S, 3] (temporal sampling, scale jitter, crop)."""

  def __init__(self, cfg: ClipConfig, entries: Sequence[tuple[str, int]],
               jitter: tuple[int, int]):
    self.cfg, self.entries, self.jitter = cfg, entries, jitter

  def _clip(self, path: str, rng: np.random.Generator) -> np.ndarray:
    c = self.cfg
    with open_video(path) as reader:
      idx = c.indices(reader.num_frames, rng)
      # SlowFast random_short_side_scale_jitter: inverse-uniform (uniform in 1/size).
      short = int(round(1.0 / rng.uniform(1.0 / self.jitter[1], 1.0 / self.jitter[0])))
      frames = reader.read(idx, short)
    y = int(rng.integers(0, frames.shape[1] - c.size + 1))
    x = int(rng.integers(0, frames.shape[2] - c.size + 1))
    return frames[:, y:y + c.size, x:x + c.size]

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    video, bad = int(element["video_id"]), 0
    for _ in range(MAX_RETRIES):
      path, label = self.entries[video]
      try:
        clip = self._clip(path, rng)
        return {"image": clip, "label": np.int32(label), "bad": np.int32(bad)}
      except BAD_ERRORS as e:
        _log_bad(path, e)
        bad, video = 1, int(rng.integers(len(self.entries)))
    raise RuntimeError(f"{MAX_RETRIES} videos in a row could not be read (last: {path}); "
                       f"is the dataset readable?")


class DecodeEvalClip(grain.transforms.Map):
  """(path, view) -> the fixed test view uint8 [T, S, S, 3]; `mask` False if unreadable."""

  def __init__(self, cfg: ClipConfig):
    self.cfg = cfg

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    c, path = self.cfg, element["path"]
    real = bool(element.get("mask", True))
    out = {"label": element["label"], "video_id": element["video_id"],
           "view": element["view"], "bad": np.int32(0)}
    try:
      out["image"], out["mask"] = c.test_view(path, element["view"]), np.bool_(real)
    except BAD_ERRORS as e:
      _log_bad(path, e)
      out["image"] = np.zeros((c.num_frames, c.size, c.size, 3), np.uint8)
      out["mask"], out["bad"] = np.bool_(False), np.int32(real)  # padding copies not counted
    return out


class VideoRandAugment(grain.transforms.RandomMap):
  """timm RandAugment (transforms.RandAugment) with the same ops and magnitudes on every
  frame, as SlowFast/UniFormer's video RandAugment: each frame replays the clip's draws.
  Applied to the cropped clip (SlowFast: before the crop; cheaper, nearly the same)."""

  def __init__(self, config: str, mean: Sequence[float]):
    from structvit_jax.data.transforms import RandAugment
    self.augment = RandAugment(config, mean)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    seed = int(rng.integers(2**63))
    frames = [np.asarray(self.augment.random_map({"image": Image.fromarray(f)},
                                                 np.random.default_rng(seed))["image"])
              for f in element["image"]]
    return {**element, "image": np.stack(frames)}


# ----------------------------------------------------------------------------- builder


def _howto(data: ml_collections.ConfigDict) -> str:
  lists = " and ".join(os.path.basename(list_file(data, split))
                       for split in (data.train_split, data.eval_split))
  if data.name == "ssv1":
    return (f"Expected: the frame folders (<id>/00001.jpg ...) under DATA_DIR and the list "
            f"files {lists} in it, one folder per line: 'relative/folder label', written "
            f"from the official CSVs by `python -m structvit_jax.data.video_lists "
            f"--dataset=ssv1 ...` (other names via config.data.train_list / eval_list). "
            f"Pass --config.data.data_dir=DATA_DIR (README, 'Video datasets').")
  return (f"Expected: the videos under DATA_DIR and the list files {lists} in it, one "
          f"video per line: 'relative/path.mp4 label' (the UniFormer/mmaction annotation "
          f"format; other names via config.data.train_list / eval_list). Pass "
          f"--config.data.data_dir=DATA_DIR (README, 'Video datasets').")


def list_file(data: ml_collections.ConfigDict, split: str) -> str:
  key = ("train_list" if split == data.train_split else
         "eval_list" if split == data.eval_split else None)
  name = (data[key] if key else "") or f"{split}.csv"
  return os.path.join(data.data_dir, name)


def build_dataset(data: ml_collections.ConfigDict, split: str, train: bool) -> DatasetSpec:
  """The DatasetSpec of video dataset `data.name`, split `split` (module docstring)."""
  name, root = data.name, data.data_dir
  if not root or not os.path.isdir(root):
    state = "config.data.data_dir is not set" if not root else f"{root!r} does not exist"
    raise DatasetNotFoundError(f"dataset {name!r} (split {split!r}): {state}. {_howto(data)}")
  path = list_file(data, split)
  if not os.path.isfile(path):
    raise DatasetNotFoundError(f"dataset {name!r} (split {split!r}): list file {path!r} "
                               f"does not exist. {_howto(data)}")
  num_classes = int(data.num_classes or registry.get(name).num_classes)
  entries = read_list(path, root, num_classes)
  if not entries:
    raise DatasetNotFoundError(f"dataset {name!r}: list file {path!r} lists no videos.")
  cfg = ClipConfig(data.num_frames, data.image_size, data.sampling, data.sampling_rate,
                   data.test_clips, data.test_crops)
  jitter = tuple(int(s) for s in data.scale_jitter or (cfg.size, cfg.size))
  if cfg.num_frames <= 0 or cfg.sampling not in ("dense", "segment"):
    raise ValueError(f"{name}: needs config.data.num_frames > 0 (got {cfg.num_frames}) and "
                     f"sampling 'dense' or 'segment' (got {cfg.sampling!r})")
  if train and min(jitter) < cfg.size:
    raise ValueError(f"config.data.scale_jitter={jitter} must not be below image_size "
                     f"{cfg.size} (short side before the random crop)")
  if train:  # SlowFast order: sample, RandAugment, jitter + crop + flip, normalise, erase
    ops = ((DecodeTrainClip(cfg, entries, jitter),)
           + ((VideoRandAugment(data.randaugment, data.mean),) if data.randaugment else ())
           + ((RandomFlip(),) if data.random_flip else ())
           + (Normalize(data.mean, data.std),)
           + ((RandomErasing(data.random_erase),) if data.random_erase else ()))
    source = VideoListSource(entries)
  else:
    source = VideoListSource(entries, cfg.clips * cfg.crops)
    spec = eval_spec(data)
    ops = (DecodeEvalClip(cfg), Normalize(spec["mean"], spec["std"]))
  return DatasetSpec(source, num_classes, (cfg.num_frames, cfg.size, cfg.size, 3), ops)
