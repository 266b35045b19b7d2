"""The fused Pallas backward of the flash kernel's gather formulation (`flash_attention`, GPU / interpret).

`fused_gather_backward`: two Pallas kernels for the gather formulation (Triton on a GPU; the generic
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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from debertax.attention import take_table_rows
from debertax.flash_backward import saturation_distance
from debertax.flash_tiles import (KEY_VALID, Settings, apply_key_status, dot_nn, dot_nt, dot_tn, gather_tables,
                                  heads_layout, key_status_vector, relative_table_index)
from debertax.relative_position import distance_to_table_index

_GPU_NUM_WARPS = 4
_GPU_NUM_STAGES = 2


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
    dv = dv + dot_tn(probs.astype(d_out.dtype), d_out, s.precision)
    dk = dk + dot_tn(d_scores.astype(q.dtype), q, s.precision)
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

  by_head = [heads_layout(x, padded) for x, padded in ((q, len_q), (k, len_k), (v, len_k), (d_out, len_q))]
  c2p_tab, p2c_tab = gather_tables(by_head[0], by_head[1], kr_table, qr_table, s)
  # Triton tiles need power-of-two sizes (and >= 16 for tl.dot): zero columns change no dot product.
  qh, kh, vh, doh = (jnp.pad(x, [(0, 0)] * 3 + [(0, padded_dim - head_dim)]) for x in by_head)
  key_status = key_status_vector(key_mask, len_k)
  pad_rows = lambda x, value: jnp.pad(x, [(0, 0), (0, 0), (0, len_q - length)], constant_values=value)
  delta = jnp.einsum("blhd,blhd->bhl", d_out.astype(f32), out.astype(f32))
  # Padded query rows: row max +inf, so their recomputed probabilities (and gradients) are exactly 0.
  stats = [pad_rows(row_max, jnp.inf), pad_rows(row_sum, 1.0), pad_rows(delta, 0.0)]
  tables = [t for t in (c2p_tab, p2c_tab) if t is not None]  # [B, H, L, 2k] each, as the forward builds them
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
