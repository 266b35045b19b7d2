"""Relative positions: log buckets and the Toeplitz distance index.

The relative table index idx(i, j) depends only on the distance r = i - j, so for a sequence of length L
there are just 2L - 1 distinct values. Everything here is computed on the host with NumPy for a static L
and cached; the device never sees an [L, L] index.

Bucketing follows Hugging Face (the parity target): the distance is NOT clamped to +-(max_pos - 1) before
bucketing. The authors' code clamps first, which differs only for |r| >= max_pos (512 in every released
config): there, for r <= -512, the authors' index is 1 and Hugging Face's is 0. Beyond 512 tokens every
distance collapses onto the outermost buckets (index 0 / 2k - 1 after clamping), so long sequences see
"far left" and "far right" and nothing finer.
"""

from __future__ import annotations

import functools

import numpy as np


def log_bucket(relative_distance: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
  """Maps signed distances to signed log buckets, in float32 like the PyTorch reference.

  Distances with |r| <= bucket_size // 2 are kept; larger ones are compressed logarithmically so that
  |r| = max_position - 1 lands on bucket bucket_size - 1. The arithmetic is float32 on purpose: the ceil()
  of a float32 quotient decides the bucket at the edges, and float64 would disagree there.
  """
  r = np.asarray(relative_distance, dtype=np.int64)
  mid = bucket_size // 2
  sign = np.sign(r).astype(np.float32)
  abs_r = np.where((r < mid) & (r > -mid), mid - 1, np.abs(r))
  # float32 throughout: the ceil() of a float32 quotient decides the bucket at the edges.
  ratio = (abs_r.astype(np.float32) / np.float32(mid)).astype(np.float32)
  log_ratio = np.log(ratio).astype(np.float32)
  denom = np.log(np.float32((max_position - 1) / mid)).astype(np.float32)
  log_pos = (np.ceil((log_ratio / denom).astype(np.float32) * np.float32(mid - 1)) + mid).astype(np.float32)
  return np.where(abs_r <= mid, r.astype(np.float32), log_pos * sign).astype(np.int64)


@functools.lru_cache(maxsize=64)
def distance_to_table_index(length: int, position_buckets: int, max_relative_span: int) -> np.ndarray:
  """Index into the [2k, D] relative table for every distance r = i - j in [-(L-1), L-1].

  Returns int32 [2L - 1] where element r + L - 1 is clamp(bucket(r) + k, 0, 2k - 1).
  """
  r = np.arange(-(length - 1), length, dtype=np.int64)
  if position_buckets > 0:
    k = position_buckets
    bucket = log_bucket(r, position_buckets, max_relative_span)
  else:
    k = max_relative_span
    bucket = r
  index = np.clip(bucket + k, 0, 2 * k - 1).astype(np.int32)
  index.setflags(write=False)
  return index


def table_index_matrix(length: int, position_buckets: int, max_relative_span: int) -> np.ndarray:
  """The full [L, L] index idx(i, j), for tests and documentation only (never used by the model)."""
  dist = distance_to_table_index(length, position_buckets, max_relative_span)
  i = np.arange(length)[:, None]
  j = np.arange(length)[None, :]
  return dist[i - j + length - 1]
