"""Token labeling: the official label files, their alignment with crop + flip, and training.

Dense targets that are known: synthetic_image's class shape has its own coverage mask, so a
"teacher" map per image is that mask (shape class vs an extra background class), in the
official on-disk layout ([2, k, h, w]: scores, class indices).
"""

import contextlib
import io
from pathlib import Path
import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image
import pytest

from structvit_jax import optim
from structvit_jax import token_label_loss
from structvit_jax import train
from structvit_jax import train_state
from structvit_jax.data import synthetic, token_labels
from structvit_jax.data.ops import RandomFlip
from structvit_jax.data.transforms import RandomResizedCrop
from structvit_jax.models import get_model

BACKGROUND = 10  # synthetic_image has classes 0..9; the teacher's extra background class
NUM_CLASSES = 11
MAP = 16         # teacher map cells per side (NFNet-F6's are 18 x 18 at 576 px)


# ----------------------------------------------------------------------------- official files


def torch_save_bytes(array: np.ndarray, storage: str = "HalfStorage",
                     rebuild: tuple[str, str] = ("torch._utils", "_rebuild_tensor_v2")) -> bytes:
  """What `torch.save(tensor, f)` (torch >= 1.6) writes for a contiguous tensor, built with
  pickle opcodes (no torch here): a zip of archive/data.pkl, archive/data/0, version."""
  size, numel = array.shape, array.size
  stride = [int(np.prod(size[i + 1:])) for i in range(len(size))]
  glob = lambda m, n: b"c" + m.encode() + b"\n" + n.encode() + b"\n"
  uni = lambda s: b"X" + struct.pack("<I", len(s)) + s.encode()
  ints = lambda xs: b"(" + b"".join(b"J" + struct.pack("<i", x) for x in xs) + b"t"
  pkl = (b"\x80\x02" + glob(*rebuild) + b"("
         + b"(" + uni("storage") + glob("torch", storage) + uni("0") + uni("cpu")
         + b"J" + struct.pack("<i", numel) + b"tQ"          # persistent id -> storage
         + b"J" + struct.pack("<i", 0) + ints(size) + ints(stride) + b"\x89"
         + glob("collections", "OrderedDict") + b")R"       # requires_grad, backward hooks
         + b"tR.")
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/data/0", array.astype("<f2" if storage == "HalfStorage"
                                              else "<f4").tobytes())
    z.writestr("archive/version", "3\n")
  return buf.getvalue()


def teacher_map(coverage: np.ndarray, label: int, cells: int = MAP, gain: float = 4.0
                ) -> np.ndarray:
  """The official layout [2, k=2, cells, cells] float16 for a synthetic image: per cell the
  scores gain * c (shape class) and gain * (1 - c) (background), c the shape's coverage."""
  s = coverage.shape[0] // cells
  c = coverage.reshape(cells, s, cells, s).mean((1, 3))
  scores = np.stack([gain * c, gain * (1 - c)])
  index = np.stack([np.full_like(c, label), np.full_like(c, BACKGROUND)])
  return np.stack([scores, index]).astype(np.float16)


def test_reads_the_official_format_without_torch():
  rng = np.random.default_rng(0)
  m = np.stack([rng.normal(size=(5, 3, 4)), rng.integers(0, 1000, (5, 3, 4))]).astype(np.float16)
  out = token_labels.read_torch_tensor(torch_save_bytes(m), "x.pt")
  np.testing.assert_array_equal(out, m)
  scores, index = token_labels.check_map(out, "x.pt", 1000)
  assert scores.dtype == np.float16 and index.dtype == np.int16
  np.testing.assert_array_equal(index, m[1].astype(np.int16))
  # float32 storage too (a label set saved without .half()).
  np.testing.assert_array_equal(token_labels.read_torch_tensor(
      torch_save_bytes(m.astype(np.float32), "FloatStorage")), m.astype(np.float32))


@pytest.mark.parametrize("data, message", [
    (b"\x80\x02}q\x00.", "not a zip-format torch file"),
    (b"PK\x05\x06" + b"\0" * 18, "one \\*/data.pkl, found 0"),
    ("shape", r"shape \[3, 5, 3, 4\], expected \[2, k, h, w\]"),
    ("index", r"class indices must be whole numbers in \[0, 1000\)"),
    ("global", "holds os.system, not a plain tensor"),
    ("truncated", "unreadable torch file"),
], ids=["pickle", "empty_zip", "shape", "index", "global", "truncated"])
def test_refuses_malformed_label_files(data, message):
  rng = np.random.default_rng(1)
  good = np.stack([rng.normal(size=(5, 3, 4)), rng.integers(0, 1000, (5, 3, 4))])
  if data == "shape":
    data = torch_save_bytes(np.concatenate([good, good[:1]]).astype(np.float16))
  elif data == "index":
    bad = good.copy()
    bad[1, 0, 0, 0] = 1000
    data = torch_save_bytes(bad.astype(np.float16))
  elif data == "global":
    data = torch_save_bytes(good.astype(np.float16), rebuild=("os", "system"))
  elif data == "truncated":
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
      z.writestr("archive/data.pkl", torch_save_bytes(good.astype(np.float16))[:10])
    data = buf.getvalue()
  with pytest.raises(token_labels.TokenLabelError, match=message):
    token_labels.check_map(token_labels.read_torch_tensor(data, "n01/x.pt"), "n01/x.pt", 1000)


def _write_label_folder(root, names_and_maps):
  for name, m in names_and_maps:
    path = root / (name.rsplit(".", 1)[0] + ".pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(torch_save_bytes(m))


def test_prepare_joins_by_file_name_and_names_what_is_missing(tmp_path):
  rng = np.random.default_rng(2)
  maps = {f"n0{c}/n0{c}_{i}.JPEG": np.stack([rng.normal(size=(2, 4, 4)),
                                            rng.integers(0, 10, (2, 4, 4))]).astype(np.float16)
          for c in range(2) for i in range(3)}
  _write_label_folder(tmp_path / "labels", maps.items())
  # Records in their own order; the official tfds imagenet2012 names drop the folder.
  names = ["n01/n01_2.JPEG", "n00_0.JPEG", "n00/n00_1.JPEG", "n01/n01_0.JPEG"]
  info = token_labels.prepare(str(tmp_path / "labels"), names, str(tmp_path / "out"), "train", 10)
  assert (info["num_examples"], info["k"], info["height"]) == (4, 2, 4)
  store = token_labels.TokenLabelStore(str(tmp_path / "out"), "train", 4, 10)
  for i, n in enumerate(names):
    key = n if "/" in n else f"{n[:3]}/{n}"
    np.testing.assert_array_equal(store.get(i, n), maps[key])
  # Grain workers get the store pickled: it reopens its memory maps there.
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(store)).get(3, names[3]),
                                maps[names[3]])
  with pytest.raises(token_labels.TokenLabelError, match=r"row 1 is 'n00_0' but record 1"):
    store.get(1, "n01/n01_1.JPEG")
  # The split has images without labels: count and first names, nothing written.
  with pytest.raises(token_labels.TokenLabelError,
                     match=r"do not cover split 'train': 2 of 4 images .* e\.g\. n02/a\.JPEG, "
                           r"n03_9\.JPEG"):
    token_labels.prepare(str(tmp_path / "labels"), names[:2] + ["n02/a.JPEG", "n03_9.JPEG"],
                         str(tmp_path / "out2"), "train", 10)
  assert not (tmp_path / "out2").exists()
  # A zip of the same folder reads the same.
  with zipfile.ZipFile(tmp_path / "labels.zip", "w") as z:
    for n, m in maps.items():
      z.writestr("label_top5/" + n.rsplit(".", 1)[0] + ".pt", torch_save_bytes(m))
  token_labels.prepare(str(tmp_path / "labels.zip"), names, str(tmp_path / "out3"), "train", 10)
  store3 = token_labels.TokenLabelStore(str(tmp_path / "out3"), "train", 4, 10)
  np.testing.assert_array_equal(store3.get(0, names[0]), store.get(0, names[0]))
  # Labels that do not cover the split as the trainer sees it, or none at all.
  with pytest.raises(token_labels.TokenLabelError, match="prepared for 4 images, the split has 5"):
    token_labels.TokenLabelStore(str(tmp_path / "out"), "train", 5, 10)
  with pytest.raises(token_labels.TokenLabelError, match="holds none"):
    token_labels.TokenLabelStore(str(tmp_path / "out"), "validation", 4, 10)


# ----------------------------------------------------------------------------- alignment


def _augment(image, coverage, label, seed, size):
  """The pipeline's crop + flip on (image, teacher map) and, with the same draws, on the
  coverage mask as an image: the mask of the crop the model sees."""
  ops = (RandomResizedCrop(size, (0.25, 1.0)), RandomFlip())
  el = {"image": Image.fromarray(image), "token_label": teacher_map(coverage, label)}
  mask = {"image": Image.fromarray(coverage.astype(np.float32), mode="F")}
  for op in ops:
    el = op.random_map(el, np.random.default_rng(seed))
    mask = op.random_map(mask, np.random.default_rng(seed))
  return el, np.asarray(mask["image"], np.float32)


def _roi_coverage(elements, grid):
  """Per token, the teacher map's shape coverage after RoIAlign of the crop box (inverting
  the 2-class softmax of targets())."""
  maps = np.stack([e["token_label"] for e in elements])
  boxes = np.stack([e["token_label_box"] for e in elements])
  _, dense = jax.jit(token_label_loss.targets, static_argnums=(2, 3, 4))(
      maps, boxes, NUM_CLASSES, (grid, grid), 0.0)
  p = np.asarray(dense)
  label = maps[:, 1, 0, 0, 0].astype(int)
  rows = np.arange(len(elements))
  logit = np.log(p[rows, :, label]) - np.log(p[:, :, BACKGROUND])   # = gain * (2 c - 1)
  return (logit / 4.0 + 1) / 2


def test_label_map_follows_crop_and_flip():
  """The map cropped by RoIAlign of the crop box equals the map computed from the cropped
  (and flipped) image, up to interpolation; the map with the flip undone, or with the box
  transposed, does not."""
  size, grid = 64, 8
  cases, truths, flips = {"ours": [], "flip_undone": [], "transposed": []}, [], set()
  for index in range(6):
    rng = np.random.default_rng((0, 1, index))
    label = int(rng.integers(10))
    image, coverage = synthetic.render_image(label, rng, 128, return_mask=True)
    for seed in range(3):
      el, mask = _augment(image, coverage, label, seed, size)
      truths.append(mask.reshape(grid, size // grid, grid, size // grid).mean((1, 3)).ravel())
      flips.add(bool(np.random.default_rng(seed).random() < 0.5))  # RandomFlip's draw
      cases["ours"].append(el)
      x0, y0, x1, y1 = el["token_label_box"]
      cases["flip_undone"].append(dict(
          el, token_label=el["token_label"][..., ::-1].copy(),
          token_label_box=np.asarray([1 - x1, y0, 1 - x0, y1], np.float32)))
      # The official code passes (y0, x0, y1, x1) where RoIAlign takes (x0, y0, x1, y1).
      cases["transposed"].append(dict(
          el, token_label_box=np.asarray([y0, x0, y1, x1], np.float32)))
  error = {k: float(np.abs(_roi_coverage(v, grid) - np.stack(truths)).mean())
           for k, v in cases.items()}
  assert flips == {True, False}
  assert error["ours"] < 0.05, error
  assert error["flip_undone"] > 3 * error["ours"] and error["transposed"] > 3 * error["ours"], error


GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def test_label_map_follows_randaugment_geometry():
  """After crop + flip, each geometric RandAugment op (magnitude 9: 27 degrees, shear 0.27,
  translate 40%) moves the teacher map with the image: the RoIAligned map matches the
  coverage of the transformed image (nearest cell, as the official); left unmoved, it does
  not. The area an op brings in has no teacher scores (every class equal: coverage 0.5),
  as the mask image's fill 128 / 255."""
  from structvit_jax.data.transforms import RandAugment
  size, grid = 64, 8
  ra = RandAugment("rand-m9-n1-p1.0", mean=(0.5, 0.5, 0.5))
  errors = {}
  for name in GEOMETRIC_OPS:
    ra.ops = (name,)
    cases, truths = {"ours": [], "unmoved": []}, []
    for index in range(4):
      rng = np.random.default_rng((0, 3, index))
      label = int(rng.integers(10))
      image, coverage = synthetic.render_image(label, rng, 128, return_mask=True)
      mask_rgb = np.repeat((coverage * 255 + 0.5).astype(np.uint8)[..., None], 3, -1)
      for seed in range(2):
        el, mask = {"image": Image.fromarray(image),
                    "token_label": teacher_map(coverage, label)}, {
                        "image": Image.fromarray(mask_rgb)}
        for op in (RandomResizedCrop(size, (0.25, 1.0)), RandomFlip()):
          el = op.random_map(el, np.random.default_rng(seed))
          mask = op.random_map(mask, np.random.default_rng(seed))
        cases["unmoved"].append(el)
        cases["ours"].append(ra.random_map(el, np.random.default_rng(seed)))
        moved = np.asarray(ra.random_map(mask, np.random.default_rng(seed))["image"],
                           np.float32)[..., 0] / 255
        truths.append(moved.reshape(grid, size // grid, grid, size // grid).mean((1, 3)).ravel())
    errors[name] = {k: float(np.abs(_roi_coverage(v, grid) - np.stack(truths)).mean())
                    for k, v in cases.items()}
  for name, e in errors.items():
    assert e["ours"] < 0.1 and e["unmoved"] > 2.5 * e["ours"], errors


def test_mixtoken_box_and_swap():
  """MixToken's box lies on the last stage's grid; the stage-1 swap covers exactly the
  stage-1 tokens under it (8 per side), taken from the batch flipped; swapping twice undoes."""
  from structvit_jax.models.uniformer import _swap_in_box
  areas = set()
  for i in range(20):
    y0, x0, y1, x1 = np.asarray(token_label_loss.mixtoken_box(jax.random.PRNGKey(i), (7, 7)))
    assert 0 <= y0 <= y1 <= 7 and 0 <= x0 <= x1 <= 7
    areas.add(int((y1 - y0) * (x1 - x0)))
  assert len(areas) > 3  # lam ~ Beta(1, 1): boxes of many sizes
  x = jnp.arange(3 * 16 * 16, dtype=jnp.float32).reshape(3, 16, 16, 1)
  box = jnp.asarray([0, 1, 1, 2])                       # last-stage token (0, 1) of a 2 x 2 grid
  mixed = np.asarray(_swap_in_box(x, box, 8))
  inside = np.zeros((16, 16), bool)
  inside[0:8, 8:16] = True
  np.testing.assert_array_equal(mixed[:, inside], np.asarray(x)[::-1][:, inside])
  np.testing.assert_array_equal(mixed[:, ~inside], np.asarray(x)[:, ~inside])
  np.testing.assert_array_equal(np.asarray(_swap_in_box(jnp.asarray(mixed), box, 8)), x)


# ----------------------------------------------------------------------------- training


@contextlib.contextmanager
def cheap_compiles():
  """XLA's cheap compile mode (conftest's FAST_COMPILES) for what is compiled inside: for
  programs run once or twice, where compiling dominates; the training test's step runs 400
  times and is compiled outside."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


# Four of synthetic_image's classes that differ in both shape and stripes (circle/horizontal,
# square/vertical, triangle/horizontal, cross/vertical), as labels 0..3, and the teacher's
# background class 4.
SHAPE_CLASSES = (0, 3, 4, 7)
TL_BACKGROUND = len(SHAPE_CLASSES)
SIZE, CROP = 64, (0.5, 1.0)
TRAIN_STEPS, BATCH = 400, 16
# The teacher's score per cell: GAIN x coverage for the shape's class (+ CONTEXT, below) and
# GAIN x (1 - coverage) for background. CONTEXT: a real teacher names the image's class off
# the object too (its receptive field sees the object). Without it the class target, the
# teacher's distribution over the crop (as the official trainer's; docs/token_labeling.md),
# puts ~4 % of its mass on the shape's class and ~90 % on background, and the class head
# stays at chance; with it, ~45 % on the class. The per-token targets stay the mask's
# (shape class where coverage > 1/4, else background).
GAIN, CONTEXT = 8.0, 4.0


def _tl_teacher(coverage: np.ndarray, label: int) -> np.ndarray:
  cells = SIZE // 8
  s = coverage.shape[0] // cells
  c = coverage.reshape(cells, s, cells, s).mean((1, 3))
  scores = np.stack([GAIN * c + CONTEXT, GAIN * (1 - c)])
  index = np.stack([np.full_like(c, label), np.full_like(c, TL_BACKGROUND)])
  return np.stack([scores, index]).astype(np.float16)


def _examples(split_id: int, count: int):
  out = []
  for index in range(count):
    rng = np.random.default_rng((0, split_id, index))
    label = int(rng.integers(len(SHAPE_CLASSES)))
    image, coverage = synthetic.render_image(SHAPE_CLASSES[label], rng, SIZE, return_mask=True)
    out.append((image, _tl_teacher(coverage, label), label))
  return out


def _normalise(images):
  return (np.asarray(images, np.float32) / 255.0 - 0.45) / 0.25


def _train_batches(pool, steps, seed=0):
  """The pipeline's crop + flip on each (image, teacher map), as the input pipeline runs
  them (RandomResizedCrop adds the box, RandomFlip flips map and box)."""
  ops = (RandomResizedCrop(SIZE, CROP), RandomFlip())
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    els = []
    for i in rng.integers(0, len(pool), BATCH):
      image, tl, label = pool[i]
      el = {"image": Image.fromarray(image), "token_label": tl, "label": np.int32(label)}
      for op in ops:
        el = op.random_map(el, rng)
      els.append(el)
    yield {"image": _normalise([np.asarray(e["image"]) for e in els]),
           "label": np.stack([e["label"] for e in els]),
           "token_label": np.stack([e["token_label"] for e in els]),
           "token_label_box": np.stack([e["token_label_box"] for e in els])}


def test_token_labeling_trains_the_aux_head_per_token_and_the_class_head():
  """A tiny UniFormer trained with token labeling as the recipe runs it (aux head, dense
  loss, MixToken, label smoothing, AdamW) on synthetic images whose teacher maps come from
  the shapes' own masks. On held-out whole images the aux head names each token's exact
  target (the shape's class on shape tokens, background elsewhere) far above chance, on
  shape tokens too, and the class head's top-1 is more than twice chance. With the dense
  loss weight at 0 the aux head stays at chance (checked by hand: docs/token_labeling.md)."""
  nc = TL_BACKGROUND + 1
  config = ml_collections.ConfigDict(dict(
      label_smoothing=0.1, mixup_alpha=0.0, cutmix_alpha=0.0, mixup_switch_prob=0.5,
      grad_accum_steps=1, ema_decay=0.0, optimizer="adamw", weight_decay=0.05,
      grad_clip_norm=0.0, token_label=dict(cls_weight=1.0, dense_weight=1.0, mix_token=True,
                                           ground_truth=False)))
  model = get_model("uniformer_tiny", token_labeling=True, num_classes=nc)
  schedule = optax.warmup_cosine_decay_schedule(1e-4, 3e-3, TRAIN_STEPS // 10, TRAIN_STEPS,
                                                1e-5)
  tx = optim.make_optimizer(config, schedule)
  with cheap_compiles():  # jitted: one compile, not one per op of the init
    state = jax.jit(lambda rng: train_state.init_state(rng, model, tx, (SIZE, SIZE, 3),
                                                       ema=False))(jax.random.PRNGKey(0))
  step = jax.jit(lambda s, b: train_state.train_step(s, b, model=model, tx=tx, schedule=schedule,
                                               config=config, num_classes=nc))
  losses = []
  for batch in _train_batches(_examples(1, 128), TRAIN_STEPS):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))

  # Held out, whole images (box = the full map): per-token targets from the teacher maps.
  test = _examples(2, 64)
  images = _normalise([e[0] for e in test])
  maps = np.stack([e[1] for e in test])
  grid = SIZE // token_label_loss.TOKEN_STRIDE
  full = np.tile(np.asarray([0, 0, 1, 1], np.float32), (len(test), 1))
  _, dense = token_label_loss.targets(maps, full, nc, (grid, grid), 0.0)
  target = np.asarray(dense.argmax(-1))                               # [B, tokens]
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  with cheap_compiles():
    logits, aux = jax.jit(lambda v, x: model.apply(v, x, dense=True))(variables, images)
  hit = np.asarray(aux.argmax(-1)) == target
  shape_tokens = target != TL_BACKGROUND
  # Mean recall over the 5 target classes: chance 0.2 whatever the class frequencies.
  balanced = np.mean([hit[target == k].mean() for k in range(nc) if (target == k).any()])
  shape_acc, background_acc = float(hit[shape_tokens].mean()), float(hit[~shape_tokens].mean())
  labels = np.asarray([e[2] for e in test])
  # The class head's answer is its best shape class (its target also has background mass).
  cls_acc = float((np.asarray(logits[:, :TL_BACKGROUND].argmax(-1)) == labels).mean())
  print(f"loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}; tokens: accuracy "
        f"{hit.mean():.3f} (all background: {1 - shape_tokens.mean():.3f}), balanced "
        f"{balanced:.3f} (chance 0.2), shape tokens {shape_acc:.3f} (chance 0.2), background "
        f"{background_acc:.3f}; class head top-1 {cls_acc:.3f} (chance 0.25)")
  assert balanced > 0.55 and shape_acc > 0.45, (balanced, shape_acc)
  assert hit.mean() > 1 - shape_tokens.mean() + 0.1
  assert cls_acc > 0.5, cls_acc
  assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
def fast_compiles():
  with cheap_compiles():
    yield


def test_recipe_trains_from_prepared_token_labels(tmp_path, fast_compiles):
  """image_folder -> prepare -> token labels prepared and joined by file name ->
  in1k_s.py:tl=True (its model made tiny) trains two steps through the real input pipeline
  (crop, flip, RandAugment moving the map) and evaluates; without the labels the recipe
  stops with one clear error."""
  from structvit_jax import config_utils
  from structvit_jax.data import builders, prepare
  from structvit_jax.data.pipeline import create_input
  rng = np.random.default_rng(3)
  for c in ("a", "b"):
    for split, n in (("train", 4), ("validation", 2)):
      (tmp_path / "raw" / split / c).mkdir(parents=True)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(
            tmp_path / "raw" / split / c / f"{c}{i}.jpg")
      if split == "train":
        _write_label_folder(tmp_path / "labels", [
            (f"{c}/{c}{i}.jpg", np.stack([rng.normal(size=(2, 3, 3)),
                                          rng.integers(0, 2, (2, 3, 3))]).astype(np.float16))
            for i in range(n)])
  prepare.prepare("image_folder", str(tmp_path / "raw"), str(tmp_path / "tfds"), workers=1)
  source, num_classes, _ = builders.open_split(
      builders.find_prepared(str(tmp_path / "tfds"), "image_folder"), "train")
  token_labels.prepare(str(tmp_path / "labels"), list(token_labels.record_names(source)),
                       str(tmp_path / "tl"), "train", num_classes)

  in1k = config_utils.import_sibling(str(Path(__file__).parents[1] / "configs" / "in1k_s.py"),
                                     "in1k_s")
  c = in1k.get_config("d=0,tl=True")
  assert (c.data.token_labels, c.model.kwargs.head_dim, c.mixup_alpha, c.lr) == (
      True, 32, 0.0, 1.6e-3)
  c.data.name, c.data.data_dir, c.data.image_size = "image_folder", str(tmp_path / "tfds"), 32
  c.data.num_workers = 0  # the transforms in process: worker start-up is not what this tests
  with pytest.raises(token_labels.TokenLabelError, match="token_label_dir is not set"):
    create_input(c, "train", 4)
  c.data.token_label_dir = str(tmp_path / "tl")
  batch = next(create_input(c, "train", 4).iterator)
  assert batch["token_label"].shape == (4, 2, 2, 3, 3)
  assert batch["token_label_box"].shape == (4, 4)

  c.model.name = "uniformer_tiny"
  c.model.kwargs.num_classes, c.model.kwargs.head_dim = 2, 16
  c.batch_size = c.eval_batch_size = 4
  c.num_train_steps, c.log_every_steps, c.ema_decay = 2, 1, 0.0
  # One device: what the recipe runs is under test here, not the sharding (cheaper compiles).
  state, ev = train.train_and_evaluate(c, str(tmp_path / "work"), devices=jax.devices()[:1])
  assert int(state.step) == 2 and np.isfinite(ev["eval/loss"])
