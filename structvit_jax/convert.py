"""Official PyTorch checkpoint -> structvit_jax export (model.json + Orbax params/, the
serving artefact model.stablehlo unless --no_stablehlo, model.onnx with --onnx, and the
model card README.md: the layout of python -m structvit_jax.export).

  python -m structvit_jax.convert --src=uniformer_small_in1k.pth --model=uniformer_s --out=EXPORT
  python -m structvit_jax.convert --src=uniformer_small_in1k.pth --model=structvit_s_4_1 --out=EXPORT
  (more examples: README.md, "Pretrained weights")

Key mapping and layouts: structvit_jax/weights.py and the model families' rules
(models/*_weights.py; docs/official_weights.md). Every checkpoint key must map and every
model leaf be filled, else the error lists them. --set / --num_classes override what the
checkpoint implies (checkpoint_kwargs); another class count re-initialises the head.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from structvit_jax import cli, weights
from structvit_jax.data.preprocessing import default_spec
from structvit_jax.models import TimeSformer, get_model


def checkpoint_kwargs(model: str, sd: Mapping[str, np.ndarray], overrides: Mapping[str, Any]
                      ) -> dict[str, Any]:
  """get_model fields the checkpoint implies: its class count and what its family reads off
  it (weights.Family.infer_kwargs, e.g. TimeSformer's attention_type and num_frames)."""
  from structvit_jax.models import PRESETS
  cls, preset = PRESETS[model]
  kw = {k: v for f in weights.families() if f.infer_kwargs and issubclass(cls, f.models)
        for k, v in f.infer_kwargs(sd, {**preset, **overrides}).items()}
  return kw | ({"num_classes": int(sd["head.weight"].shape[0])} if "head.weight" in sd else {})


def input_spec(model: Any, sd: Mapping[str, np.ndarray], image_size: int, num_frames: int
               ) -> dict[str, Any]:
  """Eval input of the converted model: TimeSformer and UniFormer video (5-D patch embed)
  take clips, the rest images; preprocessing defaults from data/preprocessing.py."""
  if isinstance(model, TimeSformer):
    return default_spec("video", model.img_size, model.num_frames)
  if np.ndim(sd.get("patch_embed1.proj.weight", np.zeros((1,) * 4))) == 5:
    return default_spec("video", image_size, num_frames)
  return default_spec("image", image_size)


def convert_state_dict(sd: Mapping[str, np.ndarray], model_name: str,
                       overrides: dict[str, Any] | None = None, num_classes: int | None = None,
                       image_size: int = 224, num_frames: int = 16, seed: int = 0
                       ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """Returns (get_model kwargs, variables {'params', 'batch_stats'}, input spec)."""
  sd = weights.unwrap(sd)  # idempotent: wrappers and the 'model.' prefix
  overrides = dict(overrides or {}, **({} if num_classes is None else {"num_classes": num_classes}))
  ckpt = checkpoint_kwargs(model_name, sd, overrides)
  kw = {**ckpt, **overrides}  # --set fields and --num_classes over the checkpoint's
  model = get_model(model_name, **kw)
  spec = input_spec(model, sd, image_size, num_frames)
  shape = ((1, spec["num_frames"]) if spec["kind"] == "video" else (1,)) + \
          (spec["image_size"], spec["image_size"], 3)
  init = lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros(shape, jnp.float32))
  abstract = jax.eval_shape(init)
  drop = "num_classes" in ckpt and kw["num_classes"] != ckpt["num_classes"]
  variables = weights.fit(weights.from_torch(sd, abstract), abstract, init, drop_head=drop)
  return kw, variables, spec


def _origin(src: str) -> dict[str, Any]:
  """The model card's origin of a converted checkpoint: its path and sha256."""
  import hashlib
  import os
  from structvit_jax import paths
  if paths.is_remote(src):
    return {"converted_from": src}
  digest = hashlib.sha256()
  with open(src, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return {"converted_from": os.path.abspath(src), "sha256": digest.hexdigest()}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m structvit_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--src", required=True, help="official .pth / .pyth checkpoint")
  p.add_argument("--model", required=True, help="preset (structvit_jax.models.list_models())")
  p.add_argument("--out", required=True, help="export directory to write")
  p.add_argument("--set", action="append", default=[], metavar="K=V",
                 help="get_model field override, e.g. head_dim=32 (repeatable)")
  p.add_argument("--num_classes", type=int, default=None,
                 help="default: the checkpoint's; another value re-initialises the head")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--num_frames", type=int, default=16, help="UniFormer video clips")
  p.add_argument("--class_names", default="", help="text file, one class name per line")
  p.add_argument("--no_stablehlo", action="store_true",
                 help="skip model.stablehlo (the jax.export serving artefact)")
  p.add_argument("--onnx", action="store_true", help="also write model.onnx (jax2onnx, "
                 "checked with onnxruntime; pip install 'structvit_jax[onnx]')")
  args = p.parse_args(argv)
  try:
    sd = weights.load_torch_file(args.src)
    kw, variables, spec = convert_state_dict(sd, args.model, cli.parse_overrides(args.set),
                                             args.num_classes, args.image_size, args.num_frames)
    names = None
    if args.class_names:
      with open(args.class_names) as f:
        names = [line.strip() for line in f if line.strip()]
    from structvit_jax.inference import save_export
    from structvit_jax.serving_export import ServingExportError
    save_export(args.out, args.model, kw, variables, spec, class_names=names,
                source=f"converted from {args.src}", stablehlo=not args.no_stablehlo,
                onnx=args.onnx, provenance=_origin(args.src))
  except (ImportError, ValueError, FileNotFoundError, ServingExportError) as e:
    print(f"convert: error: {e}", file=sys.stderr)
    return 1
  n = sum(int(np.size(v)) for v in jax.tree.leaves(variables["params"]))
  print(f"wrote {args.out}: {args.model} {kw}, {n:,} params, input {spec['kind']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
