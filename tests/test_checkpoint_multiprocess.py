"""Two processes (127.0.0.1, gloo) restoring a checkpoint whose newest step only one of
them can use: they must agree to skip it, move it aside once and restore the same older
step (checkpoint.Checkpointer.restore). The checksum flip matrix: 64 bytes flipped at the
start, middle and end of one file of each kind of the newest step (the arrays each process
wrote, the merged index, the metadata, each process's input position, the checksums)."""

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


FLIP_WORKER = r"""
import json, os, re, shutil, sys
pid, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import grain
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from structvit_jax import checkpoint as ckpt_lib, cli
cli.quiet_library_logs(os.path.dirname(directory))

mesh = Mesh(np.asarray(jax.devices()), ("data",))
def host(step):
  r = np.random.RandomState(step)
  return {"w": r.standard_normal((2, 8192)).astype(np.float32),
          "b": r.standard_normal((64,)).astype(np.float32)}
specs = {"w": P("data"), "b": P()}
def state(step):
  h = host(step)
  return {k: jax.make_array_from_callback(h[k].shape, NamedSharding(mesh, specs[k]),
                                          lambda index, k=k: h[k][index]) for k in h}
def iterator():
  return iter(grain.MapDataset.range(16).to_iter_dataset())

ckpt = ckpt_lib.Checkpointer(directory)
it = iterator()
for step in (1, 2):
  next(it)
  ckpt.save(step, state(step), it)
  ckpt.wait()
ckpt.close()
pristine = directory + ".pristine"
if pid == 0:
  shutil.copytree(directory, pristine)
multihost_utils.sync_global_devices("saved")

def kinds():
  # One file of each kind: the path with hashed names as '*'; of those, the largest.
  out = {}
  root = os.path.join(pristine, "2")
  for d, _, files in os.walk(root):
    for f in files:
      rel = os.path.relpath(os.path.join(d, f), root)
      kind = re.sub(r"/d/[0-9a-f]+$", "/d/*", rel)
      if kind not in out or os.path.getsize(os.path.join(root, rel)) > os.path.getsize(
          os.path.join(root, out[kind])):
        out[kind] = rel
  return sorted(out.items())

abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, specs[k]))
            for k, v in host(0).items()}
results = []
for kind, rel in kinds():
  for where in ("start", "middle", "end"):
    if pid == 0:
      shutil.rmtree(directory)
      shutil.copytree(pristine, directory)
      path = os.path.join(directory, "2", rel)
      b = bytearray(open(path, "rb").read())
      k = min(64, len(b))
      o = {"start": 0, "middle": max(0, len(b) // 2 - k // 2), "end": len(b) - k}[where]
      b[o:o + k] = bytes(x ^ 0xFF for x in b[o:o + k])
      open(path, "wb").write(bytes(b))
    multihost_utils.sync_global_devices(f"damaged {kind} {where}")
    ckpt = ckpt_lib.Checkpointer(directory)
    it = iterator()
    restored, step = ckpt.restore(abstract, data_iter=it, check=lambda s, m: None)
    exact = all(np.array_equal(np.asarray(s.data), host(step)[k][s.index])
                for k in restored for s in restored[k].addressable_shards)
    results.append(dict(kind=kind, where=where, step=step, exact=exact, next=int(next(it))))
    ckpt.close()
    multihost_utils.sync_global_devices(f"restored {kind} {where}")
print("RESULT " + json.dumps(results), flush=True)
"""


def _run_two(tmp_path, worker: str, timeout: float = 150) -> tuple[list, list[str]]:
  """(stdout, stderr) of each of two processes running `worker` on tmp_path/checkpoints."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  port, directory = str(_free_port()), str(tmp_path / "checkpoints")
  procs = [subprocess.Popen([sys.executable, "-c", worker, str(i), port, directory], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  deadline = time.time() + timeout
  while time.time() < deadline and any(p.poll() is None for p in procs):
    if any(p.poll() not in (None, 0) for p in procs):
      break  # one failed: the other would wait for it at a barrier
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
  outs = [p.communicate() for p in procs]
  assert all(p.returncode == 0 for p in procs), (
      f"return codes {[p.returncode for p in procs]}\n"
      + "\n----\n".join(err[-5000:] for _, err in outs))
  return outs


def test_two_processes_agree_on_every_flipped_file_kind(tmp_path):
  outs = _run_two(tmp_path, FLIP_WORKER, timeout=300)
  results = [json.loads(out.split("RESULT ", 1)[1]) for out, _ in outs]
  assert results[0] == results[1], results  # the same step, values, position on both
  kinds = {r["kind"] for r in results[0]}
  for kind in ("state/_METADATA", "state/manifest.ocdbt", "state/d/*",
               "state/ocdbt.process_0/d/*", "state/ocdbt.process_1/d/*",
               "data_iter/process_0-of-2.json", "data_iter/process_1-of-2.json",
               "checksums/metadata"):
    assert kind in kinds, kinds
  for r in results[0]:
    assert r["exact"] and r["next"] == r["step"], r  # that step's arrays and position
  skipped = {(r["kind"], r["where"]) for r in results[0] if r["step"] == 1}
  for kind in ("state/_METADATA", "state/manifest.ocdbt", "data_iter/process_0-of-2.json",
               "data_iter/process_1-of-2.json", "checksums/metadata"):
    assert {(kind, w) for w in ("start", "middle", "end")} <= skipped, (kind, skipped)
  for kind in ("state/ocdbt.process_0/d/*", "state/ocdbt.process_1/d/*"):
    assert (kind, "middle") in skipped, (kind, skipped)  # the arrays' values
  for _, err in outs:
    assert "Traceback" not in err, err[-3000:]
  warnings = [line for line in outs[0][1].splitlines() if "is unusable" in line]
  assert len(warnings) == len(skipped), warnings


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_processes_agree_to_skip_a_step_one_of_them_cannot_restore(tmp_path):
  outs = _run_two(tmp_path, WORKER)  # asserts both processes exit 0
  directory = str(tmp_path / "checkpoints")
  logs = [err[-5000:] for _, err in outs]
  results = [json.loads(out.split("RESULT ", 1)[1]) for out, _ in outs]
  for r in results:  # both on step 1: its state and the input position after one element
    assert (r["step"], r["w"], r["next"], r["steps"]) == (1, 1.0, 1, [1]), (r, logs)
  names = sorted(os.listdir(directory))
  assert names == ["1", "2.unusable-unreadable"], names
  assert "another process cannot use it" in logs[0], logs[0]
  assert "no-data-iter" not in logs[0] and "process_1-of-2.json" in logs[1], logs[1]
