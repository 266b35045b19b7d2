"""The attention core: the skew against an explicit gather, and the blocked path against the full one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from debertax.attention import disentangled_attention_xla, relative_shift, take_table_rows
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


def test_relative_shift_gradient_equals_gather_gradient():
  rng = np.random.default_rng(1)
  for rows, width in [(1, 6), (4, 4), (7, 13)]:
    x = jnp.asarray(rng.normal(size=(3, rows, width)), jnp.float32)
    cols = np.arange(width - rows + 1)[None, :] + rows - 1 - np.arange(rows)[:, None]
    gather = lambda x, cols=cols: x[:, np.arange(rows)[:, None], cols]
    cotangent = jnp.asarray(rng.normal(size=(3, rows, width - rows + 1)), jnp.float32)
    got = jax.vjp(relative_shift, x)[1](cotangent)[0]
    expected = jax.vjp(gather, x)[1](cotangent)[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("length", [7, 600, 1300])
def test_take_table_rows_gradient_equals_scatter_add(length):
  """The hand-written backward (gathers + slice sums, float32) against autodiff's scatter-add of a gather,
  for the released buckets (beyond 512 tokens hundreds of distances read the two outermost rows) and a
  reversed index (how the c2p tables are read)."""
  rng = np.random.default_rng(length)
  table = jnp.asarray(rng.normal(size=(512, 3, 4)), jnp.float32)
  for index in (distance_to_table_index(length, 256, 512), distance_to_table_index(length, 256, 512)[::-1]):
    cotangent = jnp.asarray(rng.normal(size=(index.size, 3, 4)), jnp.float32)
    values, vjp = jax.vjp(lambda t, index=index: take_table_rows(t, index), table)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(table)[index])
    expected = jax.vjp(lambda t, index=index: t[jnp.asarray(index)], table)[1](cotangent)[0]
    np.testing.assert_allclose(np.asarray(vjp(cotangent)[0]), np.asarray(expected), rtol=1e-5, atol=1e-5)
    jitted = jax.jit(lambda t, c, index=index: jax.vjp(lambda t: take_table_rows(t, index), t)[1](c)[0])
    np.testing.assert_allclose(np.asarray(jitted(table, cotangent)), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_take_table_rows_gradient_is_summed_in_float32():
  """A bf16 table whose outermost row is read 3000 times: its gradient is the float32 sum rounded once
  (a bf16 running sum stalls: autodiff's scatter-add gives 512 here)."""
  index = np.concatenate([np.zeros(3000, np.int32), np.arange(1, 9, dtype=np.int32)])
  table = jnp.zeros((9, 2), jnp.bfloat16)
  cotangent = np.random.default_rng(0).uniform(0.5, 1.5, size=(index.size, 2)).astype(np.float32)
  grad = jax.vjp(lambda t: take_table_rows(t, index), table)[1](jnp.asarray(cotangent, jnp.bfloat16))[0]
  assert grad.dtype == jnp.bfloat16
  exact = cotangent.astype(jnp.bfloat16).astype(np.float64)
  np.testing.assert_allclose(np.asarray(grad[0], np.float64), exact[:3000].sum(0), rtol=2 ** -8)
  np.testing.assert_array_equal(np.asarray(grad[1:], np.float32), exact[3000:].astype(np.float32))


def test_take_table_rows_rejects_bad_indices():
  index = np.tile(np.arange(3, dtype=np.int32), 20)  # every row read 20 times, never contiguously
  with pytest.raises(ValueError, match="contiguous run"):
    jax.grad(lambda t: take_table_rows(t, index).sum())(jnp.ones((3,)))
  for bad in (np.array([0, 3]), np.array([-1, 0]), np.zeros((2, 2), np.int32)):
    with pytest.raises(ValueError, match=r"1-D with values in \[0, 3\)"):
      take_table_rows(jnp.ones((3,)), bad)


def _naive(q, k, v, kr_dist, qr_dist, mask, terms, xp=np):
  """Straight from the definition with an explicit [L, L] index (the thing the model never builds).
  With xp=jnp it is differentiable by plain autodiff: the reference for the hand-written skew backward."""
  length = q.shape[1]
  idx = np.arange(length)[:, None] - np.arange(length)[None, :] + length - 1
  s = xp.einsum("bihd,bjhd->bhij", q, k)
  if "c2p" in terms:
    s = s + xp.einsum("bihd,ijhd->bhij", q, kr_dist[idx])
  if "p2c" in terms:
    s = s + xp.einsum("bjhd,ijhd->bhij", k, qr_dist[idx])
  s = xp.where(mask[:, None, None, :], s, -1e30)
  p = xp.exp(s - s.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  return xp.einsum("bhij,bjhd->bihd", p, v)


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


@pytest.mark.parametrize("terms", [("c2p", "p2c"), ("p2c",), ()])
@pytest.mark.parametrize("block", [0, 5])
def test_gradients_match_autodiff_of_definition(terms, block):
  q, k, v, kr, qr, mask = _inputs(13, seed=2)
  mask[0] = False  # A fully masked row: uniform weights, zero score gradients.
  cotangent = np.random.default_rng(3).normal(size=q.shape).astype(np.float32)
  ours = lambda *xs: disentangled_attention_xla(*xs, mask, pos_terms=terms, query_block_size=block)
  naive = lambda *xs: _naive(*xs, mask, terms, xp=jnp)
  args = tuple(jnp.asarray(x) for x in (q, k, v, kr, qr))
  got = jax.vjp(ours, *args)[1](jnp.asarray(cotangent))
  expected = jax.vjp(naive, *args)[1](jnp.asarray(cotangent))
  for name, g, e in zip(("q", "k", "v", "kr", "qr"), got, expected):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=2e-5, rtol=1e-5, err_msg=name)


def test_fully_masked_row_is_finite():
  q, k, v, kr, qr, mask = _inputs(6)
  mask[:] = False
  out = disentangled_attention_xla(q, k, v, kr, qr, mask, pos_terms=("c2p", "p2c"))
  assert np.isfinite(np.asarray(out)).all()


# ---- The Toeplitz blocks, the saturation band of the query-blocked path, and the automatic choice. ----

from debertax import attention, compile_options  # noqa: E402
from debertax.config import ModelConfig  # noqa: E402
from debertax.heads import build_model, init_params  # noqa: E402
from debertax.relative_position import table_index_matrix  # noqa: E402


def _saturating_inputs(length, buckets, span, seed=0, batch=2, heads=3, dim=8):
  """Like _inputs, with the distance tables of a log-bucketed config that saturates at about `span`."""
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=(batch, length, heads, dim)).astype(np.float32) for _ in range(3))
  dist = distance_to_table_index(length, buckets, span)
  kr = rng.normal(size=(2 * buckets, heads, dim)).astype(np.float32)[dist]
  qr = rng.normal(size=(2 * buckets, heads, dim)).astype(np.float32)[dist]
  mask = np.ones((batch, length), bool)
  mask[-1, length * 2 // 3:] = False
  return q, k, v, kr, qr, mask, attention.saturation_distance(dist)


@pytest.mark.parametrize("buckets,span", [(256, 512), (16, 512), (8, 16), (-1, 24), (4, 8)])
@pytest.mark.parametrize("length", [1, 2, 30, 700])
def test_saturation_distance_matches_definition(buckets, span, length):
  """Brute force on the [L, L] index: every pair with |i - j| >= S sees the first or the last table row."""
  s = attention.saturation_distance(distance_to_table_index(length, buckets, span))
  idx = table_index_matrix(length, buckets, span)
  r = np.arange(length)[:, None] - np.arange(length)[None, :]
  if s < length:
    assert (idx[r >= s] == idx[length - 1, 0]).all() and (idx[r <= -s] == idx[0, length - 1]).all()
  if 1 <= s < length:  # ... and S is the smallest such distance.
    assert not ((idx[r >= s - 1] == idx[length - 1, 0]).all() and (idx[r <= -(s - 1)] == idx[0, length - 1]).all())


def test_saturation_of_released_configs():
  # deberta.md section 2: past |r| = 511 Hugging Face's index is the first (r <= -512) or last row.
  assert attention.saturation_distance(distance_to_table_index(2048, 256, 512)) == 512
  # Within 512 tokens the last buckets are reached from |r| = 506 on (log_bucket(506..511) = 255).
  assert attention.saturation_distance(distance_to_table_index(512, 256, 512)) == 506


@pytest.mark.parametrize("terms", [("c2p", "p2c"), ("c2p",), ("p2c",)])
@pytest.mark.parametrize("length,block,buckets,span", [
    (100, 8, 8, 16),  # band of 5 key tiles out of 13: far keys on both sides
    (100, 7, 8, 16),  # L not a multiple of the block
    (61, 5, 4, 8),
    (64, 16, 8, 16),  # band covers every tile (no far keys)
    (45, 4, 16, 512),  # no saturation within L
])
def test_blocked_band_path_matches_definition(terms, length, block, buckets, span):
  q, k, v, kr, qr, mask, s = _saturating_inputs(length, buckets, span)
  got = disentangled_attention_xla(q, k, v, kr, qr, mask, pos_terms=terms, query_block_size=block, saturation=s)
  np.testing.assert_allclose(np.asarray(got), _naive(q, k, v, kr, qr, mask, terms), atol=2e-5, rtol=1e-5)


def test_blocked_band_gradients_match_full():
  """Gradients w.r.t. q, k, v and the bucket tables. (Per-distance rows are not comparable: the band path
  reads one saturated row where the full path reads each of the equal saturated rows.)"""
  length, buckets, span = 90, 8, 16
  q, k, v, _, _, mask, s = _saturating_inputs(length, buckets, span, seed=3)
  rng = np.random.default_rng(5)
  kr_table, qr_table = (rng.normal(size=(2 * buckets, 3, 8)).astype(np.float32) for _ in range(2))
  dist = distance_to_table_index(length, buckets, span)

  def grads(block):
    def f(q, k, v, kr_table, qr_table):
      out = disentangled_attention_xla(q, k, v, kr_table[dist], qr_table[dist], mask, pos_terms=("c2p", "p2c"),
                                       query_block_size=block, saturation=s)
      return jnp.sum(out * jnp.cos(out))
    return jax.grad(f, argnums=(0, 1, 2, 3, 4))(q, k, v, kr_table, qr_table)

  for full, blocked in zip(grads(0), grads(8)):
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [5, 16, 33, 130])
def test_full_path_toeplitz_rows(length, monkeypatch):
  """Any number of Toeplitz rows, dividing L or not, gives the definition."""
  q, k, v, kr, qr, mask = _inputs(length, seed=4)
  expected = _naive(q, k, v, kr, qr, mask, ("c2p", "p2c"))
  for rows in (1, 3, 16, length, 2 * length):
    monkeypatch.setattr(attention, "toeplitz_rows", lambda _, rows=rows: rows)
    got = disentangled_attention_xla(q, k, v, kr, qr, mask, pos_terms=("c2p", "p2c"))
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5, rtol=1e-5, err_msg=f"rows={rows}")


def test_fully_masked_row_same_on_both_paths():
  """A sequence with every key masked: uniform over the real keys on both paths (padding keys get none)."""
  q, k, v, kr, qr, mask, s = _saturating_inputs(30, 8, 16)
  mask[0] = False
  full = disentangled_attention_xla(q, k, v, kr, qr, mask, pos_terms=("c2p", "p2c"))
  blocked = disentangled_attention_xla(q, k, v, kr, qr, mask, pos_terms=("c2p", "p2c"), query_block_size=7,
                                       saturation=s)
  np.testing.assert_allclose(np.asarray(full)[0], np.broadcast_to(v[0].mean(0), v[0].shape), atol=1e-5)
  np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), atol=1e-5)


def test_automatic_blocking_only_for_long_sequences():
  assert attention.auto_query_block(512, 0) == 0
  assert attention.auto_query_block(attention.AUTO_BLOCKED_MIN_LENGTH, 0) == 0
  assert attention.auto_query_block(attention.AUTO_BLOCKED_MIN_LENGTH + 1, 0) == attention.AUTO_QUERY_BLOCK
  assert attention.auto_query_block(512, 64) == 64
  assert attention.auto_query_block(512, 512) == 0  # one block of everything is the full path


@pytest.mark.parametrize("pos_att_type", ["p2c|c2p", "c2p"])
def test_model_blocked_equals_full(pos_att_type):
  """The whole model, padded batch, saturating buckets: query-blocked output == full-path output."""
  base = ModelConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     position_buckets=8, max_relative_positions=16, pos_att_type=pos_att_type,
                     share_att_key=pos_att_type != "c2p")
  params = init_params(build_model(base), jax.random.PRNGKey(0))
  ids = np.random.default_rng(0).integers(1, 50, (2, 75))
  mask = np.ones_like(ids)
  mask[1, 60:] = 0
  full = build_model(base).apply({"params": params}, ids, mask)
  blocked = build_model(base.replace(query_block_size=8)).apply({"params": params}, ids, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(blocked)[valid], np.asarray(full)[valid], atol=1e-5, rtol=1e-5)


def _xsmall_train_bytes(length):
  """Bytes XLA assigns (arguments + outputs + temporaries) to forward+backward of the xsmall encoder shape
  (12 layers, hidden 384, 6 heads, released buckets) at batch 1: compiled from abstract shapes, nothing
  is allocated."""
  cfg = ModelConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                    intermediate_size=1536, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  model = build_model(cfg, "none")
  params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)

  def loss(p, ids):
    return jnp.mean(jnp.square(model.apply({"params": p}, ids, jnp.ones_like(ids))))

  stats = compile_options.jit(jax.value_and_grad(loss)).lower(params, ids).compile().memory_analysis()
  return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def test_long_sequence_training_fits_and_grows_linearly():
  """Issue target: xsmall forward+backward at L = 8192, batch 1, within 8 GiB; the query-blocked path
  keeps no [L, L] array, so doubling L about doubles the memory (an [L, L] score would quadruple it)."""
  at_4k, at_8k = _xsmall_train_bytes(4096), _xsmall_train_bytes(8192)
  assert at_8k < 8 * 2**30 - 2**30  # a GiB left for the runtime itself (measured RSS: see README)
  assert at_8k < 2.5 * at_4k, (at_4k, at_8k)
