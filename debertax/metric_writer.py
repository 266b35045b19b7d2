"""The one metrics writer: console log lines, a JSONL file and TensorBoard events in the workdir.

Only process 0 writes. Every record is flushed as it is written, so a crash loses nothing already logged.
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import logging


class MetricWriter:

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True, filename: str = "metrics.jsonl"):
    self.enabled = enabled
    self.path = os.path.join(workdir, filename)
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(self.path, "a", buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

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
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
