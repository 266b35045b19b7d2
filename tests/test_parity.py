"""Numerical parity with transformers' DebertaV2* on randomly initialised models, and the HF round trip.

Padded batches are compared on valid (unpadded) tokens only: transformers >= 4.47 gives padded query rows
uniform attention while the authors' code gives them zeros, and we do neither on purpose (padded rows
attend to valid keys). Every valid row is identical in all three, and nothing downstream reads padded rows.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import debertax  # noqa: E402

TOL = 1e-5

BASE = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            hidden_act="gelu", layer_norm_eps=1e-7, max_position_embeddings=512, type_vocab_size=0,
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, legacy=False, pad_token_id=0)

CONFIGS = {
    # Released v3 settings (buckets shrunk so short sequences exercise the log buckets: mid = 8).
    "v3": dict(relative_attention=True, position_buckets=16, max_relative_positions=-1, pos_att_type="p2c|c2p",
               share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False),
    # v2-xlarge style: ConvLayer after layer 0 and separate pos_key_proj / pos_query_proj.
    "v2_conv_separate_keys": dict(relative_attention=True, position_buckets=16, max_relative_positions=-1,
                                  pos_att_type="p2c|c2p", share_att_key=False, norm_rel_ebd="layer_norm",
                                  position_biased_input=False, conv_kernel_size=3, conv_groups=2,
                                  conv_act="gelu"),
    # v1-like: no bucketing, absolute positions added to the input, token types, no relative LayerNorm.
    "no_buckets_abs_pos": dict(relative_attention=True, position_buckets=-1, max_relative_positions=24,
                               pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="none",
                               position_biased_input=True, type_vocab_size=2),
    # A factorised embedding (embedding_size != hidden_size) with embed_proj.
    "embedding_proj": dict(relative_attention=True, position_buckets=16, max_relative_positions=-1,
                           pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm",
                           position_biased_input=False, embedding_size=24),
    # c2p only, separate key projection.
    "c2p_only": dict(relative_attention=True, position_buckets=16, max_relative_positions=-1, pos_att_type="c2p",
                     share_att_key=False, norm_rel_ebd="layer_norm", position_biased_input=False),
    # p2c only with the log buckets of the released models (256) but a longer max_relative_positions.
    "p2c_only_wide": dict(relative_attention=True, position_buckets=64, max_relative_positions=256,
                          pos_att_type="p2c", share_att_key=True, norm_rel_ebd="layer_norm",
                          position_biased_input=False),
}

HF_CLASSES = {"none": "DebertaV2Model", "mlm": "DebertaV2ForMaskedLM", "cls": "DebertaV2ForSequenceClassification"}


def _hf_model(name, head, num_labels=3, seed=0):
  torch.manual_seed(seed)
  config = transformers.DebertaV2Config(**{**BASE, **CONFIGS[name]}, num_labels=num_labels)
  model = getattr(transformers, HF_CLASSES[head])(config).eval()
  # Random init leaves LayerNorms at identity and biases at zero; perturb them so every parameter matters.
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if "LayerNorm" in pname or pname.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def _batch(vocab, batch, length, seed=0, pad_from=None):
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, vocab, size=(batch, length))
  mask = np.ones_like(ids)
  if pad_from is not None:
    mask[-1, pad_from:] = 0
    ids[-1, pad_from:] = 0
  return ids, mask, None


def _hf_forward(model, ids, mask, types=None):
  kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  if types is not None:
    kwargs["token_type_ids"] = torch.tensor(types)
  with torch.no_grad():
    out = model(**kwargs)
  return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits).numpy()


def _max_err_valid(ours, ref, mask):
  diff = np.abs(ours - ref)
  return float(diff[mask.astype(bool)].max()) if diff.ndim == 3 else float(diff.max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("head", ["none", "mlm", "cls"])
def test_hf_parity(name, head, tmp_path):
  if head == "mlm" and name == "embedding_proj":
    pytest.skip("transformers' legacy=False MLM head requires embedding_size == hidden_size")
  model = _hf_model(name, head)
  model.save_pretrained(tmp_path)
  ours = debertax.from_pretrained(str(tmp_path))
  assert ours.head == head
  length = 40  # > position_buckets / 2: log buckets are exercised.
  ids, mask, _ = _batch(BASE["vocab_size"], 3, length, pad_from=29)
  types = np.random.default_rng(1).integers(0, 2, ids.shape) if CONFIGS[name].get("type_vocab_size") else None
  ref = _hf_forward(model, ids, mask, types)
  if head == "none":
    got = ours.encode(ids, mask, types)
  elif head == "mlm":
    got = ours.mlm_logits(ids, mask, types)
  else:
    got = ours.classify(ids, mask, types)
  err = _max_err_valid(got, ref, mask)
  print(f"{name}/{head}: max abs err {err:.2e}")
  assert err <= TOL, f"{name}/{head}: max abs error {err}"


@pytest.mark.parametrize("name", ["v3", "v2_conv_separate_keys", "c2p_only"])
def test_hf_parity_long_sequence(name, tmp_path):
  """L > 512: past max_relative_positions every distance lands on the outermost buckets."""
  model = _hf_model(name, "none", seed=1)
  model.save_pretrained(tmp_path)
  ours = debertax.from_pretrained(str(tmp_path))
  ids, mask, _ = _batch(BASE["vocab_size"], 1, 600, seed=2)
  err = _max_err_valid(ours.encode(ids, mask), _hf_forward(model, ids, mask), mask)
  print(f"{name}/L=600: max abs err {err:.2e}")
  assert err <= TOL


def test_regression_head(tmp_path):
  model = _hf_model("v3", "cls", num_labels=1)
  model.save_pretrained(tmp_path)
  ours = debertax.from_pretrained(str(tmp_path))
  ids, mask, _ = _batch(BASE["vocab_size"], 2, 20, pad_from=12)
  got = ours.classify(ids, mask)
  assert got.shape == (2, 1)
  assert np.abs(got - _hf_forward(model, ids, mask)).max() <= TOL


@pytest.mark.parametrize("head", ["none", "mlm", "cls"])
def test_round_trip_hf_debertax_hf(head, tmp_path):
  """HF -> debertax (Orbax) -> HF: transformers loads the export with nothing missing or unexpected."""
  model = _hf_model("v3", head, seed=3)
  model.save_pretrained(tmp_path / "hf")
  ours = debertax.from_pretrained(str(tmp_path / "hf"))
  debertax.save_pretrained(ours, str(tmp_path / "ours"), format="orbax")
  reloaded = debertax.from_pretrained(str(tmp_path / "ours"))
  debertax.save_pretrained(reloaded, str(tmp_path / "back"), format="hf")
  cls = getattr(transformers, HF_CLASSES[head])
  back, info = cls.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
  assert not info["missing_keys"], info["missing_keys"]
  assert not info["unexpected_keys"], info["unexpected_keys"]
  assert not info.get("mismatched_keys"), info.get("mismatched_keys")
  if head == "mlm":
    assert back.config.legacy is False
  back.eval()
  ids, mask, _ = _batch(BASE["vocab_size"], 2, 33, pad_from=20)
  ref, again = _hf_forward(model, ids, mask), _hf_forward(back, ids, mask)
  assert _max_err_valid(again, ref, mask) <= 1e-6


# Each DebertaV2 class and the prefixes of its own head: what a backbone-only export cannot provide.
HF_TASK_HEADS = {"DebertaV2Model": (), "DebertaV2ForMaskedLM": ("lm_predictions.",),
                 "DebertaV2ForSequenceClassification": ("pooler.", "classifier."),
                 "DebertaV2ForTokenClassification": ("classifier.",),
                 "DebertaV2ForQuestionAnswering": ("qa_outputs.",)}


@pytest.mark.parametrize("class_name", sorted(HF_TASK_HEADS))
def test_backbone_export_loads_in_every_hf_class(class_name, tmp_path):
  """A backbone-only export loads into every DebertaV2 class: the whole backbone is read (only the class's
  own head is missing, nothing is unexpected) and its hidden states are the original model's."""
  model = _hf_model("v3", "none", seed=4)
  model.save_pretrained(tmp_path / "hf")
  ours = debertax.from_pretrained(str(tmp_path / "hf"))
  debertax.save_pretrained(ours, str(tmp_path / "back"), format="hf")
  loaded, info = getattr(transformers, class_name).from_pretrained(str(tmp_path / "back"), output_loading_info=True)
  assert not info["unexpected_keys"], info["unexpected_keys"]
  assert not info.get("mismatched_keys"), info.get("mismatched_keys")
  head = HF_TASK_HEADS[class_name]
  missing = sorted(info["missing_keys"])
  assert all(key.startswith(head) for key in missing) if head else not missing, missing
  assert bool(missing) == bool(head), missing
  backbone = loaded.eval() if class_name == "DebertaV2Model" else loaded.eval().deberta
  ids, mask, _ = _batch(BASE["vocab_size"], 2, 21, seed=6, pad_from=15)
  ref = _hf_forward(model, ids, mask)
  got = _hf_forward(backbone, ids, mask)
  assert _max_err_valid(got, ref, mask) <= 1e-6
  assert _max_err_valid(ours.encode(ids, mask), got, mask) <= TOL


def test_backbone_from_task_checkpoint(tmp_path):
  """head='none' loads just the backbone out of a classification checkpoint; hidden states agree."""
  model = _hf_model("v3", "cls", seed=5)
  model.save_pretrained(tmp_path)
  ours = debertax.from_pretrained(str(tmp_path), head="none")
  ids, mask, _ = _batch(BASE["vocab_size"], 2, 18)
  with torch.no_grad():
    ref = model.deberta(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  assert np.abs(ours.encode(ids, mask) - ref).max() <= TOL
