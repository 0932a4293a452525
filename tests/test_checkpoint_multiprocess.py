"""Two processes (127.0.0.1, gloo) restoring a checkpoint whose newest step only one of
them can use: they must agree to skip it, move it aside once and restore the same older
step (checkpoint.Checkpointer.restore)."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

WORKER = r"""
import json, os, sys
pid, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import grain
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from structvit_jax import checkpoint as ckpt_lib

sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), P("data"))
def state(value):
  return {"w": jax.make_array_from_callback(
      (4,), sharding, lambda index: np.full((4,), value, np.float32)[index])}
def iterator():
  return iter(grain.MapDataset.range(16).to_iter_dataset())

ckpt = ckpt_lib.Checkpointer(directory)
it = iterator()
for step in (1, 2):
  next(it)
  ckpt.save(step, state(float(step)), it)
  ckpt.wait()
multihost_utils.sync_global_devices("saved")
if pid == 1:  # only process 1 loses its input position of step 2
  os.remove(os.path.join(directory, "2", "data_iter", "process_1-of-2.json"))
multihost_utils.sync_global_devices("damaged")
abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        state(0.0))
it = iterator()
restored, step = ckpt.restore(abstract, data_iter=it, check=lambda step, metadata: None)
print("RESULT " + json.dumps(dict(
    pid=pid, step=step, w=float(np.asarray(restored["w"].addressable_shards[0].data)[0]),
    next=int(next(it)), steps=ckpt.all_steps())), flush=True)
ckpt.close()
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_processes_agree_to_skip_a_step_one_of_them_cannot_restore(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  port, directory = str(_free_port()), str(tmp_path / "checkpoints")
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), port, directory], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  deadline = time.time() + 150
  while time.time() < deadline and any(p.poll() is None for p in procs):
    if any(p.poll() not in (None, 0) for p in procs):
      break  # one failed: the other would wait for it at a barrier
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
  outs = [p.communicate() for p in procs]
  logs = [err[-5000:] for _, err in outs]
  assert all(p.returncode == 0 for p in procs), (
      f"return codes {[p.returncode for p in procs]}\n" + "\n----\n".join(logs))
  results = [json.loads(out.split("RESULT ", 1)[1]) for out, _ in outs]
  for r in results:  # both on step 1: its state and the input position after one element
    assert (r["step"], r["w"], r["next"], r["steps"]) == (1, 1.0, 1, [1]), (r, logs)
  names = sorted(os.listdir(directory))
  assert names == ["1", "2.unusable-unreadable"], names
  assert "another process cannot use it" in logs[0], logs[0]
  assert "no-data-iter" not in logs[0] and "process_1-of-2.json" in logs[1], logs[1]
