"""Something-Something V1, StructViT-S-4-1, 16 frames (TSN segment sampling), from K400.

  python -m structvit_jax.main --config=configs/ssv1_s.py --workdir=/tmp/ssv1_s \
      --config.data.data_dir=/data/ssv1 --config.init_from.checkpoint=/tmp/k400_s/checkpoints

DATA_DIR holds the frame folders (20bn-something-something-v1/<id>/00001.jpg ...) and the
lists train.csv / val.csv written by `python -m structvit_jax.data.video_lists
--dataset=ssv1` (README, "Video datasets"). The recipe is the SSv2 one (paper section 4.1:
60 epochs incl. 5 warm-up, init from K400, segment sampling, no flip); 174 classes,
86,017 train / 11,522 validation videos.
Variants: d, stride, kernel_size, aggregation, form, frames.
Expected top-1 (3 crops x 1 clip): the paper's Table 5a SSv1 row for S-4-1 (not transcribed
here).
"""

from structvit_jax import config_utils

common = config_utils.import_sibling(__file__, "common")


def get_config(arg=None):
  c = common.segment_config("s", common.structsa_arg(arg, frames=16), name="ssv1",
                            num_classes=174)
  return c
