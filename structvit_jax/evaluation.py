"""Evaluation metrics per dataset kind, and the one count of unreadable ('bad') examples.

`evaluator_for(config)`: a fresh evaluator for one eval pass. The trainer's jitted eval step
returns its `outputs(logits, batch)` (sums over the real examples, replicated to every
process); the host calls `update(outputs)` per batch and `result()` at the end:
- `Classification` (images, synthetic clips): loss, top-1, top-5 over the real examples.
- `MultiViewVideo` (video datasets: each video's test views are examples with a `video_id`):
  top-1/top-5 of the softmax scores summed over a video's views (SlowFast/UniFormer), each
  video once; the loss stays the mean over views; with config.data.mean_per_class
  (FineGym) also the top-1 of each class averaged over the classes present.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k highest logits."""
  k = min(k, logits.shape[-1])
  _, idx = jax.lax.top_k(logits, k)
  return jnp.any(idx == labels[:, None], axis=-1).astype(jnp.float32)


class BadCount:
  """Unreadable examples (the pipeline's optional `bad` field; train replaces them, eval
  masks them out): `of(batch)` counts a global batch on device, for the train and eval step
  outputs; the host's count per log interval (`add`, `take`) and over the run (`total`)."""

  def __init__(self):
    self.interval, self.total = None, 0.0  # interval None: the dataset flags none

  @staticmethod
  def of(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {"bad_examples": batch["bad"].astype(jnp.float32).sum()} if "bad" in batch else {}

  def add(self, metrics: dict[str, float]) -> None:
    """Moves metrics' 'bad_examples' into the count (a count, never averaged)."""
    if "bad_examples" in metrics:
      n = metrics.pop("bad_examples")
      self.interval, self.total = (self.interval or 0.0) + n, self.total + n

  def take(self) -> dict[str, float]:
    """{'bad_examples': the count since the last take}, {} for data without the field."""
    out = {} if self.interval is None else {"bad_examples": self.interval}
    self.interval = None if self.interval is None else 0.0
    return out

  def console(self) -> str:
    return f" bad examples {int(self.total)}" if self.total else ""


class Classification:
  """Single-view classification: exact means over the real examples of a padded pass."""
  keys = ("image", "label", "mask", "bad")  # the batch fields the eval step needs

  def __init__(self):
    self.totals = None

  @staticmethod
  def outputs(logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    logits = logits.astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return dict(loss=(loss * mask).sum(), top1=(topk_correct(logits, labels, 1) * mask).sum(),
                top5=(topk_correct(logits, labels, 5) * mask).sum(), count=mask.sum(),
                **BadCount.of(batch))

  def update(self, outputs: dict[str, Any]) -> None:
    self.totals = outputs if self.totals is None else jax.tree.map(jnp.add, self.totals,
                                                                   outputs)

  def result(self) -> dict[str, float]:
    t = jax.tree.map(float, jax.device_get(self.totals))
    n = max(t["count"], 1.0)
    return dict(t, loss=t["loss"] / n, top1=t["top1"] / n, top5=t["top5"] / n)


class MultiViewVideo(Classification):
  """Multi-view video testing: per-view softmax scores summed per video on the host."""
  keys = Classification.keys + ("video_id",)

  def __init__(self, mean_per_class: bool = False):
    super().__init__()
    self.mean_per_class, self.chunks = mean_per_class, []

  @staticmethod
  def outputs(logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    out = Classification.outputs(logits, batch)
    out["per_example"] = dict(probs=jax.nn.softmax(logits.astype(jnp.float32)),
                              video_id=batch["video_id"], label=batch["label"],
                              mask=batch["mask"])
    return out

  def update(self, outputs: dict[str, Any]) -> None:
    self.chunks.append(jax.device_get(outputs.pop("per_example")))
    super().update(outputs)

  def result(self) -> dict[str, float]:  # loss: mean over views; accuracies: per video
    return {**super().result(), **video_metrics(self.chunks, self.mean_per_class)}


def video_metrics(chunks: list[dict[str, np.ndarray]], mean_per_class: bool
                  ) -> dict[str, float]:
  """top-1/top-5 (and mean per-class top-1) of the softmax scores summed over each video's
  real views; count: videos, views: real views."""
  real = [{k: v[c["mask"]] for k, v in c.items()} for c in chunks]
  vid = np.concatenate([c["video_id"] for c in real]).astype(np.int64)
  if not len(vid):
    return dict(top1=0.0, top5=0.0, count=0.0, views=0.0)
  probs = np.concatenate([c["probs"] for c in real]).astype(np.float64)
  labels = np.concatenate([c["label"] for c in real])
  videos, inverse = np.unique(vid, return_inverse=True)
  scores = np.zeros((len(videos), probs.shape[1]))
  np.add.at(scores, inverse, probs)
  label = np.zeros(len(videos), np.int64)
  label[inverse] = labels
  top = np.argsort(-scores, axis=1, kind="stable")[:, :5]
  top1 = top[:, 0] == label
  out = dict(top1=float(top1.mean()), top5=float((top == label[:, None]).any(1).mean()),
             count=float(len(videos)), views=float(len(vid)))
  if mean_per_class:  # FineGym's metric: top-1 per class, averaged over classes present
    out["mean_class_top1"] = float(np.mean([top1[label == k].mean() for k in np.unique(label)]))
  return out


def evaluator_for(config: ml_collections.ConfigDict) -> Classification:
  """A fresh evaluator for one pass over config's eval split."""
  from structvit_jax.data import registry
  if registry.get(config.data.name).views:
    return MultiViewVideo(mean_per_class=config.data.mean_per_class)
  return Classification()
