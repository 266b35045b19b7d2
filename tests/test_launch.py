"""launch/: the TPU VM slice and SLURM launchers print, in order, the commands they run, and run exactly those.

gcloud, srun and the job's Python are replaced by stubs on PATH that record how they were called.
"""

import json
import os
import shlex
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_ARGS = ["--tpu=dbx-large", "--zone=us-west4-a", "--accelerator_type=v5litepod-64",
            "--runtime_version=v2-alpha-tpuv5-lite", "--devices=64", "--hbm_gib=16",
            "--config=configs/deberta_v3_large.py", "--workdir=gs://dbx-bucket/runs/large"]
OVERRIDES = ["--config.model.dtype=bfloat16", "--config.train.microbatches=16",
             "--config.data.source=/data/my corpus/*.txt"]  # A space and a glob must survive the quoting.


def _stub(directory, name, fail_when=None, status=3):
  """An executable `name` that appends its arguments (JSON) to calls.jsonl; exits `status` when any
  argument contains `fail_when`."""
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    f.write(f"""#!{sys.executable}
import json, os, sys
with open(os.path.join({str(directory)!r}, "calls.jsonl"), "a") as log:
  log.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
sys.exit({status} if {fail_when!r} is not None and any({fail_when!r} in a for a in sys.argv[1:]) else 0)
""")
  os.chmod(path, 0o755)
  return path


def _calls(directory):
  path = os.path.join(directory, "calls.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]


def _printed(stdout):
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _tpu(args, env=None):
  return subprocess.run([sys.executable, "launch/tpu_pod.py", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=60, env=env)


def _remote(command):
  """The remote shell command of a `gcloud ... ssh` invocation."""
  return next(a for a in command if a.startswith("--command="))[len("--command="):]


def test_tpu_dry_run_creates_installs_plans_then_trains_on_all_workers():
  result = _tpu(TPU_ARGS + ["--dry_run", "--", *OVERRIDES])
  assert result.returncode == 0, result.stderr
  create, tar, scp, setup, plan, train = _printed(result.stdout)
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "dbx-large"]
  assert {"--zone=us-west4-a", "--accelerator-type=v5litepod-64", "--version=v2-alpha-tpuv5-lite"} <= set(create)
  assert tar[0] == "tar" and "--exclude=./.venv" in tar and ROOT in tar
  assert scp[4] == "scp" and "--worker=all" in scp and scp[5] == tar[tar.index("-czf") + 1]
  assert "--worker=all" in setup and "pip install -q -r requirements.txt" in _remote(setup)
  assert "jax[tpu]==0.10.2" in _remote(setup)

  # The plan: once, on worker 0, for the slice's device count, failing above the chip's memory.
  assert "--worker=0" in plan
  plan_argv = shlex.split(_remote(plan).split("&&")[-1])
  assert plan_argv[:3] == [".venv/bin/python", "-m", "debertax.plan"]
  assert {"--config=configs/deberta_v3_large.py", "--devices=64", "--max_gib_per_device=16"} <= set(plan_argv)
  assert set(OVERRIDES) <= set(plan_argv)

  # The run: every worker, the same config and overrides, the shared workdir, jax.distributed on.
  assert "--worker=all" in train
  remote = _remote(train)
  assert remote.rstrip().endswith("&") and "nohup" in remote
  train_argv = shlex.split(remote.split("&&")[-1])
  main_at = train_argv.index("debertax.main")
  assert train_argv[main_at - 2:main_at] == [".venv/bin/python", "-m"]
  assert {"--config=configs/deberta_v3_large.py", "--workdir=gs://dbx-bucket/runs/large", "--distributed=on"} <= set(train_argv)
  assert set(OVERRIDES) <= set(train_argv)
  assert "GLIBC_TUNABLES" not in result.stdout

  skipped = _printed(_tpu(TPU_ARGS + ["--dry_run", "--skip_create"]).stdout)
  assert [c[4] if c[0] == "gcloud" else c[0] for c in skipped] == ["tar", "scp", "ssh", "ssh", "ssh"]


def test_tpu_launch_runs_exactly_the_printed_commands(tmp_path):
  stubs = tmp_path / "bin"
  stubs.mkdir()
  _stub(stubs, "gcloud")
  env = dict(os.environ, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}")
  tarball = str(tmp_path / "src.tar.gz")
  args = TPU_ARGS + [f"--tarball={tarball}", "--", *OVERRIDES]
  result = _tpu(args, env)
  assert result.returncode == 0, result.stderr
  printed = _printed(result.stdout)
  assert _calls(stubs) == [c for c in printed if c[0] == "gcloud"]
  assert _printed(_tpu(args[:-len(OVERRIDES) - 1] + ["--dry_run", "--", *OVERRIDES]).stdout) == printed
  with tarfile.open(tarball) as archive:
    names = set(archive.getnames())
  assert "./debertax/plan.py" in names and "./launch/tpu_pod.py" in names
  assert not any(n.startswith("./.venv") or n.startswith("./.git/") for n in names)


def test_tpu_launch_stops_when_the_plan_does_not_fit(tmp_path):
  stubs = tmp_path / "bin"
  stubs.mkdir()
  _stub(stubs, "gcloud", fail_when="debertax.plan", status=3)  # The plan's exit status for "does not fit".
  env = dict(os.environ, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}")
  result = _tpu(TPU_ARGS + ["--skip_create", f"--tarball={tmp_path / 'src.tar.gz'}"], env)
  assert result.returncode == 3
  assert "the plan says the step does not fit" in result.stderr
  assert not any("debertax.main" in " ".join(call) for call in _calls(stubs))


@pytest.mark.parametrize("missing", ["--workdir", "--config", "--devices"])
def test_tpu_launch_requires_its_arguments(missing):
  result = _tpu([a for a in TPU_ARGS if not a.startswith(missing + "=")] + ["--dry_run"])
  assert result.returncode == 2 and missing.lstrip("-") in result.stderr


@pytest.mark.parametrize("accelerator,workdir,refused", [
    ("v5litepod-64", "/mnt/shared/large", True), ("v4-16", "runs/large", True),  # Several hosts.
    ("v5litepod-8", "/home/me/large", False), ("v4-8", "/home/me/large", False),  # One host.
    ("v4-16", "gs://dbx-bucket/runs/large", False)])
def test_tpu_launch_refuses_a_local_workdir_on_a_multi_host_slice(accelerator, workdir, refused):
  args = [a for a in TPU_ARGS if not a.startswith(("--accelerator_type=", "--workdir="))]
  result = _tpu(args + [f"--accelerator_type={accelerator}", f"--workdir={workdir}", "--dry_run"])
  if refused:
    assert result.returncode == 2
    assert f"--workdir={workdir}: a {accelerator} slice has several hosts" in result.stderr
    assert "gs://BUCKET/PATH" in result.stderr and not result.stdout
  else:
    assert result.returncode == 0, result.stderr
    assert f"--workdir={workdir}" in result.stdout


# SLURM ----------------------------------------------------------------------------------------------------
def _slurm(args, env_extra, cwd=ROOT):
  env = dict(os.environ, **env_extra)
  return subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sbatch"), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=60)


def test_slurm_script_asks_for_one_task_per_gpu():
  with open(os.path.join(ROOT, "launch", "slurm_gpu.sbatch")) as f:
    directives = dict(line[len("#SBATCH --"):].strip().split("=", 1) for line in f if line.startswith("#SBATCH --"))
  assert directives["ntasks-per-node"] == directives["gpus-per-node"]


def test_slurm_dry_run_plans_for_every_gpu_then_sruns_main():
  args = ["--config=configs/deberta_v3_large.py", "--workdir=/shared/runs/large", "--dry_run", "--", *OVERRIDES]
  result = _slurm(args, {"SLURM_NTASKS": "16"})
  assert result.returncode == 0, result.stderr
  plan, train = _printed(result.stdout)
  assert plan[:3] == [".venv/bin/python", "-m", "debertax.plan"]
  assert {"--config=configs/deberta_v3_large.py", "--devices=16", "--max_gib_per_device=80"} <= set(plan)
  assert train[:2] == ["srun", "--kill-on-bad-exit=1"]
  assert train[2:5] == [".venv/bin/python", "-m", "debertax.main"]
  assert {"--config=configs/deberta_v3_large.py", "--workdir=/shared/runs/large", "--distributed=on"} <= set(train)
  assert train[-len(OVERRIDES):] == OVERRIDES and plan[-len(OVERRIDES):] == OVERRIDES


def test_slurm_job_runs_the_printed_commands_and_stops_when_the_plan_fails(tmp_path):
  job_dir = tmp_path / "repo"  # Stands in for SLURM_SUBMIT_DIR, with a stub venv.
  (job_dir / ".venv" / "bin").mkdir(parents=True)
  stubs = tmp_path / "bin"
  stubs.mkdir()
  _stub(stubs, "srun")
  _stub(job_dir / ".venv" / "bin", "python")
  env = {"SLURM_NTASKS": "16", "SLURM_SUBMIT_DIR": str(job_dir), "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
  args = ["--config=configs/tiny.py", "--workdir=/shared/w", "--gpu_gib=40", "--", *OVERRIDES]
  result = _slurm(args, env)
  assert result.returncode == 0, result.stderr
  plan, train = _printed(result.stdout)
  assert _calls(job_dir / ".venv" / "bin") == [["python"] + plan[1:]]
  assert _calls(stubs) == [["srun"] + train[1:]]
  assert "--max_gib_per_device=40" in plan

  _stub(job_dir / ".venv" / "bin", "python", fail_when="debertax.plan", status=3)
  os.remove(stubs / "calls.jsonl")
  failed = _slurm(args, env)
  assert failed.returncode == 3
  assert _calls(stubs) == []  # srun never ran.


def test_slurm_script_names_what_is_missing():
  result = _slurm(["--config=configs/tiny.py", "--dry_run"], {"SLURM_NTASKS": "8"})
  assert result.returncode == 2 and "--workdir" in result.stderr
  result = _slurm(["--config=configs/tiny.py", "--workdir=/w", "--dry_run"], {"SLURM_NTASKS": ""})
  assert result.returncode == 2 and "SLURM_NTASKS" in result.stderr
