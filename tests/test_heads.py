"""The heads transformers does not have: the Enhanced Mask Decoder and the RTD head, against references built
from transformers' own layers (EMD) and NumPy (RTD head)."""

import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from debertax import convert, heads  # noqa: E402
from debertax.config import ModelConfig  # noqa: E402

HF_KW = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
             relative_attention=True, position_buckets=16, max_relative_positions=-1, pos_att_type="p2c|c2p",
             share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, legacy=False)


def _hf_mlm():
  torch.manual_seed(0)
  model = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**HF_KW)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def test_enhanced_mask_decoder_matches_hf_layers():
  """EMD = run HF's last layer twice with Q from (layer L-1 output + abs positions), K/V from layer L-1."""
  hf = _hf_mlm()
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  rng = np.random.default_rng(0)
  positions = rng.normal(0, 0.5, (512, 32)).astype(np.float32)
  state["deberta.embeddings.position_embeddings.weight"] = positions
  cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
  params = convert.hf_state_to_params(state, cfg, "mlm", use_emd=True)
  ids = rng.integers(4, 120, (2, 24))
  mask = np.ones_like(ids)
  mask[1, 17:] = 0
  ours = np.asarray(heads.build_model(cfg, "mlm", use_emd=True).apply({"params": params}, ids, mask))

  with torch.no_grad():
    t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
    out = hf.deberta(input_ids=t_ids, attention_mask=t_mask, output_hidden_states=True)
    kv = out.hidden_states[-2]
    encoder = hf.deberta.encoder
    att_mask = encoder.get_attention_mask(t_mask)
    rel_pos = encoder.get_rel_pos(kv)
    rel_emb = encoder.get_rel_embedding()
    query = kv + torch.tensor(positions[:24])[None]
    for _ in range(2):
      query = encoder.layer[-1](kv, att_mask, query_states=query, relative_pos=rel_pos, rel_embeddings=rel_emb)[0]
    ref = hf.lm_predictions(query, hf.deberta.embeddings.word_embeddings).numpy()
  valid = mask.astype(bool)
  assert np.abs(ours - ref)[valid].max() <= 1e-5
  # The EMD output differs from the plain MLM head (it is not a no-op).
  plain = np.asarray(heads.build_model(cfg, "mlm").apply({"params": params}, ids, mask))
  assert np.abs(plain - ours)[valid].max() > 1e-3


def test_mlm_logits_at_positions_equal_full_logits():
  cfg = ModelConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=32, position_buckets=8)
  model = heads.build_model(cfg, "mlm", use_emd=True)
  params = heads.init_params(model, jax.random.PRNGKey(1))
  ids = np.random.default_rng(0).integers(0, 50, (2, 12))
  positions = np.array([[0, 5, 11], [2, 3, 4]])
  full = np.asarray(model.apply({"params": params}, ids, np.ones_like(ids)))
  picked = np.asarray(model.apply({"params": params}, ids, np.ones_like(ids), positions=positions))
  np.testing.assert_allclose(picked, np.take_along_axis(full, positions[:, :, None], 1), atol=1e-6)


def _np_layer_norm(x, w, b, eps=1e-7):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _np_gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def test_rtd_head_matches_numpy_reference():
  """mask_predictions: LN(h + h[:, 0]) -> dense -> gelu -> classifier, on top of the HF backbone."""
  torch.manual_seed(1)
  hf = transformers.DebertaV2Model(transformers.DebertaV2Config(**HF_KW)).eval()
  state = {"deberta." + k: v.numpy() for k, v in hf.state_dict().items()}
  rng = np.random.default_rng(2)
  head = {"mask_predictions.LayerNorm.weight": 1 + 0.1 * rng.normal(size=32),
          "mask_predictions.LayerNorm.bias": 0.1 * rng.normal(size=32),
          "mask_predictions.dense.weight": 0.2 * rng.normal(size=(32, 32)),
          "mask_predictions.dense.bias": 0.1 * rng.normal(size=32),
          "mask_predictions.classifier.weight": 0.2 * rng.normal(size=(1, 32)),
          "mask_predictions.classifier.bias": 0.1 * rng.normal(size=1)}
  head = {k: v.astype(np.float32) for k, v in head.items()}
  state.update(head)
  cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
  params = convert.hf_state_to_params(state, cfg, "rtd")
  ids = rng.integers(4, 120, (2, 15))
  mask = np.ones_like(ids)
  ours = np.asarray(heads.build_model(cfg, "rtd").apply({"params": params}, ids, mask))
  with torch.no_grad():
    h = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy().astype(np.float64)
  x = _np_layer_norm(h + h[:, :1], head["mask_predictions.LayerNorm.weight"], head["mask_predictions.LayerNorm.bias"])
  x = _np_gelu(x @ head["mask_predictions.dense.weight"].T + head["mask_predictions.dense.bias"])
  ref = (x @ head["mask_predictions.classifier.weight"].T + head["mask_predictions.classifier.bias"])[..., 0]
  assert ours.shape == (2, 15)
  assert np.abs(ours - ref).max() <= 1e-5
