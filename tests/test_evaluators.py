"""The evaluators of evaluation.py on hand-made logits: exact numbers for single-view
classification, per-video score averaging, FineGym's mean per-class top-1, and the masking
of padding and unreadable examples; the bad-example count of train and eval."""

import jax
import ml_collections
import numpy as np
import pytest

from structvit_jax import evaluation as E
from structvit_jax import run_log


def _ce(logits, label):
  z = np.asarray(logits, np.float64)
  return float(np.log(np.exp(z - z.max()).sum()) + z.max() - z[label])


def _run(evaluator, batches):
  for logits, batch in batches:
    batch = {k: np.asarray(v) for k, v in batch.items()}
    evaluator.update(jax.jit(type(evaluator).outputs)(np.asarray(logits, np.float32), batch))
  return evaluator.result()


def test_classification_exact_over_real_examples():
  ramp = list(range(7))
  b1 = ([[5, 0, 0, 0, 0, 0, 0],   # label 0: top-1
         ramp,                    # label 0: ranked last, not even top-5
         ramp,                    # label 2: 5th, top-5 only
         [0, 0, 0, 0, 0, 0, 9]],  # unreadable (masked): would be a top-1 hit
        dict(label=[0, 0, 2, 6], mask=[True, True, True, False], bad=[0, 0, 0, 1]))
  b2 = ([[0, 0, 9, 0, 0, 0, 0],   # label 2: top-1
         [0, 0, 0, 0, 0, 0, 9]],  # padding (masked, not bad)
        dict(label=[2, 6], mask=[True, False], bad=[0, 0]))
  m = _run(E.Classification(), [b1, b2])
  loss = np.mean([_ce(b1[0][0], 0), _ce(ramp, 0), _ce(ramp, 2), _ce(b2[0][0], 2)])
  assert (m["count"], m["top1"], m["top5"], m["bad_examples"]) == (4, 0.5, 0.75, 1)
  assert m["loss"] == pytest.approx(loss, rel=1e-6)
  line = run_log.eval_line("eval", 7, m)
  assert line.startswith("eval step 7: loss") and "over 4 examples (1 unreadable, left out)" in line
  # a dataset without a `bad` field reports no count
  no_bad = _run(E.Classification(), [(b2[0], dict(label=[2, 6], mask=[True, False]))])
  assert "bad_examples" not in no_bad and no_bad["top1"] == 1.0
  assert "unreadable" not in run_log.eval_line("eval", 7, no_bad)


def test_multi_view_video_sums_scores_per_video_and_mean_per_class():
  views = ([[4, 0], [0, .5], [0, .5],   # video 0 (label 0): 2 of 3 views say 1, the sum says 0
            [0, 2], [9, 0],             # video 1 (label 0): wrong; its 2nd view is unreadable
            [0, 1], [0, 1]],            # video 2 (label 1): right; its 2nd view is padding
           dict(label=[0, 0, 0, 0, 0, 1, 1], video_id=[0, 0, 0, 1, 1, 2, 2],
                mask=[True, True, True, True, False, True, False], bad=[0, 0, 0, 0, 1, 0, 0]))
  m = _run(E.MultiViewVideo(mean_per_class=True), [views])
  assert (m["count"], m["views"], m["bad_examples"]) == (3, 5, 1)
  assert m["top1"] == pytest.approx(2 / 3) and m["top5"] == 1.0
  assert m["mean_class_top1"] == pytest.approx((1 / 2 + 1) / 2)  # class 0: 1 of 2; class 1
  real = [0, 1, 2, 3, 5]
  assert m["loss"] == pytest.approx(np.mean([_ce(views[0][i], views[1]["label"][i])
                                             for i in real]), rel=1e-6)  # mean over views
  assert "over 3 videos" in run_log.eval_line("eval", 1, m)
  plain = _run(E.MultiViewVideo(), [views])
  assert "mean_class_top1" not in plain and plain["top1"] == m["top1"]


def test_bad_count_per_interval_and_in_total():
  bad = E.BadCount()
  assert bad.take() == {} and bad.console() == ""          # a dataset without the field
  for n in (2.0, 0.0, 1.0):
    m = {"loss": 1.0, "bad_examples": n}
    bad.add(m)
    assert "bad_examples" not in m                        # never averaged with the means
  assert bad.take() == {"bad_examples": 3.0} and bad.take() == {"bad_examples": 0.0}
  bad.add({"bad_examples": 4.0})
  assert bad.take() == {"bad_examples": 4.0} and bad.console() == " bad examples 7"


def test_evaluator_for_dataset_kind():
  def config(name, **data):
    return ml_collections.ConfigDict(dict(data=dict(name=name, mean_per_class=False, **data)))
  assert type(E.evaluator_for(config("synthetic_image"))) is E.Classification
  assert type(E.evaluator_for(config("synthetic_video"))) is E.Classification  # one view
  assert type(E.evaluator_for(config("imagenet2012"))) is E.Classification
  k400 = E.evaluator_for(config("kinetics400"))
  assert type(k400) is E.MultiViewVideo and not k400.mean_per_class
  gym = config("finegym")
  gym.data.mean_per_class = True
  assert E.evaluator_for(gym).mean_per_class
