"""Bucketed batch inference: every task path against the unpadded model, bounded compilations, the CLI."""

import json

import jax
import numpy as np
import pytest

from debertax import api, heads, inference
from debertax.config import ModelConfig
from debertax.tokenizer import Tokenizer, train_sentencepiece

WORDS = ("apple", "river", "stone", "cloud", "zebra", "lemon", "tiger", "piano", "ocean", "maple", "robot", "candle")
MAX_LENGTH = 32


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
  """These tiny models spend far longer compiling than running: skip most XLA optimisation passes."""
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  rng = np.random.default_rng(0)
  sentences = [" ".join(rng.choice(WORDS, rng.integers(2, 9))) for _ in range(400)]
  return train_sentencepiece(sentences, tmp_path_factory.mktemp("vocab"), 32)


@pytest.fixture(scope="module")
def tokenizer(spm_path):
  return Tokenizer.load(spm_path)


@pytest.fixture(scope="module")
def make_model(tokenizer, spm_path):
  """A randomly initialised tiny model with the given head, and the fixture's tokenizer."""
  def make(head, use_emd=False, num_labels=2, seed=0):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, position_buckets=8, max_relative_positions=32,
                         max_position_embeddings=64, num_labels=num_labels)
    params = heads.init_params(heads.build_model(config, head, use_emd), jax.random.PRNGKey(seed))
    return api.PretrainedDeberta(config, params, head, use_emd, tokenizer, spm_path)
  return make


@pytest.fixture(scope="module")
def make_texts(tokenizer):
  """Texts of whole-piece words with 1 or 6 words (few distinct token lengths, so the unpadded reference
  compiles few shapes); `sizes` picks other word counts."""
  words = [w for w in WORDS if len(tokenizer.encode_ids(w)) == 1]
  assert len(words) >= 4, words

  def make(count=40, seed=1, sizes=(1, 6)):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, int(rng.choice(sizes)))) for _ in range(count)]
  return make


def _by_length(tokenizer, texts, pairs=None):
  """{token length: positions}: the reference runs the model once per exact length, without padding."""
  encoded = tokenizer(texts, pairs, padding=False)
  groups = {}
  for position, ids in enumerate(encoded["input_ids"]):
    groups.setdefault(len(ids), []).append(position)
  return encoded, groups


def test_buckets():
  assert inference.bucket_lengths(200, 16) == (16, 32, 64, 128, 200)
  assert inference.bucket_lengths(128, 16) == (16, 32, 64, 128)
  assert inference.bucket_for(17, (16, 32)) == 32
  with pytest.raises(ValueError, match="does not fit the largest bucket 32"):
    inference.bucket_for(33, (16, 32))


def test_classify_matches_unpadded_model_and_compiles_once_per_bucket(tokenizer, make_model, make_texts):
  model = make_model("cls", num_labels=3)
  predictor = model.predictor(max_length=MAX_LENGTH, batch_size=8, min_length=8)
  assert predictor.buckets == (8, 16, 32)
  texts, pairs = make_texts(), make_texts(seed=2)
  before = inference.TRACES["classify"]
  got = predictor.classify(texts, pairs)
  encoded, groups = _by_length(tokenizer, texts, pairs)
  for positions in groups.values():
    stack = lambda key: np.stack([encoded[key][p] for p in positions])
    reference = model.classify(stack("input_ids"), stack("attention_mask"), stack("token_type_ids"))
    np.testing.assert_allclose(got[positions], reference, rtol=1e-5, atol=1e-5)
  # Many batches of every length up to the longest bucket: one compilation per bucket, whatever the input.
  predictor.classify(make_texts(count=30, seed=3, sizes=(2, 4, 9, 14)), make_texts(count=30, seed=4))
  predictor.classify(make_texts(count=5, seed=5, sizes=(1,)))
  assert len(predictor.stats.shapes) == 3 and predictor.stats.batches == 5 + 4 + 1
  assert inference.TRACES["classify"] - before == 3
  predictor.classify(make_texts(count=21, seed=6, sizes=(1, 3, 5, 8, 12)), make_texts(count=21, seed=7))
  assert inference.TRACES["classify"] - before == 3
  # Counts: real tokens exactly, padding on top.
  fresh = model.predictor(max_length=MAX_LENGTH, batch_size=8, min_length=8)
  fresh.classify(texts, pairs)
  assert fresh.stats.texts == 40 and fresh.stats.tokens == sum(len(ids) for ids in encoded["input_ids"])
  assert fresh.stats.padded_tokens >= fresh.stats.tokens and fresh.stats.tokens_per_second > 0


def test_embeddings_are_mean_pooled_last_hidden_states(tokenizer, make_model, make_texts):
  model = make_model("rtd")  # Any head: embeddings use the backbone.
  texts = make_texts(count=20, seed=5)
  got = model.predictor(max_length=MAX_LENGTH, batch_size=8, min_length=8).embed(texts)
  encoded, groups = _by_length(tokenizer, texts)
  for positions in groups.values():
    hidden = model.encode(np.stack([encoded["input_ids"][p] for p in positions]))  # [n, L, D], no padding
    np.testing.assert_allclose(got[positions], hidden.mean(axis=1), rtol=1e-5, atol=1e-5)


def test_rtd_scores_per_token(tokenizer, make_model, make_texts):
  model = make_model("rtd")
  texts = make_texts(count=12, seed=6)
  got = model.predictor(max_length=MAX_LENGTH, batch_size=4, min_length=8).rtd_scores(texts)
  encoded, groups = _by_length(tokenizer, texts)
  for positions in groups.values():
    logits = model.rtd_logits(np.stack([encoded["input_ids"][p] for p in positions]))
    for row, p in enumerate(positions):
      ids = encoded["input_ids"][p][1:-1]  # [CLS] and [SEP] are left out
      assert [token for token, _ in got[p]] == [tokenizer.id_to_piece(int(t)) for t in ids]
      np.testing.assert_allclose([prob for _, prob in got[p]], 1 / (1 + np.exp(-logits[row, 1:-1])), rtol=1e-5,
                                 atol=1e-6)


def test_fill_mask_top_k_at_every_mask(tokenizer, make_model):
  model = make_model("mlm", use_emd=True)
  texts = ["apple [MASK] river", "[MASK] stone [MASK] cloud zebra", "tiger piano [MASK]", "no masks here"]
  got = model.predictor(max_length=MAX_LENGTH, batch_size=4, min_length=8).fill_mask(texts, top_k=3)
  for text, masks in zip(texts, got):
    ids = tokenizer([text], padding=False)["input_ids"][0]
    positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_id]
    assert [m["position"] for m in masks] == positions
    if not positions:
      continue
    logits = model.mlm_logits(ids[None])[0]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for mask in masks:
      expected = np.argsort(-probs[mask["position"]])[:3]
      assert [c["id"] for c in mask["candidates"]] == list(expected)
      np.testing.assert_allclose([c["prob"] for c in mask["candidates"]], probs[mask["position"], expected],
                                 rtol=1e-5)
      assert mask["candidates"][0]["token"] == tokenizer.id_to_piece(int(expected[0]))


def test_wrong_head_is_refused(make_model):
  with pytest.raises(ValueError, match="needs a checkpoint with the 'cls' head"):
    make_model("rtd").predictor().classify(["apple"])
  with pytest.raises(ValueError, match="'mlm' head"):
    make_model("rtd").predictor().fill_mask(["apple [MASK]"])


# Command line ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(make_model, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("cls_model"))
  api.save_pretrained(make_model("cls", num_labels=2, seed=7), path, format="orbax")
  return path


def test_cli_classify_tsv_pairs_and_jsonl(model_dir, make_texts, tmp_path, capsys):
  texts, pairs = make_texts(count=10, seed=8), make_texts(count=10, seed=9)
  (tmp_path / "in.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in zip(texts, pairs)))
  assert inference.main(["classify", f"--model={model_dir}", f"--input={tmp_path / 'in.tsv'}",
                         f"--output={tmp_path / 'out.jsonl'}", "--max_length=32", "--batch_size=4"]) == 0
  rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["texts"] == 10 and summary["tokens_per_sec"] > 0
  reference = api.from_pretrained(model_dir).predictor(max_length=32, batch_size=4).classify(texts, pairs)
  assert [r["line"] for r in rows] == list(range(1, 11))
  assert [r["label"] for r in rows] == list(np.argmax(reference, axis=1))
  probs = np.exp(reference) / np.exp(reference).sum(1, keepdims=True)
  np.testing.assert_allclose([r["probs"] for r in rows], probs, atol=2e-6)
  # The same rows as JSONL, and as a headed TSV picked by column names.
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": a, "text_pair": b}) + "\n"
                                             for a, b in zip(texts, pairs)))
  (tmp_path / "headed.tsv").write_text("id\tsentence1\tsentence2\n" + "".join(
      f"{i}\t{a}\t{b}\n" for i, (a, b) in enumerate(zip(texts, pairs))))
  for name, extra in (("in.jsonl", []), ("headed.tsv", ["--columns=sentence1,sentence2"])):
    out = tmp_path / (name + ".out.jsonl")
    assert inference.main(["classify", f"--model={model_dir}", f"--input={tmp_path / name}", f"--output={out}",
                           "--max_length=32", "--batch_size=4", *extra]) == 0
    assert [json.loads(line)["label"] for line in out.read_text().splitlines()] == [r["label"] for r in rows]


def test_cli_embed_to_npy(model_dir, make_texts, tmp_path):
  texts = make_texts(count=6, seed=10)
  (tmp_path / "in.tsv").write_text("\n".join(texts) + "\n")
  assert inference.main(["embed", f"--model={model_dir}", f"--input={tmp_path / 'in.tsv'}",
                         f"--output={tmp_path / 'emb.npy'}", "--max_length=32", "--batch_size=4"]) == 0
  expected = api.from_pretrained(model_dir).predictor(max_length=32, batch_size=4).embed(texts)
  np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), expected, rtol=1e-6)


@pytest.mark.parametrize("name, content, message", [
    ("bad.tsv", "apple\tpiano\nriver\tstone\tcloud\n",
     "bad.tsv:2: expected 1 or 2 tab-separated columns (text, text_pair), got 3"),
    ("bad.jsonl", '{"text": "apple"}\n{"text": "river"\n', "bad.jsonl:2: not valid JSON"),
    ("mixed.tsv", "apple\tpiano\nriver\n", "mixed.tsv:2: mixes single texts and text pairs"),
    ("empty.tsv", "apple\n\t\n", "empty.tsv:2: empty text"),
])
def test_cli_bad_rows_name_file_and_line(model_dir, tmp_path, capsys, name, content, message):
  (tmp_path / name).write_text(content)
  assert inference.main(["classify", f"--model={model_dir}", f"--input={tmp_path / name}",
                         f"--output={tmp_path / 'out.jsonl'}"]) == 1
  assert message in capsys.readouterr().err
  assert not (tmp_path / "out.jsonl").exists()


def test_cli_skips_bad_rows_when_asked(tmp_path):
  (tmp_path / "in.tsv").write_text("apple\nriver\tstone\tcloud\nmaple\n")
  rows = inference.read_inputs(str(tmp_path / "in.tsv"), on_bad_row="skip")
  assert rows.texts == ["apple", "maple"] and rows.lines == [1, 3]
