"""Input pipelines: `create_input(config, split, local_batch_size, ...)` (pipeline.py) over
the datasets of registry.py: the built-in procedural ones (synthetic.py, motion.py), tfds
ArrayRecord images prepared by `python -m structvit_jax.data.prepare` (images.py,
builders.py, transforms.py) and videos listed in mmaction-style list files (video.py)."""

from structvit_jax.data.pipeline import Input, create_input
from structvit_jax.data.registry import get_dataset
from structvit_jax.data.spec import DatasetNotFoundError, DatasetSpec

__all__ = ["DatasetNotFoundError", "DatasetSpec", "Input", "create_input", "get_dataset"]
