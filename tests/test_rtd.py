"""RTD and embedding sharing: the defining gradient properties of GDES / ES / NES on real gradients."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from debertax import eval_metrics, rtd
from debertax.config import ModelConfig

VOCAB = 64


def _models(sharing):
  disc = ModelConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, position_buckets=8, max_position_embeddings=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  gen = rtd.generator_config(disc, ml_collections.ConfigDict({"generator_layers": 2}))
  return rtd.RTDModels(disc, gen, sharing)


def _batch(seed=0, batch=4, length=16):
  rng = np.random.default_rng(seed)
  original = rng.integers(4, VOCAB - 1, (batch, length)).astype(np.int32)
  original[:, 0], original[:, -1] = 1, 2
  mlm = rng.random((batch, length)) < 0.3
  mlm[:, 0] = mlm[:, -1] = False
  mlm[:, 3] = True
  ids = np.where(mlm, VOCAB - 1, original).astype(np.int32)
  mask = np.ones_like(ids)
  mask[-1, 12:] = 0
  return {"input_ids": ids, "original_ids": original, "attention_mask": mask, "mlm_mask": mlm & (mask > 0)}


def _grad_of(models, params, key):
  def loss(p):
    _, aux = models.losses(p, _batch(), jax.random.PRNGKey(0), num_predictions=8, rtd_lambda=50.0)
    return aux[key]
  return jax.grad(loss)(params)


def _emb(tree, part):
  return np.asarray(tree[part]["deberta"]["embeddings"]["word_embeddings"]["embedding"])


def test_gdes_gradients():
  models = _models("gdes")
  params = models.init(jax.random.PRNGKey(0))
  assert np.all(_emb(params, "discriminator") == 0), "E_delta starts at zero"
  g_rtd = _grad_of(models, params, "rtd_loss")
  g_mlm = _grad_of(models, params, "mlm_loss")
  assert np.all(_emb(g_rtd, "generator") == 0.0), "RTD loss must not reach E_G under GDES"
  assert np.abs(_emb(g_rtd, "discriminator")).max() > 0, "RTD loss must update E_delta"
  assert np.abs(_emb(g_mlm, "generator")).max() > 0, "MLM loss must update E_G"
  assert np.all(_emb(g_mlm, "discriminator") == 0.0), "MLM loss must not reach E_delta"
  # The discriminator sees E_G + E_delta: with E_delta = 0 its embedding is exactly E_G.
  disc = models.discriminator_params(params, for_export=True)
  np.testing.assert_array_equal(np.asarray(disc["deberta"]["embeddings"]["word_embeddings"]["embedding"]),
                                _emb(params, "generator"))


def test_es_gradients():
  models = _models("es")
  params = models.init(jax.random.PRNGKey(0))
  assert "word_embeddings" not in params["discriminator"]["deberta"]["embeddings"]
  g_rtd = _grad_of(models, params, "rtd_loss")
  g_mlm = _grad_of(models, params, "mlm_loss")
  assert np.abs(_emb(g_rtd, "generator")).max() > 0, "ES: the RTD loss updates E_G"
  assert np.abs(_emb(g_mlm, "generator")).max() > 0, "ES: the MLM loss updates E_G"
  # Both reach it: the total gradient is their (lambda-weighted) sum, not either one alone.
  g_total = _grad_of(models, params, "loss")
  np.testing.assert_allclose(_emb(g_total, "generator"), _emb(g_mlm, "generator") + 50.0 * _emb(g_rtd, "generator"),
                             rtol=1e-4, atol=1e-6)


def test_nes_gradients():
  models = _models("nes")
  params = models.init(jax.random.PRNGKey(0))
  assert not np.allclose(_emb(params, "generator"), _emb(params, "discriminator"))
  g_rtd = _grad_of(models, params, "rtd_loss")
  g_mlm = _grad_of(models, params, "mlm_loss")
  assert np.all(_emb(g_rtd, "generator") == 0.0)
  assert np.abs(_emb(g_rtd, "discriminator")).max() > 0
  assert np.all(_emb(g_mlm, "discriminator") == 0.0)
  assert np.abs(_emb(g_mlm, "generator")).max() > 0


def test_generator_body_gets_no_rtd_gradient():
  """The sample is drawn under stop_gradient: the RTD loss reaches the generator only via embeddings."""
  for sharing in rtd.SHARING_MODES:
    models = _models(sharing)
    g_rtd = _grad_of(models, models.init(jax.random.PRNGKey(1)), "rtd_loss")
    flat = traverse_util.flatten_dict(g_rtd["generator"])
    for path, value in flat.items():
      if path[:3] != ("deberta", "embeddings", "word_embeddings"):
        assert np.all(np.asarray(value) == 0.0), (sharing, path)


def test_corrupt_labels_sample_equal_to_original_as_original():
  original = jnp.array([[1, 10, 11, 12, 2]])
  positions = jnp.array([[1, 2, 3]])
  valid = jnp.array([[True, True, False]])
  sampled = jnp.array([[10, 20, 30]])  # slot 1 resamples the original; slot 3 is not a valid slot.
  ids, replaced = rtd.corrupt(original, positions, valid, sampled)
  np.testing.assert_array_equal(np.asarray(ids), [[1, 10, 20, 12, 2]])
  np.testing.assert_array_equal(np.asarray(replaced), [[False, False, True, False, False]])


def test_losses_are_finite_and_hand_checked():
  models = _models("gdes")
  params = models.init(jax.random.PRNGKey(2))
  batch = _batch(3)
  total, aux = models.losses(params, batch, jax.random.PRNGKey(0), num_predictions=8, rtd_lambda=10.0,
                             deterministic=True)
  assert np.isclose(float(total), float(aux["mlm_loss"]) + 10.0 * float(aux["rtd_loss"]), rtol=1e-6)
  # A fresh generator is near uniform over the vocabulary: MLM loss ~ log(V).
  assert abs(float(aux["mlm_loss"]) - np.log(VOCAB)) < 0.5
  n_slots = min(8, int(batch["mlm_mask"].sum(1).max()))
  assert float(aux["masked_tokens"]) == float(np.minimum(batch["mlm_mask"].sum(1), 8).sum()) and n_slots > 0
  labels, mask = np.asarray(aux["rtd_labels"]), np.asarray(aux["token_mask"]).astype(bool)
  assert not labels[~batch["mlm_mask"]].any(), "only masked slots can be replaced"
  assert np.isclose(float(aux["replaced_ratio"]), labels[mask].mean())


def test_binary_auc_against_sklearn():
  sklearn_metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(0)
  labels = rng.random(500) < 0.2
  scores = np.round(rng.normal(size=500) + labels, 1)  # Rounded: many ties.
  assert np.isclose(eval_metrics.binary_auc(scores, labels), sklearn_metrics.roc_auc_score(labels, scores))
  assert np.isnan(eval_metrics.binary_auc(scores, np.zeros(500, bool)))


def test_average_pairwise_cosine():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 8))
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  sims = unit @ unit.T
  expected = (sims.sum() - np.trace(sims)) / (50 * 49)
  assert np.isclose(rtd.average_pairwise_cosine(x), expected)
  same = np.tile(rng.normal(size=(1, 8)), (10, 1))
  assert np.isclose(rtd.average_pairwise_cosine(same), 1.0)
