"""figures.py: the captured attention is the one the model used, the figure quantities obey the
paper's identities, and the figures / CLI write PNGs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from structvit_jax import figures, visualize
from structvit_jax.data import synthetic
from structvit_jax.models import StructSA, StructSAConfig, get_model


FAST_COMPILES = True  # XLA's cheap compile mode for this module (conftest.py)


def image(size=64, label=3, seed=0):
  return synthetic.render_image(label, np.random.default_rng(seed), size)


@pytest.fixture(scope="module")
def image_captures():
  """structvit_tiny at 64 px (stage-3 grid 4x4, D=2) with random U^K/U^V; the same
  parameters through the reference path; and uniformer_tiny (SA)."""
  x = jnp.asarray(image(), jnp.float32)[None] / 255.0
  m = get_model("structvit_tiny", structure_init_noise=0.3)
  v = jax.jit(m.init)(jax.random.key(0), x)
  plain = jax.jit(lambda v, x: m.apply(v, x))(v, x)
  out_f, caps_f = figures.capture(m, v, x)
  out_r, caps_r = figures.capture(m.clone(structsa=m.structsa.replace(form="reference")), v, x)
  return dict(x=x, plain=plain, fused=(out_f, caps_f), reference=(out_r, caps_r))


def test_capture_is_the_attention_the_model_used(image_captures):
  out_f, caps_f = image_captures["fused"]
  out_r, caps_r = image_captures["reference"]
  assert list(caps_f) == ["blocks3_0/attn", "blocks4_0/attn"] == list(caps_r)
  # Capturing does not change the outputs, and both implementations capture the same maps.
  np.testing.assert_allclose(out_f, image_captures["plain"], atol=1e-5)
  np.testing.assert_allclose(out_r, out_f, atol=1e-5)
  for name, cap in caps_f.items():
    assert cap.attn.shape[-1] == 2 and cap.d == 2
    np.testing.assert_allclose(cap.attn, caps_r[name].attn, atol=1e-6)
    # One joint softmax over all (j, d) per query and head.
    np.testing.assert_allclose(cap.attn.reshape(*cap.attn.shape[:1 + cap.rank], -1).sum(-1),
                               1.0, atol=1e-5)
  assert figures.default_layer(caps_f) == "blocks3_0/attn"


def test_dynamic_kernels_scatter_to_the_final_attention(image_captures):
  """W_i[j'] = sum of kappa_ij[m] over all (j, m) with S j + m - p = j'."""
  _, caps = image_captures["fused"]
  cap = caps["blocks3_0/attn"]
  for query in [(0, 0), (2, 1)]:
    for head in [0, 1]:
      kappa = figures.dynamic_kernels(cap, query, head)          # [*key_grid, 3, 3, hd]
      w = np.zeros((*cap.grid, kappa.shape[-1]))
      for j in np.ndindex(*cap.key_grid):
        for m in np.ndindex(3, 3):
          r, c = (j[0] * cap.strides[0] + m[0] - 1, j[1] * cap.strides[1] + m[1] - 1)
          if 0 <= r < cap.grid[0] and 0 <= c < cap.grid[1]:
            w[r, c] += kappa[j][m]
      np.testing.assert_allclose(w.mean(-1), figures.final_attention(cap, query, head), atol=1e-6)
      # The kernels' entries sum to the attention weight they carry times U^V's sum.
      a = figures.pattern_maps(cap, query, head)                  # [D, *key_grid]
      u_sum = figures.context_aggregators(cap, head).reshape(cap.d, -1).sum(-1)
      np.testing.assert_allclose(kappa.mean(-1).reshape(*cap.key_grid, -1).sum(-1),
                                 np.einsum("d...,d->...", a, u_sum), atol=1e-6)


@pytest.mark.parametrize("stride", [1, 2])
def test_strided_structsa_kernels_scatter_onto_the_value_grid(stride):
  layer = StructSA(num_heads=2, structsa=StructSAConfig(d=3, stride=stride, init_noise=0.5))
  x = jax.random.normal(jax.random.key(1), (1, 5, 6, 8))
  v = layer.init(jax.random.key(2), x)
  _, caps = figures.capture(layer, v, x, apply_kwargs={})
  cap = caps["structsa"]
  assert cap.strides == (stride, stride) and cap.key_grid == (-(-5 // stride), -(-6 // stride))
  q = (2, 3)
  kappa = figures.dynamic_kernels(cap, q, None)                   # all heads: [*key_grid, 3, 3, 8]
  w = np.zeros((5, 6, 8))
  for j in np.ndindex(*cap.key_grid):
    for m in np.ndindex(3, 3):
      r, c = j[0] * stride + m[0] - 1, j[1] * stride + m[1] - 1
      if 0 <= r < 5 and 0 <= c < 6:
        w[r, c] += kappa[j][m]
  np.testing.assert_allclose(w.mean(-1), figures.final_attention(cap, q, None), atol=1e-6)
  # y_i = sum_j' W_i[j'] v_j' is the layer's output before the projection.
  qkv = v["params"]["qkv"]
  vals = (x.reshape(30, 8) @ qkv["kernel"] + qkv["bias"])[:, 16:]
  wq = jnp.asarray(figures.aggregated_weights_of(cap, q))          # [5, 6, 8]
  y = (wq.reshape(30, 8) * vals).sum(0)
  out = layer.apply(v, x)[0, q[0], q[1]]
  proj = v["params"]["proj"]
  np.testing.assert_allclose(y @ proj["kernel"] + proj["bias"], out, atol=1e-5)


def test_identity_structsa_maps_equal_sa():
  """Centre-tap U^K/U^V (no noise) and the same q/k/v weights: StructSA's final map is
  SA's, and each of its D pattern maps is SA's attention / D."""
  x = jnp.asarray(image(), jnp.float32)[None] / 255.0
  s = get_model("structvit_tiny", structure_init="centre", structure_init_noise=0.0)
  vs = jax.jit(s.init)(jax.random.key(0), x)
  sa = get_model("uniformer_tiny")
  va = jax.tree.map(lambda a: a, vs)
  for blk in ("blocks3_0", "blocks4_0"):
    va["params"][blk]["attn"] = {k: w for k, w in vs["params"][blk]["attn"].items()
                                 if k in ("qkv", "proj")}
  out_s, caps_s = figures.capture(s, vs, x)
  out_a, caps_a = figures.capture(sa, va, x)
  np.testing.assert_allclose(out_s, out_a, atol=1e-5)
  cs, ca = caps_s["blocks3_0/attn"], caps_a["blocks3_0/attn"]
  assert ca.d == 0 and cs.d == 2 and ca.describe() == "SA"
  for q in [(0, 0), (1, 3)]:
    for head in [0, None]:
      np.testing.assert_allclose(figures.final_attention(cs, q, head),
                                 figures.final_attention(ca, q, head), atol=1e-6)
      sa_map = figures.pattern_maps(ca, q, head)[0]
      for d_map in figures.pattern_maps(cs, q, head):
        np.testing.assert_allclose(d_map, sa_map / 2, atol=1e-6)


def _png(path):
  im = Image.open(path)
  im.load()
  assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 150
  return np.asarray(im)


def test_figures_write_pngs(image_captures, tmp_path):
  _, caps = image_captures["fused"]
  cap = caps["blocks3_0/attn"]
  img = image()
  _png(figures.fig_pattern_detectors(cap, (1, 2), str(tmp_path / "f2.png"), image=img))
  _png(figures.fig_pattern_detectors(cap, None, str(tmp_path / "f2b.png"), keys=[(0, 0)], head=None))
  _png(figures.fig_attention_comparison({"a": cap, "b": cap}, (1, 2), str(tmp_path / "f4.png"),
                                    image=img))
  with pytest.raises(ValueError, match="video model"):
    figures.fig_dynamic_kernels_over_time(cap, None, str(tmp_path / "f3.png"))
  with pytest.raises(ValueError, match="not a token"):
    figures.fig_pattern_detectors(cap, (4, 0), str(tmp_path / "x.png"))
  with pytest.raises(ValueError, match="head 7 out of range"):
    figures.final_attention(cap, None, 7)
  with pytest.raises(ValueError, match="different token grids"):
    figures.fig_attention_comparison({"a": cap, "b": caps["blocks4_0/attn"]}, None,
                                 str(tmp_path / "x.png"))


def test_video_capture_and_fig3(tmp_path):
  clip = synthetic.render_clip(0, np.random.default_rng(0), 8, 64)
  x = jnp.asarray(clip, jnp.float32)[None] / 255.0
  m = get_model("structvit_tiny", structure_init_noise=0.3)
  v = jax.jit(m.init)(jax.random.key(0), x)
  _, caps = figures.capture(m, v, x)
  cap = caps["blocks3_0/attn"]
  assert cap.grid == (4, 4, 4) and cap.u_v.shape[:3] == (3, 3, 3)
  path = figures.fig_dynamic_kernels_over_time(cap, (1, 2), str(tmp_path / "f3.png"), clip=clip)
  _png(path)
  kappa = figures.dynamic_kernels(cap, (2, 1, 2), 0)              # [4, 4, 4, 3, 3, 3, hd]
  assert kappa.shape[:6] == (4, 4, 4, 3, 3, 3)
  _png(figures.fig_pattern_detectors(cap, (2, 1, 2), str(tmp_path / "f2.png"), image=clip[4]))


def test_cli_writes_the_figures_and_fails_clearly(tmp_path, capsys):
  img_file = tmp_path / "shape.png"
  Image.fromarray(image()).save(img_file)
  paths = visualize.run("structvit_tiny", str(img_file), str(tmp_path / "out"),
                        compare=["uniformer_tiny"], image_size=64, query=[1, 1])
  assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["fig2_pattern_detectors.png",
                                                        "fig4_attention_maps.png"]
  for p in paths:
    _png(p)
  assert "layer blocks3_0/attn" in capsys.readouterr().out
  with pytest.raises(ValueError, match="neither an export directory nor a preset"):
    visualize.run("no_such_model", str(img_file), str(tmp_path / "o2"))
  from structvit_jax.inference import InputError
  with pytest.raises(InputError, match="no such file"):
    visualize.run("structvit_tiny", str(tmp_path / "missing.png"), str(tmp_path / "o3"),
                  image_size=32)
