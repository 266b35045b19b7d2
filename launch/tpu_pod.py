"""Create a Cloud TPU VM slice, install debertax on every worker, check the plan, start pretraining.

    python launch/tpu_pod.py --tpu=debertax-large --zone=us-west4-a \\
        --accelerator_type=v5litepod-64 --runtime_version=v2-alpha-tpuv5-lite --devices=64 --hbm_gib=16 \\
        --config=configs/deberta_v3_large.py --workdir=gs://my-bucket/debertax/large \\
        [--project=P] [--skip_create] [--dry_run] \\
        -- --config.model.dtype=bfloat16 --config.model.remat=True --config.train.microbatches=16

Runs, in order (each printed before it runs; --dry_run only prints them):
  1. gcloud compute tpus tpu-vm create           (skipped with --skip_create)
  2. tar the working tree (without .venv/.git) and scp it to every worker (--worker=all)
  3. on every worker: unpack into ~/debertax, make a Python 3.11 venv, pip install requirements + jax[tpu]
  4. on worker 0: python -m debertax.plan for the slice's device count; stops here when the step does
     not fit --hbm_gib per device (the plan simulates the devices on the host CPU; it needs no TPU)
  5. on every worker: python -m debertax.main --distributed=on in the background, logging to
     ~/debertax-train.log (jax.distributed finds the slice from the TPU VM metadata server)
Everything after `--` is passed to both the plan and the run (config overrides).

--workdir must be a place every worker sees: on a multi-host slice (accelerator types whose number is above
8, e.g. v4-16, v5litepod-16) the hosts share nothing but Cloud Storage, so a local path is refused and the
workdir is a gs:// URL (checkpoints are written by all workers together, metrics and exports by worker 0).
A single-host slice may use a local directory.
--devices is the slice's JAX device count: chips for v5e/v5p/v6e (v5litepod-64: 64), chips for v4 too
(v4-64 is 32 chips; its name counts TensorCores). GLIBC_TUNABLES is not needed on TPU VMs.
Only the Python standard library is used here; gcloud must be installed and authenticated.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/debertax"
REMOTE_TARBALL = "~/debertax-src.tar.gz"
REMOTE_LOG = "~/debertax-train.log"
JAX_TPU = "jax[tpu]==0.10.2"  # The version requirements.txt pins, with libtpu.


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tpu", required=True, help="TPU VM name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=None, help="Google Cloud project (default: gcloud's)")
  parser.add_argument("--accelerator_type", required=True, help="e.g. v5litepod-64, v4-64")
  parser.add_argument("--runtime_version", required=True, help="e.g. v2-alpha-tpuv5-lite, tpu-ubuntu2204-base")
  parser.add_argument("--devices", type=int, required=True, help="JAX devices in the slice (see above)")
  parser.add_argument("--hbm_gib", type=float, required=True, help="memory per device: 16 (v5e), 32 (v4), 95 (v5p)")
  parser.add_argument("--config", required=True, help="config file, relative to the repository")
  parser.add_argument("--workdir", required=True, help="shared directory seen by every worker")
  parser.add_argument("--skip_create", action="store_true", help="the TPU VM exists already")
  parser.add_argument("--dry_run", action="store_true", help="print the commands without running them")
  parser.add_argument("--tarball", default=os.path.join(tempfile.gettempdir(), "debertax-src.tar.gz"),
                      help="local path for the source archive")
  args, overrides = parser.parse_known_args(argv)
  if overrides and overrides[0] == "--":
    overrides = overrides[1:]
  unknown = [o for o in overrides if not o.startswith("--config.")]
  if unknown:
    parser.error(f"after -- only --config.<key>=<value> overrides are passed on; got {unknown}")
  if args.devices < 1:
    parser.error(f"--devices={args.devices}: give the slice's device count")
  if not os.path.isfile(os.path.join(REPO, args.config)):
    parser.error(f"--config={args.config}: no such file under {REPO}")
  if is_multi_host(args.accelerator_type) and not args.workdir.startswith("gs://"):
    parser.error(f"--workdir={args.workdir}: a {args.accelerator_type} slice has several hosts that share only "
                 f"Cloud Storage; give --workdir=gs://BUCKET/PATH")
  return args, overrides


def is_multi_host(accelerator_type: str) -> bool:
  """v4-16, v5p-16 (TensorCores) and v5litepod-16, v6e-16 (chips) all span several hosts; -8 and below fit one."""
  try:
    return int(accelerator_type.rsplit("-", 1)[1]) > 8
  except (IndexError, ValueError):
    raise ValueError(f"--accelerator_type={accelerator_type}: expected a name such as v5litepod-64 or v4-32") from None


def commands(args, overrides) -> list[list[str]]:
  """The commands of a launch, in order (argument lists, run without a shell on this machine)."""
  where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
  tpu_vm = ["gcloud", "compute", "tpus", "tpu-vm"]

  def ssh(worker: str, remote: str) -> list[str]:
    return tpu_vm + ["ssh", args.tpu, *where, f"--worker={worker}", f"--command={remote}"]

  passed_on = " ".join(shlex.quote(o) for o in overrides)
  config_flags = f"--config={shlex.quote(args.config)} {passed_on}".strip()
  setup = " && ".join([
      f"mkdir -p {REMOTE_DIR}", f"tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR}", f"cd {REMOTE_DIR}",
      "(command -v python3.11 >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q python3.11 "
      "python3.11-venv))",
      "python3.11 -m venv .venv", ".venv/bin/pip install -q -r requirements.txt",
      f'.venv/bin/pip install -q "{JAX_TPU}"',
  ])
  plan = (f"cd {REMOTE_DIR} && .venv/bin/python -m debertax.plan {config_flags} --devices={args.devices} "
          f"--max_gib_per_device={args.hbm_gib:g}")
  train = (f"cd {REMOTE_DIR} && setsid nohup .venv/bin/python -m debertax.main {config_flags} "
           f"--workdir={shlex.quote(args.workdir)} --distributed=on > {REMOTE_LOG} 2>&1 < /dev/null &")
  out = []
  if not args.skip_create:
    out.append(tpu_vm + ["create", args.tpu, *where, f"--accelerator-type={args.accelerator_type}",
                         f"--version={args.runtime_version}"])
  out += [
      ["tar", "--exclude=./.venv", "--exclude=./.git", "--exclude=__pycache__", "-czf", args.tarball, "-C", REPO, "."],
      tpu_vm + ["scp", args.tarball, f"{args.tpu}:{REMOTE_TARBALL}", *where, "--worker=all"],
      ssh("all", setup),
      ssh("0", plan),
      ssh("all", train),
  ]
  return out


def main(argv) -> int:
  args, overrides = parse_args(argv)
  for command in commands(args, overrides):
    print("+ " + shlex.join(command), flush=True)
    if args.dry_run:
      continue
    status = subprocess.run(command).returncode
    if status:
      step = "the plan says the step does not fit" if "debertax.plan" in command[-1] else "a step failed"
      print(f"tpu_pod: {step} (exit status {status}); stopping", file=sys.stderr)
      return status
  if not args.dry_run:
    print(f"Started. Follow worker 0: gcloud compute tpus tpu-vm ssh {args.tpu} --zone={args.zone} --worker=0 "
          f"--command='tail -f {REMOTE_LOG}'")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
