"""The one metrics writer: console log lines, a JSONL file and TensorBoard events in the workdir.

Only process 0 writes. On disk every record is flushed as it is written, so a crash loses nothing already
logged; in a bucket (a gs:// workdir) the files are re-uploaded every 10 s and at close (storage.AppendingFile).
"""

from __future__ import annotations

import json
import math
import time

from absl import logging

from debertax import storage


class MetricWriter:

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True, filename: str = "metrics.jsonl"):
    self.enabled = enabled
    self.path = storage.join(workdir, filename)
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    storage.makedirs(workdir)
    self._jsonl = storage.AppendingFile(self.path)
    if tensorboard:
      from tensorboardX import SummaryWriter
      _register_object_store_event_files()
      self._tb = SummaryWriter(storage.join(workdir, "tensorboard"), flush_secs=10)

  def write(self, step: int, metrics: dict, prefix: str = "train", console: bool = True):
    if not self.enabled:
      return
    values = {k: _plain(v) for k, v in metrics.items()}
    record = {"step": int(step), "split": prefix, "time": time.time(), **values}
    self._jsonl.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in values.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(f"{prefix}/{key}", value, int(step))
    if console:
      shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
      logging.info("[%s] step %d: %s", prefix, step, shown)

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _plain(value):
  try:
    return float(value)
  except (TypeError, ValueError):
    return value


def _fmt(value):
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def read_jsonl(path: str) -> list[dict]:
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


class _EventFileFactory:
  """tensorboardX writer factory for object-store URLs: event files through storage.AppendingFile."""

  def open(self, path):
    return storage.AppendingFile(path, binary=True)

  def directory_check(self, path):
    del path  # Object stores have no directories to create.


def _register_object_store_event_files():
  # tensorboardX's own gs:// writer needs google-cloud-storage and its own credentials; ours goes through
  # the same fsspec filesystem as every other file of the workdir.
  from tensorboardX import record_writer
  for scheme in ("gs", "s3", "memory"):
    record_writer.register_writer_factory(scheme, _EventFileFactory())
