"""The fused Pallas backward of the flash kernel's Toeplitz formulation (`flash_attention`, TPU / tpu_interpret).

The forward adds roll(q . Kr_window^T) (c2p) and roll(k . Qr_window^T)^T (p2c) to a tile, windows of
W = T_q + T_k distances of the per-distance tables. The gradient of a strided roll is the strided roll
the other way (stride W - 1 = -1 mod W) of the zero-padded tile gradient, which gives d window [T_q, W]
(or [T_k, W]) with no gather. From it: dq += d_window . Kr_window, dk += d_window . Qr_window, and the
window's table gradient q^T . d_window (or k^T . d_window), added into a per-(batch, head) per-distance
accumulator [d, L_q + L_k] at the tile's lane-aligned offset. The accumulator stays resident in VMEM
while a program walks all its tiles, so both block axes are sequential ("arbitrary"); batch and heads
stay parallel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from debertax.flash_tiles import (KEY_VALID, Settings, apply_key_status, distance_tables, dot_nn, dot_nt, dot_tn,
                                  heads_layout, key_status_vector)


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
    dkr_ref[:, window] = dkr_ref[:, window] + dot_tn(q, d_window.astype(q.dtype), s.precision)
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
  dv_scratch[...] = dv_scratch[...] + dot_tn(probs.astype(d_out.dtype), d_out, s.precision)
  dk = dk_scratch[...] + dot_tn(d_scores.astype(q.dtype), q, s.precision)
  if s.use_p2c:
    d_window = _window_gradient(d_scores.T, block_k - 1)  # [T_k, W]
    dk = dk + dot_nn(d_window.astype(k.dtype), qr_ref[...], s.precision)
    offset = pl.multiple_of(query_block * block_q - key_block * block_k + len_k - block_k, 8)
    window = pl.ds(offset, block_q + block_k)
    dqr_ref[:, window] = dqr_ref[:, window] + dot_tn(k, d_window.astype(k.dtype), s.precision)
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

  qh, kh, vh, doh = (heads_layout(x, padded) for x, padded in ((q, len_q), (k, len_k), (v, len_k), (d_out, len_q)))
  key_status = key_status_vector(key_mask, len_k)[:, None, :]
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
