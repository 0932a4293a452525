"""Exports written by an earlier version of the code (tests/data/legacy_exports, made before
the StructSA-settings refactor) still load and give the logits and probabilities they gave
then: an export is a user's artefact and must outlive changes to the code."""

import pathlib

import numpy as np
import pytest

from structvit_jax import inference

DATA = pathlib.Path(__file__).parent / "data" / "legacy_exports"
FAST_COMPILES = True


@pytest.mark.parametrize("tag", ["image_structvit_tiny", "video_structvit_tiny"])
def test_legacy_export_predicts_as_before(tag):
  d = DATA / tag
  pred = inference.load(str(d))
  np.testing.assert_allclose(pred.logits(np.load(d / "probe_input.npy")),
                             np.load(d / "probe_logits.npy"), rtol=1e-5, atol=1e-5)
  raw = np.load(d / "probe_raw.npy")
  np.testing.assert_allclose(pred.predict(list(raw)), np.load(d / "probe_raw_probs.npy"),
                             rtol=1e-5, atol=1e-6)
