"""The one entry point: `python -m debertax.main --config=configs/<name>.py --workdir=DIR`.

Overrides: `--config.train.steps=10 --config.model.dtype=bfloat16`. The config's `task` picks the job
(pretrain, glue, xnli); `--mode=export` turns a pretraining workdir's latest checkpoint into Hugging Face
directories. Multi-host runs call jax.distributed.initialize() when --coordinator_address is given, with
--distributed=on (JAX then finds the cluster itself: a TPU VM slice from its metadata server, SLURM, GKE),
or by default when the environment says so (SLURM with more than one task, TPU_WORKER_HOSTNAMES listing
several hosts). A TPU VM slice has no such variable: launch/tpu_pod.py passes --distributed=on.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and exports go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "export"], "train (resumes automatically) or export.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "on: call jax.distributed.initialize() and let JAX read the cluster from the environment (TPU VM "
    "metadata, SLURM, GKE); auto: only where SLURM or TPU_WORKER_HOSTNAMES shows several hosts.")


def _multi_host_environment() -> bool:
  """True on a multi-worker TPU VM slice or inside a multi-task SLURM step."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


def initialize_distributed():
  import jax
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value == "on" or (_DISTRIBUTED.value == "auto" and _multi_host_environment()):
    jax.distributed.initialize()  # Reads the TPU / SLURM environment itself.
  else:
    return
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _quiet_library_logs():
  """Orbax logs every save step at INFO; keep its warnings, drop its chatter from our progress log."""
  import logging as std_logging

  class DropOrbaxInfo(std_logging.Filter):
    def filter(self, record):
      return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname

  for handler in std_logging.getLogger().handlers + [logging.get_absl_handler()]:
    handler.addFilter(DropOrbaxInfo())


def main(argv):
  _quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/<name>.py is required")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  initialize_distributed()
  from debertax import compile_options
  compile_options.log_cpu_malloc_hint()
  task = config.get("task", "pretrain")
  if task == "pretrain":
    from debertax import pretrain
    pretrain.run(config, _WORKDIR.value, mode=_MODE.value)
  elif task in ("glue", "xnli"):
    from debertax import finetune
    finetune.run(config, _WORKDIR.value)
  else:
    raise app.UsageError(f"config.task={task!r}: expected pretrain, glue or xnli")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
