"""The paper's figures for any StructSA model and input (matplotlib, PNG out).

Everything drawn is what the model computed: `capture` runs it once and collects the joint
attention A_i[j, d] every StructSA layer sows, combined here with the layer's own U^V
(docs/structsa.md, "Reading the attention back").

  Fig. 2  fig_pattern_detectors: for a query i, the D maps A_i[:, d], the D context
          aggregators U^V_d and the dynamic kernels kappa_ij at chosen key sites j.
  Fig. 4  fig_attention_comparison: the final attention map W_i of each model side by side.
  Fig. 3  fig_dynamic_kernels_over_time: for a video query, kappa_ii (i = j) in every frame.

Maps are shown per head (`head=k`) or averaged over heads (`head=None`); kernels and
W average the head's channels. Grid coordinates are token coordinates of the chosen layer
((row, col) for images, (t, row, col) for clips); `query=None` is the centre token.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from structvit_jax.models.structsa import aggregated_weights

Query = Sequence[int] | None


@dataclasses.dataclass
class Capture:
  """One StructSA layer's attention for one example, with the layer's kernels.

  attn: [heads, *grid, *key_grid, D] (D = 1 for SA); attn_extra: [heads, *grid, E, D] or
  None; u_k / u_v: [*M, D, C] or None (SA); strides: per grid axis.
  """
  name: str
  attn: np.ndarray
  attn_extra: np.ndarray | None
  u_k: np.ndarray | None
  u_v: np.ndarray | None
  strides: tuple[int, ...]

  @property
  def num_heads(self) -> int:
    return self.attn.shape[0]

  @property
  def rank(self) -> int:
    return (self.attn.ndim - 2) // 2

  @property
  def grid(self) -> tuple[int, ...]:
    return self.attn.shape[1:1 + self.rank]

  @property
  def key_grid(self) -> tuple[int, ...]:
    return self.attn.shape[1 + self.rank:-1]

  @property
  def d(self) -> int:
    """Structure dimension D; 0 for SA."""
    return 0 if self.u_v is None else self.attn.shape[-1]

  @property
  def channels(self) -> int:
    return self.u_v.shape[-1] if self.u_v is not None else 0

  def describe(self) -> str:
    if self.d == 0:
      return "SA"
    window = "x".join(map(str, self.u_k.shape[:self.rank]))
    agg = "element" if all(m == 1 for m in self.u_v.shape[:self.rank]) else "context"
    kind = "ConvSA" if self.d == 1 and agg == "context" else "StructSA"
    return f"{kind} D={self.d} M={window} S={max(self.strides)}"


# ----------------------------------------------------------------------------- capture


def capture(model: Any, variables: Mapping[str, Any], x: Any, index: int = 0,
            apply_kwargs: Mapping[str, Any] | None = None
            ) -> tuple[np.ndarray, dict[str, Capture]]:
  """Runs `model` (eval mode) on the batch x and returns (outputs, captures): for every
  StructSA layer, by path ("blocks3_0/attn"), the attention of example `index`.
  apply_kwargs: extra arguments of model.apply (default {"train": False}; {} for a bare
  StructSA layer). Costs one forward with explicit attention weights; memory grows with
  N^2 * D per layer."""
  kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)

  def run(v, x):
    return model.apply(v, x, mutable=["intermediates"], **kwargs)

  logits, state = jax.jit(run)(variables, jnp.asarray(x))
  sown = jax.device_get(state.get("intermediates", {}))
  params = variables["params"]
  caps: dict[str, Capture] = {}

  def walk(tree, path):
    for key, val in tree.items():
      if key == "attention" and isinstance(val, tuple):
        out = val[-1]
        layer = params
        for p in path:
          layer = layer[p]
        name = "/".join(path) or "structsa"
        extra = out.get("attn_extra")
        caps[name] = Capture(
            name=name, attn=np.asarray(out["attn_grid"][index], np.float32),
            attn_extra=None if extra is None else np.asarray(extra[index], np.float32),
            u_k=_np_or_none(layer.get("u_k")), u_v=_np_or_none(layer.get("u_v")),
            strides=tuple(int(s) for s in out["strides"]))
      elif isinstance(val, Mapping):
        walk(val, path + (key,))

  walk(sown, ())
  if not caps:
    raise ValueError(f"{type(model).__name__} has no StructSA layers to capture (UniFormer, "
                     "StructViT and DeiT have them; TimeSformer does not)")
  # blocks3_10 after blocks3_9: numeric parts compare as numbers.
  order = lambda kv: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", kv[0])]
  return jax.device_get(logits), dict(sorted(caps.items(), key=order))


def _np_or_none(a):
  return None if a is None else np.asarray(jax.device_get(a), np.float32)


def default_layer(caps: Mapping[str, Capture]) -> str:
  """The last layer among those with the largest token grid (stage 3 of UniFormer)."""
  best = max(int(np.prod(c.grid)) for c in caps.values())
  return [n for n, c in caps.items() if int(np.prod(c.grid)) == best][-1]


def pick_layer(caps: Mapping[str, Capture], layer: str | None) -> Capture:
  if layer is None:
    return caps[default_layer(caps)]
  if layer in caps:
    return caps[layer]
  hits = [n for n in caps if n.startswith(layer + "/") or n.startswith(layer)]
  if len(hits) == 1:
    return caps[hits[0]]
  raise ValueError(f"layer {layer!r} {'is ambiguous' if hits else 'not found'}; "
                   f"captured layers: {list(caps)}")


# ----------------------------------------------------------------------------- the numbers


def query_index(cap: Capture, query: Query = None) -> tuple[int, ...]:
  """Validated token coordinates of a query (default: the centre token)."""
  if query is None:
    return tuple(g // 2 for g in cap.grid)
  query = tuple(int(q) for q in query)
  if len(query) != cap.rank or any(not 0 <= q < g for q, g in zip(query, cap.grid)):
    raise ValueError(f"query {query} is not a token of layer {cap.name}'s grid {cap.grid} "
                     f"(0-based {'(t, row, col)' if cap.rank == 3 else '(row, col)'})")
  return query


def _head_slice(cap: Capture, head: int | None) -> slice:
  if head is None:
    return slice(None)
  if not 0 <= head < cap.num_heads:
    raise ValueError(f"head {head} out of range: layer {cap.name} has {cap.num_heads} heads")
  hd = cap.channels // cap.num_heads
  return slice(head * hd, (head + 1) * hd)


def _heads(a: np.ndarray, head: int | None) -> np.ndarray:
  return a.mean(0) if head is None else a[head]


def pattern_maps(cap: Capture, query: Query = None, head: int | None = 0) -> np.ndarray:
  """A_i[:, d] over the key grid: [D, *key_grid] (D = 1 for SA)."""
  a = _heads(cap.attn[(slice(None), *query_index(cap, query))], head)   # [*key_grid, D]
  return np.moveaxis(a, -1, 0)


def context_aggregators(cap: Capture, head: int | None = 0) -> np.ndarray:
  """U^V_d averaged over the head's channels: [D, *Mv]."""
  if cap.u_v is None:
    raise ValueError(f"layer {cap.name} is SA (D = 0): it has no context aggregators")
  u = cap.u_v[..., _head_slice(cap, head)].mean(-1)                      # [*Mv, D]
  return np.moveaxis(u, -1, 0)


def dynamic_kernels(cap: Capture, query: Query = None, head: int | None = 0) -> np.ndarray:
  """kappa_ij = sum_d A_i[j, d] U^V_d for every key site j, per channel of the head:
  [*key_grid, *Mv, channels]."""
  if cap.u_v is None:
    raise ValueError(f"layer {cap.name} is SA (D = 0): its kernels are single taps A_i[j]")
  _head_slice(cap, head)  # validates head
  heads = range(cap.num_heads) if head is None else [head]
  hd = cap.channels // cap.num_heads
  i = query_index(cap, query)
  parts = []
  for h in heads:  # each head's channels combine that head's attention
    a = cap.attn[(h, *i)]                                               # [*key_grid, D]
    u = cap.u_v[..., h * hd:(h + 1) * hd]                                 # [*Mv, D, hd]
    parts.append(np.einsum("...d,mdc->...mc", a, u.reshape(-1, *u.shape[-2:]))
                 .reshape(*a.shape[:-1], *u.shape[:-2], hd))
  return np.concatenate(parts, axis=-1)


def final_attention(cap: Capture, query: Query = None, head: int | None = None) -> np.ndarray:
  """W_i over the value grid [*grid]: the weight each value site receives from query i,
  averaged over the head's channels (head=None: all channels). For SA this is A_i."""
  i = query_index(cap, query)
  if cap.u_v is None:
    return _heads(cap.attn[(slice(None), *i)], head)[..., 0]
  return aggregated_weights_of(cap, i)[..., _head_slice(cap, head)].mean(-1)


def aggregated_weights_of(cap: Capture, query: Query = None) -> np.ndarray:
  """W_i per channel [*grid, C] (StructSA / ConvSA layers): y_i = sum_j' W_i[j'] * v_j'
  (plus the extra tokens' share), computed by the function the reference path uses."""
  if cap.u_v is None:
    raise ValueError(f"layer {cap.name} is SA (D = 0): its weights are the attention A_i")
  i = query_index(cap, query)
  a = np.moveaxis(cap.attn[(slice(None), *i)], 0, -2)                  # [*key_grid, heads, D]
  w = aggregated_weights(jnp.asarray(a)[None], jnp.asarray(cap.u_v), cap.grid, cap.strides)
  return np.asarray(w[0])


def key_site(cap: Capture, query: Query) -> tuple[int, ...]:
  """The key site j whose window is centred on query i (i = j for stride 1)."""
  return tuple(q // s for q, s in zip(query_index(cap, query), cap.strides))


# ----------------------------------------------------------------------------- drawing


def _figure(rows: int, cols: int, figsize, **kw):
  # The object API, not pyplot: no global backend switch (notebooks keep inline plots) and
  # no figure registry to leak.
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize)
  return fig, fig.subplots(rows, cols, squeeze=False, **kw)


def _display(img: np.ndarray | None) -> np.ndarray | None:
  """uint8 or float image -> float RGB in [0, 1] for imshow (min-max if outside [0, 1])."""
  if img is None:
    return None
  img = np.asarray(img)
  if img.dtype == np.uint8:
    return img.astype(np.float32) / 255.0
  img = img.astype(np.float32)
  lo, hi = float(img.min()), float(img.max())
  if lo < 0 or hi > 1:
    img = (img - lo) / max(hi - lo, 1e-6)
  return img


def _mark(ax, pos: tuple[int, int], grid: tuple[int, int], extent: tuple[float, float] | None):
  h, w = extent if extent is not None else grid
  y = (pos[0] + 0.5) * h / grid[0] - (0 if extent else 0.5)
  x = (pos[1] + 0.5) * w / grid[1] - (0 if extent else 0.5)
  ax.plot([x], [y], marker="+", color="red", markersize=14, markeredgewidth=2.5)
  ax.plot([x], [y], marker="o", color="red", markersize=6, fillstyle="none")


def _map_panel(ax, m: np.ndarray | None, image: np.ndarray | None, title: str, query2d=None,
               grid2d=None, vmax=None):
  """A 2-D map over the token grid, over the image if given (nearest upsampling)."""
  extent = None
  if image is not None:
    h, w = extent = image.shape[:2]
    ax.imshow(image, extent=(0, w, h, 0))
    if m is not None:
      ax.imshow(m, cmap="inferno", alpha=0.6, extent=(0, w, h, 0), interpolation="nearest",
                vmin=0, vmax=vmax)
  else:
    ax.imshow(m, cmap="inferno", interpolation="nearest", vmin=0, vmax=vmax)
  if query2d is not None:
    _mark(ax, query2d, grid2d, extent)
  ax.set_title(title, fontsize=9)
  ax.set(xticks=[], yticks=[])


def _kernel_image(k: np.ndarray) -> np.ndarray:
  """A kernel [Mh, Mw] or [Mt, Mh, Mw] as one 2-D image (temporal taps side by side, NaN gaps)."""
  if k.ndim == 1:
    return k[None]
  if k.ndim == 2:
    return k
  taps = []
  for t in range(k.shape[0]):
    taps.append(k[t])
    if t + 1 < k.shape[0]:
      taps.append(np.full((k.shape[1], 1), np.nan))
  return np.concatenate(taps, axis=1)


def _kernel_panel(ax, k: np.ndarray, title: str, vlim: float):
  ax.imshow(_kernel_image(k), cmap="RdBu_r", vmin=-vlim, vmax=vlim, interpolation="nearest")
  ax.set_title(title, fontsize=9)
  ax.set(xticks=[], yticks=[])


def _frame_slice(cap: Capture, m: np.ndarray, t: int) -> np.ndarray:
  # A map over a (t, h, w) grid -> the 2-D map of frame t; 1-D grids -> a 1 x N strip.
  if m.ndim == 3:
    return m[t]
  return m[None] if m.ndim == 1 else m


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  return path


def _query2d(cap: Capture, q: tuple[int, ...]):
  return (q[-2], q[-1]) if cap.rank >= 2 else (0, q[0])


def _grid2d(grid: Sequence[int]) -> tuple[int, int]:
  return (grid[-2], grid[-1]) if len(grid) >= 2 else (1, grid[0])


def top_keys(cap: Capture, query: Query = None, k: int = 3, head: int | None = 0
             ) -> list[tuple[int, ...]]:
  """The k key sites with the largest total attention sum_d A_i[j, d]."""
  total = pattern_maps(cap, query, head).sum(0)
  order = np.argsort(-total, axis=None, kind="stable")[:k]
  return [tuple(int(v) for v in np.unravel_index(o, total.shape)) for o in order]


def fig_pattern_detectors(cap: Capture, query: Query, path: str, image: np.ndarray | None = None,
                          keys: Sequence[Sequence[int]] | None = None, head: int | None = 0
                          ) -> str:
  """Fig. 2: row 1 the D pattern-detector attention maps A_i[:, d] of query i (over the
  image if given; for clips, the query's frame), row 2 the D context aggregators U^V_d,
  row 3 the dynamic kernels kappa_ij at key sites `keys` (default: the 3 most attended)."""
  if cap.d == 0:
    raise ValueError(f"layer {cap.name} is SA (D = 0): it has no pattern detectors; "
                     "pick a StructSA model")
  q = query_index(cap, query)
  maps = pattern_maps(cap, q, head)                                      # [D, *key_grid]
  aggs = context_aggregators(cap, head)                                  # [D, *Mv]
  keys = [tuple(k) for k in keys] if keys is not None else top_keys(cap, q, 3, head)
  kernels = dynamic_kernels(cap, q, head).mean(-1)                       # [*key_grid, *Mv]
  t = q[0] if cap.rank == 3 else 0
  image = _display(image)
  cols = max(cap.d, len(keys)) + 1
  fig, axes = _figure(3, cols, (2.2 * cols, 7.0))
  for ax in axes.ravel():
    ax.axis("off")
  who = "mean over heads" if head is None else f"head {head}"
  if image is not None:
    axes[0, 0].axis("on")
    _map_panel(axes[0, 0], None, image, "input, query i",
               _query2d(cap, q), _grid2d(cap.grid), vmax=1)
  vmax = float(maps.max())
  for d in range(cap.d):
    axes[0, d + 1].axis("on")
    _map_panel(axes[0, d + 1], _frame_slice(cap, maps[d], t), image,
               f"A_i[:, d={d + 1}]  ({maps[d].sum():.2f})", _query2d(cap, key_site(cap, q)),
               _grid2d(cap.key_grid), vmax=vmax)
  vlim = float(np.abs(aggs).max()) or 1.0
  for d in range(cap.d):
    axes[1, d + 1].axis("on")
    _kernel_panel(axes[1, d + 1], aggs[d], f"U^V_{d + 1}", vlim)
  axes[1, 0].text(0.5, 0.5, f"context\naggregators\n{who}", ha="center", va="center")
  axes[2, 0].text(0.5, 0.5, "dynamic kernels\nkappa_ij =\nsum_d A_i[j,d] U^V_d", ha="center",
                  va="center")
  klim = max(float(np.abs(kernels[k]).max()) for k in keys) or 1.0
  total = maps.sum(0)
  for n, k in enumerate(keys):
    axes[2, n + 1].axis("on")
    _kernel_panel(axes[2, n + 1], kernels[k], f"j={k} A={total[k]:.2f}", klim)
  fig.suptitle(f"Fig. 2  {cap.name} ({cap.describe()}), query i={q}, {who}")
  return _save(fig, path)


def fig_attention_comparison(caps: Mapping[str, Capture], query: Query, path: str,
                             image: np.ndarray | None = None, head: int | None = None) -> str:
  """Fig. 4: the final attention map W_i of each model (e.g. SA, ConvSA, StructSA) for the
  same query, side by side, over the image if given (clips: the query's frame)."""
  if not caps:
    raise ValueError("fig_attention_comparison needs at least one capture")
  grids = {c.grid for c in caps.values()}
  if len(grids) != 1:
    raise ValueError(f"captures have different token grids {sorted(grids)}: compare layers of "
                     "the same stage at the same input size")
  image = _display(image)
  n = len(caps) + (image is not None)
  fig, axes = _figure(1, n, (2.8 * n, 3.2))
  first = next(iter(caps.values()))
  q = query_index(first, query)
  g2 = _grid2d(first.grid)
  col = 0
  if image is not None:
    _map_panel(axes[0, 0], None, image, "input, query i", _query2d(first, q), g2)
    col = 1
  for label, cap in caps.items():
    w = final_attention(cap, q, head)
    t = q[0] if cap.rank == 3 else 0
    _map_panel(axes[0, col], _frame_slice(cap, w, t), image,
               f"{label}\n{cap.describe()}", _query2d(cap, q), g2)
    col += 1
  who = "mean over heads" if head is None else f"head {head}"
  fig.suptitle(f"Fig. 4  final attention maps W_i, query i={q}, {who}", fontsize=10)
  return _save(fig, path)


def fig_dynamic_kernels_over_time(cap: Capture, query_hw: Sequence[int] | None, path: str,
                                  clip: np.ndarray | None = None, head: int | None = 0) -> str:
  """Fig. 3: for the query at token (row, col) in every frame t, its own dynamic kernel
  kappa_ii (i = j) over the M_t x M_h x M_w window (temporal taps side by side), one panel
  per frame, on a shared colour scale; the clip's frames above if given."""
  if cap.rank != 3:
    raise ValueError(f"layer {cap.name} has a {cap.rank}-D token grid; Fig. 3 needs a video model")
  if cap.d == 0:
    raise ValueError(f"layer {cap.name} is SA (D = 0): it has no dynamic kernels")
  tg = cap.grid[0]
  hw = tuple(query_hw) if query_hw is not None else (cap.grid[1] // 2, cap.grid[2] // 2)
  kernels = []
  for t in range(tg):
    q = query_index(cap, (t, *hw))
    kernels.append(dynamic_kernels(cap, q, head).mean(-1)[key_site(cap, q)])
  vlim = max(float(np.abs(k).max()) for k in kernels) or 1.0
  rows = 2 if clip is not None else 1
  ratio = [1.0, 0.5] if clip is not None else [1.0]
  fig, axes = _figure(rows, tg, (2.4 * tg, 1.3 + 2.2 * (rows - 1)),
                      gridspec_kw={"height_ratios": ratio})
  if clip is not None:
    frames = _display(np.asarray(clip))
    for t in range(tg):
      f = min(len(frames) - 1, int(round((t + 0.5) * len(frames) / tg - 0.5)))
      ax = axes[0, t]
      ax.imshow(frames[f])
      _mark(ax, hw, cap.grid[1:], frames[f].shape[:2])
      ax.set_title(f"frame {f}", fontsize=9)
      ax.set(xticks=[], yticks=[])
  for t, k in enumerate(kernels):
    _kernel_panel(axes[-1, t], k, f"t={t}: kappa_ii", vlim)
  who = "mean over heads" if head is None else f"head {head}"
  fig.suptitle(f"Fig. 3  {cap.name} ({cap.describe()}), query (row, col)={hw}, {who}; "
               "taps t-1 | t | t+1", fontsize=10)
  return _save(fig, path)
