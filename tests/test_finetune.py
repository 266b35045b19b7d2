"""GLUE / XNLI fine-tuning end to end on generated tasks, with a tiny model and a vocabulary trained here.

The generated single-sentence task (SST-2 format) is "does the sentence contain the word zebra"; the STS-B-format
task scores sentence pairs by how many zebras they hold; the MNLI/XNLI-format task labels pairs by a word rule.
"""

import json
import os

import jax
import numpy as np
import pytest
import scipy.stats

from configs import glue, xnli
from debertax import api, finetune, glue_suite, heads, sharding, tasks
from debertax import optimizer as optimizer_lib
from debertax.config import ModelConfig
from debertax.tokenizer import Tokenizer, train_sentencepiece

WORDS = ("apple", "river", "stone", "cloud", "zebra", "lemon", "tiger", "piano", "ocean", "maple", "robot", "candle")
N_DEV = 100  # Not a multiple of the eval batch (24): the last dev batch is a remainder.


def _sentence(rng, exclude=("zebra",), low=3, high=8):
  words = [w for w in WORDS if w not in exclude]
  return list(rng.choice(words, rng.integers(low, high + 1)))


def _write(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(rows) + "\n")


def write_sst2(root, n_train, n_dev=N_DEV, seed=0):
  rng = np.random.default_rng(seed)
  for split, n in (("train", n_train), ("dev", n_dev)):
    rows = ["sentence\tlabel"]
    for i in range(n):
      words = _sentence(rng)
      if i % 2:
        words.insert(int(rng.integers(0, len(words) + 1)), "zebra")
      rows.append(" ".join(words) + "\t" + str(i % 2))
    _write(os.path.join(root, "SST-2", f"{split}.tsv"), rows)


def write_stsb(root, n_train, n_dev=N_DEV, seed=1):
  rng = np.random.default_rng(seed)
  for split, n in (("train", n_train), ("dev", n_dev)):
    rows = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
    for i in range(n):
      a, b = _sentence(rng, low=1, high=3), _sentence(rng, low=1, high=3)  # Short: nothing is truncated.
      zebras = int(rng.integers(0, 6))
      for _ in range(zebras):
        target = a if rng.random() < 0.5 else b
        target.insert(int(rng.integers(0, len(target) + 1)), "zebra")
      rows.append(f"{i}\tgen\tfile\t2024\t{i}\tsrc\tsrc\t{' '.join(a)}\t{' '.join(b)}\t{float(zebras):.3f}")
    _write(os.path.join(root, "STS-B", f"{split}.tsv"), rows)


def _nli_row(rng):
  premise = _sentence(rng)
  kind = int(rng.integers(0, 3))
  if kind == 0:  # entailment: the hypothesis is taken from the premise.
    hypothesis = premise[: max(1, len(premise) // 2)]
  elif kind == 1:  # contradiction: the hypothesis says zebra.
    hypothesis = _sentence(rng, low=1, high=3) + ["zebra"]
  else:
    hypothesis = _sentence(rng, low=2, high=4)
  return " ".join(premise), " ".join(hypothesis), ("entailment", "contradiction", "neutral")[kind]


def write_nli(glue_root, xnli_root, n_train, languages=("en", "fr"), n_dev=60):
  rng = np.random.default_rng(2)
  rows = ["index\tsentence1\tsentence2\tgold_label"]
  for i in range(n_train):
    premise, hypothesis, label = _nli_row(rng)
    rows.append(f"{i}\t{premise}\t{hypothesis}\t{label}")
  _write(os.path.join(glue_root, "MNLI", "train.tsv"), rows)
  for language in languages:
    _write(os.path.join(xnli_root, "dev", f"dev-{language}.tsv"), ["\t".join(_nli_row(rng)) for _ in range(n_dev)])


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Runs with identical step functions (a repeated run, a resumed run, evaluation) reuse the compiled code, and
  XLA skips most optimisation passes: these tiny models spend far longer compiling than running."""
  options = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes", "jax_disable_most_optimizations")
  previous = {name: jax.config.values[name] for name in options}
  jax.config.update("jax_disable_most_optimizations", True)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for name, value in previous.items():
    jax.config.update(name, value)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  glue_root, xnli_root = root / "glue", root / "xnli"
  write_sst2(glue_root, 512)
  write_stsb(glue_root, 512)
  write_nli(glue_root, xnli_root, 192)
  with open(glue_root / "SST-2" / "train.tsv") as f:
    sentences = [line.split("\t")[0] for line in f.read().splitlines()[1:]]
  spm = train_sentencepiece(sentences, root / "vocab", 32)
  return {"glue": str(glue_root), "xnli": str(xnli_root), "spm": spm, "root": root}


@pytest.fixture(scope="module")
def pretrained(data):
  """A randomly initialised tiny 'pretrained' discriminator directory (debertax format, with spm.model)."""
  tokenizer = Tokenizer.load(data["spm"])
  config = _tiny_model(tokenizer.vocab_size)
  params = heads.init_params(heads.build_model(config, "rtd"), jax.random.PRNGKey(0))
  path = str(data["root"] / "pretrained")
  api.save_pretrained(api.PretrainedDeberta(config, params, "rtd", False, tokenizer, data["spm"]), path, "orbax")
  return path


def _tiny_model(vocab_size):
  return ModelConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, position_buckets=8, max_relative_positions=32, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# Tiny-run settings: bias-corrected Adam keeps the first steps of a random 2-layer model from overshooting.
# One bucket (min_bucket_length = max_length): one compilation per step function.
TRAIN = {"model_size": "base", "train.lr": 1e-3, "train.warmup_steps": 30, "train.batch_size": 16,
         "train.eval_batch_size": 24, "train.max_length": 32, "train.min_bucket_length": 32,
         "train.bias_correction": True, "train.log_every": 8}


def _config(task, data, init_from="", **overrides):
  config = glue.get_config(task) if task != "xnli" else xnli.get_config()
  return glue_suite.apply_overrides(config, {"init_from": init_from, "data_dir": data["glue"], **TRAIN, **overrides})


@pytest.fixture(scope="module")
def single_device():
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def suite(data, pretrained, single_device, tmp_path_factory):
  """The GLUE suite command on two generated tasks: SST-2 format (learnable) and STS-B format (regression)."""
  workdir = str(tmp_path_factory.mktemp("suite"))
  overrides = {"init_from": pretrained, "data_dir": data["glue"], **TRAIN, "train.epochs": 4}
  results, table = glue_suite.run_suite(["sst2", "stsb"], workdir, overrides, mesh=single_device)
  return results, table, workdir


def _dev_labels(data, task):
  return np.array([e.label for e in tasks.read_glue_split(task, data["glue"], "dev")])


def _predictions(path):
  with open(path) as f:
    lines = f.read().splitlines()
  assert lines[0] == "index\tprediction"
  return [line.split("\t") for line in lines[1:]]


def test_learns_the_generated_task(suite):
  results, _, _ = suite
  assert results["sst2"]["metrics"]["dev"]["accuracy"] >= 0.9, results["sst2"]["history"]


def test_whole_dev_set_is_scored_including_the_remainder_batch(suite, data):
  results, _, workdir = suite
  rows = _predictions(os.path.join(workdir, "sst2", "predictions", "dev", "SST-2.tsv"))
  assert [int(index) for index, _ in rows] == list(range(N_DEV))  # SST-2 dev has no index column: positions.
  predicted = np.array([int(label) for _, label in rows])
  labels = _dev_labels(data, "sst2")
  assert results["sst2"]["metrics"]["dev"]["accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1e-12)


def test_regression_reports_pearson_and_spearman(suite, data):
  results, _, workdir = suite
  rows = _predictions(os.path.join(workdir, "stsb", "predictions", "dev", "STS-B.tsv"))
  assert [int(index) for index, _ in rows] == list(range(N_DEV))  # STS-B dev has an index column.
  scores = np.array([float(value) for _, value in rows])  # Written with 3 decimals.
  labels = _dev_labels(data, "stsb")
  metrics = results["stsb"]["metrics"]["dev"]
  assert metrics["pearson"] == pytest.approx(scipy.stats.pearsonr(scores, labels)[0], abs=2e-3)
  assert metrics["spearman"] == pytest.approx(scipy.stats.spearmanr(scores, labels)[0], abs=2e-3)
  assert metrics["pearson"] > 0.5  # Counting zebras is learnable in 4 epochs.


def test_best_checkpoint_is_kept_and_reloads(suite, data):
  results, _, workdir = suite
  result = results["sst2"]
  history = [h["dev/accuracy"] for h in result["history"]]
  assert len(history) == 4
  assert result["best_epoch"] == int(np.argmax(history)) + 1  # The first epoch with the best accuracy.
  assert result["metrics"]["dev"]["accuracy"] == history[result["best_epoch"] - 1]
  best_dir = os.path.join(workdir, "sst2", finetune.BEST_MODEL_DIR)
  with open(os.path.join(best_dir, "task.json")) as f:
    assert json.load(f)["epoch"] == result["best_epoch"]
  # The saved model, loaded through the public API, predicts what the run wrote.
  model = api.from_pretrained(best_dir)
  assert model.head == "cls"
  texts = [e.text_a for e in tasks.read_glue_split("sst2", data["glue"], "dev")]
  logits = model.predictor(max_length=32, batch_size=8).classify(texts)
  written = [int(label) for _, label in _predictions(os.path.join(workdir, "sst2", "predictions", "dev", "SST-2.tsv"))]
  assert list(np.argmax(logits, axis=1)) == written


def test_glue_table_of_the_suite(suite):
  results, table, workdir = suite
  header, _, row = table.splitlines()
  cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
  assert cells["SST-2 (Acc)"] == f"{100 * results['sst2']['metrics']['dev']['accuracy']:.1f}"
  assert cells["STS-B (Corr)"] == f"{100 * results['stsb']['metrics']['dev']['pearson']:.1f}"
  assert cells["RTE (Acc)"] == "-" and cells["Avg"] == "-"  # The average needs all eight tasks.
  with open(os.path.join(workdir, "glue_table.md")) as f:
    assert f.read().strip() == table


def test_same_seed_repeats_exactly_from_random_init(data, single_device, tmp_path):
  def losses(name, seed):
    config = _config("sst2", data, allow_random_init=True, vocab=data["spm"], seed=seed, max_train_examples=64,
                     **{"train.epochs": 2, "train.log_every": 1, "model.num_hidden_layers": 2,
                        "model.hidden_size": 32, "model.num_attention_heads": 4, "model.intermediate_size": 64,
                        "model.position_buckets": 8, "model.max_relative_positions": 32,
                        "model.max_position_embeddings": 64})
    result = finetune.run(config, str(tmp_path / name), mesh=single_device)
    with open(tmp_path / name / "metrics.jsonl") as f:
      train = [json.loads(line)["loss"] for line in f if '"train"' in line]
    return train, result["metrics"]

  first, second = losses("a", 3), losses("b", 3)
  assert len(first[0]) == 8 and first == second


def test_early_stopping_and_resume(data, pretrained, single_device, tmp_path):
  # lr = 0: every epoch scores the same, so none improves on the first.
  config = _config("sst2", data, pretrained, max_train_examples=32, **{"train.lr": 0.0, "train.epochs": 6,
                                                                     "train.early_stopping_patience": 2})
  result = finetune.run(config, str(tmp_path), mesh=single_device)
  assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
  assert result["best_epoch"] == 1
  # Running again in the same workdir resumes the finished loop: no further epochs, the same results.
  again = finetune.run(config, str(tmp_path), mesh=single_device)
  assert again["history"] == result["history"] and again["metrics"] == result["metrics"]


def _step_batch(finetuner, data, rows):
  tokenizer = Tokenizer.load(data["spm"])
  split = finetune.encode_split("train", "sst2", tasks.read_glue_split("sst2", data["glue"], "train"), tokenizer, 32)
  accum = finetuner.settings.grad_accum_steps
  return finetune.make_batch(split, finetune.step_rows(rows, 0, 16, accum), 32, [1, 2], 0)


def _finetuner(data, pretrained, mesh, accum, dtype="float32"):
  config = _config("sst2", data, pretrained, **{"train.grad_accum_steps": accum, "model.dtype": dtype})
  initial = finetune.load_initial(config, 2, eval_only=False)
  model_config = finetune.build_model_config(config, initial.config, initial.tokenizer, 2).replace(cls_dropout=0.0)
  finetuner = finetune.Finetuner(model_config, finetune.resolve_settings(config, model_config), config, 10, mesh=mesh)
  params = finetuner.place_params({**finetuner.fresh_params(), "deberta": initial.params["deberta"]})
  return finetuner, finetuner.init_state(params)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_accumulation_and_data_parallel_match_one_full_batch(data, pretrained, single_device):
  rows = np.concatenate([np.arange(40, 52), -np.ones(4, np.int64)])  # 12 real rows, 4 padding slots.
  reference, state = _finetuner(data, pretrained, single_device, accum=1)
  ref_grads, ref_loss = reference.gradients(state, _step_batch(reference, data, rows))
  assert max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(ref_grads)) > 1e-4
  for mesh, accum in ((single_device, 2), (sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1}), 2)):
    finetuner, state = _finetuner(data, pretrained, mesh, accum)
    grads, loss = finetuner.gradients(state, _step_batch(finetuner, data, rows))
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, ref_grads)
  # bf16 compute: the same loss to bf16 precision; parameters stay float32.
  bf16, state = _finetuner(data, pretrained, single_device, accum=1, dtype="bfloat16")
  _, loss = bf16.gradients(state, _step_batch(bf16, data, rows))
  assert float(loss) == pytest.approx(float(ref_loss), abs=2e-2)
  assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(state.params))


def test_layer_wise_lr_decay_scales_each_depth():
  import ml_collections
  zeros = lambda *shape: np.zeros(shape, np.float32)
  params = {"deberta": {"embeddings": {"word_embeddings": {"embedding": zeros(4, 2)}},
                        "encoder": {"rel_embeddings": {"embedding": zeros(4, 2)},
                                    "layer_0": {"dense": {"kernel": zeros(2, 2)}},
                                    "layer_1": {"dense": {"kernel": zeros(2, 2)}}}},
            "pooler": {"dense": {"kernel": zeros(2, 2)}}, "classifier": {"kernel": zeros(2, 2)}}
  grads = jax.tree_util.tree_map(lambda x: np.ones_like(x), params)
  base = dict(lr=1.0, warmup_steps=0, steps=10, grad_clip=0.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6,
              bias_correction=True, weight_decay=0.0)

  def first_update(**extra):
    tx, _ = optimizer_lib.make_optimizer(ml_collections.ConfigDict({**base, **extra}))
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates

  plain, decayed = first_update(), first_update(layer_decay=0.5)
  # Depths with 2 layers: embeddings and the shared relative table 0, layer_i i + 1, heads 3; factor 0.5^(3 - d).
  expected = {("deberta", "embeddings"): 0.125, ("deberta", "encoder", "rel_embeddings"): 0.125,
              ("deberta", "encoder", "layer_0"): 0.25, ("deberta", "encoder", "layer_1"): 0.5,
              ("pooler",): 1.0, ("classifier",): 1.0}
  flat_plain = jax.tree_util.tree_leaves_with_path(plain)
  flat_decayed = dict(jax.tree_util.tree_leaves_with_path(decayed))
  for path, value in flat_plain:
    keys = tuple(p.key for p in path)
    factor = next(f for prefix, f in expected.items() if keys[:len(prefix)] == prefix)
    np.testing.assert_allclose(flat_decayed[path], factor * value, rtol=1e-6)
  # layer_decay = 1 is the pretraining optimizer unchanged.
  same = first_update(layer_decay=1.0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, same, plain)


def test_xnli_zero_shot_tables_and_eval_only(data, pretrained, single_device, tmp_path):
  config = _config("xnli", data, pretrained, **{"xnli.eval_dir": data["xnli"], "xnli.languages": "en,fr",
                                                 "train.epochs": 1})
  result = finetune.run(config, str(tmp_path / "train"), mesh=single_device)
  assert set(result["xnli"]["dev"]) == {"en", "fr"} and result["xnli"]["test"] == {}
  # Independent check: the best model through the public API on the per-language files.
  model = api.from_pretrained(str(tmp_path / "train" / finetune.BEST_MODEL_DIR))
  predictor = model.predictor(max_length=32, batch_size=8)
  for language, accuracy in result["xnli"]["dev"].items():
    rows = tasks.read_xnli_split(data["xnli"], "dev", [language])[language].examples
    logits = predictor.classify([e.text_a for e in rows], [e.text_b for e in rows])
    assert accuracy == pytest.approx(np.mean(np.argmax(logits, 1) == [e.label for e in rows]), abs=1e-12)
  table = finetune.result_tables(result)
  assert "| en | fr | es |" in table and f"{100 * result['xnli']['dev']['fr']:.1f}" in table
  # Evaluation only, from the fine-tuned directory: the same accuracies.
  evaluated = finetune.run(_config("xnli", data, str(tmp_path / "train" / finetune.BEST_MODEL_DIR), eval_only=True,
                                   **{"xnli.eval_dir": data["xnli"], "xnli.languages": "en,fr"}),
                           str(tmp_path / "eval"), mesh=single_device)
  assert evaluated["xnli"]["dev"] == result["xnli"]["dev"] and evaluated["history"] == []


# Bad input -----------------------------------------------------------------------------------------------------
def test_unknown_task_name():
  with pytest.raises(ValueError, match="unknown GLUE task 'sst3'"):
    glue.get_config("sst3")
  with pytest.raises(ValueError, match="no field 'epochz'"):
    glue_suite.apply_overrides(glue.get_config("rte"), {"train.epochz": 1})


def test_init_from_is_required_or_must_exist(data, tmp_path):
  with pytest.raises(ValueError, match="allow_random_init"):
    finetune.run(_config("sst2", data), str(tmp_path / "a"))
  with pytest.raises(FileNotFoundError, match="does-not-exist"):
    finetune.run(_config("sst2", data, str(tmp_path / "does-not-exist")), str(tmp_path / "b"))
  with pytest.raises(ValueError, match="eval_only"):
    finetune.run(_config("sst2", data, eval_only=True), str(tmp_path / "c"))


def test_eval_only_needs_a_classifier_and_architecture_comes_from_init_from(data, pretrained, tmp_path):
  with pytest.raises(ValueError, match="head='rtd'"):
    finetune.run(_config("sst2", data, pretrained, eval_only=True), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="hidden_size"):
    finetune.run(_config("sst2", data, pretrained, **{"model.hidden_size": 64}), str(tmp_path / "b"))


def test_missing_data_file_and_malformed_row(data, pretrained, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"SST-2/train.tsv"):
    finetune.run(_config("sst2", data, pretrained, data_dir=str(tmp_path / "empty")), str(tmp_path / "a"))
  bad = tmp_path / "bad"
  write_sst2(bad, 8, 4)
  path = bad / "SST-2" / "train.tsv"
  lines = path.read_text().splitlines()
  lines[4] = lines[4] + "\textra"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=rf"{path}:5: expected 2 tab-separated columns, got 3"):
    finetune.run(_config("sst2", data, pretrained, data_dir=str(bad)), str(tmp_path / "b"))


def test_without_local_files_tfds_is_read_and_its_absence_named(tmp_path):
  config = glue.get_config("rte")
  config.tfds_data_dir = str(tmp_path)  # Nothing prepared here, and no download.
  with pytest.raises(RuntimeError, match=r"TFDS glue/rte split 'train' is not available .*--config.data_dir"):
    finetune.load_task_data(config, None, 32, with_train=True)


def test_translate_train_all_reads_every_language(data, tmp_path):
  languages = ("en", "fr")
  for language in languages:
    (tmp_path / f"train-{language}.tsv").write_text(
        (data["root"] / "xnli" / "dev" / f"dev-{language}.tsv").read_text())
  config = _config("xnli", data, **{"xnli.eval_dir": data["xnli"], "xnli.languages": ",".join(languages),
                                    "xnli.translate_train_all": True, "xnli.translate_train_dir": str(tmp_path)})
  loaded = finetune.load_task_data(config, Tokenizer.load(data["spm"]), 32, with_train=True)
  expected = [e.label for lang in languages for e in tasks.read_xnli_split(data["xnli"], "dev", [lang])[lang]]
  assert loaded.train.task == "mnli" and list(loaded.train.labels) == expected
  assert set(loaded.evals) == {"dev/en"} and set(loaded.finals) == {"dev/fr"}  # Selection on English dev.
  config.xnli.translate_train_dir = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="train-en.tsv: no translate-train file"):
    finetune.load_task_data(config, Tokenizer.load(data["spm"]), 32, with_train=True)


def test_workdir_of_another_config_is_refused(data, pretrained, single_device, tmp_path):
  finetune._check_workdir_config(str(tmp_path), json.dumps({"train": {"lr": 1.0}}))
  with pytest.raises(ValueError, match=r"different config \(keys \['train.lr'\]\)"):
    finetune._check_workdir_config(str(tmp_path), json.dumps({"train": {"lr": 2.0}}))


TINY_SHAPE = {"model.num_hidden_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 4,
              "model.intermediate_size": 64, "model.position_buckets": 8, "model.max_relative_positions": 32,
              "model.max_position_embeddings": 128}


def test_defaults_reach_the_run_and_learn_from_random_weights(data, single_device, tmp_path):
  # No train.* override: the task's row for model_size "auto" (configs/tiny.py's 4 x 128 shape: the "tiny"
  # row), a warmup capped to 10% of the run, bias-corrected Adam, the table's classifier dropout and the
  # released models' hidden/attention dropout 0.1.
  from configs import common
  shape = {f"model.{k}": v for k, v in common.SIZES["tiny"].items()}
  config = glue_suite.apply_overrides(glue.get_config("sst2"), {
      "data_dir": data["glue"], "allow_random_init": True, "vocab": data["spm"], **shape,
      "model.position_buckets": 8, "model.max_relative_positions": 32})
  result = finetune.run(config, str(tmp_path), mesh=single_device)
  with open(tmp_path / "config.json") as f:
    resolved = json.load(f)["resolved"]
  large = tasks.default_hparams("sst2", "large")
  steps = 8 * -(-512 // 32)  # 8 epochs of 512 rows in batches of 32
  assert resolved["model_size"] == "tiny"
  assert resolved["lr"] == pytest.approx(large.learning_rate * tasks.LR_SCALE_BY_SIZE["tiny"])
  assert (resolved["epochs"], resolved["batch_size"], resolved["classifier_dropout"]) == (8, 32, 0.1)
  assert resolved["warmup_steps"] == -(-steps // 10) < large.warmup_steps
  with open(tmp_path / "metrics.jsonl") as f:
    peak = max(json.loads(line).get("learning_rate", 0.0) for line in f if '"train"' in line)
  assert peak == pytest.approx(resolved["lr"], rel=0.1)  # the schedule reaches its peak
  assert result["metrics"]["dev"]["accuracy"] >= 0.9, result["history"]


def test_warmup_longer_than_the_run_is_named(data, single_device, tmp_path, caplog):
  config = _config("sst2", data, allow_random_init=True, vocab=data["spm"], max_train_examples=32,
                   **TINY_SHAPE, **{"train.epochs": 1, "train.warmup_steps": 10})
  with caplog.at_level("WARNING"):
    finetune.run(config, str(tmp_path), mesh=single_device)
  assert "warmup_steps=10 >= the run's 2 optimizer steps" in caplog.text


def _train_losses(workdir):
  """{step: training loss} of a fine-tuning workdir's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r.get("split") == "train"}


def test_resume_in_the_middle_of_an_epoch_repeats_the_uninterrupted_run(data, pretrained, single_device, tmp_path,
                                                                        monkeypatch):
  overrides = {"max_train_examples": 96, "train.epochs": 2, "train.checkpoint_every": 2, "train.log_every": 1}
  whole = finetune.run(_config("sst2", data, pretrained, **overrides), str(tmp_path / "whole"), mesh=single_device)

  real_step, calls = finetune.Finetuner.step, []

  def crashing_step(self, state, batch):  # A kill after the 5th step of 12: the last save was at step 4.
    calls.append(1)
    if len(calls) > 5:
      raise KeyboardInterrupt("killed")
    return real_step(self, state, batch)

  workdir = str(tmp_path / "resumed")
  monkeypatch.setattr(finetune.Finetuner, "step", crashing_step)
  with pytest.raises(KeyboardInterrupt):
    finetune.run(_config("sst2", data, pretrained, **overrides), workdir, mesh=single_device)
  monkeypatch.setattr(finetune.Finetuner, "step", real_step)
  resumed = finetune.run(_config("sst2", data, pretrained, **overrides), workdir, mesh=single_device)

  whole_losses, resumed_losses = _train_losses(str(tmp_path / "whole")), _train_losses(workdir)
  assert sorted(whole_losses) == list(range(1, 13))
  for step in range(5, 13):  # steps 5.. were run again after the resume from step 4
    assert resumed_losses[step] == pytest.approx(whole_losses[step], rel=1e-6), step
  assert resumed["metrics"] == whole["metrics"]


@pytest.mark.parametrize("signal_at,message", [
    (5, r"SIGTERM: saved step 5 \(epoch 1, step 5 of 6\) to .*/checkpoints; rerun"),
    (6, r"SIGTERM: saved the end of epoch 1 \(step 6\) to .*/checkpoints; rerun")])  # After its evaluation.
def test_sigterm_saves_the_step_and_the_rerun_continues_from_it(data, pretrained, single_device, tmp_path,
                                                                 monkeypatch, signal_at, message):
  """A preempted fine-tuning (SIGTERM during the 5th or the 6th, last, step of epoch 1 of 2, with saves every
  4) saves that step and stops with a one-line message and no results; the rerun continues from there with
  the uninterrupted run's losses and scores."""
  import signal
  overrides = {"max_train_examples": 96, "train.epochs": 2, "train.checkpoint_every": 4, "train.log_every": 1}
  whole = finetune.run(_config("sst2", data, pretrained, **overrides), str(tmp_path / "whole"), mesh=single_device)
  real_step, calls = finetune.Finetuner.step, []

  def preempted_step(self, state, batch):
    calls.append(1)
    if len(calls) == signal_at:
      os.kill(os.getpid(), signal.SIGTERM)  # Delivered to the loop's handler, like a TPU VM preemption notice.
    return real_step(self, state, batch)

  workdir = str(tmp_path / "preempted")
  monkeypatch.setattr(finetune.Finetuner, "step", preempted_step)
  handler_before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(SystemExit, match=message):
    finetune.run(_config("sst2", data, pretrained, **overrides), workdir, mesh=single_device)
  assert signal.getsignal(signal.SIGTERM) == handler_before  # The loop's handler is gone with the loop.
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == [signal_at]
  monkeypatch.setattr(finetune.Finetuner, "step", real_step)
  resumed = finetune.run(_config("sst2", data, pretrained, **overrides), workdir, mesh=single_device)

  whole_losses, resumed_losses = _train_losses(str(tmp_path / "whole")), _train_losses(workdir)
  for step in range(signal_at + 1, 13):
    assert resumed_losses[step] == pytest.approx(whole_losses[step], rel=1e-6), step
  assert resumed["metrics"] == whole["metrics"]
