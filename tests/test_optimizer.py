"""The pretraining optimizer against hand-computed values: Adam with and without bias correction, the weight
decay mask, global-norm clipping, the warmup/linear-decay schedule, and the generator's own learning rate."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import tiny
from debertax import heads, sharding, train
from debertax import optimizer as optimizer_lib
from debertax.config import ModelConfig

B1, B2 = 0.9, 0.999
# Three steps of a fixed gradient sequence; the last entry is of the order of eps, so where eps enters matters.
GRADS = [np.array([0.5, -2.0, 3.0, 1e-5]), np.array([-1.0, 0.25, 3.0, -2e-5]), np.array([2.0, 0.5, -6.0, 1e-5])]


def _train_config(**changes):
  base = dict(lr=0.1, warmup_steps=0, steps=100, grad_clip=0.0, adam_b1=B1, adam_b2=B2, adam_eps=1e-5,
              bias_correction=False, weight_decay=0.0)
  return ml_collections.ConfigDict({**base, **changes})


def _adam_by_hand(grads, eps, bias_correction):
  """The Adam direction after each step, in float64 (m, v start at zero; t counts from 1)."""
  m = v = np.zeros_like(grads[0])
  out = []
  for t, g in enumerate(grads, start=1):
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    if bias_correction:
      m_hat, v_hat = m / (1 - B1 ** t), v / (1 - B2 ** t)
      out.append(m_hat / (np.sqrt(v_hat) + eps))
    else:
      out.append(m / (np.sqrt(v) + eps))
  return out


def _adam_moments(opt_state):
  """The (mu, nu) of the AdamState inside a chained optimizer state."""
  found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optimizer_lib.AdamState))
           if isinstance(x, optimizer_lib.AdamState)]
  assert len(found) == 1
  return found[0]


@pytest.mark.parametrize("bias_correction", [True, False])
def test_scale_by_adam_three_steps_by_hand(bias_correction):
  eps = 1e-5
  tx = optimizer_lib.scale_by_adam(B1, B2, eps, bias_correction)
  params = {"w": jnp.zeros(4, jnp.float32)}
  state = tx.init(params)
  expected = _adam_by_hand(GRADS, eps, bias_correction)
  for step, g in enumerate(GRADS):
    out, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    np.testing.assert_allclose(np.asarray(out["w"]), expected[step], rtol=2e-5, atol=1e-7,
                               err_msg=f"step {step + 1}, bias_correction={bias_correction}")
  # The two variants really differ early on: at step 1 the corrected direction is ~sign(g) and the uncorrected
  # one (1 - b1) / sqrt(1 - b2) ~ 3.16 times that, so a swapped flag cannot pass either case.
  other = _adam_by_hand(GRADS, eps, not bias_correction)
  assert not np.allclose(expected[0][:3], other[0][:3], rtol=0.1)
  if not bias_correction:
    np.testing.assert_allclose(expected[0][:3], np.sqrt(1e3) * np.sign(GRADS[0][:3]) * 0.1, rtol=1e-3)
  else:
    np.testing.assert_allclose(expected[0][:3], np.sign(GRADS[0][:3]), rtol=1e-3)


def _tiny_model_config():
  return ModelConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=16, position_buckets=4, max_position_embeddings=16)


def _rtd_params():
  return heads.init_params(heads.build_model(_tiny_model_config(), "rtd"), jax.random.PRNGKey(0))


def test_decay_mask_on_a_real_parameter_tree():
  params = _rtd_params()
  flat_params = traverse_util.flatten_dict(params)
  mask = traverse_util.flatten_dict(optimizer_lib.decay_mask(params))
  assert set(mask) == set(flat_params)
  for path, decayed in mask.items():
    in_layer_norm = any("LayerNorm" in part for part in path)
    expected = path[-1] in ("kernel", "embedding") and not in_layer_norm
    assert decayed is expected, (path, decayed)
    if path[-1] == "bias" or in_layer_norm:
      assert decayed is False, path
  kinds = {path[-1] for path in mask}
  assert {"kernel", "embedding", "bias", "scale"} <= kinds, kinds
  n_ln = sum(any("LayerNorm" in part for part in path) for path in mask)
  assert n_ln >= 8  # embeddings, encoder (relative table), 2 per layer, the RTD head: every one is excluded.


def test_make_optimizer_decays_kernels_but_not_layer_norm_or_biases():
  """One full update: LayerNorm scale and biases get the pure Adam step, kernels also lr * wd * param."""
  lr, wd, eps = 0.1, 0.5, 1e-5
  # Shifted by 0.5 so biases (initialised at zero) would also show a decay term.
  params = jax.tree_util.tree_map(lambda p: p + 0.5, _rtd_params())
  rng = np.random.default_rng(0)
  flat = traverse_util.flatten_dict(params)
  grads = traverse_util.unflatten_dict({k: jnp.asarray(rng.normal(size=v.shape), jnp.float32)
                                        for k, v in flat.items()})
  tx, _ = optimizer_lib.make_optimizer(_train_config(lr=lr, adam_eps=eps, weight_decay=wd))
  updates, _ = tx.update(grads, tx.init(params), params)
  flat_updates, flat_grads = traverse_util.flatten_dict(updates), traverse_util.flatten_dict(grads)
  checked = set()
  for path, update in flat_updates.items():
    adam = _adam_by_hand([np.asarray(flat_grads[path], np.float64)], eps, False)[0]
    param = np.asarray(flat[path], np.float64)
    decayed = path[-1] in ("kernel", "embedding") and not any("LayerNorm" in p for p in path)
    expected = -lr * (adam + wd * param) if decayed else -lr * adam
    np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-5, atol=1e-7, err_msg=str(path))
    checked.add(path[-1] if path[-1] != "scale" else "LayerNorm scale")
  assert {"kernel", "embedding", "bias", "LayerNorm scale"} <= checked
  # The decay term would be visible on every excluded parameter (LayerNorm scale 1.5, biases 0.5).
  assert min(np.abs(lr * wd * np.asarray(v)).min() for k, v in flat.items() if k[-1] in ("bias", "scale")) > 1e-2


def _global_norm_10():
  return {"a": jnp.asarray([6.0, 0.0], jnp.float32), "b": jnp.asarray([[0.0], [-8.0]], jnp.float32)}


@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_global_norm_clipping(scale):
  """grad_clip = 1: a gradient of global norm 10 enters Adam divided by 10; one of norm 0.5 unchanged."""
  grads = jax.tree_util.tree_map(lambda g: g * scale, _global_norm_10())  # norm 10 or 0.5
  norm = 10.0 * scale
  params = jax.tree_util.tree_map(jnp.zeros_like, grads)
  eps, lr = 1.0, 1.0  # A large eps: the first update m / (sqrt(v) + eps) is not scale-invariant.
  tx, _ = optimizer_lib.make_optimizer(_train_config(lr=lr, grad_clip=1.0, adam_eps=eps))
  updates, state = tx.update(grads, tx.init(params), params)
  factor = 1.0 / norm if norm > 1.0 else 1.0
  mu, nu = _adam_moments(state)
  for key in ("a", "b"):
    g = np.asarray(grads[key], np.float64) * factor
    np.testing.assert_allclose(np.asarray(mu[key]), (1 - B1) * g, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(nu[key]), (1 - B2) * g * g, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(np.asarray(updates[key]), -lr * _adam_by_hand([g], eps, False)[0], rtol=1e-5,
                               atol=1e-9)
  # Sanity: the clipped and unclipped first updates differ, so the check above can tell them apart.
  raw = np.asarray(grads["a"], np.float64)
  assert factor == 1.0 or not np.allclose(_adam_by_hand([raw], eps, False)[0],
                                          _adam_by_hand([raw * factor], eps, False)[0], rtol=1e-2)


def test_no_clipping_when_grad_clip_is_zero():
  grads = _global_norm_10()
  params = jax.tree_util.tree_map(jnp.zeros_like, grads)
  tx, _ = optimizer_lib.make_optimizer(_train_config(grad_clip=0.0))
  _, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(_adam_moments(state).mu["b"]), 0.1 * np.asarray(grads["b"]), rtol=1e-6)


def test_warmup_linear_decay_by_hand():
  """The docstring's rule: peak * s / w for s < w, then peak * (T - s) / (T - w), clamped at 0."""
  peak, w, total = 2e-3, 10, 110
  schedule = optimizer_lib.warmup_linear_decay(peak, w, total)
  expected = {0: 0.0, 1: peak / 10, w // 2: peak / 2, w: peak, 35: peak * 75 / 100, (w + total) // 2: peak / 2,
              total: 0.0, total + 5: 0.0}
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, rel=1e-6, abs=1e-12), step
  # Under jit with a traced int32 step (as in the train step).
  got = jax.jit(jax.vmap(schedule))(jnp.asarray(list(expected), jnp.int32))
  np.testing.assert_allclose(np.asarray(got), list(expected.values()), rtol=1e-6, atol=1e-12)
  # Without warmup the first step already has the peak rate.
  assert float(optimizer_lib.warmup_linear_decay(peak, 0, total)(0)) == pytest.approx(peak, rel=1e-6)


def test_make_optimizer_steps_follow_the_schedule():
  """The chained update uses the schedule at the optimizer's own step count: lr 0 at step 0 of a warmup,
  then peak / 2, then peak."""
  peak, eps = 0.5, 1e-5
  tx, schedule = optimizer_lib.make_optimizer(_train_config(lr=peak, warmup_steps=2, steps=10, adam_eps=eps))
  params = {"w": jnp.zeros(4, jnp.float32)}
  state = tx.init(params)
  adam = _adam_by_hand(GRADS, eps, False)
  for step, g in enumerate(GRADS):
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    rate = [0.0, peak / 2, peak][step]
    assert float(schedule(step)) == pytest.approx(rate)
    np.testing.assert_allclose(np.asarray(updates["w"]), -rate * adam[step], rtol=2e-5, atol=1e-7, err_msg=str(step))


@pytest.mark.parametrize("override, peak", [(None, 1e-3), (-1.0, 1e-3), (2e-4, 2e-4), (0.0, 0.0)])
def test_make_optimizer_lr_override(override, peak):
  tx, schedule = optimizer_lib.make_optimizer(_train_config(lr=1e-3, warmup_steps=4, steps=20), lr=override)
  assert float(schedule(4)) == pytest.approx(peak, rel=1e-6, abs=0)
  assert float(schedule(2)) == pytest.approx(peak / 2, rel=1e-6, abs=0)
  params = {"w": jnp.zeros(4, jnp.float32)}
  state = tx.init(params)
  for step in range(5):  # The 5th update runs at the peak rate.
    updates, state = tx.update({"w": jnp.asarray(GRADS[0], jnp.float32)}, state, params)
  # Five equal gradients, no bias correction: m = (1 - b1^5) g, v = (1 - b2^5) g^2.
  g = GRADS[0]
  direction = (1 - B1 ** 5) * g / (np.sqrt(1 - B2 ** 5) * np.abs(g) + 1e-5)
  np.testing.assert_allclose(np.asarray(updates["w"]), -peak * direction, rtol=2e-5, atol=1e-12)


# The Trainer: a decoupled generator optimizer with its own learning rate ----------------------------------

def _tiny_trainer_config(generator_lr):
  config = tiny.get_config()
  config.model.update(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                      vocab_size=64, position_buckets=8, max_relative_positions=16, max_position_embeddings=16)
  config.rtd.generator_layers = 2
  config.rtd.decoupled = True
  config.data.seq_len = 8
  config.data.max_predictions = 2
  config.train.batch_size = 2
  config.train.lr = 1e-2
  config.train.warmup_steps = 0
  config.train.steps = 10
  config.train.generator_lr = generator_lr
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  return config


def _single_device_mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def test_trainer_decoupled_generator_learning_rate():
  trainer = train.Trainer(_tiny_trainer_config(generator_lr=2e-3), mesh=_single_device_mesh())
  assert trainer.decoupled and set(trainer.txs) == {"generator", "discriminator"}
  for step in (0, 5, 10):
    fraction = (10 - step) / 10
    assert float(trainer.schedule(step)) == pytest.approx(1e-2 * fraction, rel=1e-6)
    assert float(trainer.gen_schedule(step)) == pytest.approx(2e-3 * fraction, rel=1e-6)
  same = train.Trainer(_tiny_trainer_config(generator_lr=-1.0), mesh=_single_device_mesh())
  assert float(same.gen_schedule(3)) == pytest.approx(float(same.schedule(3)), rel=1e-7)


def test_trainer_zero_generator_lr_freezes_only_the_generator():
  trainer = train.Trainer(_tiny_trainer_config(generator_lr=0.0), mesh=_single_device_mesh())
  state = trainer.init(0)
  before = jax.device_get(state.params)
  ids = np.array([[1, 5, 63, 7, 9, 63, 11, 2], [1, 12, 13, 63, 15, 2, 0, 0]], np.int32)
  original = np.array([[1, 5, 6, 7, 9, 10, 11, 2], [1, 12, 13, 14, 15, 2, 0, 0]], np.int32)
  batch = {"input_ids": ids, "original_ids": original, "attention_mask": (original > 0).astype(np.int32),
           "mlm_mask": ids == 63}
  state, metrics = trainer.step(state, batch)
  after = jax.device_get(state.params)
  assert float(metrics["learning_rate"]) == pytest.approx(1e-2)
  gen_before = traverse_util.flatten_dict(before["generator"])
  gen_after = traverse_util.flatten_dict(after["generator"])
  for path in gen_before:
    np.testing.assert_array_equal(gen_after[path], gen_before[path], err_msg=f"generator {path} moved")
  disc_before = traverse_util.flatten_dict(before["discriminator"])
  disc_after = traverse_util.flatten_dict(after["discriminator"])
  moved = [path for path in disc_before if not np.array_equal(disc_after[path], disc_before[path])]
  # Every discriminator parameter with a gradient moves; at least the RTD head and E_delta do.
  assert ("mask_predictions", "classifier", "kernel") in moved
  assert ("deberta", "embeddings", "word_embeddings", "embedding") in moved
  assert len(moved) > len(disc_before) // 2, (len(moved), len(disc_before))
