"""Pieces shared by the flash kernels' forward and backward passes (`flash_attention`, `flash_backward`):
the relative-table index computed inside a tile, the static settings of a call, the tile matmuls, key
masking and the online-softmax update. Everything here traces inside a kernel (Triton, Mosaic, interpreters).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

from debertax.attention import take_table_rows
from debertax.relative_position import distance_to_table_index

FORMULATION = {"tpu": "toeplitz", "tpu_interpret": "toeplitz", "gpu": "gather", "interpret": "gather"}

# Key status in the per-key int32 vector the kernels read: attend, user-masked (score -> finfo.min, like
# the XLA path), or internal padding beyond L (score -> -inf: never weighted, even in a fully masked row).
KEY_VALID, KEY_MASKED, KEY_PADDING = 1, 0, -1


# --------------------------------------------------------------------------------------------------
# The bucket index, traceable inside kernels.


def relative_table_index(distance, position_buckets: int, max_relative_span: int):
  """int32 distances r = i - j (any shape) -> int32 rows of the [2k, ...] relative table.

  Same numbers as `relative_position.distance_to_table_index`: clamp(log_bucket(r) + k, 0, 2k - 1), with
  the log bucket computed in float32 as in `relative_position.log_bucket`. Only elementwise ops that both
  Triton and XLA lower, so the kernels can call it on a whole [T_q, T_k] tile of distances.
  """
  distance = distance.astype(jnp.int32)
  if position_buckets <= 0:
    span = max_relative_span
    return jnp.clip(distance + span, 0, 2 * span - 1)
  half = position_buckets
  mid = position_buckets // 2
  max_position = max_relative_span
  abs_r = jnp.where((distance < mid) & (distance > -mid), mid - 1, jnp.abs(distance))
  ratio = abs_r.astype(jnp.float32) / jnp.float32(mid)
  # The denominator is a host constant computed exactly as the NumPy reference does.
  denom = np.log(np.float32((max_position - 1) / mid)).astype(np.float32)
  log_pos = jnp.ceil((jnp.log(ratio) / denom) * jnp.float32(mid - 1)) + jnp.float32(mid)
  # |r| = max_position - 1 is the one distance whose quotient is exactly mid - 1 in the reference (the
  # same log on both sides of the division); pin it so that a device log one ulp off cannot round it up.
  # Every other distance is at least 1e-4 from an integer (checked in the tests), far beyond float32 error.
  log_pos = jnp.where(abs_r == max_position - 1, jnp.float32(mid + mid - 1), log_pos)
  magnitude = jnp.where(abs_r <= mid, abs_r, log_pos.astype(jnp.int32))
  bucket = jnp.where(distance < 0, -magnitude, magnitude)
  bucket = jnp.where(abs_r <= mid, distance, bucket)
  return jnp.clip(bucket + half, 0, 2 * half - 1)


# --------------------------------------------------------------------------------------------------
# Static settings.


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything static about one call (hashable: it is a nondiff argument of the custom_vjp)."""

  use_c2p: bool
  use_p2c: bool
  position_buckets: int
  max_relative_span: int
  backend: str  # resolved: tpu | gpu | interpret | tpu_interpret
  block_q: int
  block_k: int
  backward_block: int
  precision: lax.Precision | None
  backward: str = "fused"  # fused (Pallas kernels) | blocked (XLA recompute)

  @property
  def formulation(self) -> str:
    return FORMULATION[self.backend]


# --------------------------------------------------------------------------------------------------
# Kernel pieces shared by both formulations.


def dot_nt(a, b, precision):
  """a [M, K] . b [N, K]^T -> float32 [M, N]."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def dot_nn(a, b, precision):
  """a [M, K] . b [K, N] -> float32 [M, N]."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def dot_tn(a, b, precision):
  """a [K, M]^T . b [K, N] -> float32 [M, N]."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)



def apply_key_status(scores, key_status):
  """scores [T_q, T_k] float32, key_status [1, T_k] int32 -> masked scores."""
  scores = jnp.where(key_status == KEY_VALID, scores, jnp.finfo(jnp.float32).min)
  return jnp.where(key_status == KEY_PADDING, -jnp.inf, scores)


def online_softmax_step(scores, v, row_max, row_sum, acc, precision):
  """One FlashAttention-2 update. scores [T_q, T_k] f32, v [T_k, d]; row_max/row_sum [T_q, 1]; acc [T_q, d]."""
  new_max = jnp.maximum(row_max, jnp.max(scores, axis=1, keepdims=True))
  correction = jnp.exp(row_max - new_max)  # 0 on the first tile (row_max = -inf), never NaN.
  probs = jnp.exp(scores - new_max)
  row_sum = correction * row_sum + jnp.sum(probs, axis=1, keepdims=True)
  acc = correction * acc + dot_nn(probs.astype(v.dtype), v, precision)
  return new_max, row_sum, acc


def distance_tables(kr_table, qr_table, len_q: int, len_k: int, s: Settings):
  """[2k, H, d] tables -> per-distance tables [H, L_q + L_k, d] for r in [-(L_k - 1), L_q].

  c2p comes back in reversed order (row t <-> r = L_q - t), p2c in forward order (row t <-> r = t - L_k + 1).
  """
  reach = max(len_q + 1, len_k)
  full = distance_to_table_index(reach, s.position_buckets, s.max_relative_span)  # r in [-(reach-1), reach-1]
  index = full[reach - 1 - (len_k - 1): reach - 1 + len_q + 1]
  kr_rev = jnp.swapaxes(take_table_rows(kr_table, index[::-1]), 0, 1) if s.use_c2p else None
  qr_fwd = jnp.swapaxes(take_table_rows(qr_table, index), 0, 1) if s.use_p2c else None
  return kr_rev, qr_fwd


def heads_layout(x, padded: int):
  """[B, L, H, d] -> [B, H, padded, d], zero rows beyond L (the kernels' whole-block lengths)."""
  return jnp.pad(jnp.swapaxes(x, 1, 2), [(0, 0), (0, 0), (0, padded - x.shape[1]), (0, 0)])


def key_status_vector(key_mask, padded: int):
  """key_mask [B, L] bool -> int32 [B, padded]: KEY_VALID / KEY_MASKED, and KEY_PADDING beyond L."""
  status = jnp.where(key_mask, KEY_VALID, KEY_MASKED).astype(jnp.int32)
  return jnp.pad(status, [(0, 0), (0, padded - key_mask.shape[1])], constant_values=KEY_PADDING)


def gather_tables(q_heads, k_heads, kr_table, qr_table, s: Settings):
  """The gather formulation's per-layer score tables, float32: c2p [B, H, L_q, 2k] (row i: q_i . Kr[m] for
  every table row m) and p2c [B, H, L_k, 2k] (row j: k_j . Qr[m]); None for a term that is off."""
  f32 = jnp.float32
  c2p = (jnp.einsum("bhid,mhd->bhim", q_heads, kr_table, precision=s.precision, preferred_element_type=f32)
         if s.use_c2p else None)
  p2c = (jnp.einsum("bhjd,mhd->bhjm", k_heads, qr_table, precision=s.precision, preferred_element_type=f32)
         if s.use_p2c else None)
  return c2p, p2c
