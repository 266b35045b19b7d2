"""The attention core: the skew against an explicit gather, and the blocked path against the full one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from debertax.attention import disentangled_attention_xla, relative_shift
from debertax.relative_position import distance_to_table_index


def test_relative_shift_equals_gather():
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 13)).astype(np.float32)  # rows 7, width 13 -> 7 columns
  got = np.asarray(relative_shift(jnp.asarray(x)))
  rows, width = 7, 13
  expected = np.empty((2, 5, rows, width - rows + 1), np.float32)
  for r in range(rows):
    for t in range(width - rows + 1):
      expected[..., r, t] = x[..., r, t + rows - 1 - r]
  np.testing.assert_array_equal(got, expected)


def _naive(q, k, v, kr_dist, qr_dist, mask, terms):
  """Straight from the definition with an explicit [L, L] index (the thing the model never builds)."""
  length = q.shape[1]
  idx = np.arange(length)[:, None] - np.arange(length)[None, :] + length - 1
  s = np.einsum("bihd,bjhd->bhij", q, k)
  if "c2p" in terms:
    s = s + np.einsum("bihd,ijhd->bhij", q, kr_dist[idx])
  if "p2c" in terms:
    s = s + np.einsum("bjhd,ijhd->bhij", k, qr_dist[idx])
  s = np.where(mask[:, None, None, :], s, -1e30)
  p = np.exp(s - s.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  return np.einsum("bhij,bjhd->bihd", p, v)


def _inputs(length, seed=0, batch=2, heads=3, dim=8, buckets=8):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=(batch, length, heads, dim)).astype(np.float32) for _ in range(3))
  table_k = rng.normal(size=(2 * buckets, heads, dim)).astype(np.float32)
  table_q = rng.normal(size=(2 * buckets, heads, dim)).astype(np.float32)
  dist = distance_to_table_index(length, buckets, 64)
  mask = np.ones((batch, length), bool)
  mask[-1, length * 2 // 3:] = False
  return q, k, v, table_k[dist], table_q[dist], mask


@pytest.mark.parametrize("terms", [("c2p", "p2c"), ("c2p",), ("p2c",), ()])
@pytest.mark.parametrize("block", [0, 4, 5, 16])
def test_xla_path_matches_definition(terms, block):
  q, k, v, kr, qr, mask = _inputs(13)
  got = disentangled_attention_xla(q, k, v, kr, qr, mask, pos_terms=terms, query_block_size=block)
  np.testing.assert_allclose(np.asarray(got), _naive(q, k, v, kr, qr, mask, terms), atol=2e-5, rtol=1e-5)


def test_blocked_gradients_match_full():
  q, k, v, kr, qr, mask = _inputs(20, seed=1)
  def loss(block):
    def f(*xs):
      out = disentangled_attention_xla(*xs, mask, pos_terms=("c2p", "p2c"), query_block_size=block)
      return jnp.sum(out * jnp.cos(out))
    return jax.grad(f, argnums=(0, 1, 2, 3, 4))(q, k, v, kr, qr)
  for full, blocked in zip(loss(0), loss(6)):
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_fully_masked_row_is_finite():
  q, k, v, kr, qr, mask = _inputs(6)
  mask[:] = False
  out = disentangled_attention_xla(q, k, v, kr, qr, mask, pos_terms=("c2p", "p2c"))
  assert np.isfinite(np.asarray(out)).all()
