"""Hugging Face Hub model ids (debertax.hub) in from_pretrained, init_from and the command lines.

No network: the models sit in a hub cache laid out as huggingface_hub writes it (models--org--name with
refs/<branch> and snapshots/<commit>), and huggingface_hub runs offline (HF_HUB_OFFLINE), as on a machine
that downloaded them before.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from debertax import api, finetune, heads, hub
from debertax.config import ModelConfig
from debertax.tokenizer import Tokenizer, train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "acme/tiny-deberta"
MAIN, DEV = "1" * 40, "2" * 40  # Commit hashes of the branches "main" and "dev".


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
  """A hub cache holding REPO at two commits (different weights): main and dev."""
  root = tmp_path_factory.mktemp("hub")
  words = ["river", "stone", "cloud", "lemon", "tiger", "piano", "ocean", "maple"]
  rng = np.random.default_rng(0)
  spm = train_sentencepiece([" ".join(rng.choice(words, 6)) for _ in range(200)], root / "vocab", 24)
  tokenizer = Tokenizer.load(spm)
  config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, position_buckets=8, max_relative_positions=32, max_position_embeddings=64)
  repo_dir = root / ("models--" + REPO.replace("/", "--"))
  for branch, commit, seed in (("main", MAIN, 0), ("dev", DEV, 1)):
    params = heads.init_params(heads.build_model(config, "rtd"), jax.random.PRNGKey(seed))
    model = api.PretrainedDeberta(config, params, "rtd", False, tokenizer, str(spm))
    api.save_pretrained(model, str(repo_dir / "snapshots" / commit), format="hf")
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / branch).write_text(commit)
  return root


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return hub_cache


def _snapshot(cache, commit):
  return str(cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / commit)


def _embedding(model):
  return np.asarray(model.params["deberta"]["embeddings"]["word_embeddings"]["embedding"])


def test_from_pretrained_resolves_ids_branches_and_commits(offline_hub):
  main_dir, dev_dir = _snapshot(offline_hub, MAIN), _snapshot(offline_hub, DEV)
  main = api.from_pretrained(main_dir)
  assert not np.array_equal(_embedding(main), _embedding(api.from_pretrained(dev_dir)))
  for spec, expected in ((REPO, main_dir), (f"{REPO}@main", main_dir), (f"{REPO}@dev", dev_dir),
                         (f"{REPO}@{DEV}", dev_dir)):
    assert hub.resolve_model_dir(spec) == expected, spec
    model = api.from_pretrained(spec)
    np.testing.assert_array_equal(_embedding(model), _embedding(api.from_pretrained(expected)), err_msg=spec)
    assert model.head == "rtd" and model.spm_path == os.path.join(expected, "spm.model")


def test_fine_tuning_init_from_a_hub_id(offline_hub):
  from configs import glue
  config = glue.get_config("rte")
  config.init_from = f"{REPO}@dev"
  initial = finetune.load_initial(config, num_labels=2, eval_only=False)
  dev = api.from_pretrained(_snapshot(offline_hub, DEV), head="none")
  np.testing.assert_array_equal(
      initial.params["deberta"]["embeddings"]["word_embeddings"]["embedding"], _embedding(dev))
  assert initial.spm_path == os.path.join(_snapshot(offline_hub, DEV), "spm.model")


def test_missing_models_and_revisions_are_one_line_errors(offline_hub):
  cases = {"acme/no-such-model": "has no copy of the Hub model 'acme/no-such-model' at its default branch",
           f"{REPO}@v9": f"has no copy of the Hub model '{REPO}' at revision 'v9'",
           "runs/typo/export": r"runs/typo/export: no such directory \(nor a Hugging Face Hub model id"}
  for spec, pattern in cases.items():
    with pytest.raises(FileNotFoundError, match=pattern) as error:
      api.from_pretrained(spec)
    assert "\n" not in str(error.value)


def test_vocabulary_of_a_hub_model(offline_hub):
  from debertax import pretrain
  assert hub.resolve_vocab(f"{REPO}@dev") == os.path.join(_snapshot(offline_hub, DEV), "spm.model")
  assert pretrain._spm_file(REPO) == os.path.join(_snapshot(offline_hub, MAIN), "spm.model")
  with pytest.raises(FileNotFoundError, match="has no copy of the Hub model 'acme/none'"):
    hub.resolve_vocab("acme/none")
  with pytest.raises(FileNotFoundError, match=r"a/b/spm.model: no such file or directory \(nor a Hugging Face"):
    hub.resolve_vocab("a/b/spm.model")


def test_what_counts_as_a_hub_id(tmp_path):
  assert hub.parse_hub_id("microsoft/deberta-v3-base") == ("microsoft/deberta-v3-base", None)
  assert hub.parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
  assert hub.parse_hub_id("bert-base-uncased") == ("bert-base-uncased", None)
  for not_an_id in ("/abs/model", "./model", "a/b/c", "model/config.json", "org/name@", "gs://bucket/model"):
    assert hub.parse_hub_id(not_an_id) is None, not_an_id
  # An existing directory or a bucket path is never looked up on the Hub, even when spelled like an id.
  (tmp_path / "org" / "name").mkdir(parents=True)
  os.chdir(tmp_path)
  try:
    assert hub.resolve_model_dir("org/name") == "org/name"
  finally:
    os.chdir(ROOT)
  assert hub.resolve_model_dir("gs://bucket/org/name") == "gs://bucket/org/name"


def test_safetensors_repositories_skip_the_pickled_weights(monkeypatch):
  import huggingface_hub
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  listings = {"with": ["config.json", "model.safetensors", "pytorch_model.bin", "pytorch_model.generator.bin"],
              "without": ["config.json", "pytorch_model.bin", "spm.model"]}
  monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: listings[repo])
  assert hub._ignored_weights("with", None) == ["pytorch_model.bin"]  # The generator's .bin still comes.
  assert hub._ignored_weights("without", None) == []


def test_offline_runs_ask_for_the_files_the_cached_snapshot_has(offline_hub):
  """Offline, the cached snapshot says whether the pickle was skipped (the hub cache fixture has safetensors)."""
  assert hub._ignored_weights(REPO, None) == ["pytorch_model.bin"]
  assert hub._ignored_weights(REPO, DEV) == ["pytorch_model.bin"]
  assert hub._ignored_weights("acme/not-cached", None) == []


def test_command_lines_take_hub_ids(hub_cache, tmp_path):
  env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
  env.pop("XLA_FLAGS", None)

  def run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)

  out = tmp_path / "converted"
  result = run("debertax.convert", "import", f"{REPO}@dev", str(out))
  assert result.returncode == 0, result.stderr[-2000:]
  np.testing.assert_array_equal(_embedding(api.from_pretrained(str(out))),
                                _embedding(api.from_pretrained(_snapshot(hub_cache, DEV))))
  inputs = tmp_path / "in.jsonl"
  inputs.write_text(json.dumps({"text": "river stone cloud"}) + "\n")
  result = run("debertax.inference", "rtd", f"--model={REPO}", f"--input={inputs}", f"--output={tmp_path / 'o.jsonl'}")
  assert result.returncode == 0, result.stderr[-2000:]
  record = json.loads((tmp_path / "o.jsonl").read_text())
  assert record["tokens"] and len(record["replaced_prob"]) == len(record["tokens"])
  result = run("debertax.convert", "import", "acme/no-such-model", str(tmp_path / "x"))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("error: acme/no-such-model: no such local directory, "
                                                           "and HF_HUB_OFFLINE is set")


DOWNLOAD_SCRIPT = """
import json, os, sys
from debertax import api, hub
out = {}
for spec in sys.argv[1:]:
  try:
    if spec.startswith("vocab:"):
      out[spec] = {"path": hub.resolve_vocab(spec[len("vocab:"):])}
      continue
    path = hub.resolve_model_dir(spec)
    model = api.from_pretrained(path)
    out[spec] = {"files": sorted(os.listdir(path)), "head": model.head, "path": path}
  except FileNotFoundError as e:
    out[spec] = {"error": str(e)}
print(json.dumps(out))
"""


def test_hub_download_through_the_hub_api(hub_cache, tmp_path):
  """The online path, against a Hub on 127.0.0.1 (tests/hub_emulator.py): only the model's files are fetched,
  safetensors rather than the pickle, and the cached copy then serves an offline run."""
  import shutil

  from hub_emulator import FakeHub
  repo = tmp_path / "hub" / "models" / "acme" / "tiny-deberta"
  shutil.copytree(_snapshot(hub_cache, MAIN), repo)
  (repo / "pytorch_model.bin").write_bytes(b"a pickle that must not be downloaded")
  (repo / "tf_model.h5").write_bytes(b"TensorFlow weights that must not be downloaded")
  (repo / "README.md").write_text("model card")
  with FakeHub(tmp_path / "hub", tmp_path / "cache") as fake:
    env = {**os.environ, **fake.env}
    env.pop("XLA_FLAGS", None)
    run = lambda *specs: subprocess.run([sys.executable, "-c", DOWNLOAD_SCRIPT, *specs], cwd=ROOT, env=env,
                                        capture_output=True, text=True, timeout=300)
    result = run(f"vocab:{REPO}")  # config.data.vocab: the vocabulary alone, not the weights.
    assert result.returncode == 0, result.stderr[-3000:]
    vocab = json.loads(result.stdout.strip().splitlines()[-1])[f"vocab:{REPO}"]["path"]
    assert vocab.endswith("spm.model") and os.path.getsize(vocab) == os.path.getsize(repo / "spm.model")
    assert [p for m, p in fake.requests if m == "GET" and "/resolve/" in p] == [
        f"/{REPO}/resolve/main/spm.model"], fake.requests
    result = run(REPO, "acme/no-such-model")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    downloads = [p for method, p in fake.requests if method == "GET" and "/resolve/" in p]
  assert out[REPO]["files"] == ["config.json", "model.safetensors", "spm.model"], out
  assert out[REPO]["head"] == "rtd" and out[REPO]["path"].startswith(str(tmp_path / "cache"))
  assert not any(name in p for p in downloads for name in ("pytorch_model.bin", "tf_model.h5", "README.md"))
  assert out["acme/no-such-model"]["error"] == ("acme/no-such-model: no such local directory, and the Hugging "
                                                "Face Hub has no model 'acme/no-such-model' (a private one needs "
                                                "HF_TOKEN)")
  # The server is gone: offline, the cache answers.
  env["HF_HUB_OFFLINE"] = "1"
  result = subprocess.run([sys.executable, "-c", DOWNLOAD_SCRIPT, REPO], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  offline = json.loads(result.stdout.strip().splitlines()[-1])[REPO]
  assert offline.get("files") == out[REPO]["files"], offline
