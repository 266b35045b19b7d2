"""Orbax checkpoints: one place for saving and restoring parameter trees and training state.

A debertax model directory (what `save_pretrained(format="orbax")` and `convert import` write):
    debertax.json   model config + head + use_emd
    params/         an Orbax StandardCheckpointer tree
    spm.model       optional tokenizer
Training workdirs use `TrainCheckpointer` (an Orbax CheckpointManager) with the same tree format.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from debertax import storage
from debertax.config import ModelConfig

MODEL_META = "debertax.json"
PARAMS_DIR = "params"


def is_model_dir(path: str) -> bool:
  return storage.exists(storage.join(path, MODEL_META))


def save_model_dir(path: str, params, config: ModelConfig, head: str, use_emd: bool,
                   spm_model: str | None = None) -> str:
  path = storage.absolute(path)
  storage.makedirs(path)
  params_dir = storage.join(path, PARAMS_DIR)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(params_dir, params, force=True)
  checkpointer.wait_until_finished()
  meta = {"config": json.loads(config.to_json()), "head": head, "use_emd": bool(use_emd)}
  # Written last, so a directory with debertax.json always has complete parameters.
  storage.write_atomic(storage.join(path, MODEL_META), json.dumps(meta, indent=2, sort_keys=True))
  if spm_model and storage.absolute(spm_model) != storage.join(path, "spm.model"):
    storage.copy_file(spm_model, storage.join(path, "spm.model"))
  return path


def load_model_dir(path: str) -> tuple[ModelConfig, Any, str, bool]:
  """-> (config, params as NumPy-backed host arrays, head, use_emd)."""
  meta_path = storage.join(path, MODEL_META)
  try:
    meta = json.loads(storage.read_text(meta_path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{meta_path}:{e.lineno}: not valid JSON: {e.msg}") from e
  config = ModelConfig.from_dict(meta["config"])
  params_dir = storage.join(storage.absolute(path), PARAMS_DIR)
  if not storage.isdir(params_dir):
    raise FileNotFoundError(f"{params_dir}: missing parameter checkpoint")
  params = restore_tree(params_dir)
  return config, params, meta["head"], bool(meta.get("use_emd", False))


def restore_tree(directory: str, abstract=None):
  """Restores an Orbax StandardCheckpointer tree; `abstract` (ShapeDtypeStructs with shardings) places it."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    if abstract is None:
      return checkpointer.restore(directory)
    return checkpointer.restore(directory, abstract)
  except Exception as e:  # Orbax raises several types for damaged or incompatible trees.
    raise ValueError(f"{directory}: cannot restore the Orbax checkpoint: {type(e).__name__}: {e}") from e


def host_tree(tree):
  return jax.device_get(tree)


class Preemption:
  """SIGTERM (TPU preemption, scancel) -> the training loop saves at a step boundary and stops.

  Installed for the duration of a loop (`restore()` puts the previous handler back); the loop asks
  `agreed(step)` after every step. On a multi-host slice the signal reaches the hosts at different times,
  and a host that left the loop alone would wait in the collective save for the others forever: so the
  hosts compare their flags every `sync_every` steps (a small all-gather; every host calls `agreed` at
  the same steps) and stop together."""

  def __init__(self, sync_every: int = 10):
    self.requested = False
    self.sync_every = sync_every
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def agreed(self, step: int, force_sync: bool = False) -> bool:
    """Whether every process is to save after `step` and stop. One process: as soon as SIGTERM arrived.
    Several: at the steps where they compare flags (every `sync_every`, or now with `force_sync`), when any
    of them received it."""
    if jax.process_count() == 1:
      return self.requested
    if step % self.sync_every and not force_sync:
      return False
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array([self.requested], np.int32))))

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint at the next step boundary, then exiting")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class Preempted(SystemExit):
  """Raised by a loop that saved after SIGTERM: the process exits (status 1) with its one-line message, and
  nothing after the loop (results, reports) runs as if it had finished. Rerunning the command resumes."""


class TrainCheckpointer:
  """Orbax CheckpointManager for training: saves every N steps, keeps the last K, writes asynchronously.

  Each step directory holds `state` (the TrainState tree, written collectively by all processes) and
  `data` (every host's data-iterator position, written once). Orbax writes into a temporary directory and
  renames it when complete, so a process killed mid-save leaves the previous checkpoint as the latest.
  """

  def __init__(self, directory: str, save_every: int, keep: int, async_save: bool = True):
    self.directory = storage.absolute(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(int(save_every), 1), create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_states: dict, force: bool = False) -> bool:
    """data_states: {process_index: iterator state}; returns whether a save was started."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave({str(k): v for k, v in data_states.items()}))
    return self.manager.save(int(step), args=args, force=force)

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    try:
      restored = self.manager.restore(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises several types for damaged or incompatible trees.
      raise ValueError(f"{self.directory}/{step}: cannot restore the checkpoint "
                       f"(was it written by a different config?): {type(e).__name__}: {e}") from e
    return restored["state"], {int(k): v for k, v in (restored["data"] or {}).items()}

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
