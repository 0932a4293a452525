"""DeiT on clips (the paper's Table 1 backbone on video) and the U^K / U^V init setting.

What the design implies: a one-frame clip is the image model (zero time_embed, tubelet depth
1, time_embed 0); an image DeiT inflated into the video model computes the image model on a clip of
identical frames, exactly when one tubelet spans the clip and up to the class token's share
of the softmax when each frame is a tubelet (the class key then competes with T copies of
every patch key); official timm/DeiT keys (`patch_embed.proj`) load; StructSA runs over the
T x H x W grid with a 3x3x3 window.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structvit_jax import weights
from structvit_jax.models import get_model
from structvit_jax.models.structsa import INITS, StructSA, StructSAConfig

FAST_COMPILES = True  # tiny models; every comparison runs both sides in the same mode
KW = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def _params(model, x, seed=0):
  return jax.jit(model.init)(jax.random.PRNGKey(seed), x)


def _random_weights(variables, seed=1):
  """Every leaf random (time_embed included), so nothing hides behind an init of zeros."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, l.shape) for k, l in
                                   zip(keys, leaves)])


def test_one_frame_clip_is_the_image_model():
  image = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3))
  img_model, vid_model = get_model("deit_tiny", **KW), get_model("deit_tiny", **KW)
  v_img = _random_weights(_params(img_model, image))
  v_vid = _params(vid_model, image[:, None])
  assert set(v_vid["params"]) == set(v_img["params"]) | {"time_embed"}
  v_vid = {"params": {**v_img["params"], "time_embed": np.zeros((1, 1, 32), np.float32),
                      "patch_embed": jax.tree.map(lambda w: w[None] if w.ndim == 4 else w,
                                                  v_img["params"]["patch_embed"])}}
  a = img_model.apply(v_img, image)
  b = vid_model.apply(v_vid, image[:, None])
  np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tubelet, atol", [(4, 1e-5), (1, 0.05)])
def test_inflated_image_deit_gives_the_image_logits_on_identical_frames(tubelet, atol):
  """D = 0 DeiT, image weights -> video model by weights.fit (inflate 'average'): exact
  (float32 rounding) with one tubelet over the 4 frames; with frame-wise tubelets only the
  class key's softmax share differs (measured max |diff| well under `atol`, logits ~O(1))."""
  image = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3))
  clip = jnp.repeat(image[:, None], 4, axis=1)
  img_model = get_model("deit_tiny", **KW)
  vid_model = get_model("deit_tiny", temporal_patch_size=tubelet, **KW)
  v_img = _random_weights(_params(img_model, image))
  abstract = jax.eval_shape(vid_model.init, jax.random.PRNGKey(0), clip)
  v_vid = weights.fit(weights.flat_paths(v_img), abstract, lambda: _params(vid_model, clip),
                      inflate_mode="average")
  assert v_vid["params"]["patch_embed"]["kernel"].shape == (tubelet, 8, 8, 3, 32)
  assert not np.any(v_vid["params"]["time_embed"])  # zero: frames alike, as for the image model
  a = np.asarray(img_model.apply(v_img, image))
  b = np.asarray(vid_model.apply(v_vid, clip))
  diff = np.abs(a - b).max()
  assert diff <= atol, diff
  assert np.abs(a).max() > 0.5  # the comparison is not between near-zero logits
  if tubelet == 1:
    assert diff > 1e-6  # the class key's share really differs: the tolerance is needed
    assert (a.argmax(-1) == b.argmax(-1)).all()


def test_official_deit_keys_load_into_the_video_model():
  """A timm/DeiT state_dict (patch_embed.proj.*) -> the video model by from_torch + fit."""
  image = jnp.zeros((1, 16, 16, 3))
  img_model = get_model("deit_tiny", **KW)
  v_img = _random_weights(_params(img_model, image))
  sd = {}
  for path, w in weights.flat_paths(v_img["params"]).items():
    key = weights.torch_key(("params", *path))
    w = np.asarray(w)
    if path[-1] == "kernel":
      w = np.transpose(w, (3, 2, 0, 1)) if w.ndim == 4 else w.T
    sd[key.replace("patch_embed.", "patch_embed.proj.")] = w
  assert "patch_embed.proj.weight" in sd and sd["patch_embed.proj.weight"].shape == (32, 3, 8, 8)
  clip = jnp.repeat(image[:, None], 2, axis=1)
  vid_model = get_model("deit_tiny", **KW)
  abstract = jax.eval_shape(vid_model.init, jax.random.PRNGKey(0), clip)
  v_vid = weights.fit(weights.from_torch(sd, abstract), abstract,
                      lambda: _params(vid_model, clip), inflate_mode="average")
  np.testing.assert_array_equal(v_vid["params"]["blocks_1"]["attn"]["qkv"]["kernel"],
                                v_img["params"]["blocks_1"]["attn"]["qkv"]["kernel"])
  np.testing.assert_array_equal(v_vid["params"]["patch_embed"]["kernel"][0],
                                v_img["params"]["patch_embed"]["kernel"])  # tubelet depth 1


def test_video_deit_structsa_uses_a_3d_window_and_bad_tubelets_are_clear():
  clip = jnp.zeros((1, 4, 16, 16, 3))
  model = get_model("deit_tiny", structsa=dict(d=4, kernel_size=3), **KW)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), clip)["params"]
  assert shapes["blocks_0"]["attn"]["u_k"].shape == (3, 3, 3, 4, 32)
  assert shapes["time_embed"].shape == (1, 4, 32)
  with pytest.raises(ValueError, match="temporal_patch_size=3"):
    get_model("deit_tiny", temporal_patch_size=3, **KW).init(jax.random.PRNGKey(0), clip)


def test_structure_init_setting():
  """'centre': identity centre tap (+ noise); 'torch': U(-1/sqrt(M), 1/sqrt(M)), M = taps."""
  assert INITS == ("centre", "torch")
  x = jnp.zeros((1, 4, 4, 4, 16))
  for init in INITS:
    layer = StructSA(2, StructSAConfig(d=4, init=init, init_noise=0.0))
    u_k = np.asarray(layer.init(jax.random.PRNGKey(0), x)["params"]["u_k"])
    assert u_k.shape == (3, 3, 3, 4, 16)
    if init == "centre":
      expected = np.zeros_like(u_k)
      expected[1, 1, 1] = 1.0
      np.testing.assert_array_equal(u_k, expected)
    else:
      bound = 1 / np.sqrt(27)
      assert np.abs(u_k).max() <= bound and np.abs(u_k).max() > 0.9 * bound
      assert abs(u_k.std() - bound / np.sqrt(3)) < 0.01  # uniform's std
  with pytest.raises(ValueError, match="init='xavier'"):
    StructSAConfig(d=4, init="xavier")
