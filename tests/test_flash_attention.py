"""The Pallas flash kernels (interpret mode on the CPU) against the XLA path and a NumPy definition."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from debertax import flash_attention
from debertax.attention import disentangled_attention_xla
from debertax.config import ModelConfig
from debertax.heads import build_model, init_params
from debertax.relative_position import distance_to_table_index, log_bucket

TOL = dict(rtol=1e-5, atol=1e-5)
BOTH, C2P, P2C, NONE = ("c2p", "p2c"), ("c2p",), ("p2c",), ()


def _inputs(batch, length, heads, dim, table_half, seed):
  """Random q/k/v, [2k, H, d] tables and a random padding mask whose last sequence is fully padded."""
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=(batch, length, heads, dim)).astype(np.float32) for _ in range(3))
  kr_table, qr_table = (rng.normal(size=(2 * table_half, heads, dim)).astype(np.float32) for _ in range(2))
  mask = rng.random((batch, length)) < 0.7
  mask[0, 0] = True
  mask[-1] = False
  return q, k, v, kr_table, qr_table, mask


def _xla(q, k, v, kr_table, qr_table, mask, terms, buckets, span):
  index = jnp.asarray(distance_to_table_index(q.shape[1], buckets, span))
  return disentangled_attention_xla(q, k, v, kr_table[index], qr_table[index], mask, pos_terms=terms)


def _flash(q, k, v, kr_table, qr_table, mask, terms, buckets, span, **options):
  return flash_attention.disentangled_flash_attention(
      q, k, v, mask, kr_table=kr_table, qr_table=qr_table, pos_terms=terms, position_buckets=buckets,
      max_relative_span=span, **options)


def _values_and_grads(attention, inputs, mask, weights):
  """attention(q, k, v, kr_table, qr_table, mask) -> (output, the vjp of sum(output * weights)), one jit."""
  @jax.jit
  def run(*xs):
    out, vjp = jax.vjp(lambda *a: attention(*a, mask), *xs)
    return out, vjp(weights)
  return run(*inputs)


def _check_against_xla(batch, length, heads, dim, terms, buckets, span, seed, **options):
  q, k, v, kr_table, qr_table, mask = _inputs(batch, length, heads, dim, buckets if buckets > 0 else span, seed)
  weights = np.random.default_rng(seed + 1).normal(size=q.shape).astype(np.float32)
  inputs = (q, k, v, kr_table, qr_table)
  expected, expected_grads = _values_and_grads(
      lambda *a: _xla(*a, terms, buckets, span), inputs, mask, weights)
  got, got_grads = _values_and_grads(
      lambda *a: _flash(*a, terms, buckets, span, **options), inputs, mask, weights)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), **TOL)
  assert np.isfinite(np.asarray(got)).all()
  for name, g, e in zip(("dq", "dk", "dv", "dkr_table", "dqr_table"), got_grads, expected_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), err_msg=name, **TOL)


# Shapes: L not a multiple of the blocks, block_q != block_k, several heads, batch > 1; every term subset;
# log buckets and the unbucketed (position_buckets <= 0) table. In the first and third case the sequence
# is longer than the saturation distance plus two backward blocks, so the backward's far key tiles (the
# per-row / per-key constants instead of Toeplitz products) are exercised too, and the fused backward's
# saturated per-row / per-key sums. Both backward passes of the gather kernel: fused (its default) and blocked.
@pytest.mark.parametrize("backward", ["fused", "blocked"])
@pytest.mark.parametrize("batch,length,heads,dim,terms,buckets,span,block_q,block_k,backward_block", [
    (2, 43, 3, 8, BOTH, 4, 8, 8, 16, 8),
    (3, 21, 2, 8, C2P, 8, 16, 8, 16, 16),
    (2, 19, 2, 4, P2C, 0, 4, 16, 8, 4),
    (2, 11, 2, 8, NONE, 8, 16, 8, 8, 8),
])
def test_generic_interpreter_matches_xla(batch, length, heads, dim, terms, buckets, span, block_q, block_k,
                                         backward_block, backward):
  _check_against_xla(batch, length, heads, dim, terms, buckets, span, seed=length, backend="interpret",
                     block_q=block_q, block_k=block_k, backward_block=backward_block, backward=backward)


def test_unknown_backward_is_an_error():
  q, k, v, kr_table, qr_table, mask = _inputs(1, 8, 1, 8, 4, seed=0)
  with pytest.raises(ValueError, match="fused or blocked"):
    _flash(q, k, v, kr_table, qr_table, mask, BOTH, 4, 16, backend="interpret", backward="xla")


@pytest.mark.parametrize("backward", ["fused", "blocked"])
def test_tpu_interpret_mode_matches_xla(backward):
  _check_against_xla(2, 21, 2, 8, BOTH, 8, 16, seed=3, backend="tpu_interpret", block_q=8, block_k=16,
                     backward_block=8, backward=backward)


@pytest.mark.parametrize("terms", [C2P, P2C], ids="+".join)
def test_tpu_interpret_fused_backward_single_terms_and_unbucketed_table(terms):
  """Key blocks smaller than query blocks, L not a block multiple, the linear (position_buckets <= 0) table."""
  _check_against_xla(2, 40, 2, 8, terms, 0, 8, seed=5, backend="tpu_interpret", block_q=16, block_k=8,
                     backward="fused")


def _numpy_definition(q, k, v, kr_table, qr_table, mask, buckets, span):
  """Straight from the definition, float64, with an explicit [L, L] bucket index."""
  q, k, v, kr_table, qr_table = (np.asarray(x, np.float64) for x in (q, k, v, kr_table, qr_table))
  length = q.shape[1]
  r = np.arange(length)[:, None] - np.arange(length)[None, :]
  idx = np.clip(log_bucket(r, buckets, span) + buckets, 0, 2 * buckets - 1)
  s = np.einsum("bihd,bjhd->bhij", q, k)
  s += np.einsum("bihd,ijhd->bhij", q, kr_table[idx])
  s += np.einsum("bjhd,ijhd->bhij", k, qr_table[idx])
  s = np.where(mask[:, None, None, :], s, np.finfo(np.float32).min)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bhij,bjhd->bihd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("backend", ["interpret", "tpu_interpret"])
def test_matches_numpy_definition_beyond_the_bucket_span(backend):
  # L = 40 > max_relative_span = 24: the far distances saturate at the outermost buckets.
  q, k, v, kr_table, qr_table, mask = _inputs(2, 40, 2, 8, 8, seed=7)
  got = _flash(q, k, v, kr_table, qr_table, mask, BOTH, 8, 24, backend=backend, block_q=16, block_k=16)
  np.testing.assert_allclose(np.asarray(got), _numpy_definition(q, k, v, kr_table, qr_table, mask, 8, 24),
                             **TOL)


@pytest.mark.parametrize("buckets,span", [(256, 512), (64, 256), (8, 64), (6, 20), (0, 16)])
def test_in_kernel_bucket_index_equals_host_index(buckets, span):
  length = 3000
  distance = np.arange(-(length - 1), length, dtype=np.int32)
  got = jax.jit(flash_attention.relative_table_index, static_argnums=(1, 2))(distance, buckets, span)
  np.testing.assert_array_equal(np.asarray(got), distance_to_table_index(length, buckets, span))


def test_log_bucket_quotients_are_far_from_integers():
  # Why a device log that is an ulp off cannot change a bucket: apart from |r| = max_pos - 1 (pinned in
  # the kernel), every ceil() argument is at least 1e-4 from an integer, ~10 float32 ulps at 255.
  for buckets, span in [(256, 512), (128, 512), (64, 256)]:
    mid = buckets // 2
    r = np.arange(mid + 1, 8 * span, dtype=np.float64)
    r = r[r != span - 1]
    quotient = np.log(r / mid) / np.log((span - 1) / mid) * (mid - 1)
    assert np.min(np.abs(quotient - np.round(quotient))) > 5e-5


def test_auto_backend_on_cpu_is_an_error():
  q, k, v, kr_table, qr_table, mask = _inputs(1, 8, 1, 8, 4, seed=0)
  with pytest.raises(ValueError, match="attention_impl='xla'"):
    _flash(q, k, v, kr_table, qr_table, mask, BOTH, 4, 16, backend="auto")


def test_dropout_is_an_error_not_ignored():
  q, k, v, kr_table, qr_table, mask = _inputs(1, 8, 1, 8, 4, seed=0)
  with pytest.raises(ValueError, match="attention_probs_dropout_prob=0"):
    _flash(q, k, v, kr_table, qr_table, mask, BOTH, 4, 16, backend="interpret", dropout_rate=0.1,
           dropout_rng=jax.random.key(0))


@pytest.mark.parametrize("backend,block", [("gpu", 48), ("gpu", 8), ("tpu", 64), ("interpret", 12)])
def test_unsupported_blocks_are_errors(backend, block):
  q, k, v, kr_table, qr_table, mask = _inputs(1, 8, 1, 8, 4, seed=0)
  with pytest.raises(ValueError, match="block"):
    _flash(q, k, v, kr_table, qr_table, mask, BOTH, 4, 16, backend=backend, block_q=block)


def _flash_model_config(**fields):
  """A ModelConfig running the flash path in the generic interpreter (a subclass until the field exists)."""
  if "flash_backend" in {f.name for f in dataclasses.fields(ModelConfig)}:
    return ModelConfig(attention_impl="flash", flash_backend="interpret", **fields)

  @dataclasses.dataclass(frozen=True)
  class InterpretFlashConfig(ModelConfig):
    flash_backend: str = "interpret"

  return InterpretFlashConfig(attention_impl="flash", **fields)


def _tiny_models_and_inputs(batch, heads, lengths):
  """(xla model, flash model in the generic interpreter, params, ids [B, 19], attention mask, output weights)."""
  fields = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=heads, intermediate_size=32,
                position_buckets=8, max_position_embeddings=32, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
  xla_model = build_model(ModelConfig(**fields))
  flash_model = build_model(_flash_model_config(**fields))
  ids = jnp.asarray(np.random.default_rng(0).integers(4, 50, size=(batch, 19)), jnp.int32)
  attention_mask = jnp.asarray(np.arange(19)[None, :] < np.array(lengths)[:, None], jnp.int32)
  params = init_params(xla_model, jax.random.key(0), length=19)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(batch, 19, 16)), jnp.float32)
  return xla_model, flash_model, params, ids, attention_mask, weights


def _forward_backward(model, params, ids, attention_mask, weights):
  out, vjp = jax.vjp(lambda p: model.apply({"params": p}, ids, attention_mask), params)
  return out, vjp(weights)[0]


def _assert_model_outputs_close(got, got_grads, expected, expected_grads):
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), **TOL)
  for (path, e), g in zip(jax.tree_util.tree_leaves_with_path(expected_grads), jax.tree_util.tree_leaves(got_grads)):
    # Parameter gradients reach ~1e2 here and some entries are small differences of such sums, so the
    # absolute tolerance is 1e-5 of each array's largest entry (float32 rounding of the summands).
    e = np.asarray(e)
    np.testing.assert_allclose(np.asarray(g), e, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(e).max()),
                               err_msg=jax.tree_util.keystr(path))


def test_tiny_model_flash_equals_xla_values_and_gradients():
  xla_model, flash_model, params, *inputs = _tiny_models_and_inputs(2, 2, [19, 11])
  expected = jax.jit(functools.partial(_forward_backward, xla_model))(params, *inputs)
  got = jax.jit(functools.partial(_forward_backward, flash_model))(params, *inputs)
  _assert_model_outputs_close(*got, *expected)


def test_flash_model_on_a_mesh_runs_per_device_shards_and_equals_xla():
  """On 8 devices (data 2 x fsdp 2 x tensor 2) the kernel runs under shard_map, on each device's rows and
  heads; values and parameter gradients (the relative tables' summed over the batch shards) match the XLA
  path computed without a mesh."""
  from debertax import sharding
  xla_model, flash_model, params, *inputs = _tiny_models_and_inputs(4, 4, [19, 11, 3, 17])
  expected = jax.jit(functools.partial(_forward_backward, xla_model))(params, *inputs)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])
  with sharding.MeshRules(mesh):
    lowered = jax.jit(functools.partial(_forward_backward, flash_model)).lower(params, *inputs)
    got = lowered.compile()(params, *inputs)
  assert "shard_map" in lowered.as_text() or "manual" in lowered.as_text()
  _assert_model_outputs_close(*got, *expected)


def test_flash_heads_that_do_not_split_over_the_mesh_are_an_error():
  from debertax import sharding
  fields = dict(vocab_size=50, hidden_size=12, num_hidden_layers=1, num_attention_heads=3, intermediate_size=24,
                position_buckets=8, max_position_embeddings=32, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
  model = build_model(_flash_model_config(**fields))
  ids = jnp.ones((4, 8), jnp.int32)
  params = init_params(build_model(ModelConfig(**fields)), jax.random.key(0), length=8)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devices=jax.devices()[:4])
  with sharding.MeshRules(mesh), pytest.raises(ValueError, match=r"heads dimension \(3\).*tensor"):
    jax.jit(lambda p: model.apply({"params": p}, ids, jnp.ones_like(ids))).lower(params)
