"""Input pipelines: `create_input(config, split, local_batch_size, ...)` (pipeline.py) over
random-access sources: the built-in procedural datasets (synthetic.py), tfds ArrayRecord
images prepared by `python -m structvit_jax.data.prepare` (images.py, builders.py,
transforms.py) and videos listed in mmaction-style list files (video.py)."""

from structvit_jax.data.pipeline import (DatasetNotFoundError, DatasetSpec, Input,
                                         create_input, get_dataset)

__all__ = ["DatasetNotFoundError", "DatasetSpec", "Input", "create_input", "get_dataset"]
