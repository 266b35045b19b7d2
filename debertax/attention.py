"""Disentangled self-attention (DeBERTa): content-to-content + content-to-position + position-to-content.

    score[i, j] = (Q_i . K_j  +  Q_i . Kr[idx(i-j)]  +  K_j . Qr[idx(i-j)]) / sqrt(d * (1 + #terms))

Kr / Qr are the shared (or separate, older v2) projections of the LayerNorm'd relative table P [2k, D],
projected once per layer and shared by the whole batch. Because idx depends only on i - j we never gather
with an [L, L] index; a static gather maps the 2k table rows to the 2L - 1 distances ([2L-1, H, d], tiny),
and the c2p / p2c terms are block-wise Toeplitz products:

* Full path (the default up to AUTO_BLOCKED_MIN_LENGTH tokens). Queries are cut into row blocks of T rows
  (`toeplitz_rows`); a block of T query rows reaches only L + T - 1 distances, so one [B*T, d] x [d, L+T-1]
  matmul per (head, block) against that window of the distance table, followed by `relative_shift` (a
  reshape/slice skew, no gather), gives the block's c2p scores [T, L]. p2c is the same with key blocks
  against the Qr window, which yields p2c transposed ([key, query]); the transpose is folded into the
  fusion that adds the terms. Compared with the full [L, 2L-1] Toeplitz product this computes (L+T-1)/L
  instead of 2x the useful columns. Layouts are head- and block-major ([H, blocks, B*T, d]) so the batch
  folds into the matmul rows, the windows are shared by the whole batch, and the skew is a reshape of the
  matmul output with no transpose in between; the windows are kept transposed ([d, W]) so that their
  gradient comes out in the orientation the CPU dot computes fastest. Only the table rows that distances
  within L reach are projected (255 of 512 at L = 128).
* Query-blocked path (`query_block_size > 0`, or automatic beyond AUTO_BLOCKED_MIN_LENGTH). Query blocks
  of Tq rows run under `lax.map` with `jax.checkpoint`, so live score memory is [B, H, Tq, L] instead of
  [B, H, L, L] in the forward and the backward pass. Log buckets saturate: for |i - j| >= S (S = 512 for
  the released configurations) idx(i - j) is the first or last table row, so Q_i . Kr[idx] and
  K_j . Qr[idx] do not depend on the exact distance there. Per query block, only the key tiles within S of
  it (a band of about 2S + 3Tq keys) get the Toeplitz products; the far keys get per-row / per-key
  constants (Q_i . Kr[first/last], K_j . Qr[first/last]). Long sequences thus cost O(L * S) for the
  position terms instead of O(L^2) (only the content term stays O(L^2)).

Scores, the mask and the softmax are float32 whatever the compute dtype (`preferred_element_type`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from debertax import layers
from debertax.config import ModelConfig
from debertax.relative_position import distance_to_table_index

# query_block_size == 0 means "automatic": the full path up to this many tokens, the query-blocked path
# beyond (its memory is linear in L per block instead of quadratic). Both give the same numbers.
AUTO_BLOCKED_MIN_LENGTH = 1024
AUTO_QUERY_BLOCK = 128


def toeplitz_rows(length: int) -> int:
  """Rows T per Toeplitz block on the full path (tuned on the CPU with benchmarks/bench.py).

  Small T wastes less (the window is L + T - 1 columns for L useful ones) but makes more, thinner window
  copies and matmuls; about L/8 between 16 and 64 measured best at L = 128 and 512.
  """
  return int(min(64, max(16, length // 8)))


def auto_query_block(length: int, query_block_size: int) -> int:
  """The query block the XLA path uses for this length: 0 means the full (unblocked) path."""
  if query_block_size > 0:
    return query_block_size if query_block_size < length else 0
  return AUTO_QUERY_BLOCK if length > AUTO_BLOCKED_MIN_LENGTH else 0


def attention_core_flops(cfg: ModelConfig, batch: int, length: int) -> float:
  """Forward matmul FLOPs of one layer's attention core (Q K^T, probs x V, c2p, p2c) as this XLA path
  computes them: including the Toeplitz windows' extra columns, the padding to whole blocks and, on the
  blocked path, the saturated far-key constants. The projections are not included."""
  heads, dim = cfg.num_attention_heads, cfg.head_dim
  terms = cfg.pos_att_type if cfg.relative_attention else ()
  block = auto_query_block(length, cfg.query_block_size)
  if block == 0:
    flops = 2 * 2.0 * batch * heads * length * length * dim
    if terms:
      rows = toeplitz_rows(length)
      padded = -(-length // rows) * rows
      flops += len(terms) * 2.0 * batch * heads * padded * (length + rows - 1) * dim
    return flops
  num_blocks = -(-length // block)
  padded = num_blocks * block
  flops = 2 * 2.0 * batch * heads * padded * padded * dim
  if not terms:
    return flops
  saturation = saturation_distance(distance_to_table_index(length, cfg.position_buckets, cfg.max_relative_span))
  near = -(-(saturation - 1) // block) if saturation > 1 else 0
  span = min(2 * near + 1, num_blocks)
  far = span < num_blocks
  if "c2p" in terms:  # per query block: [B*Tq, d] x [d, span*Tq + Tq - 1], plus Q . Kr[first, last]
    flops += 2.0 * batch * heads * padded * (span * block + block - 1 + (2 if far else 0)) * dim
  if "p2c" in terms:  # per query block: span tiles of [B*Tq, d] x [d, 2Tq - 1], plus K . Qr[first, last] once
    flops += 2.0 * batch * heads * padded * (span * (2 * block - 1) + (2 if far else 0)) * dim
  return flops


def reachable_table_rows(dist_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(rows, row_of_distance): the sorted table rows that distances within L reach, and for each distance
  its position in `rows`, so that table[rows][row_of_distance] == table[dist_index]."""
  rows, row_of_distance = np.unique(np.asarray(dist_index), return_inverse=True)
  return rows, row_of_distance.astype(np.int32)


def saturation_distance(dist_index: np.ndarray) -> int:
  """Smallest S such that the table index is constant on each side for every |i - j| >= S.

  dist_index [2L-1] is `distance_to_table_index(L, ...)` (element r + L - 1 for distance r). Returns L when
  the index never saturates within the sequence (then no distance may be treated as "far").
  """
  dist_index = np.asarray(dist_index)
  length = (dist_index.shape[0] + 1) // 2
  r = np.arange(-(length - 1), length)
  positive_varies = (r >= 0) & (dist_index != dist_index[-1])
  negative_varies = (r <= 0) & (dist_index != dist_index[0])
  s_pos = int(r[positive_varies].max()) + 1 if positive_varies.any() else 0
  s_neg = int(-r[negative_varies].min()) + 1 if negative_varies.any() else 0
  s = max(s_pos, s_neg)
  return length if s >= length - 1 else s


@jax.custom_vjp
def relative_shift(x: jax.Array) -> jax.Array:
  """[..., R, W] -> [..., R, W - R + 1] with y[..., r, t] = x[..., r, t + (R - 1) - r].

  The skew reads row r starting (R - 1 - r) columns in. In the flattened [R * W] view that element sits at
  (R - 1) + r * (W - 1) + t, so it is one slice of the flat array, a reshape to rows of W - 1, and a
  column slice: no gather and no padding (about 2x faster on the CPU than the classic pad/reshape skew).
  The backward pass is `_relative_unshift`, written by hand (see there).
  """
  *lead, rows, width = x.shape
  if rows == 1:  # Nothing to skew (and the rows of W - 1 below would be one column short).
    return x
  flat = x.reshape(*lead, rows * width)
  flat = jax.lax.slice_in_dim(flat, rows - 1, rows - 1 + rows * (width - 1), axis=-1)
  return flat.reshape(*lead, rows, width - 1)[..., : width - rows + 1]


def _relative_unshift(y: jax.Array, width: int) -> jax.Array:
  """The transpose of `relative_shift`: [..., R, N] -> [..., R, W] (W = N + R - 1), zeros elsewhere, with
  x[..., r, t + (R - 1) - r] = y[..., r, t].

  Pad each row by R - 1 zeros on both sides (rows of V = N + 2R - 2); then x[r, c] is padded[r, c + r],
  which in the flat view sits at r * (V + 1) + c: a reshape to rows of V + 1 and a column slice. XLA's own
  transpose of the forward slices (pad, reshape, pad) ran 1.4-1.9x slower on the CPU (14 vs 20-27 ms for a
  [6, 8, 512, 575] table gradient).
  """
  *lead, rows, n = y.shape
  if rows == 1:
    return y
  no_pad = [(0, 0)] * len(lead)
  padded = jnp.pad(y, no_pad + [(0, 0), (rows - 1, rows - 1)])
  flat = padded.reshape(*lead, rows * (n + 2 * rows - 2))
  flat = jnp.pad(flat, no_pad + [(0, rows)])
  return flat.reshape(*lead, rows, n + 2 * rows - 1)[..., :width]


relative_shift.defvjp(lambda x: (relative_shift(x), x.shape[-1]),
                      lambda width, g: (_relative_unshift(g, width),))


class _RowIndex:
  """A static row index for `take_table_rows`, hashable (a nondiff argument of its custom_vjp), with the
  groups its backward pass sums: for each table row, the positions of the index that read it."""

  def __init__(self, index: np.ndarray, num_rows: int):
    self.index = np.asarray(index, np.int32)
    self.num_rows = int(num_rows)
    if self.index.ndim != 1 or (self.index.size and not 0 <= self.index.min() <= self.index.max() < num_rows):
      raise ValueError(f"take_table_rows: the index must be 1-D with values in [0, {num_rows}); got shape "
                       f"{self.index.shape}, range [{self.index.min(initial=0)}, {self.index.max(initial=0)}]")
    self._key = (self.num_rows, self.index.shape, self.index.tobytes())
    self.short, self.long = self._groups()

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _RowIndex) and self._key == other._key

  def _groups(self, long_run: int = 8):
    """(short [R, m] positions per row, padded with the sentinel N; long: [(row, start, stop)]).

    Rows read more than `long_run` times must be contiguous runs of the index (true for every distance
    index: buckets are monotonic in the distance) and are summed as slices.
    """
    counts = np.bincount(self.index, minlength=self.num_rows)
    order = np.argsort(self.index, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    width = max(1, int(counts[counts <= long_run].max(initial=1)))
    short = np.full((self.num_rows, width), self.index.shape[0], np.int32)
    long = []
    for row in np.nonzero(counts)[0]:
      members = order[starts[row]:starts[row] + counts[row]]
      if counts[row] <= long_run:
        short[row, :counts[row]] = members
      elif members[-1] - members[0] + 1 == members.size:
        long.append((int(row), int(members[0]), int(members[-1]) + 1))
      else:
        raise ValueError(f"take_table_rows: row {row} is read {counts[row]} times, not as one contiguous run")
    return short, long


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _take_rows(table, rows: _RowIndex):
  return jnp.take(table, jnp.asarray(rows.index), axis=0, mode="clip")  # in range: checked by _RowIndex


def _take_rows_fwd(table, rows: _RowIndex):
  return _take_rows(table, rows), jnp.zeros((0,), table.dtype)  # Only the dtype is needed.


def _take_rows_bwd(rows: _RowIndex, dtype_carrier, grad):
  short, long = rows.short, rows.long
  accumulate = jnp.promote_types(grad.dtype, jnp.float32)  # float32, or float64 under x64
  grad_wide = grad.astype(accumulate)
  with_sentinel = jnp.concatenate([grad_wide, jnp.zeros((1,) + grad.shape[1:], accumulate)])
  table_grad = jnp.take(with_sentinel, jnp.asarray(short), axis=0).sum(axis=1)  # [R, ...]
  if long:
    sums = jnp.stack([grad_wide[start:stop].sum(axis=0) for _, start, stop in long])
    table_grad = table_grad.at[np.array([row for row, _, _ in long])].add(sums, unique_indices=True)
  return (table_grad.astype(dtype_carrier.dtype),)


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def take_table_rows(table: jax.Array, index: np.ndarray) -> jax.Array:
  """table[index] for a static index (table [R, ...], index [N] int -> [N, ...]), e.g. the relative table's
  rows for each of the 2L - 1 distances.

  The gradient is summed per table row in float32 by gathers and slice sums instead of autodiff's
  scatter-add: beyond 512 tokens thousands of distances read the two outermost rows, and a scatter-add
  accumulates them in the table's dtype (bf16: about 2-3 significant digits) and, on GPUs, with contended
  atomic adds (non-deterministic order). Being a custom_vjp, it supports reverse-mode differentiation
  only (grad/vjp, not jvp/jacfwd).
  """
  return _take_rows(table, _RowIndex(index, table.shape[0]))


def _windowed_product(rows_blocks, table_t, starts, width):
  """[H, nb, M, d] x windows -> [H, nb, M, W]: block n against table_t[..., s_n : s_n + W].

  The windows are kept transposed ([H, nb, d, W], sliced from the [H, d, N] table): then the backward
  pass's window gradient, rows^T x d_product, comes out as [d, W], the orientation XLA's CPU dot runs
  about 2x faster than [W, d] (measured: 92 vs 48 GFLOP/s on one core).
  """
  windows_t = jnp.stack([jax.lax.slice_in_dim(table_t, int(s), int(s) + width, axis=2) for s in starts],
                        axis=1)  # [H, nb, d, W]: static slices, no gather
  return jnp.einsum("hnmd,hndw->hnmw", rows_blocks, windows_t, preferred_element_type=jnp.float32)


def _to_blocks(x, num_blocks, rows):
  """[B, Lp, H, d] -> [H, num_blocks, B * rows, d]: head- and block-major, batch folded into the rows."""
  batch, _, heads, dim = x.shape
  x = x.reshape(batch, num_blocks, rows, heads, dim).transpose(3, 1, 0, 2, 4)
  return x.reshape(heads, num_blocks, batch * rows, dim)


def _pad_rows(x, rows, axis=1):
  if rows == 0:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, rows)
  return jnp.pad(x, pad)


def _toeplitz_terms(q, k, kr_dist, qr_dist, pos_terms, rows):
  """The c2p and p2c scores of the full path, each [B, H, L, L] float32 (None when the term is off).

  Row block b holds rows bT .. bT+T-1 (queries for c2p, keys for p2c) and reaches the distances
  r in [bT - (L-1), bT + T - 1] (c2p) or [-(bT + T - 1), L - 1 - bT] (p2c): a window of W = L + T - 1
  consecutive entries of the distance table, starting at Lp - T - bT in the tables extended as below.
  """
  batch, length, heads, _ = q.shape
  num_blocks = -(-length // rows)
  padded = num_blocks * rows
  extra = padded - length
  width = length + rows - 1
  starts = [padded - rows - b * rows for b in range(num_blocks)]

  def skewed(x_blocks, table_ext):
    prod = _windowed_product(x_blocks, table_ext.transpose(1, 2, 0), starts, width)  # [H, nb, B*T, W]
    return relative_shift(prod.reshape(heads, num_blocks, batch, rows, width))  # [H, nb, B, T, L]

  c2p = p2c = None
  if "c2p" in pos_terms:
    # Window column m of query block b is distance bT + T - 1 - m: the reversed table, whose far end is
    # extended by `extra` rows for the padded query rows (whose scores are sliced off).
    kr_ext = jnp.pad(kr_dist, [(0, extra), (0, 0), (0, 0)])[::-1]
    out = skewed(_to_blocks(_pad_rows(q, extra), num_blocks, rows), kr_ext)
    c2p = out.transpose(2, 0, 1, 3, 4).reshape(batch, heads, padded, length)[:, :, :length]
  if "p2c" in pos_terms:
    # Window column m of key block b is distance m - (T - 1) - bT: the table in forward order, extended
    # at the negative end for the padded key rows.
    qr_ext = jnp.pad(qr_dist, [(extra, 0), (0, 0), (0, 0)])
    out = skewed(_to_blocks(_pad_rows(k, extra), num_blocks, rows), qr_ext)  # [H, nb, B, T_keys, L_queries]
    p2c = out.transpose(2, 0, 4, 1, 3).reshape(batch, heads, length, padded)[..., :length]
  return c2p, p2c


def _softmax_values(scores, key_mask, v, dropout_rate, dropout_rng, real_keys=None):
  """Masked float32 softmax over keys, optional dropout, then the weighted sum of values [B, T, H, d].

  Masked keys get float32 finfo.min, so a row whose keys are all masked stays finite (uniform). Keys at or
  beyond `real_keys` (padding added by the blocked path) get -inf, so they never take any weight.
  """
  scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
  if real_keys is not None and real_keys < scores.shape[-1]:
    scores = jnp.where(jnp.arange(scores.shape[-1]) < real_keys, scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout_rng is not None and dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  # float32 accumulation, rounded once: also what YNNPACK's fast CPU dot takes for bf16 (bf16 x bf16 -> bf16
  # falls back to a 2x slower dot). With v head-major first, XLA computes the product as [T, d] rows; from
  # [B, Lk, H, d] it chose the transposed [d, T] orientation, which ran 1.2x slower in the CPU forward.
  out = jnp.einsum("bhtj,bhjd->bhtd", probs.astype(v.dtype), v.transpose(0, 2, 1, 3),
                   preferred_element_type=jnp.float32)
  return out.transpose(0, 2, 1, 3).astype(v.dtype)


def _full_attention(q, k, v, kr_dist, qr_dist, key_mask, pos_terms, dropout_rate, dropout_rng):
  scores = jnp.einsum("bihd,bjhd->bhij", q, k, preferred_element_type=jnp.float32)
  c2p, p2c = _toeplitz_terms(q, k, kr_dist, qr_dist, pos_terms, toeplitz_rows(q.shape[1]))
  for term in (c2p, p2c):
    if term is not None:
      scores = scores + term
  return _softmax_values(scores, key_mask, v, dropout_rate, dropout_rng)


def _blocked_attention(q, k, v, kr_dist, qr_dist, key_mask, pos_terms, block, saturation,
                       dropout_rate, dropout_rng):
  """The query-blocked path: lax.map over query blocks of `block` rows, each rematerialised.

  Keys are padded to Lp = nb * Tq and cut into key tiles of Tq. Tile (query block a, key tile c) reaches
  the distances r in [(a - c) Tq - (Tq - 1), (a - c) Tq + Tq - 1]; it is "far" when all of them are
  saturated (|r| >= S), i.e. |a - c| > nw = ceil((S - 1) / Tq). Each query block computes the Toeplitz
  products for a window of `span` = min(2 nw + 1, nb) consecutive key tiles that contains every near tile
  (clamped at the sequence ends), and fills the keys outside it with the saturated constants.
  Everything a block needs (its queries, key tiles and table windows) is sliced inside the block from
  q, k and the distance tables, so the backward pass keeps no per-layer copies of them.
  """
  f32 = jnp.float32
  batch, length, heads, dim = q.shape
  num_blocks = -(-length // block)
  padded = num_blocks * block
  extra = padded - length
  near = -(-(saturation - 1) // block) if saturation > 1 else 0
  span = min(2 * near + 1, num_blocks)
  band_width = span * block  # keys per band
  reach = band_width  # Largest |distance| a window needs.
  far = span < num_blocks

  def extended(dist):
    """(table, base): row base + r + R of `table` is distance r, for r in [-R, R] (R = reach)."""
    if reach <= length - 1:
      return dist, length - 1 - reach
    # Beyond L - 1 only padded rows or keys read the table (their scores are discarded or masked), or
    # every distance past S is saturated: repeating the edge rows is right in both cases.
    return jnp.pad(dist, [(reach - length + 1, reach - length + 1), (0, 0), (0, 0)], mode="edge"), 0

  q_pad = _pad_rows(q, extra)
  k_pad = _pad_rows(k, extra)
  v_pad = _pad_rows(v, extra)
  mask_pad = _pad_rows(key_mask, extra)
  use_c2p, use_p2c = "c2p" in pos_terms, "p2c" in pos_terms
  if use_c2p:
    kr_src, kr_base = extended(kr_dist)
  if use_p2c:
    qr_src, qr_base = extended(qr_dist)
    if far:
      # K_j . Qr[r = +R / -R]: keys far to the left of the query (r >= S) and far to the right.
      edges = jnp.stack([qr_src[qr_base + 2 * reach], qr_src[qr_base]])  # [2, H, d]
      p2c_far = jnp.einsum("bjhd,rhd->rbhj", k_pad, edges, preferred_element_type=f32)  # [2, B, H, Lp]

  @jax.checkpoint
  def one_block(block_index):
    first_tile = jnp.clip(block_index - near, 0, num_blocks - span)
    lo = first_tile * block  # first key of the band
    offset = block_index * block - lo  # i0 - lo, in [0, (span - 1) Tq]
    q_blk = jax.lax.dynamic_slice_in_dim(q_pad, block_index * block, block, axis=1)  # [B, Tq, H, d]
    scores = jnp.einsum("bthd,bjhd->bhtj", q_blk, k_pad, preferred_element_type=f32)  # [B, H, Tq, Lp]
    band = None
    if use_c2p:
      # Window column m <-> r = (offset + Tq - 1) - m, m in [0, W), W = band + Tq - 1: table rows from
      # r = offset - band + 1 upwards, reversed. Transposed to [H, d, W] (see _windowed_product).
      width = band_width + block - 1
      rows = jax.lax.dynamic_slice_in_dim(kr_src, kr_base + reach + offset - band_width + 1, width, axis=0)
      window_t = rows[::-1].transpose(1, 2, 0)
      q_rows = q_blk.transpose(2, 0, 1, 3).reshape(heads, batch * block, dim)
      c2p = jnp.einsum("hmd,hdw->hmw", q_rows, window_t, preferred_element_type=f32)
      band = relative_shift(c2p.reshape(heads, batch, block, width)).transpose(1, 0, 2, 3)  # [B, H, Tq, band]
    if use_p2c:
      # Key tile w of the band (w = 0 .. span-1) sits at tile offset delta = a - first_tile - w and needs
      # the 2Tq - 1 distances delta*Tq - (Tq-1) .. delta*Tq + Tq - 1. All of them lie in (span + 1) Tq
      # consecutive table rows; cut those into Tq-row chunks: tile w's window is chunk span-1-w followed by
      # the first Tq - 1 rows of the next chunk.
      keys = jax.lax.dynamic_slice_in_dim(k_pad, lo, band_width, axis=1)
      tiles = _to_blocks(keys, span, block)  # [H, span, B*Tq, d]
      first_row = qr_base + reach + offset - band_width + 1
      chunks = jax.lax.dynamic_slice_in_dim(qr_src, first_row, (span + 1) * block, axis=0)
      chunks = chunks.reshape(span + 1, block, heads, dim)
      windows = jnp.concatenate([chunks[:span], chunks[1:, : block - 1]], axis=1)[::-1]  # [span, 2Tq-1, H, d]
      windows_t = windows.transpose(2, 0, 3, 1)  # [H, span, d, 2Tq-1] (see _windowed_product)
      p2c = jnp.einsum("hnmd,hndw->hnmw", tiles, windows_t, preferred_element_type=f32)
      p2c = relative_shift(p2c.reshape(heads, span, batch, block, 2 * block - 1))  # [H, span, B, Tk, Tq]
      p2c = p2c.transpose(2, 0, 4, 1, 3).reshape(batch, heads, block, band_width)
      band = p2c if band is None else band + p2c
    if band is not None:
      if far:
        key = jnp.arange(padded)
        left, right = key < lo, key >= lo + band_width  # keys with r >= S, keys with r <= -S
        background = jnp.zeros((batch, heads, block, padded), f32)
        if use_c2p:
          edges = jnp.stack([kr_src[kr_base + 2 * reach], kr_src[kr_base]])  # r = +R, r = -R
          q_far = jnp.einsum("bthd,rhd->bhtr", q_blk, edges, preferred_element_type=f32)
          background = background + jnp.where(left, q_far[..., :1], jnp.where(right, q_far[..., 1:], 0.0))
        if use_p2c:
          background = background + jnp.where(left, p2c_far[0][:, :, None, :],
                                              jnp.where(right, p2c_far[1][:, :, None, :], 0.0))
        band = jax.lax.dynamic_update_slice_in_dim(background, band, lo, axis=3)
      scores = scores + band
    rng = jax.random.fold_in(dropout_rng, block_index) if dropout_rng is not None else None
    return _softmax_values(scores, mask_pad, v_pad, dropout_rate, rng, real_keys=length)

  out = jax.lax.map(one_block, jnp.arange(num_blocks))  # [nb, B, Tq, H, d]
  out = jnp.moveaxis(out, 0, 1).reshape(batch, padded, heads, dim)
  return out[:, :length]


def disentangled_attention_xla(q, k, v, kr_dist, qr_dist, key_mask, *, pos_terms, query_block_size=0,
                               saturation=None, dropout_rate=0.0, dropout_rng=None):
  """The XLA path.

  q, k, v [B, L, H, d] with q already divided by the scale; kr_dist / qr_dist [2L-1, H, d] indexed by
  r + L - 1 (qr_dist already divided by the scale; either may be None when its term is off);
  key_mask [B, L] bool. query_block_size: 0 = automatic (`auto_query_block`), > 0 = query blocks of that
  many rows (>= L: the full path). saturation: the S of `saturation_distance` for these tables (rows at
  |r| >= S equal the rows at +-(L-1)); None assumes no saturation. Returns [B, L, H, d].
  """
  length = q.shape[1]
  block = auto_query_block(length, query_block_size)
  if block == 0:
    return _full_attention(q, k, v, kr_dist, qr_dist, key_mask, pos_terms, dropout_rate, dropout_rng)
  saturation = length if saturation is None else min(int(saturation), length)
  return _blocked_attention(q, k, v, kr_dist, qr_dist, key_mask, pos_terms, block, saturation,
                            dropout_rate, dropout_rng)


class DisentangledSelfAttention(nn.Module):
  """Q/K/V projections, the per-layer relative tables, and the attention core.

  `hidden` supplies keys and values; `query` (defaults to `hidden`) supplies queries, which is how the
  Enhanced Mask Decoder reuses a layer.
  """

  config: ModelConfig

  def setup(self):
    cfg = self.config
    dense = lambda name: layers.dense(cfg, cfg.hidden_size, ("embed", "heads"), name=name)
    self.query_proj = dense("query_proj")
    self.key_proj = dense("key_proj")
    self.value_proj = dense("value_proj")
    if cfg.relative_attention and not cfg.share_att_key:
      if "c2p" in cfg.pos_att_type:
        self.pos_key_proj = dense("pos_key_proj")
      if "p2c" in cfg.pos_att_type:
        self.pos_query_proj = dense("pos_query_proj")
    self.pos_dropout = nn.Dropout(cfg.hidden_dropout_prob)

  def __call__(self, hidden, key_mask, rel_table=None, query=None, deterministic=True):
    """hidden [B, L, D]; key_mask [B, L] bool; rel_table [2k, D] (LayerNorm'd P) -> [B, L, D]."""
    cfg = self.config
    query = hidden if query is None else query
    batch, length, _ = hidden.shape
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim
    split = lambda x: x.reshape(x.shape[:-1] + (heads, head_dim))

    pos_terms = cfg.pos_att_type if cfg.relative_attention else ()
    scale = math.sqrt(head_dim * (1 + len(pos_terms)))
    q = split(self.query_proj(query)) * jnp.asarray(1.0 / scale, query.dtype)
    k = split(self.key_proj(hidden))
    v = split(self.value_proj(hidden))

    dropout_rng = None
    if not deterministic and cfg.attention_probs_dropout_prob > 0.0:
      dropout_rng = self.make_rng("dropout")

    # The relative tables projected once per layer (never per example); qr pre-scaled. The flash kernels
    # take all 2k rows; the XLA path projects only the rows that distances within L reach (255 of 512 at
    # L = 128 with the released buckets) and then gathers them to the 2L - 1 distances.
    dist_index = distance_to_table_index(length, cfg.position_buckets, cfg.max_relative_span)
    if cfg.attention_impl == "flash":
      rows, row_of_distance = slice(0, 2 * cfg.position_table_half), None
    else:
      rows, row_of_distance = reachable_table_rows(dist_index)
    kr_table = qr_table = None
    if pos_terms:
      table = self.pos_dropout(rel_table, deterministic=deterministic).astype(hidden.dtype)[rows]
      if "c2p" in pos_terms:
        key_layer = self.key_proj if cfg.share_att_key else self.pos_key_proj
        kr_table = split(key_layer(table))
      if "p2c" in pos_terms:
        query_layer = self.query_proj if cfg.share_att_key else self.pos_query_proj
        qr_table = split(query_layer(table)) * jnp.asarray(1.0 / scale, hidden.dtype)

    if cfg.attention_impl == "flash":
      from debertax import flash_attention  # Imported lazily: Pallas is only needed on this path.
      kernel = functools.partial(
          flash_attention.disentangled_flash_attention, pos_terms=pos_terms,
          position_buckets=cfg.position_buckets, max_relative_span=cfg.max_relative_span,
          dropout_rate=cfg.attention_probs_dropout_prob if dropout_rng is not None else 0.0,
          dropout_rng=dropout_rng, backend=cfg.flash_backend,
          block_q=cfg.flash_block_q or None, block_k=cfg.flash_block_k or None,  # 0: the backend's default.
          backward=cfg.flash_backward)
      context = per_device_shards(kernel, q, k, v, key_mask, kr_table, qr_table)
    else:
      kr_dist = take_table_rows(kr_table, row_of_distance) if kr_table is not None else None  # [2L-1, H, d]
      qr_dist = take_table_rows(qr_table, row_of_distance) if qr_table is not None else None
      context = disentangled_attention_xla(
          q, k, v, kr_dist, qr_dist, key_mask, pos_terms=pos_terms, query_block_size=cfg.query_block_size,
          saturation=saturation_distance(dist_index), dropout_rate=cfg.attention_probs_dropout_prob,
          dropout_rng=dropout_rng)
    return context.reshape(batch, length, heads * head_dim)


def per_device_shards(kernel, q, k, v, key_mask, kr_table, qr_table):
  """kernel(q, k, v, key_mask, kr_table=, qr_table=) run by every device on its own shard of the batch
  (the act_batch mesh axes) and of the heads (the heads axis) under the mesh in scope.

  The Pallas kernels are custom calls (Mosaic, Triton) that the SPMD partitioner cannot split: under a
  mesh of several devices a bare call fails to lower ("Mosaic kernels cannot be automatically
  partitioned"). Attention mixes neither examples nor heads, so the shards need no communication
  (check_vma=False: the kernels' output shapes carry no per-axis variance annotation).
  q, k, v [B, L, H, d]; key_mask [B, L]; tables [2k, H, d] or None. Without a mesh (or with one device)
  the kernel is called directly.
  """
  def call(q, k, v, key_mask, kr_table, qr_table):
    return kernel(q, k, v, key_mask, kr_table=kr_table, qr_table=qr_table)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return call(q, k, v, key_mask, kr_table, qr_table)
  batch_axes, _, head_axes, _ = nn.logical_to_mesh_axes(("act_batch", "act_length", "heads", None))
  for what, size, axes in (("batch", q.shape[0], batch_axes), ("heads", q.shape[2], head_axes)):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    shards = math.prod(mesh.shape[name] for name in names)
    if size % shards:
      raise ValueError(f"attention_impl='flash': the {what} dimension ({size}) does not split over mesh axes "
                       f"{names} ({shards} devices); choose a batch size / mesh that divides it")
  rows, tables = P(batch_axes, None, head_axes, None), P(None, head_axes, None)  # A table that is None: no leaves.
  return jax.shard_map(call, in_specs=(rows, rows, rows, P(batch_axes, None), tables, tables), out_specs=rows,
                       check_vma=False)(q, k, v, key_mask, kr_table, qr_table)
