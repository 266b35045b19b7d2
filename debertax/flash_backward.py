"""The blocked XLA backward of the flash kernels (`model.flash_backward = "blocked"`; any backend).

Scans over query blocks of `backward_block` rows, recomputes each block's scores with XLA, rebuilds the
probabilities from the saved row max and sum and accumulates dq, dk, dv and both relative tables'
gradients; live memory O(B H T L) per step. Only the key tiles within the saturation distance S of a block
get Toeplitz products; the far keys get per-row (c2p) and per-key (p2c) constants. The fused Pallas
backward passes are in `flash_backward_gather` (GPU) and `flash_backward_toeplitz` (TPU).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from debertax.attention import relative_shift, take_table_rows
from debertax.flash_tiles import Settings
from debertax.relative_position import distance_to_table_index


def saturation_distance(index: np.ndarray) -> int:
  """Smallest S >= 1 such that idx(r) = idx(+-(P-1)) for every |r| >= S (on the matching side).

  index [2P-1] is `distance_to_table_index(P, ...)` (element r + P - 1). Log buckets saturate at
  S = max_relative_span (512 in every released configuration): beyond it c2p and p2c do not depend on the
  exact distance, which the backward uses to skip the Toeplitz products for far key tiles.
  """
  padded = (index.shape[0] + 1) // 2
  r = np.arange(-(padded - 1), padded)
  varies = ((r >= 0) & (index != index[-1])) | ((r <= 0) & (index != index[0]))
  return int(np.abs(r[varies]).max()) + 1 if varies.any() else 1


@dataclasses.dataclass(frozen=True)
class _BackwardGeometry:
  """Static layout of the blocked backward: query blocks and key tiles of T rows, P = nb * T."""

  block: int  # T
  num_blocks: int  # nb
  span: int  # key tiles per query block that get Toeplitz products (those within S of the block)
  near: int  # tiles on each side of the diagonal that reach a non-saturated distance

  @property
  def padded(self) -> int:
    return self.block * self.num_blocks

  @property
  def has_far_tiles(self) -> bool:
    return self.span < self.num_blocks


def _block_scores(block_index, q_blk, k_tiles, kr_rev, kr_far, qr_windows, qr_far, s: Settings,
                  g: _BackwardGeometry):
  """Float32 scores [B, H, T, P] of query block `block_index` against all P (padded) keys, with XLA.

  q_blk [B, T, H, d]; k_tiles [nb, B, T, H, d]. kr_rev [2P - 1, H, d]: the c2p table per distance in
  reversed order (row u <-> r = P - 1 - u). qr_windows [2nb - 1, 2T - 1, H, d]: per tile offset
  delta = a - c (window e = nb - 1 - delta), the p2c table over the 2T - 1 distances delta T - (T - 1)
  .. delta T + T - 1. kr_far / qr_far [2, H, d]: the saturated rows for r >= S (keys far left) and
  r <= -S (far right). Only the `span` key tiles around the diagonal get Toeplitz products; the far keys
  get per-row (c2p) and per-key (p2c) constants, so each block costs O(P) memory and O(S) position work.
  """
  f32, precision = jnp.float32, s.precision
  num_tiles, batch, block, heads, _ = k_tiles.shape
  padded = num_tiles * block
  keys = jnp.moveaxis(k_tiles, 0, 1).reshape(batch, padded, heads, -1)
  scores = jnp.einsum("bthd,bjhd->bhtj", q_blk, keys, precision=precision, preferred_element_type=f32)
  if not (s.use_c2p or s.use_p2c):
    return scores
  first_tile = jnp.clip(block_index - g.near, 0, g.num_blocks - g.span)
  lo = first_tile * block  # first key of the band
  row0 = block_index * block
  band = 0.0
  if s.use_c2p:
    # Window column m <-> r = row0 + T - 1 - lo - m over the band's span*T keys (reversed table rows).
    width = g.span * block + block - 1
    window = lax.dynamic_slice_in_dim(kr_rev, padded - block - row0 + lo, width)
    c2p = jnp.einsum("bthd,mhd->bhtm", q_blk, window, precision=precision, preferred_element_type=f32)
    band = band + relative_shift(c2p)  # [B, H, T, span*T]
  if s.use_p2c:
    tiles = lax.dynamic_slice_in_dim(k_tiles, first_tile, g.span)  # [span, B, T, H, d]
    windows = lax.dynamic_slice_in_dim(qr_windows, g.num_blocks - 1 - block_index + first_tile, g.span)
    p2c = jnp.einsum("cbuhd,cwhd->bhcuw", tiles, windows, precision=precision, preferred_element_type=f32)
    p2c = relative_shift(p2c)  # [B, H, span, T keys, T queries]
    band = band + jnp.transpose(p2c, (0, 1, 4, 2, 3)).reshape(batch, heads, block, g.span * block)
  if not g.has_far_tiles:
    return scores + band
  key = jnp.arange(padded)
  left = key < lo  # r = i - j >= S: the last table row; right of the band: r <= -S, the first row.
  right = key >= lo + g.span * block
  background = jnp.zeros(scores.shape, f32)
  if s.use_c2p:
    rows = jnp.einsum("bthd,shd->bhts", q_blk, kr_far, precision=precision, preferred_element_type=f32)
    background = background + jnp.where(left, rows[..., :1], jnp.where(right, rows[..., 1:], 0.0))
  if s.use_p2c:
    cols = jnp.einsum("bjhd,shd->bhsj", keys, qr_far, precision=precision, preferred_element_type=f32)
    background = background + jnp.where(left, cols[:, :, :1], jnp.where(right, cols[:, :, 1:], 0.0))
  return scores + lax.dynamic_update_slice_in_dim(background, band, lo, axis=3)


def blocked_backward(s: Settings, residuals, d_out):
  """Blocked recompute: scan over query blocks of T rows, rebuild probabilities from the saved row max
  and row sum, accumulate dk, dv and the relative-table gradients. Live memory O(B H T P)."""
  q, k, v, kr_table, qr_table, key_mask, out, row_max, row_sum = residuals
  batch, length, heads, head_dim = q.shape
  f32 = jnp.float32
  block = min(s.backward_block, length)
  num_blocks = pl.cdiv(length, block)
  padded = num_blocks * block  # queries and keys are both padded to P = nb * T
  index = distance_to_table_index(padded, s.position_buckets, s.max_relative_span)
  near = pl.cdiv(saturation_distance(index) - 1, block)
  geometry = _BackwardGeometry(block=block, num_blocks=num_blocks, span=min(2 * near + 1, num_blocks),
                               near=near)

  def prepare(kr_table, qr_table):
    """Tables -> the per-distance operands of `_block_scores`, r in [-(P-1), P-1] (beyond L - 1 only
    padded rows or keys read them)."""
    kr_rev = kr_far = qr_windows = qr_far = None
    if s.use_c2p:
      kr_rev = take_table_rows(kr_table, index)[::-1]
      kr_far = jnp.stack([kr_rev[0], kr_rev[-1]])
    if s.use_p2c:
      qr_dist = take_table_rows(qr_table, index)  # row u <-> r = u - (P - 1)
      starts = [(num_blocks - 1 - e) * block + padded - block for e in range(2 * num_blocks - 1)]
      qr_windows = jnp.stack([lax.slice_in_dim(qr_dist, st, st + 2 * block - 1) for st in starts])
      qr_far = jnp.stack([qr_dist[-1], qr_dist[0]])
    return kr_rev, kr_far, qr_windows, qr_far

  tables, prepare_vjp = jax.vjp(prepare, kr_table, qr_table)

  def pad_rows(x, axis, value=0.0):
    return jnp.pad(x, [(0, 0)] * axis + [(0, padded - length)] + [(0, 0)] * (x.ndim - axis - 1),
                   constant_values=value)

  def blocks(x, axis, value=0.0):  # [..., L, ...] -> [nb, ..., T, ...] along `axis`
    x = pad_rows(x, axis, value)
    x = x.reshape(x.shape[:axis] + (num_blocks, block) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  k_tiles = blocks(k, 1)
  v_pad = pad_rows(v, 1)
  # Keys: attend / masked (finfo.min, as the forward) / padding (-inf: probability exactly 0).
  key_valid = pad_rows(key_mask, 1, False)[:, None, None, :]
  key_real = (jnp.arange(padded) < length)[None, None, None, :]
  delta = jnp.einsum("blhd,blhd->bhl", d_out.astype(f32), out.astype(f32))  # [B, H, L]
  # Padded query rows get row_max = +inf, so their recomputed probabilities are exactly 0.
  xs = (jnp.arange(num_blocks), blocks(q, 1), blocks(d_out, 1), blocks(row_max, 2, jnp.inf),
        blocks(row_sum, 2, 1.0), blocks(delta, 2))
  add = lambda total, part: None if total is None else total + part.astype(f32)

  def step(carry, x):
    dk_tiles, dv, d_tables = carry
    index, q_blk, do_blk, max_blk, sum_blk, delta_blk = x
    scores, scores_vjp = jax.vjp(
        lambda q_blk, k_tiles, tables: _block_scores(index, q_blk, k_tiles, *tables, s, geometry),
        q_blk, k_tiles, tables)
    scores = jnp.where(key_real, jnp.where(key_valid, scores, jnp.finfo(f32).min), -jnp.inf)
    probs = jnp.exp(scores - max_blk[..., None]) / sum_blk[..., None]
    d_probs = jnp.einsum("bthd,bjhd->bhtj", do_blk, v_pad, precision=s.precision, preferred_element_type=f32)
    dv = dv + jnp.einsum("bhtj,bthd->bjhd", probs.astype(v.dtype), do_blk, precision=s.precision,
                         preferred_element_type=f32)
    d_scores = jnp.where(key_valid, probs * (d_probs - delta_blk[..., None]), 0.0)
    dq_blk, dk_part, d_tables_part = scores_vjp(d_scores)
    d_tables = jax.tree_util.tree_map(add, d_tables, d_tables_part, is_leaf=lambda x: x is None)
    return (dk_tiles + dk_part.astype(f32), dv, d_tables), dq_blk.astype(f32)

  zeros = lambda x: None if x is None else jnp.zeros(x.shape, f32)
  carry = (jnp.zeros(k_tiles.shape, f32), jnp.zeros(v_pad.shape, f32),
           jax.tree_util.tree_map(zeros, tables, is_leaf=lambda x: x is None))
  (dk_tiles, dv, d_tables), dq_blocks = lax.scan(step, carry, xs)
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, padded, heads, head_dim)[:, :length]
  d_tables = jax.tree_util.tree_map(lambda d, t: None if d is None else d.astype(t.dtype), d_tables, tables,
                                    is_leaf=lambda x: x is None)
  dkr_table, dqr_table = prepare_vjp(d_tables)
  return (unblock(dq_blocks).astype(q.dtype), unblock(dk_tiles).astype(k.dtype),
          dv[:, :length].astype(v.dtype), dkr_table, dqr_table, None)
