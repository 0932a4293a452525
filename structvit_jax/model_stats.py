"""Parameters and GFLOPs (multiply-adds, as the paper counts) of a model preset.

  python -m structvit_jax.model_stats --model=structvit_s_4_1
  python -m structvit_jax.model_stats --model=structvit_s_4_1 --frames=16 --num_classes=400
  python -m structvit_jax.model_stats --model=deit_s --json \
      --set "structsa={'d': 4, 'aggregation': 'element'}"

Nothing is allocated: parameters come from `jax.eval_shape`, MACs from the jaxpr
(structvit_jax/flops.py). Video FLOPs are per view (multiply by clips x crops).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from structvit_jax import flops
from structvit_jax.cli import parse_overrides
from structvit_jax.models import get_model, list_models

_MODEL = flags.DEFINE_string("model", None, f"preset: {', '.join(list_models())}")
_FRAMES = flags.DEFINE_integer("frames", 0, "clip length; 0 = image input")
_SIZE = flags.DEFINE_integer("size", 224, "input height = width")
_CLASSES = flags.DEFINE_integer("num_classes", 1000, "classifier outputs")
_SET = flags.DEFINE_multi_string("set", [], "FIELD=VALUE override passed to get_model")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object per line")


def model_stats(name: str, frames: int = 0, size: int = 224, num_classes: int = 1000,
                **overrides) -> dict:
  """{'model', 'input', 'params', 'gflops'} for preset `name` with overrides."""
  model = get_model(name, num_classes=num_classes, **overrides)
  shape = (frames, size, size, 3) if frames else (size, size, 3)
  import jax
  import jax.numpy as jnp
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))
  macs = flops.count_model_macs(model, shape, variables=variables)
  return dict(model=name, input="x".join(map(str, shape[:-1])), overrides=overrides,
              params=flops.count_params(variables["params"]), gflops=round(macs["total"] / 1e9, 3))


def main(argv):
  del argv
  if not _MODEL.value:
    raise app.UsageError(f"--model is required; one of: {', '.join(list_models())}")
  try:
    stats = model_stats(_MODEL.value, _FRAMES.value, _SIZE.value, _CLASSES.value,
                        **parse_overrides(_SET.value))
  except ValueError as e:
    print(f"model_stats: {e}", file=sys.stderr)
    sys.exit(2)
  if _JSON.value:
    print(json.dumps(stats))
  else:
    extra = " ".join(f"{k}={v}" for k, v in stats["overrides"].items())
    print(f"{stats['model']:<18} {extra:<24} input {stats['input']:<12} "
          f"params {stats['params'] / 1e6:8.2f} M   GFLOPs {stats['gflops']:8.2f}")


if __name__ == "__main__":
  app.run(main)
