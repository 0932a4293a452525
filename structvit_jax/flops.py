"""Multiply-add counts as the paper reports FLOPs (fvcore convention; docs/flops.md).

Walks the jaxpr of a function (from abstract shapes: nothing is compiled) and counts one MAC
per multiply-add of every `dot_general` and `conv_general_dilated`; what is and is not
counted, and why depthwise convolutions are counted in their convolution form: docs/flops.md.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core as jex_core


def _prod(xs) -> int:
  return int(np.prod(xs)) if len(xs) else 1


def _dot_general_macs(eqn) -> int:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  contract = _prod([lhs[d] for d in lc])
  batch = _prod([lhs[d] for d in lb])
  lhs_free = _prod([s for d, s in enumerate(lhs) if d not in lc and d not in lb])
  rhs_free = _prod([s for d, s in enumerate(rhs) if d not in rc and d not in rb])
  return batch * lhs_free * rhs_free * contract


def _conv_macs(eqn) -> int:
  dn = eqn.params["dimension_numbers"]
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  # rhs spec: (out_feature_dim, in_feature_dim, *spatial)
  in_per_group = rhs[dn.rhs_spec[1]]
  window = _prod([rhs[d] for d in dn.rhs_spec[2:]])
  return _prod(out) * in_per_group * window


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    items = v if isinstance(v, (list, tuple)) else [v]
    for it in items:
      if isinstance(it, jex_core.ClosedJaxpr):
        yield it.jaxpr
      elif isinstance(it, jex_core.Jaxpr):
        yield it


def _walk(jaxpr, counts: collections.Counter, mult: int) -> None:
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      counts["matmul"] += mult * _dot_general_macs(eqn)
    elif name == "conv_general_dilated":
      counts["conv"] += mult * _conv_macs(eqn)
    sub_mult = mult * (eqn.params.get("length", 1) if name == "scan" else 1)
    if name == "cond":  # count the most expensive branch
      best = collections.Counter()
      for br in eqn.params["branches"]:
        c = collections.Counter()
        _walk(br.jaxpr, c, sub_mult)
        if sum(c.values()) > sum(best.values()):
          best = c
      counts.update(best)
      continue
    for sub in _sub_jaxprs(eqn):
      _walk(sub, counts, sub_mult)


def count_macs(fn: Callable, *args: Any, **kwargs: Any) -> dict[str, int]:
  """MACs of fn(*args) by kind ('matmul', 'conv') and 'total'. Args may be ShapeDtypeStructs."""
  jaxpr = jax.make_jaxpr(fn)(*args, **kwargs)
  counts: collections.Counter = collections.Counter()
  _walk(jaxpr.jaxpr, counts, 1)
  out = dict(counts)
  out["total"] = sum(counts.values())
  return out


def count_model_macs(model, input_shape, batch_size: int = 1,
                     variables: Any = None) -> dict[str, int]:
  """Forward (eval-mode) MACs of a flax model for one batch of `input_shape` examples.
  `variables` (arrays or their shapes), where the caller has them, spare tracing the init.

  Depthwise convolutions are traced in their conv form (docs/flops.md)."""
  import jax.numpy as jnp
  if hasattr(model, "structsa"):
    model = model.clone(structsa=model.structsa.replace(depthwise_impl="xla"))
  x = jax.ShapeDtypeStruct((batch_size, *input_shape), jnp.float32)
  if variables is None:
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                  jnp.zeros(x.shape, x.dtype)))
  return count_macs(lambda v, x: model.apply(v, x, train=False), variables, x)


def count_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
