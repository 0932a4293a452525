"""Top-5 classes of image or video files with an exported model:

  python -m structvit_jax.predict --model=EXPORT [--views=eval|single|CxK]
                                  [--backend=flax|stablehlo] FILE...

A video is scored as evaluation scores it: the softmax averaged over the export's test views
(clips x crops; --views=single: the centre clip and crop only). Prints, per file, `FILE` and
then `  prob  class` lines, best first. A file that cannot be read (missing, corrupt, wrong
kind) gets one `error: FILE: why` line on stderr; the others are still predicted, and the
exit status is 1.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging

from structvit_jax import cli

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("model", None, "Export directory (python -m structvit_jax.export / "
                      "structvit_jax.convert).")
  flags.DEFINE_integer("k", 5, "Classes to print per file.", lower_bound=1)
  flags.DEFINE_integer("batch_size", 32, "Images / clips per forward pass (each view of a "
                       "video is one clip).", lower_bound=1)
  flags.DEFINE_string("views", "eval", "Video test views: 'eval' (the export's clips x "
                      "crops, as evaluation), 'single' (centre clip and crop) or e.g. '4x3'.")
  flags.DEFINE_enum("backend", "flax", ["flax", "stablehlo"], "What runs the model: 'flax' "
                    "(the export's Orbax params with this package's model code) or 'stablehlo' "
                    "(its model.stablehlo, jax.export; same preprocessing).")
  flags.mark_flags_as_required(["model"])


def run(model: str, files: list[str], k: int = 5, batch_size: int = 32,
        views: str = "eval", backend: str = "flax") -> int:
  """Prints the predictions; returns the exit status (1 if any file failed)."""
  import numpy as np
  from structvit_jax import inference
  if k < 1 or batch_size < 1:
    raise cli.UserError(f"--k={k} --batch_size={batch_size}: both must be >= 1")
  try:
    predictor = (inference.load(model) if backend == "flax" else
                 inference.load(model, backend=backend))
  except (FileNotFoundError, ValueError) as e:
    raise cli.UserError(f"cannot load model {model!r}: {e}") from None
  try:
    clips, crops = predictor.view_grid(views)
  except ValueError as e:
    raise cli.UserError(f"--views: {e}") from None
  per_pass = max(1, batch_size // (clips * crops))  # files whose views fill a batch
  failed = 0
  for start in range(0, len(files), per_pass):
    names, inputs = [], []
    for f in files[start:start + per_pass]:
      try:
        inputs.append(predictor.preprocess_views(f, views))
        names.append(f)
      except inference.InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        failed += 1
    if not inputs:
      continue
    probs = predictor.mean_probs(
        predictor.logits_batched(np.concatenate(inputs), batch_size), len(inputs))
    for name, top in zip(names, predictor.top_k_of(probs, k)):
      print(name)
      for cls, p in top:
        print(f"  {p:.4f}  {cls}")
    sys.stdout.flush()
  if failed:
    print(f"{failed} of {len(files)} file(s) could not be read", file=sys.stderr)
  return 1 if failed else 0


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("usage: python -m structvit_jax.predict --model=EXPORT FILE...")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every read at INFO
  sys.exit(run(FLAGS.model, argv[1:], FLAGS.k, FLAGS.batch_size, FLAGS.views, FLAGS.backend))


if __name__ == "__main__":
  _define_flags()
  cli.quiet_library_logs()
  cli.run(main, workdir_flag=None)
