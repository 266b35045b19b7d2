"""config.objective="mlm": plain masked-LM pretraining of one discriminator-shaped model (the RTD baseline)."""

import json

import jax
import numpy as np
import pytest

from debertax import api, pretrain, sharding, train

from test_pretrain import small_config, vocab  # noqa: F401 (vocab: a fixture)
from test_train import _batches, _config


def test_mlm_gradient_is_the_gdes_generator_gradient():
  """Under GDES the generator gets no RTD gradient, so an RTD trainer whose generator has the model's shape
  gives the generator exactly the MLM objective's loss and gradient; anything the MLM objective adds or
  drops (a second loss, another slot selection, other weighting) shows here."""
  rtd_config = _config(dropout=0.0)
  rtd_config.rtd.generator_layers = rtd_config.model.num_hidden_layers
  mlm_config = _config(dropout=0.0)
  mlm_config.objective = "mlm"
  one_device = sharding.make_mesh(rtd_config.mesh, devices=jax.devices()[:1])
  rtd_trainer, mlm_trainer = (train.Trainer(c, mesh=one_device) for c in (rtd_config, mlm_config))
  assert rtd_trainer.gen_config == mlm_trainer.disc_config and mlm_trainer.gen_config is None
  rtd_params = jax.device_get(rtd_trainer.init(0).params)
  mlm_params = {"mlm": rtd_params["generator"]}
  assert jax.tree_util.tree_structure(mlm_params) == jax.tree_util.tree_structure(
      jax.device_get(mlm_trainer.init(0).params))
  for batch in _batches(2):
    (_, rtd_aux), rtd_grads = rtd_trainer.loss_and_grads(rtd_params, batch)
    (mlm_loss, mlm_aux), mlm_grads = mlm_trainer.loss_and_grads(mlm_params, batch)
    assert float(rtd_aux["rtd_loss"]) > 0.1  # The RTD term is really there on the other side.
    np.testing.assert_allclose(float(mlm_loss), float(rtd_aux["mlm_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(mlm_aux["mlm_accuracy"]), float(rtd_aux["mlm_accuracy"]), rtol=1e-6)
    assert sorted(k for k in mlm_aux if np.ndim(mlm_aux[k]) == 0) == [
        "loss", "masked_tokens", "mlm_accuracy", "mlm_loss", "tokens"]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7),
                           rtd_grads["generator"], mlm_grads["mlm"])


def test_mlm_pretraining_learns_exports_and_continues(vocab, tmp_path):
  transformers = pytest.importorskip("transformers")
  from safetensors.numpy import load_file

  from debertax import checkpoint
  config = small_config(vocab, steps=20, eval_every=20, checkpoint_every=20, lr=5e-3)
  config.objective = "mlm"
  config.rtd.rtd_lambda = 1e6  # No effect under the MLM objective (the loss below is the MLM loss alone).
  history = pretrain.run(config, str(tmp_path / "run"))
  train_metrics = history["train"][20]
  assert "rtd_loss" not in train_metrics and train_metrics["loss"] == train_metrics["mlm_loss"]
  start, end = history["eval"][0], history["eval"][20]
  assert not {"rtd_auc", "rtd_loss", "cosine_E_G", "cosine_E_D"} & set(end)
  # Held-out loss from log(V) (5.71 nats for the 300-piece vocabulary); measured 4.96 after the 20 steps.
  assert start["mlm_loss"] > 5.0 and end["mlm_loss"] < start["mlm_loss"] - 0.5, (start["mlm_loss"], end["mlm_loss"])
  assert 0.0 < end["cosine_E"] < 1.0

  export = tmp_path / "run" / "export" / "mlm"
  assert sorted(p.name for p in export.parent.iterdir()) == ["mlm"]
  _, info = transformers.DebertaV2ForMaskedLM.from_pretrained(str(export), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  resolved = pretrain.resolve_config(config, pretrain.Tokenizer.load(vocab))
  trainer = train.Trainer(resolved)
  state, _ = checkpoint.TrainCheckpointer(str(tmp_path / "run" / "checkpoints"), 20, 5).restore(
      20, trainer.abstract_state)
  embedding = np.asarray(state.params["mlm"]["deberta"]["embeddings"]["word_embeddings"]["embedding"])
  exported = load_file(str(export / "model.safetensors"))
  np.testing.assert_array_equal(exported["deberta.embeddings.word_embeddings.weight"], embedding)
  # What fine-tuning loads from it (the backbone), and what continued MLM pretraining starts from.
  backbone = api.from_pretrained(str(export), head="none")
  np.testing.assert_array_equal(backbone.params["deberta"]["embeddings"]["word_embeddings"]["embedding"], embedding)
  resolved.init_from = str(export)
  start_params = pretrain.initial_params_from(resolved, trainer)
  assert list(start_params) == ["mlm"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, start_params, jax.device_get(state.params))
  resolved.init_generator_from = str(export)
  with pytest.raises(ValueError, match="config.init_generator_from is for RTD pretraining"):
    pretrain.initial_params_from(resolved, trainer)
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["objective"] == "mlm"


def test_unknown_objective_is_named():
  config = _config()
  config.objective = "electra"
  with pytest.raises(ValueError, match=r"config.objective='electra'; choose one of \('rtd', 'mlm'\)"):
    train.Trainer(config, mesh=sharding.make_mesh(config.mesh, devices=jax.devices()[:1]))
