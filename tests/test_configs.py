"""Every recipe in configs/ loads the way main.py loads it (by path, with and without a
variant string, with --config.x=y overrides), rejects unknown variant keys, and builds its
model with jax.eval_shape (no compile)."""

import glob
import os
import re

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections.config_flags import config_flags
import pytest

from structvit_jax import config_utils
from structvit_jax.data import DatasetNotFoundError, create_input
from structvit_jax.models import get_model

FAST_COMPILES = True  # XLA's cheap compile mode for this module (conftest.py)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
RECIPES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                 if os.path.basename(p) not in ("base.py", "common.py"))
# A variant string per recipe, exercising its keys.
VARIANTS = {
    "in1k_s": "d=8,stride=1", "in1k_b": "d=4,stride=2", "in1k_l": "d=0",
    "k400_s": "d=4,stride=2,frames=8", "k400_b": "d=0", "ssv2_s": "aggregation=element",
    "ssv2_b": "kernel_size=3,frames=16", "diving48_b": "form=reference",
    "finegym_b": "classes=99", "deit_s_ablation": "d=8,m=5,aggregation=element",
    "ssv1_s": "d=8,frames=8", "ssv1_b": "aggregation=element",
    "demo": "image_size=48,epochs=1", "demo_video": "frames=4,image_size=32",
    "k400_timesformer": "attention=joint_space_time", "ssv2_timesformer": "attention=axial",
}


def load(spec: str):
  """As `--config=configs/<spec>` does (relative to no particular working directory)."""
  return config_flags.ConfigFileFlagParser("config").parse(os.path.join(CONFIG_DIR, spec))


def input_shape(c):
  s = c.data.image_size
  return (c.data.num_frames, s, s, 3) if c.data.num_frames else (s, s, 3)


def test_every_recipe_is_listed():
  expected = {"in1k_s", "in1k_b", "in1k_l", "k400_s", "k400_b", "ssv1_s", "ssv1_b",
              "ssv2_s", "ssv2_b",
              "diving48_b", "finegym_b", "deit_s_ablation", "demo", "demo_video",
              "k400_timesformer", "ssv2_timesformer"}
  assert set(RECIPES) == expected == set(VARIANTS)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_builds_its_model(name):
  c = load(f"{name}.py")
  assert c.is_locked
  doc = config_utils.import_sibling(os.path.join(CONFIG_DIR, f"{name}.py"), name).__doc__
  assert "python -m structvit_jax.main --config=configs/" in doc and "xpected" in doc
  v = load(f"{name}.py:{VARIANTS[name]}")
  for cfg in (c, v):
    model = get_model(cfg.model.name, **cfg.model.kwargs)
    x = jnp.zeros((1, *input_shape(cfg)))
    variables = jax.eval_shape(lambda m=model, x=x: m.init(jax.random.PRNGKey(0), x, train=False))
    assert variables["params"]
  assert v.to_dict() != c.to_dict()


def test_variants_change_what_they_say():
  assert load("in1k_s.py:d=8,stride=1").model.kwargs.structsa.d == 8
  assert load("in1k_s.py:d=0").model.name == "uniformer_s"
  c = load("deit_s_ablation.py:d=2,m=7,aggregation=element")
  ssa = c.model.kwargs.structsa
  assert (ssa.d, ssa.kernel_size, ssa.aggregation) == (2, 7, "element")
  c = load("finegym_b.py:classes=99")
  assert c.model.kwargs.num_classes == 99 and "99" in c.data.train_split
  assert load("k400_s.py:frames=8").data.num_frames == 8


@pytest.mark.parametrize("name", ["in1k_s", "k400_b", "deit_s_ablation", "demo",
                                  "k400_timesformer"])
def test_unknown_variant_key_raises_listing_valid_keys(name):
  with pytest.raises(ValueError, match="valid keys"):
    load(f"{name}.py:no_such_key=1")


@pytest.mark.parametrize("name", ["k400_timesformer", "ssv2_timesformer"])
def test_timesformer_recipes_take_every_scheme_and_the_official_solver(name):
  from structvit_jax.data.spec import VIDEO_MEAN, VIDEO_STD
  from structvit_jax.models.timesformer import ATTENTION_TYPES
  from structvit_jax.optim import make_schedule
  for scheme in ATTENTION_TYPES:
    assert load(f"{name}.py:attention={scheme}").model.kwargs.attention_type == scheme
  with pytest.raises(ValueError, match="valid: divided_space_time, joint_space_time"):
    load(f"{name}.py:attention=divided")
  c = load(f"{name}.py")
  assert c.model.kwargs.attention_type == "divided_space_time"
  assert (c.data.num_frames, c.data.image_size, c.data.test_clips, c.data.test_crops) == (
      8, 224, 1, 3)
  assert (tuple(c.data.mean), tuple(c.data.std)) == (VIDEO_MEAN, VIDEO_STD)
  assert (c.optimizer, c.momentum, c.weight_decay, c.num_epochs, c.warmup_epochs) == (
      "sgd", 0.9, 1e-4, 15.0, 0.0)
  assert c.label_smoothing == c.mixup_alpha == c.cutmix_alpha == 0.0
  # lr 0.005 at the official global batch of 8, x0.1 from epoch 11 and again from 14.
  schedule = make_schedule(c, total_steps=15 * 100, steps_per_epoch=100)
  for step, lr in ((0, 5e-3), (1099, 5e-3), (1100, 5e-4), (1399, 5e-4), (1400, 5e-5),
                   (1499, 5e-5)):
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), step
  if name == "ssv2_timesformer":
    assert (c.model.kwargs.num_classes, c.data.sampling, c.data.random_flip) == (
        174, "segment", False)
  else:
    assert (c.model.kwargs.num_classes, c.data.sampling, c.data.sampling_rate) == (
        400, "dense", 32)


def test_parse_arg_is_strict_and_typed():
  a = config_utils.parse_arg("d=8,lr=0.5,name=x,flag", d=4, lr=1.0, name="a", flag=False,
                             other=True)
  assert (a.d, a.lr, a.name, a.flag, a.other) == (8, 0.5, "x", True, True)
  assert isinstance(a.d, int) and isinstance(a.lr, float)
  assert config_utils.parse_arg("flag=false", flag=True).flag is False
  assert config_utils.parse_arg(None, d=4).d == 4
  for bad in ("d=eight", "d", "flag=maybe"):
    with pytest.raises(ValueError):
      config_utils.parse_arg(bad, d=4, flag=False)
  with pytest.raises(ValueError, match="valid keys: d=4"):
    config_utils.parse_arg("e=1", d=4)


def _parse_command_line(*args):
  argv = ["prog", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "cfg", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_command_line_overrides_on_a_locked_config():
  path = os.path.join(CONFIG_DIR, "in1k_s.py")
  c = _parse_command_line(f"--config={path}:d=8", "--config.batch_size=256",
                          "--config.data.data_dir=/data", "--config.model.kwargs.structsa.stride=2")
  assert (c.batch_size, c.data.data_dir, c.model.kwargs.structsa.d,
          c.model.kwargs.structsa.stride) == (256, "/data", 8, 2)
  with pytest.raises(AttributeError, match="batch_size"):  # a typo: error, not a new field
    _parse_command_line(f"--config={path}", "--config.batch_sise=8")


@pytest.mark.parametrize("name", ["demo", "demo_video"])
def test_demo_configs_match_their_dataset(name):
  c = load(f"{name}.py")
  inp = create_input(c, "eval", 16)
  assert inp.num_classes == c.model.kwargs.num_classes
  assert inp.input_shape == input_shape(c)


@pytest.mark.parametrize("name", [n for n in RECIPES if not n.startswith("demo")])
def test_real_dataset_recipes_fail_fast(name):
  c = load(f"{name}.py")
  with pytest.raises(DatasetNotFoundError, match=c.data.name):
    create_input(c, "train", 8)


def test_recipes_import_only_base_and_common():
  """One level above base.py: shared recipe logic lives in configs/common.py."""
  for name in RECIPES + ["common"]:
    src = open(os.path.join(CONFIG_DIR, f"{name}.py")).read()
    siblings = set(re.findall(r'import_sibling\(__file__, "(\w+)"\)', src))
    assert siblings <= ({"base"} if name == "common" else {"base", "common"}), (name, siblings)


def test_variant_export_records_and_rebuilds_the_real_variant(tmp_path):
  """in1k_s.py:d=8,stride=2 is no preset: model.json must still say D = 8, S = 2 and load
  as that model (a tiny-width copy, so that the export is small)."""
  import json
  import numpy as np
  from structvit_jax import inference, train_state
  c = load("in1k_s.py:d=8,stride=2")
  with c.unlocked():
    c.model.kwargs.depth, c.model.kwargs.embed_dim = (1, 1, 1, 1), (16, 32, 64, 64)
    c.model.kwargs.head_dim = 32
  kwargs = train_state.model_kwargs(c, 10)
  model = get_model(c.model.name, **kwargs)
  x = jnp.ones((1, 32, 32, 3))
  # jit: op-by-op (eager) init and apply compile every op of the model on its own.
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  spec = dict(kind="image", image_size=32, num_frames=0, mean=[0.5] * 3, std=[0.5] * 3)
  inference.save_export(str(tmp_path), c.model.name, kwargs, variables, spec)
  meta = json.loads((tmp_path / "model.json").read_text())
  assert (meta["kwargs"]["structsa"]["d"], meta["kwargs"]["structsa"]["stride"]) == (8, 2)
  predictor = inference.load(str(tmp_path))
  loaded = predictor.model
  assert (loaded.structsa.d, loaded.structsa.stride) == (8, 2)
  assert predictor.variables["params"]["blocks3_0"]["attn"]["u_k"].shape == (3, 3, 8, 64)
  np.testing.assert_allclose(jax.jit(loaded.apply)(predictor.variables, x),
                             jax.jit(model.apply)(variables, x), atol=1e-6)


def test_old_config_json_with_flat_structsa_fields_builds_its_variant():
  """A workdir's config.json from before StructSAConfig holds model.kwargs.d, .stride, ..."""
  import ml_collections
  from structvit_jax import train_state
  old = load("in1k_s.py").to_dict()
  old["model"]["kwargs"] = dict(num_classes=1000, drop_path_rate=0.1, d=8, stride=2,
                                kernel_size=3, aggregation="element", implementation="reference")
  model = train_state.build_model(ml_collections.ConfigDict(old), 1000)
  assert (model.structsa.d, model.structsa.stride, model.structsa.aggregation,
          model.structsa.form) == (8, 2, "element", "reference")
