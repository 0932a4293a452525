"""TimeSformer: official parameter counts and GFLOPs, names, resizing, the T = 1 equalities
between schemes, and one training gradient for every scheme (ViT-B only through eval_shape)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structvit_jax.models import get_model
from structvit_jax.models.timesformer import (ATTENTION_TYPES, attention_stages, grouped,
                                              nearest_indices)
from structvit_jax.model_stats import model_stats

FAST_COMPILES = True  # XLA's cheap compile mode (conftest.py): small programs, each compiled once

# Official counts (fvcore GFLOPs on the official code, docs/flops.md). L+G / axial: ours (no
# official code).


@pytest.mark.parametrize("scheme,params,gflops", [
    ("divided_space_time", 121_566_352, 196.05), ("joint_space_time", 86_112_400, 179.71),
    ("space_only", 86_106_256, 140.65), ("sparse_local_global", 121_566_352, 206.93),
    ("axial", 157_020_304, 249.41)])
def test_vit_b_params_and_gflops(scheme, params, gflops):
  s = model_stats("timesformer_b", frames=8, num_classes=400, attention_type=scheme)
  assert s["params"] == params
  assert abs(s["gflops"] - gflops) / gflops <= 0.03, (scheme, s["gflops"])


def _official_key(path) -> str:
  names = [p.key for p in path]
  leaf = {"kernel": "weight", "scale": "weight"}.get(names[-1], names[-1])
  return ".".join([n.replace("blocks_", "blocks.") for n in names[:-1]] + [leaf])


def test_param_names_and_shapes_are_the_official_state_dict():
  m = get_model("timesformer_b", num_classes=400)
  v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 224, 224, 3))))
  flat = jax.tree_util.tree_flatten_with_path(v["params"])[0]
  got = {_official_key(p): x.shape for p, x in flat}
  per_block = ["norm1", "attn.qkv", "attn.proj", "temporal_norm1", "temporal_attn.qkv",
               "temporal_attn.proj", "temporal_fc", "norm2", "mlp.fc1", "mlp.fc2"]
  wb = ("weight", "bias")
  want = {"cls_token", "pos_embed", "time_embed", *(f"{n}.{w}" for n in ("patch_embed.proj",
          "norm", "head") for w in wb),
          *(f"blocks.{i}.{n}.{w}" for i in range(12) for n in per_block for w in wb)}
  assert set(got) == want and len(got) == 249
  assert got["pos_embed"] == (1, 197, 768) and got["time_embed"] == (1, 8, 768)
  assert got["blocks.0.attn.qkv.weight"] == (768, 2304)          # torch [2304, 768].T
  assert got["patch_embed.proj.weight"] == (16, 16, 3, 768)      # torch [768, 3, 16, 16]
  hr = get_model("timesformer_b_hr")
  v = jax.eval_shape(lambda: hr.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 448, 448, 3))))
  assert v["params"]["pos_embed"].shape == (1, 785, 768)
  assert v["params"]["time_embed"].shape == (1, 16, 768)


def test_init_zeroes_temporal_fc_and_time_embed():
  m = get_model("timesformer_tiny", attention_type="axial")
  p = jax.jit(m.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4, 32, 32, 3)))["params"]
  assert not np.any(p["time_embed"])
  for i in range(2):
    for fc in ("temporal_fc", "width_fc"):
      assert not np.any(p[f"blocks_{i}"][fc]["kernel"]) and not np.any(p[f"blocks_{i}"][fc]["bias"])
  assert np.abs(p["pos_embed"]).max() <= 0.04 and abs(float(p["pos_embed"].std()) - 0.018) < 0.005


def test_nearest_indices_follow_torch():
  # torch.nn.functional.interpolate(arange(n_in)[None, None].float(), size=n_out, mode='nearest')
  assert nearest_indices(4, 6).tolist() == [0, 0, 1, 2, 2, 3]
  assert nearest_indices(8, 3).tolist() == [0, 2, 5]
  assert nearest_indices(14, 28).tolist() == [i // 2 for i in range(28)]
  assert nearest_indices(8, 4).tolist() == [0, 2, 4, 6]
  assert nearest_indices(5, 5).tolist() == list(range(5))


def test_embeddings_resize_to_the_input_grid():
  # A 4x32 model on an 8x64 clip == an 8x64 model holding the 2x-nearest-upsampled tables.
  small = get_model("timesformer_tiny")
  big = small.clone(num_frames=8, img_size=64)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 64, 64, 3))
  p = jax.jit(small.init)(jax.random.PRNGKey(1), x[:, :4, :32, :32])["params"]
  p = {**p, "time_embed": 0.1 * jax.random.normal(jax.random.PRNGKey(2), p["time_embed"].shape)}
  grid = p["pos_embed"][:, 1:].reshape(1, 4, 4, -1).repeat(2, axis=1).repeat(2, axis=2)
  p_big = {**p, "pos_embed": jnp.concatenate([p["pos_embed"][:, :1], grid.reshape(1, 64, -1)], 1),
           "time_embed": p["time_embed"].repeat(2, axis=1)}
  np.testing.assert_allclose(jax.jit(small.apply)({"params": p}, x),
                             jax.jit(big.apply)({"params": p_big}, x), atol=1e-5, rtol=1e-5)


def test_stage_groups_are_the_documented_ones():
  h = w = t = 4
  x = jax.random.normal(jax.random.PRNGKey(0), (1, h, w, t, 1))
  mean = lambda y: jnp.broadcast_to(y.mean(axis=1, keepdims=True), y.shape)
  xn = np.asarray(x[0, ..., 0])
  stages = dict(
      temporal=(attention_stages("divided_space_time", h, w, t)[0],
                lambda i, j, k: xn[i, j, :]),
      spatial=(attention_stages("divided_space_time", h, w, t)[1], lambda i, j, k: xn[:, :, k]),
      width=(attention_stages("axial", h, w, t)[1], lambda i, j, k: xn[i, :, k]),
      height=(attention_stages("axial", h, w, t)[2], lambda i, j, k: xn[:, j, k]),
      local=(attention_stages("sparse_local_global", h, w, t)[0],
             lambda i, j, k: xn[i // 2 * 2:i // 2 * 2 + 2, j // 2 * 2:j // 2 * 2 + 2, :]),
      global_=(attention_stages("sparse_local_global", h, w, t)[1],
               lambda i, j, k: xn[i % 2::2, j % 2::2, k % 2::2]))
  for name, ((_, split, groups), members) in stages.items():
    y, _ = grouped(mean, x, None, split, groups)
    want = np.array([[[members(i, j, k).mean() for k in range(t)] for j in range(w)]
                     for i in range(h)])
    np.testing.assert_allclose(y[0, ..., 0], want, atol=1e-6, err_msg=name)
  # The class token joins every group; its outputs are averaged over the groups.
  cls = jnp.full((1, 1, 1), 5.0)
  y, c = grouped(lambda y: y, x, cls, *attention_stages("divided_space_time", h, w, t)[1][1:])
  np.testing.assert_array_equal(y, x)
  assert c.shape == (1, 1, 1) and float(c[0, 0, 0]) == 5.0


def _perturbed(params, seed=0):
  # Moves every weight off its init value, so no equality below is an accident of init.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return tree.unflatten([a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def test_one_frame_equalities_between_schemes():
  """T = 1: divided == joint when every temporal_fc is zero; joint == space_only when
  time_embed is zero. Neither holds without its condition."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 32, 32, 3))
  div, joint, space = (get_model("timesformer_tiny", attention_type=a) for a in
                       ("divided_space_time", "joint_space_time", "space_only"))
  p = _perturbed(jax.jit(div.init)(jax.random.PRNGKey(1), x)["params"])
  div_apply, joint_apply = jax.jit(div.apply), jax.jit(joint.apply)
  zero_fc = {k: ({**b, "temporal_fc": jax.tree.map(jnp.zeros_like, b["temporal_fc"])}
                 if k.startswith("blocks_") else b) for k, b in p.items()}
  p_joint = {k: ({n: m for n, m in b.items() if not n.startswith("temporal_")}
                 if k.startswith("blocks_") else b) for k, b in p.items()}
  y_joint = joint_apply({"params": p_joint}, x)
  np.testing.assert_allclose(div_apply({"params": zero_fc}, x), y_joint, atol=1e-5, rtol=1e-5)
  assert not np.allclose(div_apply({"params": p}, x), y_joint, atol=1e-3)

  p_space = {k: b for k, b in p_joint.items() if k != "time_embed"}
  y_space = jax.jit(space.apply)({"params": p_space}, x)
  p_joint0 = {**p_joint, "time_embed": jnp.zeros_like(p_joint["time_embed"])}
  np.testing.assert_allclose(joint_apply({"params": p_joint0}, x), y_space, atol=1e-5, rtol=1e-5)
  assert not np.allclose(y_joint, y_space, atol=1e-3)


@pytest.mark.parametrize("scheme", ATTENTION_TYPES)
def test_every_scheme_has_finite_gradients(scheme):
  m = get_model("timesformer_tiny", attention_type=scheme, drop_path_rate=0.1)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 32, 32, 3))

  def loss(p):
    logits = m.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    return -jnp.mean(jax.nn.log_softmax(logits)[:, 0])

  # One compilation: init and gradient together.
  g = jax.jit(lambda: jax.grad(loss)(m.init(jax.random.PRNGKey(1), x)["params"]))()
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(g))
  # The zero-initialised fc of every pre-stage learns from the first step.
  for prefix, *_ in attention_stages(scheme, 4, 4, 4)[:-1]:
    assert np.abs(g["blocks_0"][f"{prefix}_fc"]["kernel"]).max() > 0, prefix
  assert np.abs(g["blocks_1"]["attn"]["qkv"]["kernel"]).max() > 0


def test_remat_keeps_parameter_names():
  x = jnp.zeros((1, 4, 32, 32, 3))
  m = get_model("timesformer_tiny")
  shapes = [jax.eval_shape(lambda: k.init(jax.random.PRNGKey(0), x))
            for k in (m, m.clone(remat=True))]
  assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])


def test_bad_scheme_and_grid_are_clear_errors():
  x = jnp.zeros((1, 4, 32, 32, 3))
  with pytest.raises(ValueError, match="valid: divided_space_time, joint_space_time"):
    get_model("timesformer_tiny", attention_type="divided").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="even time"):
    get_model("timesformer_tiny", attention_type="sparse_local_global").init(
        jax.random.PRNGKey(0), x[:, :3])
  with pytest.raises(ValueError, match=r"clips \[B, T, H, W, 3\]"):
    get_model("timesformer_tiny").init(jax.random.PRNGKey(0), x[..., :1])
