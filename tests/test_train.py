"""The sharded train step: meshes over 8 simulated CPU devices give the single-device losses."""

import jax
import ml_collections
import numpy as np
import pytest

from configs import common
from debertax import sharding, train


def _config(dropout=0.1, mesh=(1, 1, 1), decoupled=True):
  model = common.model_config("xsmall", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                              intermediate_size=64, vocab_size=128, position_buckets=8,
                              max_position_embeddings=32, hidden_dropout_prob=dropout,
                              attention_probs_dropout_prob=dropout)
  config = common.pretrain_config(model, lr=1e-3, batch_size=16, steps=100, warmup_steps=2)
  config.rtd.generator_layers = 2
  config.rtd.decoupled = decoupled
  config.data.seq_len = 16
  config.data.max_predictions = 4
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  return config


def _batches(n, batch=16, length=16, vocab=128, seed=0, mlm_rate=0.2, pad_from=11):
  """n RTD batches; every third row is padded from `pad_from` on (so microbatch slices get different
  token counts)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    original = rng.integers(4, vocab - 1, (batch, length)).astype(np.int32)
    original[:, 0], original[:, -1] = 1, 2
    mlm = rng.random((batch, length)) < mlm_rate
    mlm[:, 0] = mlm[:, -1] = False
    mask = np.ones_like(original)
    mask[::3, pad_from:] = 0
    mlm &= mask > 0
    out.append({"input_ids": np.where(mlm, vocab - 1, original).astype(np.int32), "original_ids": original,
                "attention_mask": mask, "mlm_mask": mlm})
  return out


def _losses(config, mesh, steps=3):
  trainer = train.Trainer(config, mesh=mesh)
  state = trainer.init(0)
  losses = []
  for batch in _batches(steps):
    state, metrics = trainer.step(state, batch)
    losses.append([float(metrics[k]) for k in ("loss", "mlm_loss", "rtd_loss")])
  return np.array(losses), trainer, state


@pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_meshes_match_single_device():
  single = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  config = _config()
  reference, ref_trainer, ref_state = _losses(config, single)
  # The reference is a real training run, so that matching it below means something:
  # (a) each logged loss is the total of its parts, and step 0's is the loss of the initial parameters under
  # the step's dropout rng, recomputed outside the train step;
  np.testing.assert_allclose(reference[:, 0], reference[:, 1] + config.rtd.rtd_lambda * reference[:, 2], rtol=1e-6)
  initial = ref_trainer.init(0)
  _, aux = ref_trainer.models.losses(
      jax.device_get(initial.params), _batches(1)[0], jax.random.fold_in(jax.device_get(initial.rng), 0),
      num_predictions=ref_trainer.num_predictions, rtd_lambda=config.rtd.rtd_lambda, deterministic=False)
  np.testing.assert_allclose(reference[0], [float(aux[k]) for k in ("loss", "mlm_loss", "rtd_loss")], rtol=1e-5)
  # (b) the three updates (lr 0, 5e-4, 1e-3) lower the deterministic loss of every batch it saw by > 0.1
  # (measured: ~0.24 from ~39.49 with bias-corrected Adam, ~0.9 without; the batches differ by ~0.015).
  for batch in _batches(3):
    before = float(ref_trainer.evaluate(initial, batch)["loss"])
    after = float(ref_trainer.evaluate(ref_state, batch)["loss"])
    assert after < before - 0.1, (before, after)
  for shape in [(8, 1, 1), (2, 2, 2)]:  # pure data parallelism; data x fsdp x tensor at once
    config = _config(mesh=shape)
    mesh = sharding.make_mesh(config.mesh)
    got, trainer, state = _losses(config, mesh)
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=1e-5, err_msg=f"mesh {shape}")
    # The state really is distributed: with fsdp/tensor > 1 some parameter is split across devices.
    if shape[1] * shape[2] > 1:
      leaves = jax.tree_util.tree_leaves(state.params)
      assert any(len({str(s.index) for s in leaf.addressable_shards}) > 1 for leaf in leaves)


def test_joint_training_and_loss_decreases():
  single = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  config = _config(dropout=0.0, decoupled=False)
  trainer = train.Trainer(config, mesh=single)
  state = trainer.init(0)
  batch = _batches(1)[0]
  first = None
  for _ in range(12):
    state, metrics = trainer.step(state, batch)
    first = float(metrics["loss"]) if first is None else first
  assert float(metrics["loss"]) < first


def test_mesh_that_does_not_divide_devices():
  with pytest.raises(ValueError, match="needs 3 devices"):
    sharding.resolve_mesh_shape(ml_collections.ConfigDict({"data": 3, "fsdp": 1, "tensor": 1}), 8)
  with pytest.raises(ValueError, match="do not divide the 8"):
    sharding.resolve_mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  assert sharding.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
