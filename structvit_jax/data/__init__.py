"""Input pipelines: `create_input(config, split, local_batch_size, ...)` (pipeline.py) over
random-access sources (the built-in procedural datasets in synthetic.py; real datasets
next)."""

from structvit_jax.data.pipeline import (DatasetNotFoundError, DatasetSpec, Input,
                                         create_input, get_dataset)

__all__ = ["DatasetNotFoundError", "DatasetSpec", "Input", "create_input", "get_dataset"]
