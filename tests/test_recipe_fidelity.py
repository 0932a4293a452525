"""The recipes against the official trainers (docs/official_weights.md, "Recipes"): which
leaves get weight decay (timm's rule, on the S presets, by jax.eval_shape: no compile), the
384 fine-tuning recipe's fields, and a fine-tune of a tiny 224-style export at a larger
size through config.init_from."""

import os
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections.config_flags import config_flags

from structvit_jax import config_utils, export, inference, optim, train, train_state, weights
from structvit_jax.data.preprocessing import eval_spec
from structvit_jax.models import get_model

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_train import tiny_config  # noqa: E402

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
FAST_COMPILES = True  # XLA's cheap compile mode for this module (conftest.py)


def load(spec: str):
  return config_flags.ConfigFileFlagParser("config").parse(str(CONFIG_DIR / spec))


def abstract_params(name: str, size: int = 224, **kwargs):
  model = get_model(name, **kwargs)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                        x)["params"]


def flat_mask(params, rule: str) -> dict[str, bool]:
  mask = optim.decay_mask(params, rule)
  return {"/".join(p): bool(v) for p, v in weights.flat_paths(mask).items()}


# timm's create_optimizer (add_weight_decay): no decay for `len(shape) == 1`, names ending
# '.bias' and names in no_weight_decay() = {'pos_embed', 'cls_token'} matched whole. In the
# official UniFormer-S the 1-D tensors are exactly the biases and the norm weights
# (BatchNorm `normN` in CBlocks and the final `norm`, LayerNorm `normN` and
# `patch_embedK.norm`); so a state_dict key is decayed iff it is a non-norm `.weight`.
def official_decayed(torch_key: str) -> bool:
  return torch_key.endswith(".weight") and not re.search(r"(^|\.)norm\d?\.weight$", torch_key)


@pytest.mark.parametrize("name", ["uniformer_s", "structvit_s_4_1"])
def test_timm_rule_on_the_s_preset_decays_what_the_official_trainer_decays(name):
  params = abstract_params(name)
  got = flat_mask({"params": params}["params"], "timm")
  twinned = {path: weights.torch_key(("params", *path.split("/"))) for path in got}
  for path, key in twinned.items():
    if key is not None:
      assert got[path] == official_decayed(key), (path, key)
    else:  # StructSA's U^K / U^V: no official twin; kernels of rank > 1, decayed by rank
      assert re.search(r"/u_[kv]$", path) and got[path], path
  assert (name == "structvit_s_4_1") == any(k is None for k in twinned.values())
  # The point: the position-encoding convs (one dw 3x3 per block, 3+4+8+3 blocks)
  # are decayed officially, and the only leaves the old 'no_pos_embed' rule treats otherwise.
  old = flat_mask(params, "no_pos_embed")
  differ = sorted(p for p in got if got[p] != old[p])
  assert differ == sorted(f"blocks{s}_{i}/pos_embed/kernel"
                          for s, n in zip((1, 2, 3, 4), (3, 4, 8, 3)) for i in range(n))
  assert all(got[p] and not old[p] for p in differ)
  assert got["head/kernel"] and not got["head/bias"] and not got["norm/scale"]
  assert not got["blocks1_0/pos_embed/bias"] and not got["patch_embed1/norm/scale"]


def test_timm_rule_layer_scale_and_top_level_tokens():
  # TL UniFormer-L: CBlock gammas are [1, C, 1, 1] in PyTorch (rank 4: decayed),
  # SABlock gammas [C] (not). Only the abstract shapes are built.
  got = flat_mask(abstract_params("uniformer_l", 64), "timm")
  assert got["blocks1_0/gamma_1"] and got["blocks2_0/gamma_2"]
  assert not got["blocks3_0/gamma_1"] and not got["blocks4_0/gamma_2"]
  # DeiT: timm's exact-name exemption hits its top-level pos_embed / cls_token.
  got = flat_mask(abstract_params("deit_tiny", 32), "timm")
  assert not got["pos_embed"] and not got["cls_token"] and got["head/kernel"]
  assert all(flat_mask({"a": jnp.ones(3), "pos_embed": jnp.ones((1, 2, 3))}, "all").values())
  with pytest.raises(ValueError, match="valid: 'no_pos_embed', 'timm', 'all'"):
    optim.decay_mask({}, "everything")


@pytest.mark.parametrize("spec,rule", [
    ("in1k_s.py", "timm"), ("in1k_b.py", "timm"), ("in1k_l.py", "timm"),
    ("in1k_s.py:res=384", "timm"), ("deit_s_ablation.py", "timm"), ("k400_s.py", "timm"),
    ("ssv2_b.py", "timm"), ("diving48_b.py", "timm"), ("finegym_b.py", "timm"),
    ("ssv1_s.py", "timm"), ("deit_s_ablation.py:video=True", "timm"),
    ("k400_timesformer.py", "all"), ("ssv2_timesformer.py", "all"),
    ("demo.py", "no_pos_embed")])
def test_recipes_use_their_official_decay_rule(spec, rule):
  assert load(spec).weight_decay_mask == rule


@pytest.mark.parametrize("size,batch,drop_path", [("s", 512, 0.1), ("b", 512, 0.3),
                                                  ("l", 256, 0.3)])
def test_384_recipe_is_the_official_tl_384_run(size, batch, drop_path):
  c224, c = load(f"in1k_{size}.py"), load(f"in1k_{size}.py:res=384")
  assert c.model.to_dict() == {**c224.model.to_dict(), "kwargs": {
      **c224.model.kwargs.to_dict(), "drop_path_rate": drop_path}}
  assert (c.batch_size, c.num_epochs, c.warmup_epochs, c.weight_decay) == (
      batch, 60.0, 0.0, 1e-8)
  assert c.mixup_alpha == c.cutmix_alpha == c.ema_decay == 0.0
  assert c.label_smoothing == 0.1 and not c.init_from.drop_head
  # lr 5e-6 = min_lr: constant over the run (at the recipe's batch).
  sched = optim.make_schedule(c, total_steps=600, steps_per_epoch=10)
  assert [float(sched(s)) for s in (0, 1, 300, 599, 600)] == pytest.approx([5e-6] * 5)
  # Evaluation at 384 with timm's crop 0.9; the 224 recipe keeps DeiT's 0.875.
  assert eval_spec(c.data)["image_size"] == 384 and eval_spec(c.data)["crop_ratio"] == 0.9
  assert eval_spec(c224.data)["image_size"] == 224
  assert eval_spec(c224.data)["crop_ratio"] == 0.875
  assert load(f"in1k_{size}.py:res=224").to_dict() == c224.to_dict()
  v = load(f"in1k_{size}.py:d=0,res=384")
  assert v.model.name.startswith("uniformer_") and v.data.image_size == 384


@pytest.fixture(scope="module")
def export_224(tmp_path_factory):
  """structvit_tiny exported at its 'pre-training' size (32): weights from another seed than
  the fine-tune's own initialisation, BatchNorm statistics away from their init values."""
  config = tiny_config()
  model = train_state.build_model(config, 10)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(7), x, train=False))(
      jnp.zeros((1, 32, 32, 3)))
  variables = {"params": variables["params"],
               "batch_stats": jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])}
  out = str(tmp_path_factory.mktemp("export") / "model")
  inference.save_export(out, config.model.name, train_state.model_kwargs(config, 10), variables,
                        eval_spec(config.data))
  return out


def test_384_finetune_starts_from_a_224_export(export_224, tmp_path):
  common = config_utils.import_sibling(str(CONFIG_DIR / "common.py"), "common")
  exported = inference.load(export_224)
  assert exported.input_spec["image_size"] == 32
  # The recipe's fine-tuning fields on the tiny model, at twice its export size.
  c = tiny_config(num_train_steps=2, **{"data.eval_examples": 16})
  common.imagenet_finetune(c, "s", 64)
  c.batch_size = c.eval_batch_size = c.lr_base_batch_size = 16  # lr stays 5e-6
  c.init_from.checkpoint = export_224
  assert (c.data.image_size, c.lr, c.warmup_epochs, c.ema_decay) == (64, 5e-6, 0.0, 0.0)

  # Step 0: the export's params and BatchNorm statistics, unchanged (no pos-embed resize).
  setup = train._Setup(c, str(tmp_path / "probe"), jax.devices()[:1], train=True)
  assert setup.input_shape == (64, 64, 3)
  state = setup.restore_or_init(c, None)
  setup.ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               exported.variables["params"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.batch_stats),
               exported.variables["batch_stats"])

  # Two steps at 64 and an evaluation there; at lr 5e-6 the weights barely move.
  workdir = str(tmp_path / "ft")
  state, ev = train.train_and_evaluate(c, workdir, devices=jax.devices()[:1])
  assert int(state.step) == 2 and ev["eval/count"] == 16
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
               jax.device_get(state.params), exported.variables["params"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(),
                                       jax.device_get(state.params),
                                       exported.variables["params"]))
  assert max(moved) > 0
  out = str(tmp_path / "export384")
  export.export(workdir, out)
  assert inference.load(out).input_spec["image_size"] == 64
