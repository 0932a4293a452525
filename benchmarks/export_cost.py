"""Time and size of an export with its serving artefacts (inference.save_export: Orbax params,
model.json, model.stablehlo, model.onnx with --onnx, the model card), for a preset with random
weights of its shapes (the sizes of a trained model's; the time of everything but reading the
checkpoint). Prints one JSON object.

  python benchmarks/export_cost.py --model=structvit_s_4_1 --onnx
  python benchmarks/export_cost.py --model=structvit_s_4_1 --frames=16 --num_classes=400
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", required=True)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--frames", type=int, default=0, help="clip length; 0 = images")
  ap.add_argument("--num_classes", type=int, default=1000)
  ap.add_argument("--onnx", action="store_true")
  ap.add_argument("--out", default="", help="export directory (default: a temporary one)")
  a = ap.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from structvit_jax import inference, serving_export
  from structvit_jax.data.preprocessing import default_spec
  from structvit_jax.models import get_model

  kind = "video" if a.frames else "image"
  spec = default_spec(kind, a.size, a.frames)
  kw = {"num_classes": a.num_classes} | ({"num_frames": a.frames} if "timesformer" in a.model
                                         else {})
  model = get_model(a.model, **kw)
  shape = serving_export.input_shape(spec)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, *shape)), train=False))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(  # BatchNorm variances positive
      lambda p, s: (rng.normal(0, 0.02, s.shape) + ("var" in jax.tree_util.keystr(p))
                    ).astype(s.dtype), abstract)
  timings = {}
  for name in ("write_stablehlo", "write_onnx", "model_stats"):
    original = getattr(serving_export, name)

    def timed(*args, _original=original, _name=name, **kwargs):
      start = time.perf_counter()
      try:
        return _original(*args, **kwargs)
      finally:
        timings[_name] = round(time.perf_counter() - start, 2)

    setattr(serving_export, name, timed)
  with tempfile.TemporaryDirectory() as tmp:
    out = a.out or os.path.join(tmp, "export")
    start = time.perf_counter()
    meta = inference.save_export(out, a.model, kw, variables, spec, stablehlo=True,
                                 onnx=a.onnx)
    total = time.perf_counter() - start
    sizes = {}
    for d, _, files in os.walk(out):
      for f in files:
        top = os.path.relpath(os.path.join(d, f), out).split(os.sep)[0]
        sizes[top] = sizes.get(top, 0) + os.path.getsize(os.path.join(d, f))
  print(json.dumps({"model": a.model, "input": ["N", *shape], "jax": jax.__version__,
                    "backend": jax.default_backend(), "total_s": round(total, 2),
                    "seconds": timings, "bytes": sizes,
                    "onnx_check_max_abs_diff": meta.get("serving", {}).get("onnx", {}).get(
                        "onnxruntime_max_abs_diff")}, indent=1))


if __name__ == "__main__":
  main()
