"""PyTorch checkpoint import (structvit_jax.weights / convert), inflation and init_from.

State_dicts are built here from the official key names and shapes
(docs/official_weights.md) with random values, independently of our parameter
tree; layer numerics are checked against numpy references (PyTorch semantics) computed from
the torch-layout weights. Tiny dimensions keep it fast; full-size key lists are checked with
jax.eval_shape only.
"""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structvit_jax import convert, weights
from structvit_jax.models import get_model, layers, uniformer as uf
from structvit_jax.models import structsa_weights, timesformer_weights

FAST_COMPILES = True  # XLA's cheap compile mode (conftest.py): small programs, each compiled once

try:
  import torch  # only to exercise the .pth file path; numerics use numpy references
except ImportError:
  torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")

TINY = dict(depth=(1, 2, 1, 2), embed_dim=(16, 32, 64, 64), drop_path_rate=0.0)


# ----------------------------------------------------------------------------- official keys


class _SD(dict):
  def __init__(self, seed):
    super().__init__()
    self.rng = np.random.default_rng(seed)

  def w(self, key, *shape, scale=0.2):
    self[key] = (scale * self.rng.standard_normal(shape)).astype(np.float32)

  def bn(self, p, c):
    for n in ("weight", "bias", "running_mean"):
      self.w(f"{p}.{n}", c)
    self[f"{p}.running_var"] = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
    self[f"{p}.num_batches_tracked"] = np.array(7, np.int64)

  def ln(self, p, c):
    self.w(f"{p}.weight", c)
    self[f"{p}.weight"] += 1
    self.w(f"{p}.bias", c)


def uniformer_sd(depth=TINY["depth"], dims=TINY["embed_dim"], num_classes=10, video=False,
                 conv_stem=False, layer_scale="none", tl=False, seed=0) -> dict:
  """Official UniFormer image/TL/video state_dict (docs/official_weights.md)."""
  sd = _SD(seed)
  t = lambda k: (k,) if video else ()
  for s in range(4):
    cin, c, pe = (3 if s == 0 else dims[s - 1]), dims[s], f"patch_embed{s + 1}"
    if conv_stem:
      if s == 0:
        sd.w(f"{pe}.proj.0.weight", c // 2, 3, 3, 3); sd.w(f"{pe}.proj.0.bias", c // 2)
        sd.bn(f"{pe}.proj.1", c // 2)
        sd.w(f"{pe}.proj.3.weight", c, c // 2, 3, 3); sd.w(f"{pe}.proj.3.bias", c)
        sd.bn(f"{pe}.proj.4", c)
      else:
        sd.w(f"{pe}.proj.0.weight", c, cin, 3, 3); sd.w(f"{pe}.proj.0.bias", c)
        sd.bn(f"{pe}.proj.1", c)
    else:
      sd.ln(f"{pe}.norm", c)
      k = (*t(3), 4, 4) if s == 0 else (*t(1), 2, 2)
      sd.w(f"{pe}.proj.weight", c, cin, *k); sd.w(f"{pe}.proj.bias", c)
    one = (1,) * (3 if video else 2)
    for i in range(depth[s]):
      b = f"blocks{s + 1}.{i}"
      sd.w(f"{b}.pos_embed.weight", c, 1, *t(3), 3, 3); sd.w(f"{b}.pos_embed.bias", c)
      if s < 2:
        sd.bn(f"{b}.norm1", c)
        sd.w(f"{b}.conv1.weight", c, c, *one); sd.w(f"{b}.conv1.bias", c)
        sd.w(f"{b}.conv2.weight", c, c, *one); sd.w(f"{b}.conv2.bias", c)
        sd.w(f"{b}.attn.weight", c, 1, *t(5), 5, 5); sd.w(f"{b}.attn.bias", c)
        sd.bn(f"{b}.norm2", c)
        sd.w(f"{b}.mlp.fc1.weight", 4 * c, c, *one); sd.w(f"{b}.mlp.fc1.bias", 4 * c)
        sd.w(f"{b}.mlp.fc2.weight", c, 4 * c, *one); sd.w(f"{b}.mlp.fc2.bias", c)
        if layer_scale == "all":
          sd.w(f"{b}.gamma_1", 1, c, 1, 1); sd.w(f"{b}.gamma_2", 1, c, 1, 1)
      else:
        sd.ln(f"{b}.norm1", c)
        sd.w(f"{b}.attn.qkv.weight", 3 * c, c); sd.w(f"{b}.attn.qkv.bias", 3 * c)
        sd.w(f"{b}.attn.proj.weight", c, c); sd.w(f"{b}.attn.proj.bias", c)
        sd.ln(f"{b}.norm2", c)
        sd.w(f"{b}.mlp.fc1.weight", 4 * c, c); sd.w(f"{b}.mlp.fc1.bias", 4 * c)
        sd.w(f"{b}.mlp.fc2.weight", c, 4 * c); sd.w(f"{b}.mlp.fc2.bias", c)
        if layer_scale != "none":
          sd.w(f"{b}.gamma_1", c); sd.w(f"{b}.gamma_2", c)
  sd.bn("norm", dims[3])
  sd.w("head.weight", num_classes, dims[3]); sd.w("head.bias", num_classes)
  if tl:
    sd.w("aux_head.weight", num_classes, dims[3]); sd.w("aux_head.bias", num_classes)
  return dict(sd)


def timesformer_sd(attention_type="divided_space_time", dim=32, depth=2, frames=4, img=32,
                   patch=8, num_classes=10, seed=0) -> dict:
  """Official TimeSformer state_dict, with the 'model.' prefix of the released wrapper."""
  sd = _SD(seed)
  n = (img // patch) ** 2
  sd.w("cls_token", 1, 1, dim); sd.w("pos_embed", 1, n + 1, dim)
  if attention_type != "space_only":
    sd.w("time_embed", 1, frames, dim)
  sd.w("patch_embed.proj.weight", dim, 3, patch, patch); sd.w("patch_embed.proj.bias", dim)
  for i in range(depth):
    b = f"blocks.{i}"
    attn = ["attn"] + (["temporal_attn"] if attention_type == "divided_space_time" else [])
    for a in attn:
      sd.ln(f"{b}.{'norm1' if a == 'attn' else 'temporal_norm1'}", dim)
      sd.w(f"{b}.{a}.qkv.weight", 3 * dim, dim); sd.w(f"{b}.{a}.qkv.bias", 3 * dim)
      sd.w(f"{b}.{a}.proj.weight", dim, dim); sd.w(f"{b}.{a}.proj.bias", dim)
    if attention_type == "divided_space_time":
      sd.w(f"{b}.temporal_fc.weight", dim, dim); sd.w(f"{b}.temporal_fc.bias", dim)
    sd.ln(f"{b}.norm2", dim)
    sd.w(f"{b}.mlp.fc1.weight", 4 * dim, dim); sd.w(f"{b}.mlp.fc1.bias", 4 * dim)
    sd.w(f"{b}.mlp.fc2.weight", dim, 4 * dim); sd.w(f"{b}.mlp.fc2.bias", dim)
  sd.ln("norm", dim)
  sd.w("head.weight", num_classes, dim); sd.w("head.bias", num_classes)
  return {"model." + k: v for k, v in sd.items()}


def _convert(sd, model, **kw):
  return convert.convert_state_dict(sd, model, image_size=kw.pop("image_size", 32),
                                    num_frames=kw.pop("num_frames", 4), **kw)


def _assert_all_mapped(sd, variables):
  """Every non-counter key landed somewhere: the converted leaf count equals the key count."""
  n_keys = sum(not k.endswith("num_batches_tracked") for k in sd)
  leaves = weights.flat_paths(variables)
  n_struct = sum(p[-1] in structsa_weights.STRUCTURE_LEAVES for p in leaves)
  assert len(leaves) - n_struct == n_keys


# ----------------------------------------------------------------------------- numpy references
# Independent of our code and of torch (CI has no torch): PyTorch semantics, NC(T)HW layouts.


def np_conv(x, w, b, stride, pad=0, groups=1):
  """torch conv{2,3}d: x [B, C, *S], w [O, C/groups, *k]; groups 1 or C (depthwise)."""
  r = x.ndim - 2
  stride, pad = ((stride,) * r if np.isscalar(stride) else stride), \
                ((pad,) * r if np.isscalar(pad) else pad)
  xp = np.pad(x, [(0, 0), (0, 0), *[(p, p) for p in pad]])
  k = w.shape[2:]
  out = [(n + 2 * p - kk) // s + 1 for n, p, kk, s in zip(x.shape[2:], pad, k, stride)]
  y = np.zeros((x.shape[0], w.shape[0], *out), np.float64)
  for tap in itertools.product(*(range(kk) for kk in k)):
    view = xp[(slice(None), slice(None),
               *(slice(t, t + (o - 1) * s + 1, s) for t, o, s in zip(tap, out, stride)))]
    wt = w[(slice(None), slice(None), *tap)]
    if groups == 1:
      y += np.einsum("bc...,oc->bo...", view, wt)
    else:
      y += view * wt[:, 0].reshape(1, -1, *([1] * r))
  return (y + b.reshape(1, -1, *([1] * r))).astype(np.float32)


def np_ln(x, w, b, eps):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def np_bn(x, sd, p):  # eval BatchNorm over NC(T)HW
  sh = (1, -1) + (1,) * (x.ndim - 2)
  return ((x - sd[p + ".running_mean"].reshape(sh)) / np.sqrt(sd[p + ".running_var"].reshape(sh)
          + 1e-5) * sd[p + ".weight"].reshape(sh) + sd[p + ".bias"].reshape(sh))


def np_linear(x, sd, p):
  return x @ sd[p + ".weight"].T + sd[p + ".bias"]


def np_gelu(x):
  from scipy.special import erf
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- layouts


UNIFORMER_LAYOUTS = {
    "image": (dict(), dict()),
    "conv_stem": (dict(conv_stem=True), dict(conv_stem=True)),
    "layer_scale_sa": (dict(layer_scale="sa"), dict(layer_scale="sa")),
    "tl_large_ls": (dict(layer_scale="all", tl=True),
                    dict(layer_scale="all", token_labeling=True)),
    "tl_head_dim_32": (dict(tl=True), dict(token_labeling=True, head_dim=32)),
    "video": (dict(video=True), dict()),
}


@pytest.mark.parametrize("layout", list(UNIFORMER_LAYOUTS))
def test_uniformer_layouts_map_every_key(layout):
  sd_kw, model_kw = UNIFORMER_LAYOUTS[layout]
  sd = uniformer_sd(**sd_kw)
  kw, variables, spec = _convert(sd, "uniformer_s", overrides=dict(TINY, **model_kw))
  _assert_all_mapped(sd, variables)
  assert kw["num_classes"] == 10
  assert spec["kind"] == ("video" if sd_kw.get("video") else "image")
  assert spec["mean"] == ((0.45,) * 3 if sd_kw.get("video") else (0.485, 0.456, 0.406))


@pytest.mark.parametrize("attention_type",
                         ["divided_space_time", "joint_space_time", "space_only"])
def test_timesformer_layouts(attention_type):
  sd = timesformer_sd(attention_type)
  kw, variables, spec = _convert(sd, "timesformer_tiny")
  assert kw["attention_type"] == attention_type and kw["img_size"] == 32
  _assert_all_mapped(sd, variables)
  p = variables["params"]
  np.testing.assert_array_equal(p["cls_token"], sd["model.cls_token"])
  np.testing.assert_array_equal(p["pos_embed"], sd["model.pos_embed"])
  np.testing.assert_array_equal(p["blocks_1"]["mlp"]["fc1"]["kernel"],
                                sd["model.blocks.1.mlp.fc1.weight"].T)
  if attention_type == "divided_space_time":
    np.testing.assert_array_equal(p["blocks_0"]["temporal_fc"]["kernel"],
                                  sd["model.blocks.0.temporal_fc.weight"].T)
    assert spec == dict(kind="video", image_size=32, num_frames=4, mean=(0.45,) * 3,
                        std=(0.225,) * 3)


@pytest.mark.parametrize("name,sd_kw,model_kw", [
    ("uniformer_s", dict(depth=(3, 4, 8, 3)), {}),
    ("uniformer_s_plus", dict(depth=(3, 5, 9, 3), conv_stem=True), {}),
    ("uniformer_b_ls", dict(depth=(5, 8, 20, 7), layer_scale="sa"), {}),
    ("uniformer_l", dict(depth=(5, 10, 24, 7), dims=(128, 192, 448, 640), layer_scale="all",
                         tl=True), {}),
    ("uniformer_b", dict(depth=(5, 8, 20, 7), video=True), {}),
])
def test_full_size_key_lists(name, sd_kw, model_kw):
  """Full-size official key lists against jax.eval_shape of the presets (no compute)."""
  sd = uniformer_sd(num_classes=1000, seed=1, **{"dims": (64, 128, 320, 512), **sd_kw})
  sd = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in sd.items()}  # shapes only
  model = get_model(name, **model_kw)
  shape = (1, 16, 224, 224, 3) if sd_kw.get("video") else (1, 224, 224, 3)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))
  by_key = {weights.torch_key(p): (p, leaf.shape)
            for p, leaf in weights.flat_paths(abstract).items()}
  keys = {k for k in sd if not k.endswith("num_batches_tracked")}
  assert keys == set(by_key)
  for k in keys:  # the layout rule yields exactly the model's shape
    path, shape = by_key[k]
    got = weights._to_flax(np.zeros(sd[k].shape, np.float32), path[-1], len(shape)).shape
    if got != tuple(shape):
      assert sd_kw.get("video") is None, (k, got, shape)


def test_full_size_timesformer_keys():
  sd = timesformer_sd(dim=768, depth=12, frames=8, img=224, patch=16, num_classes=400)
  sd = weights.unwrap({"model_state": sd})
  kw = timesformer_weights.infer_timesformer_kwargs(sd)
  model = get_model("timesformer_b", **kw, num_classes=400)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 224, 224, 3)))
  src = weights.from_torch(sd, abstract)
  for p, leaf in weights.flat_paths(abstract).items():
    assert src[p].shape == leaf.shape, p
  assert len(src) == len(sd) == 249


# ----------------------------------------------------------------------------- numerics


def test_layer_numerics():
  """conv (patch embed + LN), depthwise conv, 1x1 conv, BN (eval), linear, LN and the qkv
  split into heads: each converted submodule against numpy on the torch-layout weights."""
  sd = uniformer_sd()
  _, v, _ = _convert(sd, "uniformer_s", overrides=TINY)
  p, bs = v["params"], v["batch_stats"]
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  nchw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2)).astype(np.float64)
  tol = dict(rtol=1e-4, atol=1e-5)

  # conv + LayerNorm(eps 1e-5): patch_embed1
  ours = layers.PatchEmbed(16, (4, 4), (4, 4), [(0, 0)] * 2, norm=True).apply(
      {"params": p["patch_embed1"]}, x)
  ref = np_conv(nchw(x), sd["patch_embed1.proj.weight"], sd["patch_embed1.proj.bias"], 4)
  ref = np_ln(ref.transpose(0, 2, 3, 1), sd["patch_embed1.norm.weight"],
              sd["patch_embed1.norm.bias"], 1e-5)
  np.testing.assert_allclose(ours, ref, **tol)

  # CBlock of stage 1 on 16 channels: dw 3x3 (pos_embed), BN eval, 1x1 convs, dw 5x5, CMlp.
  h = rng.standard_normal((2, 8, 8, 16)).astype(np.float32)
  ours = uf.CBlock().apply({"params": p["blocks1_0"], "batch_stats": bs["blocks1_0"]}, h)
  b = "blocks1.0."
  conv = lambda z, n, **k: np_conv(z, sd[b + n + ".weight"], sd[b + n + ".bias"], 1, **k)
  z = nchw(h)
  z = z + conv(z, "pos_embed", pad=1, groups=16)
  z = z + conv(conv(conv(np_bn(z, sd, b + "norm1"), "conv1"), "attn", pad=2, groups=16), "conv2")
  z = z + conv(np_gelu(conv(np_bn(z, sd, b + "norm2"), "mlp.fc1")), "mlp.fc2")
  np.testing.assert_allclose(ours, z.transpose(0, 2, 3, 1), **tol)

  # SABlock of stage 3 (64 channels; 1 head of 64 and 2 heads of 32): LN eps 1e-6, qkv
  # features split (3, heads, hd), softmax(q k^T hd^-0.5) v, proj, Mlp (linear).
  h = rng.standard_normal((2, 4, 4, 64)).astype(np.float32)
  b = "blocks3.0."
  for heads in (1, 2):
    ours = uf.SABlock(num_heads=heads).apply({"params": p["blocks3_0"]}, h)
    z = nchw(h)
    z = z + np_conv(z, sd[b + "pos_embed.weight"], sd[b + "pos_embed.bias"], 1, 1, 64)
    tok = z.reshape(2, 64, 16).transpose(0, 2, 1)                       # (B, N, C) row-major
    y = np_ln(tok, sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
    qkv = np_linear(y, sd, b + "attn.qkv")
    q, k, vv = qkv.reshape(2, 16, 3, heads, 64 // heads).transpose(2, 0, 3, 1, 4)
    a = np_softmax((q @ k.swapaxes(-2, -1)) * (64 // heads) ** -0.5)
    y = (a @ vv).transpose(0, 2, 1, 3).reshape(2, 16, 64)
    tok = tok + np_linear(y, sd, b + "attn.proj")
    y = np_ln(tok, sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
    tok = tok + np_linear(np_gelu(np_linear(y, sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    np.testing.assert_allclose(ours, tok.reshape(2, 4, 4, 64), **tol)


def test_video_and_timesformer_conv_numerics():
  """Conv3d stem (kt=3, stride 2, pad 1) and TimeSformer's per-frame Conv2d patch embed."""
  sd = uniformer_sd(video=True)
  _, v, _ = _convert(sd, "uniformer_s", overrides=TINY)
  x = np.random.default_rng(0).standard_normal((1, 4, 16, 16, 3)).astype(np.float32)
  ours = layers.PatchEmbed(16, (3, 4, 4), (2, 4, 4), [(1, 1), (0, 0), (0, 0)], norm=True).apply(
      {"params": v["params"]["patch_embed1"]}, x)
  ref = np_conv(x.transpose(0, 4, 1, 2, 3).astype(np.float64), sd["patch_embed1.proj.weight"],
                sd["patch_embed1.proj.bias"], (2, 4, 4), (1, 0, 0))
  ref = np_ln(ref.transpose(0, 2, 3, 4, 1), sd["patch_embed1.norm.weight"],
              sd["patch_embed1.norm.bias"], 1e-5)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)

  sd = weights.unwrap(timesformer_sd())
  _, v, _ = _convert(timesformer_sd(), "timesformer_tiny")
  img = x[:, 0]
  ours = layers.PatchEmbed(32, (8, 8), (8, 8)).apply({"params": v["params"]["patch_embed"]}, img)
  ref = np_conv(img.transpose(0, 3, 1, 2).astype(np.float64), sd["patch_embed.proj.weight"],
                sd["patch_embed.proj.bias"], 8)
  np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)


def np_uniformer(sd, x, depth, dims, head_dim, video=False, layer_scale="none", tl=False):
  """The official UniFormer forward (image / TL / video file, eval) in numpy, NC(T)HW."""
  z = x.astype(np.float64)
  gamma = lambda b, g, y: y * sd[b + g].reshape(1, -1, *([1] * (y.ndim - 2))) \
      if b + g in sd else y
  for s in range(4):
    pe = f"patch_embed{s + 1}."
    if pe + "proj.0.weight" in sd:  # conv stem (S†): [conv, BN(, GELU, conv, BN)]
      z = np_bn(np_conv(z, sd[pe + "proj.0.weight"], sd[pe + "proj.0.bias"], 2, 1), sd,
                pe + "proj.1")
      if s == 0:
        z = np_bn(np_conv(np_gelu(z), sd[pe + "proj.3.weight"], sd[pe + "proj.3.bias"], 2, 1),
                  sd, pe + "proj.4")
    else:
      stride, pad = ((2, 4, 4), (1, 0, 0)) if (video and s == 0) else \
                    ((1, 2, 2) if video else 2, 0) if s else (4, 0)
      z = np_conv(z, sd[pe + "proj.weight"], sd[pe + "proj.bias"], stride, pad)
      z = np.moveaxis(np_ln(np.moveaxis(z, 1, -1), sd[pe + "norm.weight"], sd[pe + "norm.bias"],
                            1e-5), -1, 1)
    c = dims[s]
    for i in range(depth[s]):
      b = f"blocks{s + 1}.{i}."
      conv = lambda y, n, **k: np_conv(y, sd[b + n + ".weight"], sd[b + n + ".bias"], 1, **k)
      z = z + conv(z, "pos_embed", pad=1, groups=c)
      if s < 2:
        y = conv(conv(conv(np_bn(z, sd, b + "norm1"), "conv1"), "attn", pad=2, groups=c), "conv2")
        z = z + gamma(b, "gamma_1", y)
        z = z + gamma(b, "gamma_2", conv(np_gelu(conv(np_bn(z, sd, b + "norm2"), "mlp.fc1")),
                                         "mlp.fc2"))
      else:
        shape = z.shape
        tok = z.reshape(shape[0], c, -1).transpose(0, 2, 1)      # t*H*W + h*W + w
        n, heads = tok.shape[1], c // head_dim
        y = np_ln(tok, sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
        q, k, v = np_linear(y, sd, b + "attn.qkv").reshape(-1, n, 3, heads, head_dim
                                                             ).transpose(2, 0, 3, 1, 4)
        y = (np_softmax(q @ k.swapaxes(-2, -1) * head_dim ** -0.5) @ v)
        y = np_linear(y.transpose(0, 2, 1, 3).reshape(-1, n, c), sd, b + "attn.proj")
        tok = tok + (y * sd[b + "gamma_1"] if b + "gamma_1" in sd else y)
        y = np_ln(tok, sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
        y = np_linear(np_gelu(np_linear(y, sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
        tok = tok + (y * sd[b + "gamma_2"] if b + "gamma_2" in sd else y)
        z = tok.transpose(0, 2, 1).reshape(shape)
  tokens = np_bn(z, sd, "norm").reshape(z.shape[0], z.shape[1], -1).transpose(0, 2, 1)
  logits = np_linear(tokens.mean(1), sd, "head")
  if tl:
    logits = logits + 0.5 * np_linear(tokens, sd, "aux_head").max(1)
  return logits


@pytest.mark.parametrize("case", list(UNIFORMER_LAYOUTS))
def test_whole_model_logits_match_numpy_reference(case):
  sd_kw, model_kw = UNIFORMER_LAYOUTS[case]
  sd = uniformer_sd(**sd_kw)
  kw, v, spec = _convert(sd, "uniformer_s", overrides=dict(TINY, **model_kw))
  video = spec["kind"] == "video"
  x = np.random.default_rng(5).standard_normal(
      (2, 4, 32, 32, 3) if video else (2, 32, 32, 3)).astype(np.float32)
  want = np_uniformer(sd, np.moveaxis(x, -1, 1), TINY["depth"], TINY["embed_dim"],
                      kw.get("head_dim", 64), video=video, tl=sd_kw.get("tl", False))
  got = get_model("uniformer_s", **kw).apply(v, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_tl_eval_rule_and_gammas():
  """TL large_ls: CBlock gammas [1, C, 1, 1] -> [C]; logits = head(mean) + 0.5 max aux."""
  sd = uniformer_sd(layer_scale="all", tl=True)
  kw, v, _ = _convert(sd, "uniformer_s", overrides=dict(TINY, layer_scale="all",
                                                        token_labeling=True))
  np.testing.assert_array_equal(v["params"]["blocks1_0"]["gamma_1"],
                                sd["blocks1.0.gamma_1"].reshape(-1))
  assert v["params"]["blocks3_0"]["gamma_2"].shape == (64,)
  _, intermediates = get_model("uniformer_s", **kw).apply(
      v, jnp.ones((1, 32, 32, 3)), capture_intermediates=lambda m, _: m.name == "norm",
      mutable=["intermediates"])
  tokens = np.asarray(intermediates["intermediates"]["norm"]["__call__"][0]).reshape(1, -1, 64)
  want = tokens.mean(1) @ sd["head.weight"].T + sd["head.bias"] + 0.5 * (
      tokens @ sd["aux_head.weight"].T + sd["aux_head.bias"]).max(1)
  got = get_model("uniformer_s", **kw).apply(v, jnp.ones((1, 32, 32, 3)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_unmapped_and_missing_keys_are_listed():
  sd = uniformer_sd()
  sd["blocks9.0.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
  sd["extra.thing"] = np.zeros(2, np.float32)
  with pytest.raises(weights.WeightsError, match=r"(?s)\(2\).*blocks9\.0\.attn\.qkv.*extra"):
    _convert(sd, "uniformer_s", overrides=TINY)
  sd = uniformer_sd()
  del sd["blocks2.1.conv1.weight"], sd["norm.running_var"]
  with pytest.raises(weights.WeightsError,
                     match=r"(?s)missing.*\(2\).*norm/var.*blocks2_1/conv1/kernel.*torch: blocks2.1.conv1.weight"):
    _convert(sd, "uniformer_s", overrides=TINY)
  with pytest.raises(weights.WeightsError, match="shapes that do not fit"):
    _convert(uniformer_sd(), "uniformer_s", overrides=dict(TINY, embed_dim=(16, 32, 64, 128)))


def test_missing_torch_message(monkeypatch):
  import builtins
  real = builtins.__import__
  monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (
      (_ for _ in ()).throw(ImportError("no torch")) if name == "torch" else real(name, *a, **k)))
  with pytest.raises(ImportError, match="download.pytorch.org/whl/cpu"):
    weights.load_torch_file("x.pth")


# ----------------------------------------------------------------------------- StructViT, inflation


def test_structvit_from_uniformer_same_logits():
  sd = uniformer_sd()
  kw_u, v_u, _ = _convert(sd, "uniformer_s", overrides=TINY)
  kw_s, v_s, _ = _convert(sd, "structvit_s_4_1", overrides=TINY)
  u_k = v_s["params"]["blocks3_0"]["attn"]["u_k"]
  assert u_k.shape == (3, 3, 4, 64) and u_k[1, 1].min() == 1 and np.abs(u_k).sum() == 4 * 64
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  a = get_model("uniformer_s", **kw_u).apply(v_u, x)
  b = get_model("structvit_s_4_1", **kw_s).apply(v_s, x)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _image_and_inflated(mode):
  sd = uniformer_sd()
  kw, v_img, _ = _convert(sd, "uniformer_s", overrides=TINY)
  model = get_model("uniformer_s", **kw)
  clip = jnp.zeros((1, 4, 32, 32, 3))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), clip)
  v_vid = weights.fit(weights.flat_paths(v_img), abstract, inflate_mode=mode)
  return sd, model, v_img, v_vid


def test_inflation_rule():
  sd, _, v_img, v_avg = _image_and_inflated("average")
  w2d = v_img["params"]["blocks1_0"]["attn"]["kernel"]               # [5, 5, 1, C]
  w3d = v_avg["params"]["blocks1_0"]["attn"]["kernel"]               # [5, 5, 5, 1, C]
  np.testing.assert_allclose(w3d, np.repeat(w2d[None], 5, 0) / 5, rtol=1e-6)
  np.testing.assert_allclose(v_avg["params"]["patch_embed1"]["proj"]["kernel"].sum(0),
                             v_img["params"]["patch_embed1"]["proj"]["kernel"], rtol=1e-6)
  np.testing.assert_array_equal(v_avg["params"]["patch_embed2"]["proj"]["kernel"][0],
                                v_img["params"]["patch_embed2"]["proj"]["kernel"])
  _, _, _, v_c = _image_and_inflated("centre")
  k = v_c["params"]["blocks1_0"]["pos_embed"]["kernel"]
  np.testing.assert_array_equal(k[1], v_img["params"]["blocks1_0"]["pos_embed"]["kernel"])
  assert not np.any(k[0]) and not np.any(k[2])
  # The averaged kernel reproduces the 2D conv on identical frames wherever the temporal
  # window lies inside the clip (interior frames; the zero padding at the ends is not).
  x = np.random.default_rng(0).standard_normal((1, 8, 8, 16)).astype(np.float32)
  clip = np.repeat(x[:, None], 7, axis=1)
  y2 = uf.layers.DepthwiseConv(5).apply({"params": v_img["params"]["blocks1_0"]["attn"]}, x)
  y3 = uf.layers.DepthwiseConv(5).apply({"params": v_avg["params"]["blocks1_0"]["attn"]}, clip)
  np.testing.assert_allclose(y3[:, 2:5], np.repeat(y2[:, None], 3, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,tol", [("centre", 1e-5), ("average", None)])
def test_inflated_model_on_identical_frames(mode, tol):
  """Centre-frame inflation: the video model on T identical frames gives the image model's
  logits (1e-5). Averaging inflation (the official rule) cannot be exact for UniFormer:
  every temporal conv zero-pads time by (k-1)/2, so the first and last frames see a
  fraction of the kernel; we check it stays close to, but is not, the image logits."""
  _, model, v_img, v_vid = _image_and_inflated(mode)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)), jnp.float32)
  clip = jnp.repeat(x[:, None], 4, axis=1)
  want, got = model.apply(v_img, x), model.apply(v_vid, clip)
  if tol is not None:
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
  else:
    assert np.all(np.isfinite(got)) and not np.allclose(got, want, atol=1e-3)


def test_structvit_image_to_video_inflates_structure_kernels():
  """U^K / U^V windows inflate like conv kernels: centre inflation of a (noisy, non-identity)
  image StructViT gives its logits on a clip of identical frames."""
  model = get_model("structvit_tiny", structsa=dict(init_noise=0.3))
  x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 32, 32, 3)), jnp.float32)
  v_img = jax.jit(model.init)(jax.random.PRNGKey(0), x)  # jitted: one compile, not one per op
  clip = jnp.repeat(x[:, None], 4, axis=1)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), clip)
  v_vid = weights.fit(weights.flat_paths(v_img), abstract, inflate_mode="centre")
  u_k = v_vid["params"]["blocks3_0"]["attn"]["u_k"]
  assert u_k.shape == (3, 3, 3, 2, 64) and not np.any(u_k[0]) and not np.any(u_k[2])
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply(v_vid, clip), apply(v_img, x), rtol=1e-5, atol=1e-5)


def test_timesformer_resize_and_drop_head():
  sd = weights.unwrap(timesformer_sd())
  model = get_model("timesformer_tiny", img_size=64, num_frames=8, num_classes=5, embed_dim=32)
  x = jnp.zeros((1, 8, 64, 64, 3))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  init = lambda: model.init(jax.random.PRNGKey(0), x)
  with pytest.raises(weights.WeightsError, match="head/kernel.*drop_head"):
    weights.fit(weights.from_torch(sd, abstract), abstract, init)
  v = weights.fit(weights.from_torch(sd, abstract), abstract, init, drop_head=True)
  pe = v["params"]["pos_embed"]
  assert pe.shape == (1, 65, 32) and v["params"]["time_embed"].shape == (1, 8, 32)
  np.testing.assert_array_equal(pe[0, 0], sd["pos_embed"][0, 0])
  np.testing.assert_array_equal(pe[0, 1 + 2 * 8 + 2], sd["pos_embed"][0, 1 + 4 + 1])  # (2,2)->(1,1)
  np.testing.assert_array_equal(v["params"]["time_embed"][0, 3], sd["time_embed"][0, 1])
  assert v["params"]["head"]["kernel"].shape == (32, 5)
  # The resized model at 64x64x8 equals the source model run at 64x64x8 (its forward resize).
  kw, v_src, _ = _convert(timesformer_sd(), "timesformer_tiny")
  xr = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 64, 64, 3)), jnp.float32)
  feats = lambda m, vv: jax.jit(lambda vv: m.apply(
      vv, xr, capture_intermediates=lambda mm, _: mm.name == "norm",
      mutable=["intermediates"])[1]["intermediates"]["norm"])(vv)
  np.testing.assert_allclose(feats(model, v)["__call__"][0],
                             feats(get_model("timesformer_tiny", **kw), v_src)["__call__"][0],
                             rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- files, CLI


@needs_torch
def test_cli_pth_to_export(tmp_path):
  sd = uniformer_sd(tl=True)
  path = str(tmp_path / "tl.pth")
  torch.save({"state_dict_ema": {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()},
              "epoch": 3}, path)
  out = str(tmp_path / "export")
  sets = [f"--set={k}={v}" for k, v in dict(TINY, token_labeling=True, head_dim=32).items()]
  assert convert.main([f"--src={path}", "--model=uniformer_s", f"--out={out}",
                       "--image_size=32", *sets]) == 0
  meta = json.load(open(os.path.join(out, "model.json")))
  assert meta["format"] == "structvit_jax.export/1" and meta["input"]["kind"] == "image"
  assert meta["kwargs"]["token_labeling"] and meta["kwargs"]["num_classes"] == 10
  assert meta["input"]["mean"] == [0.485, 0.456, 0.406]
  # The layout of python -m structvit_jax.export: the StableHLO artefact and a model card
  # naming the checkpoint (tests/test_serving_export.py checks the artefacts' logits).
  import hashlib
  assert meta["serving"]["stablehlo"]["platforms"] == ["cpu", "cuda", "tpu"]
  assert os.path.getsize(os.path.join(out, "model.stablehlo")) > 0
  card = open(os.path.join(out, "README.md")).read()
  digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
  assert f"Converted from the official checkpoint `{path}` (sha256 {digest})" in card
  from structvit_jax import inference
  pred = inference.load(out)
  x = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
  _, v, _ = _convert(sd, "uniformer_s", overrides=dict(TINY, token_labeling=True, head_dim=32))
  np.testing.assert_allclose(np.asarray(pred.logits(x)),
                             get_model("uniformer_s", **meta["kwargs"]).apply(v, x), rtol=1e-5, atol=1e-5)
  # init_from a .pth and from the export: same variables, u_k at the centre tap.
  model = get_model("structvit_s_4_1", **dict(TINY, token_labeling=True, head_dim=32,
                                               num_classes=10))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  a = weights.init_variables_from(path, abstract, None)
  b = weights.init_variables_from(out, abstract, None)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert convert.main([f"--src={path}", "--model=uniformer_s", f"--out={out}2",
                       "--image_size=32"]) == 1  # wrong preset dims: a listed error, rc 1


# ----------------------------------------------------------------------------- init_from


def test_init_from_training_checkpoint_inflates_into_video_model(tmp_path):
  """config.init_from: an image training run's checkpoint -> a video model with another
  class count (inflate='average', drop_head=True), through _Setup.restore_or_init."""
  from test_train import tiny_config
  from structvit_jax import train
  img = tiny_config(**{"model.name": "uniformer_tiny", "num_train_steps": 2,
                       "checkpoint_every_steps": 2, "ema_decay": 0.0})
  train.train_and_evaluate(img, str(tmp_path / "img"), devices=jax.devices()[:1])
  _, want = __import__("test_train").read_params(tmp_path / "img")
  vid = tiny_config(**{"model.name": "uniformer_tiny", "data.name": "synthetic_video",
                       "data.num_frames": 4, "ema_decay": 0.0})
  vid.init_from.checkpoint = str(tmp_path / "img" / "checkpoints")
  setup = train._Setup(vid, str(tmp_path / "vid"), jax.devices()[:1], train=False)
  with pytest.raises(weights.WeightsError, match="set inflate"):
    setup.restore_or_init(vid, None)
  vid.init_from.inflate, vid.init_from.drop_head = "average", True
  state = setup.restore_or_init(vid, None)
  got = state.params
  k2, k3 = want["patch_embed1"]["proj"]["kernel"], got["patch_embed1"]["proj"]["kernel"]
  np.testing.assert_allclose(k3, np.repeat(k2[None], 3, 0) / 3, rtol=1e-6)
  np.testing.assert_array_equal(got["blocks3_0"]["attn"]["qkv"]["kernel"],
                                want["blocks3_0"]["attn"]["qkv"]["kernel"])
  assert got["head"]["kernel"].shape[1] == setup.num_classes != want["head"]["kernel"].shape[1]
  setup.ckpt.close()


def test_vit_into_divided_timesformer():
  """A 2-D (space-only) checkpoint into divided TimeSformer as the official load_pretrained:
  temporal_attn/temporal_norm1 = attn/norm1, temporal_fc and time_embed zero, so on a clip
  of identical frames it computes what the source computes."""
  sd = weights.unwrap(timesformer_sd("space_only"))
  kw_src, v_src, _ = _convert(timesformer_sd("space_only"), "timesformer_tiny")
  model = get_model("timesformer_tiny", **dict(kw_src, attention_type="divided_space_time"))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32, 32, 3)), jnp.float32)
  clip = jnp.repeat(x[:, None], 4, axis=1)
  init = lambda: model.init(jax.random.PRNGKey(0), clip)
  abstract = jax.eval_shape(init)
  v = weights.fit(weights.from_torch(sd, abstract), abstract, init)
  b = v["params"]["blocks_0"]
  np.testing.assert_array_equal(b["temporal_attn"]["qkv"]["kernel"], b["attn"]["qkv"]["kernel"])
  assert not np.any(b["temporal_fc"]["kernel"]) and not np.any(v["params"]["time_embed"])
  np.testing.assert_allclose(model.apply(v, clip),
                             get_model("timesformer_tiny", **kw_src).apply(v_src, clip),
                             rtol=1e-5, atol=1e-5)


def test_unwrap_wrappers_and_prefix():
  sd = {"a.weight": np.ones(2, np.float32)}
  for wrapper in weights.WRAPPERS:
    assert weights.unwrap({wrapper: sd, "epoch": 1}) == sd
  assert weights.unwrap({"model_state": {"model.a.weight": sd["a.weight"]}}) == sd
  assert set(weights.unwrap({"state_dict": {"x": sd["a.weight"]},
                             "state_dict_ema": sd})) == {"a.weight"}  # EMA preferred
  assert weights.unwrap(sd) == sd


def test_export_then_init_from_export(tmp_path):
  """convert's export (no torch needed) -> init_from into StructViT: u_k/u_v at the centre
  tap, everything else the UniFormer's."""
  from structvit_jax.inference import save_export
  sd = uniformer_sd()
  kw, v, spec = _convert(sd, "uniformer_s", overrides=TINY)
  save_export(str(tmp_path / "exp"), "uniformer_s", kw, v, spec, source="test")
  model = get_model("structvit_s_4_1", **kw)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  got = weights.init_variables_from(str(tmp_path / "exp"), abstract, None)
  _, want, _ = _convert(sd, "structvit_s_4_1", overrides=TINY)
  jax.tree.map(np.testing.assert_array_equal, got, want)
