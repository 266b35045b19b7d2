"""bfloat16 compute: close to float32 on a converted model, float32 scores, no overflow with large values.

bf16 keeps float32's exponent range (so nothing overflows where fp16 would, max 65504) but only 8 bits of
mantissa: unit roundoff 2^-8 = 3.9e-3. Parameters stay float32, LayerNorm statistics, attention scores, the
mask and the softmax are float32; matmul inputs, activations and the residual stream are bf16. Through a
2-layer model the relative error of the hidden states measures about 5e-3 (about one roundoff); the
tolerance 2e-2 leaves room for 4x that, while an error in a float32-only piece (scores in bf16, a softmax
in bf16) would show up far larger (see test_scores_are_float32).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import debertax
from debertax.attention import disentangled_attention_xla
from debertax.heads import build_model
from debertax.relative_position import distance_to_table_index

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_parity import BASE, _batch, _hf_model  # noqa: E402

REL_TOL = 2e-2


def _rel_err(got, ref):
  return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _converted(tmp_path, head="none", seed=0):
  model = _hf_model("v3", head, seed=seed)
  model.save_pretrained(tmp_path)
  return debertax.from_pretrained(str(tmp_path))


def _apply(ours, dtype, head, ids, mask, params=None):
  cfg = ours.config.replace(dtype=dtype)
  out = build_model(cfg, head).apply({"params": params or ours.params}, ids, mask)
  return np.asarray(out, np.float32)


@pytest.mark.parametrize("head", ["none", "mlm"])
def test_bf16_close_to_float32(head, tmp_path):
  ours = _converted(tmp_path, head)
  ids, mask, _ = _batch(BASE["vocab_size"], 3, 40, pad_from=29)
  f32 = _apply(ours, "float32", head, ids, mask)
  bf16 = _apply(ours, "bfloat16", head, ids, mask)
  valid = mask.astype(bool)
  assert np.isfinite(bf16).all()
  err = _rel_err(bf16[valid], f32[valid])
  print(f"{head}: bf16 relative error {err:.2e}")
  assert err <= REL_TOL


def test_bf16_gradients_close_to_float32(tmp_path):
  ours = _converted(tmp_path, "none", seed=1)
  ids, mask, _ = _batch(BASE["vocab_size"], 2, 33, pad_from=20)

  def grads(dtype):
    model = build_model(ours.config.replace(dtype=dtype))
    loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, ids, mask).astype(jnp.float32)))
    return jax.tree_util.tree_leaves(jax.grad(loss)(ours.params))

  g32 = np.concatenate([np.ravel(g) for g in grads("float32")])
  g16 = np.concatenate([np.ravel(np.asarray(g, np.float32)) for g in grads("bfloat16")])
  assert np.isfinite(g16).all()
  assert all(g.dtype == jnp.float32 for g in grads("bfloat16"))  # float32 master parameters
  err = _rel_err(g16, g32)
  print(f"gradient relative error {err:.2e}")
  assert err <= 5 * REL_TOL  # The backward pass rounds about twice as many bf16 products.


def test_scores_are_float32():
  """Scores of magnitude ~100, where one bf16 step is 0.5: computed in float32, the softmax is right."""
  rng = np.random.default_rng(0)
  batch, length, heads, dim, buckets = 2, 24, 2, 16, 8
  scale = 4.0  # q.k sums 16 products of ~N(0, 16): |scores| up to ~100
  q, k, v = (rng.normal(size=(batch, length, heads, dim)) * s for s in (scale, scale, 1.0))
  dist = distance_to_table_index(length, buckets, 64)
  kr = (rng.normal(size=(2 * buckets, heads, dim)) * scale)[dist]
  qr = (rng.normal(size=(2 * buckets, heads, dim)) * scale)[dist]
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  inputs = [np.asarray(bf(x), np.float64) for x in (q, k, v, kr, qr)]  # what the bf16 path actually sees
  mask = np.ones((batch, length), bool)
  got = np.asarray(disentangled_attention_xla(*[bf(x) for x in inputs], mask, pos_terms=("c2p", "p2c")),
                   np.float64)

  def reference(round_scores):
    q, k, v, kr, qr = inputs
    idx = np.arange(length)[:, None] - np.arange(length)[None, :] + length - 1
    s = (np.einsum("bihd,bjhd->bhij", q, k) + np.einsum("bihd,ijhd->bhij", q, kr[idx])
         + np.einsum("bjhd,ijhd->bhij", k, qr[idx]))
    if round_scores:
      s = np.asarray(bf(s), np.float64)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhij,bjhd->bihd", p / p.sum(-1, keepdims=True), v)

  err = _rel_err(got, reference(False))
  err_if_bf16_scores = _rel_err(reference(True), reference(False))
  print(f"error {err:.2e}; with bf16 scores it would be {err_if_bf16_scores:.2e}")
  assert err <= 4e-3  # one bf16 roundoff: the probabilities and the output are rounded to bf16
  assert err_if_bf16_scores > 10 * err  # bf16 scores would fail the bound above


def test_large_activations_stay_finite(tmp_path):
  """Activations far beyond fp16's range (65504) before each LayerNorm: bf16 stays finite and close."""
  ours = _converted(tmp_path, "none", seed=2)
  params = jax.tree_util.tree_map(lambda x: x, ours.params)
  emb = params["deberta"]["embeddings"]["word_embeddings"]
  emb["embedding"] = emb["embedding"] * 1e7
  for layer in params["deberta"]["encoder"].values():
    if isinstance(layer, dict) and "output" in layer:
      layer["output"]["dense"]["kernel"] = layer["output"]["dense"]["kernel"] * 1e6
  ids, mask, _ = _batch(BASE["vocab_size"], 2, 30)
  cfg = ours.config.replace(dtype="bfloat16")
  bf16, state = build_model(cfg).apply({"params": params}, ids, mask, capture_intermediates=True)
  largest = max(float(jnp.max(jnp.abs(x.astype(jnp.float32))))
                for x in jax.tree_util.tree_leaves(state["intermediates"]) if hasattr(x, "dtype"))
  assert largest > 1e5  # the test does reach activations fp16 (max 65504) could not hold
  f32 = _apply(ours, "float32", "none", ids, mask, params)
  bf16 = np.asarray(bf16, np.float32)
  assert np.isfinite(f32).all() and np.isfinite(bf16).all()
  err = _rel_err(bf16, f32)
  print(f"large activations (max {largest:.1e}): bf16 relative error {err:.2e}")
  assert err <= REL_TOL
