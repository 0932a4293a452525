"""The paper's StructSA figures for one input:

  python -m structvit_jax.visualize --model=EXPORT_OR_PRESET --input=FILE --out=DIR \
      [--compare=SA_MODEL,CONVSA_MODEL] [--layer=blocks3_7] [--query=4,7] [--head=0]

--model: an export directory (python -m structvit_jax.export) or a preset name (random
weights, e.g. to see the initialisation). --input: an image, or a video for video models
(presets: chosen by the file's extension). Writes DIR/fig2_pattern_detectors.png,
DIR/fig4_attention_maps.png (the model, and every --compare model, side by side) and, for
clips, DIR/fig3_dynamic_kernels_over_time.png (structvit_jax/figures.py says what each shows).
--query is in token coordinates of the layer ((row, col) or (t, row, col)); default centre.
"""

from __future__ import annotations

import os
from typing import Any

from absl import app
from absl import flags
from absl import logging

from structvit_jax import cli

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("model", None, "Export directory or preset name.")
  flags.DEFINE_string("input", None, "Image or video file.")
  flags.DEFINE_string("out", None, "Output directory for the PNGs.")
  flags.DEFINE_list("compare", [], "More models (exports or presets) for Fig. 4, e.g. the "
                    "SA and ConvSA models of the same architecture.")
  flags.DEFINE_string("layer", None, "StructSA layer, e.g. blocks3_7 (default: the last "
                      "layer of the stage with the largest token grid).")
  flags.DEFINE_list("query", None, "Query token coordinates, e.g. 3,4 (default: centre).")
  flags.DEFINE_integer("head", 0, "Attention head; -1 averages over heads.", lower_bound=-1)
  flags.DEFINE_integer("image_size", None, "Input size (default: the export's, 224 for presets).")
  flags.DEFINE_integer("frames", None, "Frames per clip (default: the export's, 16 for presets).")
  flags.DEFINE_integer("seed", 0, "Initialisation seed for presets.")
  flags.mark_flags_as_required(["model", "input", "out"])


def open_model(spec: str, kind: str | None = None, image_size: int | None = None,
               frames: int | None = None, seed: int = 0) -> Any:
  """An export directory or a preset name -> inference.Predictor. For presets, `kind`
  ('image' | 'video') picks the input; image_size / frames override the export's too (the
  UniFormer family has no fixed token grid)."""
  import jax
  import jax.numpy as jnp
  from structvit_jax import inference
  from structvit_jax.data.preprocessing import default_spec
  from structvit_jax.models import get_model, list_models
  if os.path.isdir(spec):
    p = inference.load(spec)
    new = dict(p.input_spec)
    if image_size:
      new["image_size"] = image_size
    if frames and new["kind"] == "video":
      new["num_frames"] = frames
    if new != p.input_spec:
      p = inference.Predictor(p.model, p.variables, new, p.class_names, p.meta)
    return p
  if spec not in list_models():
    raise ValueError(f"{spec!r} is neither an export directory nor a preset; presets: "
                     f"{', '.join(list_models())}")
  model = get_model(spec)
  kind = kind or "image"
  input_spec = inference._check_input_spec(
      default_spec(kind, image_size or 224, (frames or 16) if kind == "video" else 0))
  p = inference.Predictor(model, {}, input_spec, None, {"model": spec})
  x = jnp.zeros((1, *p.input_shape), jnp.float32)
  p.variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(seed), x)
  return p


def _label(spec: str) -> str:
  return os.path.basename(os.path.normpath(spec)) if os.path.isdir(spec) else spec


def run(model: str, input_file: str, out: str, compare: list[str] = (), layer: str | None = None,
        query: list[int] | None = None, head: int | None = 0, image_size: int | None = None,
        frames: int | None = None, seed: int = 0) -> list[str]:
  """Writes the figures; returns their paths."""
  from structvit_jax import inference
  from structvit_jax import figures
  kind = "video" if input_file.lower().endswith(inference._VIDEO_EXTS) else "image"
  main = open_model(model, kind, image_size, frames, seed)
  kind = main.input_spec["kind"]
  raw = main.read(input_file)                     # uint8, what the model sees
  x = main.preprocess_one(input_file)[None]
  logits, caps = figures.capture(main.model, main.variables, x)
  top = main.top_k_of(main.mean_probs(logits, 1), 3)[0]
  print(f"{input_file}: " + ", ".join(f"{c} {p:.3f}" for c, p in top))
  cap = figures.pick_layer(caps, layer)
  if head is not None and not 0 <= head < cap.num_heads:
    raise cli.UserError(f"--head={head}: layer {cap.name} has {cap.num_heads} heads "
                           f"(0..{cap.num_heads - 1}, or -1 for their mean)")
  print(f"layer {cap.name}: {cap.describe()}, token grid {cap.grid}, {cap.num_heads} heads "
        f"(captured: {', '.join(caps)})")
  image = raw if kind == "image" else None
  q = figures.query_index(cap, query)
  paths = []
  if kind == "video":
    t_frame = min(len(raw) - 1, int(round((q[0] + 0.5) * len(raw) / cap.grid[0] - 0.5)))
    image = raw[t_frame]
  if cap.d > 0:
    paths.append(figures.fig_pattern_detectors(cap, q, os.path.join(out, "fig2_pattern_detectors.png"),
                                           image=image, head=head))
  else:
    print(f"{cap.name} is SA (D = 0): no pattern detectors, Fig. 2 skipped")
  caps4 = {}  # the paper's order: the compared models (SA, ConvSA) first, this model last
  for other in compare:
    p = open_model(other, kind, main.input_spec["image_size"],
                   main.input_spec.get("num_frames") or None, seed)
    if p.input_spec["kind"] != kind:
      raise ValueError(f"--compare model {other} takes {p.input_spec['kind']}s, {model} {kind}s")
    _, oc = figures.capture(p.model, p.variables, x)
    caps4[_label(other)] = figures.pick_layer(oc, layer or cap.name)
  caps4[_label(model)] = cap
  paths.append(figures.fig_attention_comparison(caps4, q, os.path.join(out, "fig4_attention_maps.png"),
                                            image=image, head=head))
  if kind == "video" and cap.d > 0:
    paths.append(figures.fig_dynamic_kernels_over_time(
        cap, q[1:], os.path.join(out, "fig3_dynamic_kernels_over_time.png"), clip=raw, head=head))
  for p in paths:
    print(f"wrote {p}")
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every read at INFO
  from structvit_jax import inference
  try:
    query = [int(v) for v in FLAGS.query] if FLAGS.query else None
  except ValueError:
    raise cli.UserError(f"--query={','.join(FLAGS.query)}: expected integer token "
                           "coordinates, e.g. --query=3,4 (row, col) or 1,3,4 (t, row, col)"
                           ) from None
  try:
    run(FLAGS.model, FLAGS.input, FLAGS.out, FLAGS.compare, FLAGS.layer, query,
        None if FLAGS.head < 0 else FLAGS.head, FLAGS.image_size, FLAGS.frames, FLAGS.seed)
  except inference.InputError as e:  # a file that cannot be read: not a usage error
    raise cli.RunError(str(e)) from e


if __name__ == "__main__":
  _define_flags()
  cli.quiet_library_logs()
  cli.run(main, workdir_flag=None)
