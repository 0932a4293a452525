"""Every user mistake on the command line is one `error:` line, no traceback, exit status 2
(structvit_jax/cli.py).

Each case runs the command's `__main__` in a forked child of one fork-server process: the
same code path as `python -m ...`, without a fresh interpreter and JAX import per case. The
server is a fresh interpreter that imports but never initialises a JAX backend (a fork of a
process whose XLA thread pools run, such as a pytest worker after other tests, can hang).
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

_SERVER = r"""
import json, os, runpy, sys, traceback
import jax, tensorflow_datasets  # noqa: F401  (imported once, before the forks)
from structvit_jax import train  # noqa: F401
for line in sys.stdin:
  req = json.loads(line)
  pid = os.fork()
  if pid == 0:  # the child: runs `python -m module *args`, never returns into the loop
    code = 70
    try:
      fd = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
      os.dup2(fd, 1)
      os.dup2(fd, 2)
      sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
      sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
      sys.stdin = open(os.devnull)
      sys.argv = [req["module"], *req["args"]]
      runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
      code = 0
    except SystemExit as e:
      if isinstance(e.code, int) or e.code is None:
        code = e.code or 0
      else:
        print(e.code, file=sys.stderr)
        code = 1
    except BaseException:  # noqa: BLE001  (shows up as a Traceback in the output)
      traceback.print_exc()
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
  _, status = os.waitpid(pid, 0)
  print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


@pytest.fixture(scope="module")
def server():
  proc = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=REPO, text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          # cheap compiles: visualize --head=7 runs a tiny model
                          env=dict(os.environ, JAX_PLATFORMS="cpu",
                                   JAX_DISABLE_MOST_OPTIMIZATIONS="1"))
  yield proc
  proc.stdin.close()
  proc.wait(timeout=60)


def run_cli(server, module: str, args: list[str], out_path: str) -> tuple[int, str]:
  """(exit status, stdout + stderr) of `python -m module *args`, run in a fork."""
  server.stdin.write(json.dumps(dict(module=module, args=args, out=out_path)) + "\n")
  server.stdin.flush()
  code = json.loads(server.stdout.readline())
  with open(out_path) as f:
    return code, f.read()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli")
  (d / "syntax.py").write_text("def get_config(:\n")
  (d / "noget.py").write_text("X = 1\n")
  (d / "afile").write_text("")
  (d / "empty").mkdir()
  bad = d / "unreadable" / "train" / "cat"
  bad.mkdir(parents=True)
  for name in ("a.jpg", "b.jpg"):
    (bad / name).write_bytes(b"not an image")
  from PIL import Image
  import numpy as np
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(d / "img.png")
  return d


MAIN = "structvit_jax.main"
DEMO = ["--config=configs/demo.py"]

# (module, args with {d} for the fixture directory, exit status, words the error line has)
CASES = [
  (MAIN, DEMO + ["--workdir={d}/w", "--config.foo=1"], 2, ["foo", "valid fields"]),
  (MAIN, DEMO + ["--workdir={d}/w", "--config.model.nme=x"], 2, ["did you mean model.name"]),
  (MAIN, DEMO + ["--workdir={d}/w", "--config.batch_size=abc"], 2, ["batch_size"]),
  (MAIN, ["--config=configs/demo.py:foo=1", "--workdir={d}/w"], 2, ["foo", "valid keys"]),
  (MAIN, ["--config={d}/nothere.py", "--workdir={d}/w"], 2, ["nothere.py", "no such file"]),
  (MAIN, ["--config={d}/syntax.py", "--workdir={d}/w"], 2, ["syntax error", "line 1"]),
  (MAIN, ["--config={d}/noget.py", "--workdir={d}/w"], 2, ["get_config"]),
  (MAIN, DEMO, 2, ["--workdir"]),
  (MAIN, DEMO + ["--workdir={d}/w", "--config.batch_size=0"], 2, ["batch_size=0", "positive"]),
  (MAIN, DEMO + ["--workdir={d}/w", "--config.batch_size=60"], 2,
   ["divisible by the 8 devices"]),
  (MAIN, DEMO + ["--workdir={d}/w", "--config.batch_size=20000"], 2, ["10000 training"]),
  (MAIN, DEMO + ["--workdir={d}/w", "--config.model.name=structvit_tiyn"], 2,
   ["unknown model", "did you mean structvit_tiny"]),
  (MAIN, DEMO + ["--workdir={d}/w", "--config.data.name=nosuch"], 2, ["unknown dataset"]),
  (MAIN, DEMO + ["--workdir={d}/afile"], 2, ["is a file"]),
  # /sys refuses new entries (EPERM) even to root, as a read-only filesystem does (EROFS).
  (MAIN, DEMO + ["--workdir=/sys/structvit_test_workdir"], 2, ["not writable"]),
  (MAIN, ["--config=configs/in1k_s.py", "--workdir={d}/w", "--config.data.data_dir={d}/nowhere"],
   2, ["imagenet2012", "nowhere"]),
  ("structvit_jax.data.prepare", ["--dataset=image_folder", "--src={d}/nosrc",
                                  "--data_dir={d}/p"], 2, ["nosrc", "not a directory"]),
  ("structvit_jax.data.prepare", ["--dataset=image_folder", "--src={d}/empty",
                                  "--data_dir={d}/p"], 2, ["no split directories"]),
  ("structvit_jax.data.prepare", ["--dataset=nosuch", "--src={d}", "--data_dir={d}/p"], 2,
   ["--dataset"]),
  ("structvit_jax.data.prepare", ["--dataset=imagenet2012", "--src={d}/empty",
                                  "--data_dir={d}/p"], 2, ["train not found"]),
  ("structvit_jax.data.prepare", ["--dataset=image_folder", "--src={d}/unreadable",
                                  "--data_dir={d}/p", "--workers=1"], 2,
   ["split train", "none of its 2"]),
  ("structvit_jax.data.prepare", ["--src={d}", "--data_dir={d}/p"], 2, ["--dataset"]),
  ("structvit_jax.predict", ["--model={d}/noexport", "--batch_size=0", "{d}/img.png"], 2,
   ["batch_size"]),
  ("structvit_jax.predict", ["--model={d}/noexport", "--k=-2", "{d}/img.png"], 2, ["--k"]),
  ("structvit_jax.predict", ["--model={d}/noexport", "{d}/img.png"], 2, ["no model.json"]),
  ("structvit_jax.predict", ["--model={d}/noexport"], 2, ["usage"]),
  ("structvit_jax.visualize", ["--model=structvit_tiny", "--input={d}/img.png", "--out={d}/v",
                               "--image_size=32", "--head=7"], 2, ["--head=7", "heads"]),
  ("structvit_jax.visualize", ["--model=structvit_tiny", "--input={d}/img.png", "--out={d}/v",
                               "--query=a,b"], 2, ["--query=a,b", "integer"]),
  ("structvit_jax.visualize", ["--model=nosuch", "--input={d}/img.png", "--out={d}/v"], 2,
   ["neither an export directory nor a preset"]),
  ("structvit_jax.export", ["--workdir={d}", "--out={d}/afile"], 2, ["--out", "is a file"]),
  ("structvit_jax.export", ["--workdir={d}/nowork", "--out={d}/e"], 2, ["not a directory"]),
  ("structvit_jax.export", ["--workdir={d}", "--out={d}/e"], 2, ["config.json not found"]),
]


@pytest.mark.parametrize("module,args,status,words", CASES,
                         ids=[f"{m.split('.')[-1]}:{' '.join(a[-1:])}" for m, a, _, _ in CASES])
def test_bad_invocation_is_one_error_line(server, files, module, args, status, words):
  args = [a.format(d=files) for a in args]
  code, out = run_cli(server, module, args, str(files / "out.txt"))
  errors = [line for line in out.splitlines() if line.startswith("error:")]
  assert "Traceback" not in out, out[-3000:]
  assert len(errors) == 1, out[-3000:]
  assert code == status, out[-3000:]
  assert all(w in errors[0] for w in words), errors[0]


def test_verbose_shows_the_traceback(server, files):
  code, out = run_cli(server, MAIN, DEMO + [f"--workdir={files}/w", "--config.batch_size=0",
                                    "--verbose"], str(files / "out.txt"))
  assert code == 2 and "Traceback" in out and out.count("\nerror:") + out.startswith(
      "error:") == 1, out[-3000:]


def test_a_bug_is_one_line_and_the_traceback_goes_to_the_workdir(tmp_path, capsys):
  from structvit_jax import cli
  (tmp_path / "w").mkdir()
  try:
    {}["x"].append(1)  # a bug: KeyError raised outside structvit_jax
  except KeyError as e:
    status = cli.report(e, ["prog"], str(tmp_path / "w"))
  err = capsys.readouterr().err
  assert status == 1 and err.count("\n") == 1 and "Traceback" not in err, err
  assert "a bug" in err and "error.log" in err, err
  assert "Traceback" in (tmp_path / "w" / "error.log").read_text()
