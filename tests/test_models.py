"""The zoo: presets build, param counts and GFLOPs match the paper, the models run."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structvit_jax import flops
from structvit_jax.models import StructSAConfig, get_model, list_models
from structvit_jax.model_stats import model_stats

FAST_COMPILES = True  # XLA's cheap compile mode for this module (conftest.py)

IMAGE, VIDEO = (224, 224, 3), (16, 224, 224, 3)


def _shapes(name):
  image_only = name.startswith("deit") or name == "uniformer_s_plus"
  return [IMAGE] if image_only else [IMAGE, VIDEO]


@pytest.mark.parametrize("name", list_models())
def test_every_preset_builds_with_eval_shape(name):
  model = get_model(name)
  for shape in _shapes(name):  # init and forward in one trace
    out, variables = jax.eval_shape(lambda: model.init_with_output(
        jax.random.PRNGKey(0), jnp.zeros((2, *shape)), train=False))
    assert out.shape == (2, model.num_classes) and out.dtype == jnp.float32
    assert variables["params"]


@pytest.mark.parametrize("name,params", [
    ("uniformer_s", 21_545_256), ("uniformer_b", 49_776_552), ("uniformer_b_ls", 49_796_520),
    ("uniformer_s_plus", 24_032_552), ("uniformer_l", 100_103_888), ("deit_s", 22_050_664)])
def test_param_counts_match_the_official_models(name, params):
  assert _param_count(name) == params


def test_video_param_count_matches_official_k400():
  assert _param_count("uniformer_s", (16, 224, 224, 3), num_classes=400) == 21_400_400
  assert _param_count("uniformer_b", (16, 224, 224, 3), num_classes=400) == 49_813_200
  # model_stats (the CLI below) counts the same parameters
  assert model_stats("uniformer_s", frames=16, num_classes=400)["params"] == 21_400_400


def _param_count(name, shape=IMAGE, **kw):
  """Parameters of the preset (the init's shapes only: no forward traced for a GFLOPs count)."""
  model = get_model(name, **kw)
  return flops.count_params(jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))["params"])


# DESIGN §3 (fvcore multiply-adds); UniFormer-L at the corrected 19.76.
@pytest.mark.parametrize("name,frames,gflops", [
    ("uniformer_s", 0, 3.64), ("uniformer_b", 0, 8.27), ("structvit_s_4_2", 0, 3.6),
    ("structvit_s_4_1", 0, 4.3), ("structvit_s_8_1", 0, 5.4), ("structvit_b_4_2", 0, 8.3),
    ("structvit_b_4_1", 0, 9.9), ("structvit_b_8_1", 0, 12.0), ("uniformer_l", 0, 19.76),
    ("uniformer_s", 16, 41.8), ("structvit_s_4_1", 16, 81.75)])
def test_gflops_within_5_percent_of_the_paper(name, frames, gflops):
  got = model_stats(name, frames=frames)["gflops"]
  assert abs(got - gflops) / gflops <= 0.05, (name, got, gflops)


def test_macs_counter_counts_matmul_and_conv_exactly():
  a = jax.ShapeDtypeStruct((3, 5, 7), jnp.float32)
  b = jax.ShapeDtypeStruct((3, 7, 11), jnp.float32)
  assert flops.count_macs(jnp.matmul, a, b)["total"] == 3 * 5 * 7 * 11
  x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 4, 6), jnp.float32)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert flops.count_macs(conv, x, w)["total"] == 2 * 8 * 8 * 6 * 4 * 9


@pytest.fixture(scope="module")
def tiny():
  """structvit_tiny with exact centre-tap init and uniformer_tiny sharing its weights."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  ssa = get_model("structvit_tiny", structsa=dict(init="centre", init_noise=0.0))
  uni = get_model("uniformer_tiny")
  v = jax.jit(lambda x: ssa.init(jax.random.PRNGKey(1), x))(x)
  return ssa, uni, v, x


def test_identity_structvit_equals_uniformer(tiny):
  ssa, uni, v, x = tiny
  strip = lambda t: {k: strip(s) for k, s in t.items() if k not in ("u_k", "u_v")} \
      if isinstance(t, dict) else t
  v_uni = {"params": strip(v["params"]), "batch_stats": v["batch_stats"]}
  assert flops.count_params(v_uni["params"]) == flops.count_params(
      jax.eval_shape(lambda: uni.init(jax.random.PRNGKey(0), x))["params"])
  np.testing.assert_allclose(jax.jit(ssa.apply)(v, x), jax.jit(uni.apply)(v_uni, x),
                             atol=1e-5, rtol=1e-5)


def test_state_dict_names_are_the_official_ones(tiny):
  _, _, v, _ = tiny
  p = v["params"]
  assert set(p) >= {"patch_embed1", "blocks1_0", "blocks3_0", "norm", "head"}
  assert set(p["blocks1_0"]) == {"pos_embed", "norm1", "conv1", "attn", "conv2", "norm2", "mlp"}
  assert set(p["blocks3_0"]) == {"pos_embed", "norm1", "attn", "norm2", "mlp"}
  assert set(p["blocks3_0"]["attn"]) == {"qkv", "proj", "u_k", "u_v"}
  assert p["blocks1_0"]["attn"]["kernel"].shape == (5, 5, 1, 16)      # torch [C, 1, 5, 5]
  assert p["patch_embed1"]["proj"]["kernel"].shape == (4, 4, 3, 16)   # torch [C, 3, 4, 4]
  assert p["blocks3_0"]["attn"]["u_k"].shape == (3, 3, 2, 64)        # [M, D, C]


def _train_grads(model, v, x):
  def loss(params):
    logits, upd = model.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"],
                              rngs={"dropout": jax.random.PRNGKey(2)})
    return jnp.mean(jnp.sin(logits)), upd
  return jax.jit(jax.grad(loss, has_aux=True))(v["params"])


def test_remat_keeps_parameter_names_and_gradients():
  # 64 px so that the last BatchNorm sees more than one value per example (well conditioned).
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 64, 64, 3))
  base = get_model("structvit_tiny", drop_path_rate=0.2)
  v = jax.jit(lambda x: base.init(jax.random.PRNGKey(1), x))(x)
  v_remat = jax.eval_shape(lambda x: base.clone(remat=True).init(jax.random.PRNGKey(1), x), x)
  assert jax.tree.structure(v) == jax.tree.structure(v_remat)
  g1, _ = _train_grads(base, v, x)
  g2, _ = _train_grads(base.clone(remat=True), v, x)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(a).max())), rtol=1e-3)


def test_video_model_train_step():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 32, 32, 3))
  model = get_model("structvit_tiny", drop_path_rate=0.2)
  v = jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x))(x)
  g, upd = _train_grads(model, v, x)
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(g))
  assert float(np.abs(g["blocks3_0"]["attn"]["u_k"]).max()) > 0
  assert not np.allclose(upd["batch_stats"]["norm"]["mean"], v["batch_stats"]["norm"]["mean"])


def test_bf16_compute_keeps_fp32_params():
  x = jnp.ones((1, 32, 32, 3))
  m = get_model("structvit_tiny", dtype="bfloat16")
  v = jax.jit(lambda x: m.init(jax.random.PRNGKey(0), x))(x)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v))
  y = jax.jit(m.apply)(v, x)
  assert y.dtype == jnp.float32 and np.isfinite(y).all()
  f32 = jax.jit(get_model("structvit_tiny").apply)(v, x)
  np.testing.assert_allclose(y, f32, atol=0.1, rtol=0.1)


def test_deit_structsa_variants_run():
  x = jnp.ones((1, 32, 32, 3))
  for kw in [dict(d=0), dict(d=1), dict(d=2, aggregation="element"), dict(d=2, kernel_size=5)]:
    m = get_model("deit_tiny", structsa=kw)
    v = jax.jit(lambda x: m.init(jax.random.PRNGKey(0), x))(x)
    assert jax.jit(m.apply)(v, x).shape == (1, 10)


def test_unknown_names_and_fields_are_clear_errors():
  with pytest.raises(ValueError, match="valid names: .*structvit_s_4_1"):
    get_model("structvit_x")
  with pytest.raises(ValueError, match="unknown field.*'dd'.*valid fields"):
    get_model("structvit_s_4_1", dd=3)
  with pytest.raises(ValueError, match="dtype"):
    get_model("structvit_s_4_1", dtype="float8")
  with pytest.raises(ValueError, match="image-only"):
    get_model("uniformer_s_plus").init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 32, 32, 3)))


def test_structsa_overrides_change_only_the_fields_they_name():
  m = get_model("structvit_s_4_2", structsa=dict(d=8))
  assert m.structsa == StructSAConfig(d=8, stride=2)
  cfg = StructSAConfig(d=1, aggregation="element")
  assert get_model("deit_s", structsa=cfg).structsa is cfg
  assert get_model("uniformer_s").structsa == StructSAConfig()  # D = 0: UniFormer
  assert get_model("structvit_s_8_1").structsa.init_noise == 0.02


def test_flat_structsa_fields_of_old_configs_fold_into_structsa():
  """config.json / model.json written before StructSAConfig hold the fields flat."""
  old = dict(d=8, stride=2, kernel_size=[3, 3, 3], aggregation="element",
             implementation="reference", structure_init_noise=0.0, attention_impl="xla",
             depthwise_impl="xla", num_classes=5)
  m = get_model("structvit_s_4_1", **old)
  assert m.structsa == StructSAConfig(d=8, stride=2, kernel_size=(3, 3, 3),
                                      aggregation="element", form="reference", init_noise=0.0,
                                      attention_impl="xla", depthwise_impl="xla")
  assert m.num_classes == 5
  with pytest.raises(ValueError, match="stride=2 needs D > 0"):
    get_model("uniformer_s", stride=2)
  with pytest.raises(ValueError, match="unknown field.*'d'"):
    get_model("timesformer_tiny", d=4)  # no StructSA in TimeSformer


def test_model_stats_cli_json():
  out = subprocess.run([sys.executable, "-m", "structvit_jax.model_stats",
                        "--model=structvit_s_4_2", "--frames=16", "--num_classes=400", "--json",
                        "--set", "d=8"], capture_output=True, text=True, check=True).stdout
  row = json.loads(out.strip().splitlines()[-1])
  assert row["model"] == "structvit_s_4_2" and row["input"] == "16x224x224"
  assert row["overrides"] == {"d": 8} and row["params"] > 21e6 and row["gflops"] > 41
