"""Mesh, shardings, global batches and multi-host initialisation.

One mesh axis, 'data', over every device of every process. Params are replicated by default;
with FSDP each array is split over 'data' along its largest divisible dimension. The jitted
step runs on global arrays (GSPMD, no pmap), so BatchNorm statistics are over the global
batch (docs/platform_notes.md, "Meshes and sharding").
"""

from typing import Any, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize() when config.distributed.enabled.

  Without a coordinator address JAX auto-detects the cluster (TPU pods, SLURM, ...);
  otherwise coordinator_address / num_processes / process_id are passed explicitly.
  """
  d = config.distributed
  if not d.enabled or jax.distributed.is_initialized():
    return
  # Cross-process collectives on CPU (local multi-process runs and tests).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if d.coordinator_address:
    kwargs = dict(coordinator_address=d.coordinator_address,
                  num_processes=d.num_processes, process_id=d.process_id)
  if d.local_device_ids:
    kwargs["local_device_ids"] = [int(i) for i in str(d.local_device_ids).split(",")]
  logging.info("jax.distributed.initialize(%s)", kwargs or "auto-detect")
  jax.distributed.initialize(**kwargs)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D ('data',) mesh with Auto axis types: classic GSPMD propagation, not the Explicit
  axes jax.make_mesh creates by default (docs/platform_notes.md)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def fsdp_spec(shape: Sequence[int], n: int) -> P:
  """Shard the largest dimension divisible by n over 'data'; replicate if none is."""
  dims = [i for i, s in enumerate(shape) if s % n == 0 and s >= n]
  if n == 1 or not dims:
    return P()
  best = max(dims, key=lambda i: shape[i])
  return P(*[("data" if i == best else None) for i in range(len(shape))])


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp: bool) -> Any:
  """NamedShardings for a (abstract) state tree: replicated, or FSDP over 'data'."""
  n = mesh.shape["data"]
  def one(x):
    shape = getattr(x, "shape", ())
    return NamedSharding(mesh, fsdp_spec(shape, n) if fsdp else P())
  return jax.tree.map(one, abstract_state)


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assemble the global batch (sharded over 'data') from this process's slice."""
  sharding = batch_sharding(mesh)
  nproc = jax.process_count()
  def one(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * nproc,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return {k: one(v) for k, v in local.items()}
