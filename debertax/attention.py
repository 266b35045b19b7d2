"""Disentangled self-attention (DeBERTa): content-to-content + content-to-position + position-to-content.

    score[i, j] = (Q_i . K_j  +  Q_i . Kr[idx(i-j)]  +  K_j . Qr[idx(i-j)]) / sqrt(d * (1 + #terms))

Kr / Qr are the shared (or separate, older v2) projections of the LayerNorm'd relative table P [2k, D],
projected once per layer and shared by the whole batch. Because idx depends only on i - j, we never gather
with an [L, L] index. Instead:
  1. a static gather maps the 2k table rows to the 2L - 1 distances (a tiny [2L-1, H, d] table),
  2. one matmul per term against those distances gives [.., rows, 2L-1],
  3. `relative_shift` (pad + reshape, no gather) turns that into [.., rows, L].
With `query_block_size > 0` the queries are processed in blocks under `lax.map` with rematerialisation, so
the live score memory is [B, H, block, L] instead of [B, H, L, L]: that is the long-sequence path.
Scores, the mask and the softmax are float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from debertax import layers
from debertax.config import ModelConfig
from debertax.relative_position import distance_to_table_index


def relative_shift(x: jax.Array) -> jax.Array:
  """[..., R, W] -> [..., R, W - R + 1] with y[..., r, t] = x[..., r, t + (R - 1) - r].

  The classic pad/reshape skew: each row r is read starting (R - 1 - r) columns in, with no gather.
  """
  *lead, rows, width = x.shape
  x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (0, 1)])
  x = x.reshape(*lead, rows * (width + 1))
  x = jax.lax.slice_in_dim(x, rows - 1, rows - 1 + rows * width, axis=-1)
  x = x.reshape(*lead, rows, width)
  return x[..., : width - rows + 1]


def _block_scores(q_blk, k, kr_window, qr_window, pos_terms):
  """Attention scores for one block of T query rows against all L keys.

  q_blk [B, T, H, d] holds query rows i0..i0+T-1, already divided by the scale; k [B, L, H, d].
  kr_window [L+T-1, H, d]: the c2p key table in reversed-distance order, m' <-> r = (i0 + T - 1) - m'.
  qr_window [L+T-1, H, d]: the p2c query table (scaled) in forward order, n' <-> r = i0 - (L - 1) + n'.
  Either window may be None when its term is off. Returns float32 [B, H, T, L].
  """
  f32 = jnp.float32
  scores = jnp.einsum("bthd,bjhd->bhtj", q_blk, k, preferred_element_type=f32)
  if "c2p" in pos_terms:
    c2p = jnp.einsum("bthd,mhd->bhtm", q_blk, kr_window, preferred_element_type=f32)
    scores = scores + relative_shift(c2p)
  if "p2c" in pos_terms:
    p2c = jnp.einsum("bjhd,nhd->bhjn", k, qr_window, preferred_element_type=f32)
    scores = scores + jnp.swapaxes(relative_shift(p2c), -1, -2)
  return scores


def _softmax_values(scores, key_mask, v, dropout_rate, dropout_rng):
  """Masked float32 softmax over keys, optional dropout, then the weighted sum of values [B, T, H, d]."""
  scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout_rng is not None and dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bhtj,bjhd->bthd", probs.astype(v.dtype), v)


def disentangled_attention_xla(q, k, v, kr_dist, qr_dist, key_mask, *, pos_terms, query_block_size=0,
                               dropout_rate=0.0, dropout_rng=None):
  """The XLA path.

  q, k, v [B, L, H, d] with q already divided by the scale; kr_dist / qr_dist [2L-1, H, d] indexed by
  r + L - 1 (qr_dist already divided by the scale; either may be None when its term is off);
  key_mask [B, L] bool. Returns [B, L, H, d].
  """
  batch, length, heads, head_dim = q.shape
  kr_rev = kr_dist[::-1] if kr_dist is not None else None

  block = query_block_size if 0 < query_block_size < length else length
  if block == length:
    scores = _block_scores(q, k, kr_rev, qr_dist, pos_terms)
    return _softmax_values(scores, key_mask, v, dropout_rate, dropout_rng)

  num_blocks = -(-length // block)
  padded = num_blocks * block
  # Padding the distance tables by `padded - length` rows on the far side keeps every window in range.
  extra = padded - length
  q_blocks = jnp.pad(q, [(0, 0), (0, extra), (0, 0), (0, 0)]).reshape(batch, num_blocks, block, heads, head_dim)
  q_blocks = jnp.moveaxis(q_blocks, 1, 0)
  kr_pad = jnp.pad(kr_rev, [(extra, 0), (0, 0), (0, 0)]) if kr_rev is not None else None
  qr_pad = jnp.pad(qr_dist, [(0, extra), (0, 0), (0, 0)]) if qr_dist is not None else None
  window = length + block - 1

  @jax.checkpoint
  def one_block(args):
    block_index, q_blk = args
    start = block_index * block
    # Reversed c2p table: rows i0..i0+T-1 reach m in [L-T-i0, 2L-2-i0]; shifted by `extra` for the pad.
    kr_win = (jax.lax.dynamic_slice_in_dim(kr_pad, length - block - start + extra, window, axis=0)
              if kr_pad is not None else None)
    qr_win = jax.lax.dynamic_slice_in_dim(qr_pad, start, window, axis=0) if qr_pad is not None else None
    scores = _block_scores(q_blk, k, kr_win, qr_win, pos_terms)
    rng = jax.random.fold_in(dropout_rng, block_index) if dropout_rng is not None else None
    return _softmax_values(scores, key_mask, v, dropout_rate, rng)

  out = jax.lax.map(one_block, (jnp.arange(num_blocks), q_blocks))  # [nb, B, T, H, d]
  out = jnp.moveaxis(out, 0, 1).reshape(batch, padded, heads, head_dim)
  return out[:, :length]


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

    kr_dist = qr_dist = None
    if pos_terms:
      table = self.pos_dropout(rel_table, deterministic=deterministic).astype(hidden.dtype)
      half = cfg.position_table_half
      table = table[: 2 * half]
      dist_index = jnp.asarray(distance_to_table_index(length, cfg.position_buckets, cfg.max_relative_span))
      if "c2p" in pos_terms:
        key_layer = self.key_proj if cfg.share_att_key else self.pos_key_proj
        kr_dist = split(key_layer(table))[dist_index]  # [2L-1, H, d]
      if "p2c" in pos_terms:
        query_layer = self.query_proj if cfg.share_att_key else self.pos_query_proj
        qr_dist = split(query_layer(table))[dist_index] * jnp.asarray(1.0 / scale, hidden.dtype)

    dropout_rng = None
    if not deterministic and cfg.attention_probs_dropout_prob > 0.0:
      dropout_rng = self.make_rng("dropout")

    if cfg.attention_impl == "flash":
      from debertax import flash_attention  # Imported lazily: Pallas is only needed on this path.
      context = flash_attention.disentangled_flash_attention(
          q, k, v, kr_dist, qr_dist, key_mask, pos_terms=pos_terms,
          dropout_rate=cfg.attention_probs_dropout_prob if dropout_rng is not None else 0.0,
          dropout_rng=dropout_rng)
    else:
      context = disentangled_attention_xla(
          q, k, v, kr_dist, qr_dist, key_mask, pos_terms=pos_terms, query_block_size=cfg.query_block_size,
          dropout_rate=cfg.attention_probs_dropout_prob, dropout_rng=dropout_rng)
    return context.reshape(batch, length, heads * head_dim)
