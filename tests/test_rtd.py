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


def _bce_by_hand(logits, labels):
  """-[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))] in float64; log sigmoid(x) = -log(1 + e^-x) and
  log(1 - sigmoid(x)) = -log(1 + e^x), through logaddexp so that |x| = 30 keeps its precision."""
  x, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
  return -(y * -np.logaddexp(0.0, -x) + (1 - y) * -np.logaddexp(0.0, x))


def _rtd_loss_by_hand(logits, replaced, attention_mask):
  real = np.asarray(attention_mask).astype(bool)
  bce = _bce_by_hand(logits, replaced)
  accuracy = np.mean((np.asarray(logits) > 0)[real] == np.asarray(replaced)[real])
  return bce[real].mean(), accuracy


def _masked_lm_loss_by_hand(logits, targets, valid):
  x = np.asarray(logits, np.float64)
  log_probs = x - x.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, np.asarray(targets)[..., None], axis=-1)[..., 0]
  valid = np.asarray(valid).astype(bool)
  return nll[valid].mean(), np.mean((x.argmax(-1) == targets)[valid])


def test_replaced_token_loss_by_hand_with_padding():
  logits = np.array([[0.3, -1.2, 2.5, 0.0, -0.7, 1.1],
                     [-2.0, 0.4, 1.5, 30.0, -30.0, 30.0]], np.float32)
  replaced = np.array([[0, 1, 1, 0, 0, 1],
                       [0, 0, 1, 0, 1, 0]], bool)
  mask = np.array([[1, 1, 1, 1, 1, 1],
                   [1, 1, 1, 0, 0, 0]], np.int32)  # the pads carry confidently wrong logits.
  loss, accuracy = rtd.replaced_token_loss(jnp.asarray(logits), jnp.asarray(replaced), jnp.asarray(mask))
  expected_loss, expected_accuracy = _rtd_loss_by_hand(logits, replaced, mask)
  assert float(loss) == pytest.approx(expected_loss, rel=1e-6)
  assert float(accuracy) == pytest.approx(expected_accuracy, rel=1e-6)
  # Written out: 9 real tokens, 6 of them classified correctly (logit > 0 == replaced).
  assert expected_accuracy == pytest.approx(6 / 9)
  # Including the pads (or averaging over all 12 slots) would give a clearly different value.
  assert abs(_bce_by_hand(logits, replaced).mean() - expected_loss) > 1.0
  assert abs(_bce_by_hand(logits, replaced)[mask > 0].sum() / mask.size - expected_loss) > 0.1
  # sigmoid_bce itself agrees with the formula elementwise.
  np.testing.assert_allclose(np.asarray(rtd.sigmoid_bce(jnp.asarray(logits), jnp.asarray(replaced, jnp.float32))),
                             _bce_by_hand(logits, replaced), rtol=1e-5, atol=1e-6)


def test_replaced_token_loss_label_convention():
  """Label 1 = replaced: a large positive logit on a replaced token (or negative on an original) costs ~0."""
  ones = jnp.ones((1, 2), jnp.int32)
  right, right_acc = rtd.replaced_token_loss(jnp.array([[20.0, -20.0]]), jnp.array([[True, False]]), ones)
  wrong, wrong_acc = rtd.replaced_token_loss(jnp.array([[20.0, -20.0]]), jnp.array([[False, True]]), ones)
  assert float(right) < 1e-8 and float(right_acc) == 1.0
  assert float(wrong) == pytest.approx(20.0, rel=1e-6) and float(wrong_acc) == 0.0


def test_masked_lm_loss_by_hand():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32) * 2
  targets = np.array([[1, 4, 6], [0, 2, 3]], np.int32)
  valid = np.array([[True, True, False], [True, False, False]])
  logits[0, 2, 6] = logits[1, 1, 2] = logits[1, 2, 3] = -50.0  # invalid slots: huge losses if counted.
  logits[0, 0, 1] = 10.0  # one valid slot predicted right.
  loss, accuracy = rtd.masked_lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(valid))
  expected_loss, expected_accuracy = _masked_lm_loss_by_hand(logits, targets, valid)
  assert float(loss) == pytest.approx(expected_loss, rel=1e-6)
  assert float(accuracy) == pytest.approx(expected_accuracy, rel=1e-6)
  assert expected_loss < 10.0 and expected_accuracy >= 1 / 3


def test_corrupt_by_hand_with_padding():
  original = jnp.array([[1, 10, 11, 12, 13, 2], [1, 20, 21, 2, 0, 0]])
  # Row 1's slot list is padded with invalid slots pointing at unmasked tokens and pads (as RTDModels builds it).
  positions = jnp.array([[2, 4, 1], [1, 4, 5]])
  valid = jnp.array([[True, True, False], [True, False, False]])
  sampled = jnp.array([[11, 40, 41], [42, 43, 44]])  # 11 resamples the original; 41, 43, 44 are at invalid slots.
  ids, replaced = rtd.corrupt(original, positions, valid, sampled)
  np.testing.assert_array_equal(np.asarray(ids), [[1, 10, 11, 12, 40, 2], [1, 42, 21, 2, 0, 0]])
  np.testing.assert_array_equal(np.asarray(replaced), [[0, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, 0]])


def test_losses_are_finite_and_hand_checked():
  models = _models("gdes")
  params = models.init(jax.random.PRNGKey(2))
  batch = _batch(3)
  rtd_lambda, num_predictions = 10.0, 8
  total, aux = models.losses(params, batch, jax.random.PRNGKey(0), num_predictions=num_predictions,
                             rtd_lambda=rtd_lambda, deterministic=True)
  assert np.isclose(float(total), float(aux["mlm_loss"]) + rtd_lambda * float(aux["rtd_loss"]), rtol=1e-6)
  assert float(aux["loss"]) == float(total)
  # A fresh generator is near uniform over the vocabulary: MLM loss ~ log(V).
  assert abs(float(aux["mlm_loss"]) - np.log(VOCAB)) < 0.5
  n_slots = min(num_predictions, int(batch["mlm_mask"].sum(1).max()))
  assert float(aux["masked_tokens"]) == float(np.minimum(batch["mlm_mask"].sum(1), num_predictions).sum())
  assert n_slots > 0
  labels, mask = np.asarray(aux["rtd_labels"]), np.asarray(aux["token_mask"]).astype(bool)
  np.testing.assert_array_equal(mask, batch["attention_mask"] > 0)
  assert (~mask).any(), "the batch has padding"
  assert not labels[~batch["mlm_mask"]].any(), "only masked slots can be replaced"
  assert labels.any(), "some masked slot was replaced"
  assert np.isclose(float(aux["replaced_ratio"]), labels[mask].mean())
  # The RTD loss and accuracy recomputed in numpy from the per-token arrays: BCE with label 1 = replaced,
  # averaged over real tokens only.
  logits = np.asarray(aux["rtd_logits"])
  expected_loss, expected_accuracy = _rtd_loss_by_hand(logits, labels, mask)
  assert float(aux["rtd_loss"]) == pytest.approx(expected_loss, rel=1e-6)
  assert float(aux["rtd_accuracy"]) == pytest.approx(expected_accuracy, rel=1e-6)
  # The MLM loss recomputed from the generator's logits at the masked slots: each row's masked positions in
  # order, padded with invalid slots up to P.
  order = np.stack([np.concatenate([np.flatnonzero(row), np.flatnonzero(~row)])[:num_predictions]
                    for row in batch["mlm_mask"]])
  valid = np.take_along_axis(batch["mlm_mask"], order, axis=1)
  gen_logits = models.generator.apply({"params": params["generator"]}, batch["input_ids"], batch["attention_mask"],
                                      deterministic=True, positions=jnp.asarray(order))
  expected_mlm, expected_mlm_acc = _masked_lm_loss_by_hand(
      gen_logits, np.take_along_axis(batch["original_ids"], order, axis=1), valid)
  assert float(aux["mlm_loss"]) == pytest.approx(expected_mlm, rel=1e-6)
  assert float(aux["mlm_accuracy"]) == pytest.approx(expected_mlm_acc, rel=1e-6, abs=1e-9)


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


def test_narrower_generator_shares_the_discriminator_embedding_width():
  """ELECTRA-style generator (half the width): GDES still shares one [V, D_disc] embedding via embed_proj."""
  disc = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, position_buckets=8, max_relative_positions=32, max_position_embeddings=64)
  gen = rtd.generator_config(disc, ml_collections.ConfigDict({"generator_layers": 2, "generator_hidden_size": 16}))
  assert (gen.hidden_size, gen.intermediate_size, gen.num_attention_heads, gen.embed_dim) == (16, 64, 2, 32)
  params = rtd.RTDModels(disc, gen, "gdes").init(jax.random.PRNGKey(0))
  e_g = params["generator"]["deberta"]["embeddings"]["word_embeddings"]["embedding"]
  e_delta = params["discriminator"]["deberta"]["embeddings"]["word_embeddings"]["embedding"]
  assert e_g.shape == e_delta.shape == (VOCAB, 32)
  assert params["generator"]["deberta"]["embeddings"]["embed_proj"]["kernel"].shape == (32, 16)
