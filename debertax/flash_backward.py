"""Backward passes of the flash kernels (the `jax.custom_vjp` of `flash_attention`).

* `fused_gather_backward`: two Pallas kernels for the gather formulation (Triton on a GPU; the generic
  interpreter on the CPU), FlashAttention-2 style. One program per (batch, head, key block) walks the query
  blocks and accumulates dk and dv; one per (batch, head, query block) walks the key blocks and accumulates
  dq. Each recomputes the tile's scores exactly as the forward does (gathers from the [L, 2k] tables) and
  the probabilities from the saved row max and sum. The relative terms' gradient d score[i, j] also
  reaches q_i . Kr[idx(i - j)] (c2p) and k_j . Qr[idx(i - j)] (p2c): the kernels store it by DISTANCE
  r = i - j, d_c2p[i, r] and d_p2c[j, r], for |r| < S (S the saturation distance, 512 for the released
  configurations; each (row, r) pair belongs to exactly one tile element, so these are plain masked stores,
  no atomics and a deterministic sum), and add the saturated rest into per-row sums. XLA then contracts
  them with the per-distance tables: dq += d_c2p . Kr_dist, dk += d_p2c . Qr_dist, and the table
  gradients are d_c2p^T . q and d_p2c^T . k folded back onto the 2k table rows. Memory: [B, H, L, 2S]
  float32 per term, linear in L; nothing [L, L].
* `fused_toeplitz_backward`: the same two kernels for the TPU (Toeplitz) formulation (Mosaic; TPU
  interpret mode on the CPU): the relative terms' gradients come from undoing the forward's strided roll
  (see the section below), with no gather and no [L, L].
* `blocked_backward`: XLA code, any backend (`backward="blocked"`). Scans over query blocks,
  recomputes each block's scores, rebuilds the probabilities from the saved row statistics and
  accumulates every gradient.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from debertax.attention import relative_shift, take_table_rows
from debertax.flash_tiles import (KEY_MASKED, KEY_PADDING, KEY_VALID, Settings, apply_key_status, distance_tables,
                                  dot_nn, dot_nt, relative_table_index)
from debertax.relative_position import distance_to_table_index

_GPU_NUM_WARPS = 4
_GPU_NUM_STAGES = 2


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




# --------------------------------------------------------------------------------------------------
# Fused backward, gather formulation.


def _dot_tn(a, b, precision):
  """a [K, M]^T . b [K, N] -> float32 [M, N]."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _tile_gradients(q, k, v, d_out, row_max, row_sum, delta, key_status, rows, cols, c2p, p2c, s: Settings):
  """Recomputed scores -> (probabilities, d scores) of one [T_q, T_k] tile, float32.

  q, d_out [T_q, d]; k, v [T_k, d]; row_max, row_sum, delta [T_q, 1]; key_status [1, T_k]; rows, cols
  [T_q, T_k] absolute query / key positions; c2p(table_index), p2c(table_index): the gathered terms.
  """
  scores = dot_nt(q, k, s.precision)
  if s.use_c2p or s.use_p2c:
    table_index = relative_table_index(rows - cols, s.position_buckets, s.max_relative_span)
    if s.use_c2p:
      scores = scores + c2p(table_index)
    if s.use_p2c:
      scores = scores + p2c(table_index)
  scores = apply_key_status(scores, key_status)
  probs = jnp.exp(scores - row_max) / row_sum
  d_probs = dot_nt(d_out, v, s.precision)
  d_scores = jnp.where(key_status == KEY_VALID, probs * (d_probs - delta), 0.0)
  return probs, d_scores


def _store_by_distance(near_ref, row_index, distance, d_scores, near: int):
  """near_ref[row, r + near - 1] = d_scores for |r| < near (each (row, r) is one tile element).

  The masked-off lanes address column 2 near - 1, which no distance uses: an interpreter that writes
  every lane back (the old value where masked) must not race a real store to the same address."""
  inside = jnp.abs(distance) < near
  column = jnp.where(inside, distance + (near - 1), 2 * near - 1)
  pltriton.store(near_ref.at[row_index, column], d_scores.astype(near_ref.dtype), mask=inside)


def _gather_dkv_kernel(*refs, settings: Settings, num_query_blocks: int, near: int):
  """One program per (batch, head, key block); loops over the query blocks.

  Refs: q, d_out [L_q, d]; k, v [T_k, d]; key_status [T_k]; row_max, row_sum, delta [L_q];
  [c2p_tab [L_q, 2k]]; [p2c_tab [T_k, 2k]]; [the near output's zero initial value (aliased)];
  outputs dk, dv [T_k, d]; [d_p2c near [T_k, W], far sums [T_k] for r >= S and r <= -S].
  """
  s = settings
  q_ref, do_ref, k_ref, v_ref, status_ref, max_ref, sum_ref, delta_ref, *rest = refs
  c2p_ref = rest.pop(0) if s.use_c2p else None
  p2c_ref = rest.pop(0) if s.use_p2c else None
  if s.use_p2c:
    rest.pop(0)  # The aliased zeros: the same buffer as d_p2c near.
    dk_ref, dv_ref, near_ref, far_pos_ref, far_neg_ref = rest
  else:
    dk_ref, dv_ref = rest
  block_q, block_k = s.block_q, s.block_k
  k, v = k_ref[...], v_ref[...]
  key_status = status_ref[...].reshape(1, block_k)
  local_rows = lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  local_cols = lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
  cols = pl.program_id(2) * block_k + local_cols

  def body(query_block, carry):
    dk, dv, far_pos, far_neg = carry
    start = pl.multiple_of(query_block * block_q, block_q)
    rows = start + local_rows
    q = q_ref[pl.ds(start, block_q), :]
    d_out = do_ref[pl.ds(start, block_q), :]
    stats = [ref[pl.ds(start, block_q)].reshape(block_q, 1) for ref in (max_ref, sum_ref, delta_ref)]
    probs, d_scores = _tile_gradients(
        q, k, v, d_out, *stats, key_status, rows, cols,
        lambda index: c2p_ref[rows, index], lambda index: p2c_ref[local_cols, index], s)
    dv = dv + _dot_tn(probs.astype(d_out.dtype), d_out, s.precision)
    dk = dk + _dot_tn(d_scores.astype(q.dtype), q, s.precision)
    if s.use_p2c:
      distance = rows - cols
      _store_by_distance(near_ref, local_cols, distance, d_scores, near)
      far_pos = far_pos + jnp.sum(jnp.where(distance >= near, d_scores, 0.0), axis=0)
      far_neg = far_neg + jnp.sum(jnp.where(distance <= -near, d_scores, 0.0), axis=0)
    return dk, dv, far_pos, far_neg

  zeros_kd = jnp.zeros((block_k, k.shape[-1]), jnp.float32)
  init = (zeros_kd, zeros_kd, jnp.zeros((block_k,), jnp.float32), jnp.zeros((block_k,), jnp.float32))
  dk, dv, far_pos, far_neg = lax.fori_loop(0, num_query_blocks, body, init)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  if s.use_p2c:
    far_pos_ref[...] = far_pos
    far_neg_ref[...] = far_neg


def _gather_dq_kernel(*refs, settings: Settings, num_key_blocks: int, near: int):
  """One program per (batch, head, query block); loops over the key blocks.

  Refs: q, d_out [T_q, d]; k, v [L_k, d]; key_status [L_k]; row_max, row_sum, delta [T_q];
  [c2p_tab [T_q, 2k]]; [p2c_tab [L_k, 2k]]; [the near output's zero initial value (aliased)];
  outputs dq [T_q, d]; [d_c2p near [T_q, W], far sums [T_q] for r >= S and r <= -S].
  """
  s = settings
  q_ref, do_ref, k_ref, v_ref, status_ref, max_ref, sum_ref, delta_ref, *rest = refs
  c2p_ref = rest.pop(0) if s.use_c2p else None
  p2c_ref = rest.pop(0) if s.use_p2c else None
  if s.use_c2p:
    rest.pop(0)  # The aliased zeros: the same buffer as d_c2p near.
    dq_ref, near_ref, far_pos_ref, far_neg_ref = rest
  else:
    (dq_ref,) = rest
  block_q, block_k = s.block_q, s.block_k
  q, d_out = q_ref[...], do_ref[...]
  stats = [ref[...].reshape(block_q, 1) for ref in (max_ref, sum_ref, delta_ref)]
  local_rows = lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  rows = pl.program_id(2) * block_q + local_rows
  tile_cols = lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)

  def body(key_block, carry):
    dq, far_pos, far_neg = carry
    start = pl.multiple_of(key_block * block_k, block_k)
    cols = start + tile_cols
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    key_status = status_ref[pl.ds(start, block_k)].reshape(1, block_k)
    _, d_scores = _tile_gradients(
        q, k, v, d_out, *stats, key_status, rows, cols,
        lambda index: c2p_ref[local_rows, index], lambda index: p2c_ref[cols, index], s)
    dq = dq + dot_nn(d_scores.astype(k.dtype), k, s.precision)
    if s.use_c2p:
      distance = rows - cols
      _store_by_distance(near_ref, local_rows, distance, d_scores, near)
      far_pos = far_pos + jnp.sum(jnp.where(distance >= near, d_scores, 0.0), axis=1)
      far_neg = far_neg + jnp.sum(jnp.where(distance <= -near, d_scores, 0.0), axis=1)
    return dq, far_pos, far_neg

  init = (jnp.zeros((block_q, q.shape[-1]), jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  dq, far_pos, far_neg = lax.fori_loop(0, num_key_blocks, body, init)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  if s.use_c2p:
    far_pos_ref[...] = far_pos
    far_neg_ref[...] = far_neg


def _distance_operands(table, near: int, s: Settings):
  """[2k, H, d] table -> (per-distance rows [2S - 1, H, d] for r = -(S-1) .. S-1, the saturated rows for
  r >= S and r <= -S, each [H, d])."""
  index = distance_to_table_index(near + 1, s.position_buckets, s.max_relative_span)  # r = -near .. near
  return take_table_rows(table, index[1:-1]), table[int(index[-1])], table[int(index[0])]


def _fold_distance_gradients(d_near, d_pos, d_neg, table, x, near: int, s: Settings):
  """The gradients of one relative term x_l . table[idx(r)] from its d scores by distance.

  d_near [B, H, L, 2S - 1] (column r + S - 1, in the compute dtype); d_pos, d_neg [B, H, L] float32: the
  sums over r >= S and r <= -S; table [2k, H, d]; x [B, L, H, d] (q for c2p, k for p2c). Returns
  (d x [B, L, H, d], d table [2k, H, d]), float32. The table rows are gathered and folded back in float32;
  the [L, 2S] contractions run in d_near's dtype with float32 accumulation.
  """
  f32 = jnp.float32
  contract = functools.partial(jnp.einsum, precision=s.precision, preferred_element_type=f32)
  rows, rows_vjp = jax.vjp(functools.partial(_distance_operands, near=near, s=s), table.astype(f32))
  near_rows, pos_row, neg_row = rows
  d_x = (contract("bhlr,rhd->blhd", d_near, near_rows.astype(d_near.dtype))
         + contract("bhl,hd->blhd", d_pos, pos_row) + contract("bhl,hd->blhd", d_neg, neg_row))
  (d_table,) = rows_vjp((contract("bhlr,blhd->rhd", d_near, x), contract("bhl,blhd->hd", d_pos, x),
                         contract("bhl,blhd->hd", d_neg, x)))
  return d_x, d_table


def fused_gather_backward(s: Settings, residuals, d_out):
  """The custom_vjp backward of the gather formulation; returns the cotangents of
  (q, k, v, kr_table, qr_table, key_mask)."""
  q, k, v, kr_table, qr_table, key_mask, out, row_max, row_sum = residuals
  batch, length, heads, head_dim = q.shape
  f32 = jnp.float32
  block_q, block_k = s.block_q, s.block_k
  len_q = block_q * pl.cdiv(length, block_q)
  len_k = block_k * pl.cdiv(length, block_k)
  padded_dim = max(16, pl.next_power_of_2(head_dim)) if s.backend == "gpu" else head_dim
  # Distances |r| >= S read the first / last table row; beyond the longest distance nothing is far.
  reach = max(len_q, len_k)
  near = min(saturation_distance(distance_to_table_index(reach, s.position_buckets, s.max_relative_span)),
             reach)
  width = pl.next_power_of_2(2 * near)  # Columns 0 .. 2S - 2 and the masked lanes' 2S - 1; a power of two.

  def to_heads(x, padded, value=0.0):  # [B, L, H, d] -> [B, H, padded, padded_dim]
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, [(0, 0), (0, 0), (0, padded - length), (0, padded_dim - head_dim)], constant_values=value)

  qh, kh, vh, doh = to_heads(q, len_q), to_heads(k, len_k), to_heads(v, len_k), to_heads(d_out, len_q)
  key_status = jnp.where(key_mask, KEY_VALID, KEY_MASKED).astype(jnp.int32)
  key_status = jnp.pad(key_status, [(0, 0), (0, len_k - length)], constant_values=KEY_PADDING)
  pad_rows = lambda x, value: jnp.pad(x, [(0, 0), (0, 0), (0, len_q - length)], constant_values=value)
  delta = jnp.einsum("blhd,blhd->bhl", d_out.astype(f32), out.astype(f32))
  # Padded query rows: row max +inf, so their recomputed probabilities (and gradients) are exactly 0.
  stats = [pad_rows(row_max, jnp.inf), pad_rows(row_sum, 1.0), pad_rows(delta, 0.0)]
  tables = []
  if s.use_c2p:  # [B, H, L_q, 2k], as the forward builds it.
    tables.append(jnp.einsum("bhid,mhd->bhim", to_heads(q, len_q)[..., :head_dim], kr_table,
                             precision=s.precision, preferred_element_type=f32))
  if s.use_p2c:
    tables.append(jnp.einsum("bhjd,mhd->bhjm", to_heads(k, len_k)[..., :head_dim], qr_table,
                             precision=s.precision, preferred_element_type=f32))
  two_k = tables[0].shape[-1] if tables else 0
  extra = (dict(compiler_params=pltriton.CompilerParams(num_warps=_GPU_NUM_WARPS, num_stages=_GPU_NUM_STAGES))
           if s.backend == "gpu" else dict(interpret=True))
  full = lambda rows, cols: pl.BlockSpec((None, None, rows, cols), lambda b, h, i: (b, h, 0, 0))
  tile = lambda rows, cols: pl.BlockSpec((None, None, rows, cols), lambda b, h, i: (b, h, i, 0))
  full_row = lambda rows: pl.BlockSpec((None, None, rows), lambda b, h, i: (b, h, 0))
  tile_row = lambda rows: pl.BlockSpec((None, None, rows), lambda b, h, i: (b, h, i))
  # The by-distance gradients are stored in the compute dtype (as FlashAttention feeds d scores to the dq
  # and dk matmuls): bf16 halves their memory and runs the contractions below at the bf16 matmul rate.
  near_dtype = q.dtype
  near_shape = lambda rows: jax.ShapeDtypeStruct((batch, heads, rows, width), near_dtype)
  row_shape = lambda rows: jax.ShapeDtypeStruct((batch, heads, rows), f32)

  # dk, dv (and d_p2c by distance): programs over key blocks.
  operands = [qh, doh, kh, vh, key_status, *stats]
  in_specs = [full(len_q, padded_dim), full(len_q, padded_dim), tile(block_k, padded_dim),
              tile(block_k, padded_dim), pl.BlockSpec((None, block_k), lambda b, h, i: (b, i))] + [
              full_row(len_q)] * 3
  if s.use_c2p:
    operands.append(tables[0])
    in_specs.append(full(len_q, two_k))
  if s.use_p2c:
    operands += [tables[-1], jnp.zeros((batch, heads, len_k, width), near_dtype)]
    in_specs += [tile(block_k, two_k), tile(block_k, width)]
  out_shape = [jax.ShapeDtypeStruct(kh.shape, f32), jax.ShapeDtypeStruct(vh.shape, f32)]
  out_specs = [tile(block_k, padded_dim), tile(block_k, padded_dim)]
  if s.use_p2c:
    out_shape += [near_shape(len_k), row_shape(len_k), row_shape(len_k)]
    out_specs += [tile(block_k, width), tile_row(block_k), tile_row(block_k)]
  dkv = pl.pallas_call(
      functools.partial(_gather_dkv_kernel, settings=s, num_query_blocks=len_q // block_q, near=near),
      grid=(batch, heads, len_k // block_k), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases={len(operands) - 1: 2} if s.use_p2c else {}, name="disentangled_flash_dkv",
      **extra)(*operands)

  # dq (and d_c2p by distance): programs over query blocks.
  operands = [qh, doh, kh, vh, key_status, *stats]
  in_specs = [tile(block_q, padded_dim), tile(block_q, padded_dim), full(len_k, padded_dim),
              full(len_k, padded_dim), pl.BlockSpec((None, len_k), lambda b, h, i: (b, 0))] + [
              tile_row(block_q)] * 3
  if s.use_c2p:
    operands.append(tables[0])
    in_specs.append(tile(block_q, two_k))
  if s.use_p2c:
    operands.append(tables[-1])
    in_specs.append(full(len_k, two_k))
  if s.use_c2p:
    operands.append(jnp.zeros((batch, heads, len_q, width), near_dtype))
    in_specs.append(tile(block_q, width))
  out_shape = [jax.ShapeDtypeStruct(qh.shape, f32)]
  out_specs = [tile(block_q, padded_dim)]
  if s.use_c2p:
    out_shape += [near_shape(len_q), row_shape(len_q), row_shape(len_q)]
    out_specs += [tile(block_q, width), tile_row(block_q), tile_row(block_q)]
  dqs = pl.pallas_call(
      functools.partial(_gather_dq_kernel, settings=s, num_key_blocks=len_k // block_k, near=near),
      grid=(batch, heads, len_q // block_q), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases={len(operands) - 1: 1} if s.use_c2p else {}, name="disentangled_flash_dq",
      **extra)(*operands)

  from_heads = lambda x: jnp.swapaxes(x[:, :, :length, :head_dim], 1, 2)  # -> [B, L, H, d] float32
  dq, dk, dv = from_heads(dqs[0]), from_heads(dkv[0]), from_heads(dkv[1])
  by_distance = lambda x: x[:, :, :length, :2 * near - 1]  # [B, H, L, 2S - 1]: column r + S - 1
  dkr_table = dqr_table = None
  if s.use_c2p:  # c2p: q_i . Kr[idx(i - j)], stored per query row i
    dq_c2p, dkr_table = _fold_distance_gradients(by_distance(dqs[1]), dqs[2][:, :, :length], dqs[3][:, :, :length],
                                                 kr_table, q, near, s)
    dq = dq + dq_c2p
  if s.use_p2c:  # p2c: k_j . Qr[idx(i - j)], stored per key row j
    dk_p2c, dqr_table = _fold_distance_gradients(by_distance(dkv[2]), dkv[3][:, :, :length], dkv[4][:, :, :length],
                                                 qr_table, k, near, s)
    dk = dk + dk_p2c
  cast = lambda x, like: None if x is None else x.astype(like.dtype)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), cast(dkr_table, kr_table),
          cast(dqr_table, qr_table), None)


# --------------------------------------------------------------------------------------------------
# Fused backward, Toeplitz formulation (TPU).
#
# The forward adds roll(q . Kr_window^T) (c2p) and roll(k . Qr_window^T)^T (p2c) to a tile, windows of
# W = T_q + T_k distances of the per-distance tables. The gradient of a strided roll is the strided roll
# the other way (stride W - 1 = -1 mod W) of the zero-padded tile gradient, which gives d window [T_q, W]
# (or [T_k, W]) with no gather. From it: dq += d_window . Kr_window, dk += d_window . Qr_window, and the
# window's table gradient q^T . d_window (or k^T . d_window), added into a per-(batch, head) per-distance
# accumulator [d, L_q + L_k] at the tile's lane-aligned offset. The accumulator stays resident in VMEM
# while a program walks all its tiles, so both block axes are sequential ("arbitrary"); batch and heads
# stay parallel.


def _toeplitz_tile_gradients(q, k, v, d_out, row_max, row_sum, delta, key_status, kr_window, qr_window,
                             s: Settings):
  """Recomputed scores of one tile -> (probabilities, d scores) [T_q, T_k], float32 (as the forward)."""
  block_q, block_k = q.shape[0], k.shape[0]
  scores = dot_nt(q, k, s.precision)
  if s.use_c2p:
    window = dot_nt(q, kr_window, s.precision)
    scores = scores + pltpu.roll(window, block_k, 1, stride=1, stride_axis=0)[:, :block_k]
  if s.use_p2c:
    window = dot_nt(k, qr_window, s.precision)
    scores = scores + pltpu.roll(window, block_q + 1, 1, stride=1, stride_axis=0)[:, :block_q].T
  scores = apply_key_status(scores, key_status)
  probs = jnp.exp(scores - row_max) / row_sum
  d_probs = dot_nt(d_out, v, s.precision)
  return probs, jnp.where(key_status == KEY_VALID, probs * (d_probs - delta), 0.0)


def _window_gradient(tile_gradient, shift: int):
  """[R, C] tile gradient -> [R, R + C] window gradient: zero-pad to the window and undo the forward's
  strided roll (row a moves by -(forward shift + a), i.e. shift + a (W - 1) mod W)."""
  rows, cols = tile_gradient.shape
  padded = jnp.concatenate([tile_gradient, jnp.zeros((rows, rows), tile_gradient.dtype)], axis=1)
  return pltpu.roll(padded, shift, 1, stride=rows + cols - 1, stride_axis=0)


def _toeplitz_dq_kernel(*refs, settings: Settings, len_q: int):
  """Grid (batch, head, query block i, key block j), i and j sequential.

  Refs: q, d_out [T_q, d]; k, v [T_k, d]; key_status [1, T_k]; row_max, row_sum, delta [T_q, 128]
  (lane-replicated); [kr window [W, d]]; [qr window [W, d]]; outputs dq [T_q, d], [d kr_rev transposed,
  [d, L_q + L_k] (resident per batch and head)]; scratch dq [T_q, d] float32.
  """
  s = settings
  q_ref, do_ref, k_ref, v_ref, status_ref, max_ref, sum_ref, delta_ref, *rest = refs
  kr_ref = rest.pop(0) if s.use_c2p else None
  qr_ref = rest.pop(0) if s.use_p2c else None
  dkr_ref = None
  if s.use_c2p:
    dq_ref, dkr_ref, dq_scratch = rest
  else:
    dq_ref, dq_scratch = rest
  block_q, block_k = s.block_q, s.block_k
  query_block, key_block = pl.program_id(2), pl.program_id(3)

  @pl.when(key_block == 0)
  def _init():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

  if dkr_ref is not None:
    @pl.when((query_block == 0) & (key_block == 0))
    def _init_table():
      dkr_ref[...] = jnp.zeros(dkr_ref.shape, dkr_ref.dtype)

  q, k = q_ref[...], k_ref[...]
  _, d_scores = _toeplitz_tile_gradients(
      q, k, v_ref[...], do_ref[...], max_ref[:, :1], sum_ref[:, :1], delta_ref[:, :1], status_ref[...],
      kr_ref[...] if s.use_c2p else None, qr_ref[...] if s.use_p2c else None, s)
  dq = dq_scratch[...] + dot_nn(d_scores.astype(k.dtype), k, s.precision)
  if s.use_c2p:
    d_window = _window_gradient(d_scores, block_q)  # [T_q, W]
    dq = dq + dot_nn(d_window.astype(q.dtype), kr_ref[...], s.precision)
    offset = pl.multiple_of(len_q - query_block * block_q + key_block * block_k - block_q, 8)  # whole blocks
    window = pl.ds(offset, block_q + block_k)
    dkr_ref[:, window] = dkr_ref[:, window] + _dot_tn(q, d_window.astype(q.dtype), s.precision)
  dq_scratch[...] = dq

  @pl.when(key_block == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_scratch[...].astype(dq_ref.dtype)


def _toeplitz_dkv_kernel(*refs, settings: Settings, len_k: int):
  """Grid (batch, head, key block j, query block i), j and i sequential.

  Refs as `_toeplitz_dq_kernel`; outputs dk, dv [T_k, d], [d qr_fwd transposed, [d, L_q + L_k]
  (resident)]; scratch dk, dv [T_k, d] float32.
  """
  s = settings
  q_ref, do_ref, k_ref, v_ref, status_ref, max_ref, sum_ref, delta_ref, *rest = refs
  kr_ref = rest.pop(0) if s.use_c2p else None
  qr_ref = rest.pop(0) if s.use_p2c else None
  dqr_ref = None
  if s.use_p2c:
    dk_ref, dv_ref, dqr_ref, dk_scratch, dv_scratch = rest
  else:
    dk_ref, dv_ref, dk_scratch, dv_scratch = rest
  block_q, block_k = s.block_q, s.block_k
  key_block, query_block = pl.program_id(2), pl.program_id(3)

  @pl.when(query_block == 0)
  def _init():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  if dqr_ref is not None:
    @pl.when((query_block == 0) & (key_block == 0))
    def _init_table():
      dqr_ref[...] = jnp.zeros(dqr_ref.shape, dqr_ref.dtype)

  q, k, d_out = q_ref[...], k_ref[...], do_ref[...]
  probs, d_scores = _toeplitz_tile_gradients(
      q, k, v_ref[...], d_out, max_ref[:, :1], sum_ref[:, :1], delta_ref[:, :1], status_ref[...],
      kr_ref[...] if s.use_c2p else None, qr_ref[...] if s.use_p2c else None, s)
  dv_scratch[...] = dv_scratch[...] + _dot_tn(probs.astype(d_out.dtype), d_out, s.precision)
  dk = dk_scratch[...] + _dot_tn(d_scores.astype(q.dtype), q, s.precision)
  if s.use_p2c:
    d_window = _window_gradient(d_scores.T, block_k - 1)  # [T_k, W]
    dk = dk + dot_nn(d_window.astype(k.dtype), qr_ref[...], s.precision)
    offset = pl.multiple_of(query_block * block_q - key_block * block_k + len_k - block_k, 8)
    window = pl.ds(offset, block_q + block_k)
    dqr_ref[:, window] = dqr_ref[:, window] + _dot_tn(k, d_window.astype(k.dtype), s.precision)
  dk_scratch[...] = dk

  @pl.when(query_block == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_scratch[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def fused_toeplitz_backward(s: Settings, residuals, d_out):
  """The custom_vjp backward of the TPU (Toeplitz) kernel; cotangents of (q, k, v, kr_table, qr_table,
  key_mask)."""
  q, k, v, kr_table, qr_table, key_mask, out, row_max, row_sum = residuals
  batch, length, heads, head_dim = q.shape
  f32 = jnp.float32
  block_q, block_k = s.block_q, s.block_k
  window = block_q + block_k
  len_q = block_q * pl.cdiv(length, block_q)
  len_k = block_k * pl.cdiv(length, block_k)
  lanes = 128

  def to_heads(x, padded):  # [B, L, H, d] -> [B, H, padded, d]
    return jnp.pad(jnp.swapaxes(x, 1, 2), [(0, 0), (0, 0), (0, padded - length), (0, 0)])

  qh, kh, vh, doh = to_heads(q, len_q), to_heads(k, len_k), to_heads(v, len_k), to_heads(d_out, len_q)
  key_status = jnp.where(key_mask, KEY_VALID, KEY_MASKED).astype(jnp.int32)
  key_status = jnp.pad(key_status, [(0, 0), (0, len_k - length)], constant_values=KEY_PADDING)[:, None, :]
  delta = jnp.einsum("blhd,blhd->bhl", d_out.astype(f32), out.astype(f32))

  def lane_stat(x, value):  # [B, H, L] -> [B, H, L_q, 128]; padded query rows get `value`
    x = jnp.pad(x, [(0, 0), (0, 0), (0, len_q - length)], constant_values=value)
    return jnp.broadcast_to(x[..., None], x.shape + (lanes,))

  # Padded query rows: row max +inf, so their recomputed probabilities (and gradients) are exactly 0.
  stats = [lane_stat(row_max, jnp.inf), lane_stat(row_sum, 1.0), lane_stat(delta, 0.0)]
  tables, tables_vjp = jax.vjp(lambda kr, qr: distance_tables(kr, qr, len_q, len_k, s),
                               None if kr_table is None else kr_table.astype(f32),
                               None if qr_table is None else qr_table.astype(f32))
  kr_rev, qr_fwd = (None if t is None else t.astype(q.dtype) for t in tables)
  extra = dict(compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")))
  if s.backend == "tpu_interpret":
    extra["interpret"] = pltpu.InterpretParams()

  def specs(query_axis: int, key_axis: int):
    """BlockSpecs of the inputs for a grid whose axes 2, 3 are (query, key) blocks in some order."""
    qi = lambda b, h, *g: g[query_axis]
    kj = lambda b, h, *g: g[key_axis]
    rows = lambda size, block: pl.BlockSpec((None, None, size, head_dim), lambda b, h, *g: (b, h, block(b, h, *g), 0))
    in_specs = [rows(block_q, lambda b, h, *g: qi(b, h, *g)), rows(block_q, lambda b, h, *g: qi(b, h, *g)),
                rows(block_k, lambda b, h, *g: kj(b, h, *g)), rows(block_k, lambda b, h, *g: kj(b, h, *g)),
                pl.BlockSpec((None, 1, block_k), lambda b, h, *g: (b, 0, kj(b, h, *g)))]
    in_specs += [pl.BlockSpec((None, None, block_q, lanes), lambda b, h, *g: (b, h, qi(b, h, *g), 0))] * 3
    if s.use_c2p:
      in_specs.append(pl.BlockSpec(
          (None, pl.Element(window), pl.Element(head_dim)),
          lambda b, h, *g: (h, len_q - qi(b, h, *g) * block_q + kj(b, h, *g) * block_k - block_q, 0)))
    if s.use_p2c:
      in_specs.append(pl.BlockSpec(
          (None, pl.Element(window), pl.Element(head_dim)),
          lambda b, h, *g: (h, qi(b, h, *g) * block_q - kj(b, h, *g) * block_k + len_k - block_k, 0)))
    return in_specs

  operands = [qh, doh, kh, vh, key_status, *stats] + [t for t in (kr_rev, qr_fwd) if t is not None]
  # Distances on the lanes: [d, L_q + L_k] needs no lane padding for d = 64 (4 MiB at L = 8192).
  table_shape = jax.ShapeDtypeStruct((batch, heads, head_dim, len_q + len_k), f32)
  table_spec = pl.BlockSpec((None, None, head_dim, len_q + len_k), lambda b, h, *g: (b, h, 0, 0))

  # dq and d kr_rev: grid (b, h, i, j).
  out_shape = [jax.ShapeDtypeStruct(qh.shape, f32)] + ([table_shape] if s.use_c2p else [])
  out_specs = [pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, j: (b, h, i, 0))] + (
      [table_spec] if s.use_c2p else [])
  dq_out = pl.pallas_call(
      functools.partial(_toeplitz_dq_kernel, settings=s, len_q=len_q),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=(batch, heads, len_q // block_q, len_k // block_k),
          in_specs=specs(0, 1), out_specs=out_specs, scratch_shapes=[pltpu.VMEM((block_q, head_dim), f32)]),
      out_shape=out_shape, name="disentangled_flash_toeplitz_dq", **extra)(*operands)

  # dk, dv and d qr_fwd: grid (b, h, j, i).
  out_shape = [jax.ShapeDtypeStruct(kh.shape, f32)] * 2 + ([table_shape] if s.use_p2c else [])
  out_specs = [pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, j, i: (b, h, j, 0))] * 2 + (
      [table_spec] if s.use_p2c else [])
  dkv_out = pl.pallas_call(
      functools.partial(_toeplitz_dkv_kernel, settings=s, len_k=len_k),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=(batch, heads, len_k // block_k, len_q // block_q),
          in_specs=specs(1, 0), out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((block_k, head_dim), f32), pltpu.VMEM((block_k, head_dim), f32)]),
      out_shape=out_shape, name="disentangled_flash_toeplitz_dkv", **extra)(*operands)

  from_heads = lambda x: jnp.swapaxes(x[:, :, :length], 1, 2)
  d_kr_rev = jnp.swapaxes(jnp.sum(dq_out[1], axis=0), 1, 2) if s.use_c2p else None  # [H, L_q + L_k, d]
  d_qr_fwd = jnp.swapaxes(jnp.sum(dkv_out[2], axis=0), 1, 2) if s.use_p2c else None
  dkr_table, dqr_table = tables_vjp((d_kr_rev, d_qr_fwd))
  cast = lambda x, like: None if like is None else x.astype(like.dtype)
  return (from_heads(dq_out[0]).astype(q.dtype), from_heads(dkv_out[0]).astype(k.dtype),
          from_heads(dkv_out[1]).astype(v.dtype), cast(dkr_table, kr_table), cast(dqr_table, qr_table), None)
