"""Checkpoint import/export edge cases: bad files get clear errors, never a silent random init."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import debertax  # noqa: E402
from debertax import convert  # noqa: E402
from debertax.config import ModelConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = dict(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
          relative_attention=True, position_buckets=8, max_relative_positions=-1, pos_att_type="p2c|c2p",
          share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, legacy=False)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  torch.manual_seed(0)
  path = tmp_path_factory.mktemp("hf")
  transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**KW)).save_pretrained(path)
  return path


def _copy(src, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(src, dst)
  return dst


def _edit_state(path, fn):
  from safetensors.numpy import load_file, save_file
  state = load_file(str(path / "model.safetensors"))
  fn(state)
  save_file(state, str(path / "model.safetensors"))


def test_truncated_checkpoint_is_a_clear_error(hf_dir, tmp_path):
  path = _copy(hf_dir, tmp_path)
  data = (path / "model.safetensors").read_bytes()
  (path / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(convert.CheckpointError, match="model.safetensors: cannot read the checkpoint"):
    debertax.from_pretrained(str(path))


def test_corrupt_torch_bin_is_a_clear_error(tmp_path):
  path = tmp_path / "bin"
  path.mkdir()
  (path / "config.json").write_text(json.dumps({"model_type": "deberta-v2", **KW}))
  (path / "pytorch_model.bin").write_bytes(b"not a zip pickle at all")
  with pytest.raises(convert.CheckpointError, match="pytorch_model.bin: cannot read"):
    debertax.from_pretrained(str(path))


def test_torch_bin_checkpoint_loads(hf_dir, tmp_path):
  """The authors' format: a torch pickle with the same keys (torch is only needed for this path)."""
  from safetensors.numpy import load_file
  path = tmp_path / "bin"
  path.mkdir()
  shutil.copy(hf_dir / "config.json", path / "config.json")
  state = {k: torch.tensor(v) for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
  torch.save(state, path / "pytorch_model.bin")
  a, b = debertax.from_pretrained(str(path)), debertax.from_pretrained(str(hf_dir))
  ids = np.array([[1, 5, 9, 2]])
  np.testing.assert_array_equal(a.mlm_logits(ids), b.mlm_logits(ids))


def test_shape_disagreement_names_the_tensor(hf_dir, tmp_path):
  path = _copy(hf_dir, tmp_path)
  config = json.loads((path / "config.json").read_text())
  config["intermediate_size"] = 48
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(convert.CheckpointError, match=r"wrongly shaped .*layer\.0\.intermediate\.dense\.weight"):
    debertax.from_pretrained(str(path))


def test_missing_and_unexpected_tensors_are_listed(hf_dir, tmp_path):
  path = _copy(hf_dir, tmp_path)

  def edit(state):
    del state["deberta.encoder.layer.1.output.dense.bias"]
    state["deberta.encoder.layer.7.mystery.weight"] = np.zeros(3, np.float32)
  _edit_state(path, edit)
  with pytest.raises(convert.CheckpointError) as err:
    debertax.from_pretrained(str(path))
  message = str(err.value)
  assert "missing 1 tensor(s): deberta.encoder.layer.1.output.dense.bias" in message
  assert "unexpected 1 tensor(s): deberta.encoder.layer.7.mystery.weight" in message


def test_released_layout_quirks(hf_dir, tmp_path):
  """Unused v3 position_embeddings and mdeberta's `_weight` (GDES delta) are ignored by rule; the
  `.weight` (E_G + delta) is what is loaded."""
  path = _copy(hf_dir, tmp_path)
  rng = np.random.default_rng(0)

  def edit(state):
    state["deberta.embeddings.position_embeddings.weight"] = rng.normal(size=(512, 16)).astype(np.float32)
    state["deberta.embeddings.word_embeddings._weight"] = rng.normal(size=(100, 16)).astype(np.float32)
  _edit_state(path, edit)
  from safetensors.numpy import load_file
  state = load_file(str(path / "model.safetensors"))
  model = debertax.from_pretrained(str(path))
  np.testing.assert_array_equal(np.asarray(model.params["deberta"]["embeddings"]["word_embeddings"]["embedding"]),
                                state["deberta.embeddings.word_embeddings.weight"])
  assert "position_embeddings" not in model.params["deberta"]["embeddings"]
  # A generator (MLM + Enhanced Mask Decoder) keeps the absolute positions: its decoder needs them.
  gen = debertax.from_pretrained(str(path), use_emd=True)
  np.testing.assert_array_equal(np.asarray(gen.params["deberta"]["embeddings"]["position_embeddings"]["embedding"]),
                                state["deberta.embeddings.position_embeddings.weight"])


def test_generator_without_positions_is_an_error(hf_dir):
  with pytest.raises(convert.CheckpointError, match="missing 1 tensor.*position_embeddings"):
    debertax.from_pretrained(str(hf_dir), use_emd=True)


def test_keys_without_deberta_prefix_and_legacy_head(hf_dir, tmp_path):
  """A bare backbone state dict (no `deberta.`) and transformers' legacy `cls.predictions` head."""
  path = _copy(hf_dir, tmp_path)

  def edit(state):
    for key in list(state):
      value = state.pop(key)
      key = key.replace("deberta.", "", 1)
      key = key.replace("lm_predictions.lm_head.", "cls.predictions.transform.")
      key = key.replace("cls.predictions.transform.bias", "cls.predictions.bias")
      state[key] = value
  _edit_state(path, edit)
  a, b = debertax.from_pretrained(str(path)), debertax.from_pretrained(str(hf_dir))
  ids = np.array([[1, 7, 8, 2]])
  np.testing.assert_array_equal(a.mlm_logits(ids), b.mlm_logits(ids))


def test_missing_spm_with_text_input(hf_dir):
  model = debertax.from_pretrained(str(hf_dir))
  assert model.tokenizer is None
  with pytest.raises(ValueError, match="no spm.model"):
    model.encode(["hello world"])


def test_wrong_head_method_and_bad_ids(hf_dir):
  model = debertax.from_pretrained(str(hf_dir))
  with pytest.raises(ValueError, match="needs a checkpoint with the 'cls' head"):
    model.classify(np.array([[1, 2]]))
  with pytest.raises(ValueError, match="out of range"):
    model.encode(np.array([[1, 100]]))


def test_not_deberta_config(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="is not deberta-v2"):
    debertax.from_pretrained(str(tmp_path))


def test_cli_import_export(hf_dir, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  run = lambda *args: subprocess.run([sys.executable, "-m", "debertax.convert", *args], env=env,
                                     capture_output=True, text=True, cwd=ROOT)
  done = run("import", str(hf_dir), str(tmp_path / "ours"))
  assert done.returncode == 0, done.stderr
  assert "head=mlm" in done.stdout
  done = run("export", str(tmp_path / "ours"), str(tmp_path / "hf"))
  assert done.returncode == 0, done.stderr
  _, info = transformers.DebertaV2ForMaskedLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  bad = run("import", str(tmp_path / "nowhere"), str(tmp_path / "x"))
  assert bad.returncode == 1 and "error:" in bad.stderr and "nowhere" in bad.stderr


def test_config_round_trip():
  cfg = ModelConfig(vocab_size=77, hidden_size=32, num_attention_heads=4, num_hidden_layers=3,
                    intermediate_size=40, pos_att_type="c2p", embedding_size=24, conv_kernel_size=3,
                    position_buckets=-1, max_relative_positions=64, position_biased_input=True)
  hf = transformers.DebertaV2Config(**cfg.to_hf_dict())
  assert ModelConfig.from_hf_dict(hf.to_dict()) == cfg
