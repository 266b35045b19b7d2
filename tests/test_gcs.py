"""Runs that keep everything in a bucket, as on a TPU VM slice: gs:// workdirs, corpora, data and models.

The bucket is served by a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py): gcsfs, etils.epath and Orbax's
tensorstore all speak the real GCS protocol to it, with no credentials and no network.
"""

import functools
import json
import os
import signal
import subprocess
import sys
import uuid

import jax
import numpy as np
import pytest

import gcs_emulator
from debertax import api, checkpoint, finetune, heads, pretrain, storage, train
from debertax.corpus import default_corpus_lines
from debertax.metric_writer import read_jsonl
from debertax.tokenizer import Tokenizer
from test_finetune import TRAIN, _config, _tiny_model, write_sst2
from test_pretrain import _losses, small_config

BUCKET = "debertax-test"


@pytest.fixture(scope="module")
def bucket():
  with gcs_emulator.running(buckets=(BUCKET,)):
    yield f"gs://{BUCKET}"


@pytest.fixture
def prefix(bucket):
  return f"{bucket}/{uuid.uuid4().hex[:8]}"


@functools.lru_cache(maxsize=1)
def _corpus_lines() -> tuple[str, ...]:
  # Harvested once: what the standard library's modules expose can change as the process imports more.
  return tuple(default_corpus_lines())


def _corpus_files(directory_of_files: str) -> str:
  """The embedded corpus as two files under `directory_of_files` (local or gs://); returns a glob of them."""
  lines = _corpus_lines()
  half = len(lines) // 2
  for index, part in enumerate((lines[:half], lines[half:])):
    storage.write_atomic(storage.join(directory_of_files, f"part-{index}.txt"),
                         "".join(line.replace("\n", " ") + "\n" for line in part))
  return storage.join(directory_of_files, "*.txt")


def _bucket_config(corpus: str, **train):
  config = small_config("", **train)
  config.data.source = corpus
  config.data.vocab = ""  # Trained into the workdir, and read back from there when the run resumes.
  config.data.train_vocab_size = 300
  return config


def test_pretraining_in_a_bucket_resumes_exactly_and_exports(bucket, prefix, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Where a path-unaware open("gs://...") would create a folder "gs:".
  corpus = _corpus_files(f"{prefix}/corpus")
  workdir = f"{prefix}/run"
  first = pretrain.run(_bucket_config(corpus, max_steps_per_run=3), workdir)
  second = pretrain.run(_bucket_config(corpus), workdir)
  assert sorted(first["train"]) == [1, 2, 3] and sorted(second["train"]) == [4, 5, 6]
  # The reference: one uninterrupted local run on local copies of the files, with the vocabulary that the
  # bucket run trained into its workdir (read from there).
  reference = _bucket_config(_corpus_files(str(tmp_path / "corpus")))
  reference.data.vocab = f"{workdir}/spm.model"
  local = pretrain.run(reference, str(tmp_path / "local"))
  # The same batches, read from the bucket by byte ranges and resumed from a checkpoint in the bucket.
  np.testing.assert_array_equal(_losses(first, [1, 2, 3]), _losses(local, [1, 2, 3]))
  np.testing.assert_array_equal(_losses(second, [4, 5, 6]), _losses(local, [4, 5, 6]))
  assert not os.path.exists(tmp_path / "gs:")

  saved = storage.listdir(f"{workdir}/checkpoints")
  assert {"2", "3", "4", "6"} <= set(saved), saved  # Every 2 steps, and where the first invocation stopped.
  assert [r["step"] for r in read_jsonl(f"{workdir}/metrics.jsonl") if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
  assert len(storage.glob(f"{workdir}/tensorboard/events.out.tfevents.*")) == 2  # One per invocation.
  assert json.loads(storage.read_text(f"{workdir}/config.json"))["data"]["source"] == corpus
  assert Tokenizer.load(f"{workdir}/spm.model").vocab_size == 301  # 300 pieces + [MASK].
  # A save of step 8 that died half-way: some of its objects in the bucket, no commit marker. The next run
  # resumes from the last committed checkpoint (6) and writes step 8 again.
  for name in ("_CHECKPOINT_METADATA", "state/_METADATA"):
    storage.write_atomic(f"{workdir}/checkpoints/8/{name}", "{truncated")
  third = pretrain.run(_bucket_config(corpus, steps=8, export_at_end=False), workdir)
  assert sorted(third["train"]) == [7, 8]
  assert storage.exists(f"{workdir}/checkpoints/8/commit_success.txt")
  exported = api.from_pretrained(f"{workdir}/export/discriminator")
  reference = api.from_pretrained(str(tmp_path / "local" / "export" / "discriminator"))
  assert exported.tokenizer is not None and exported.head == "rtd"
  jax.tree_util.tree_map(np.testing.assert_array_equal, exported.params, reference.params)


def test_glue_fine_tuning_in_a_bucket(bucket, prefix, tmp_path):
  write_sst2(str(tmp_path / "glue"), 64, n_dev=32)
  for split in ("train", "dev"):
    storage.copy_file(str(tmp_path / "glue" / "SST-2" / f"{split}.tsv"), f"{prefix}/glue/SST-2/{split}.tsv")
  sentences = [line.split("\t")[0] for line in storage.read_text(f"{prefix}/glue/SST-2/train.tsv").splitlines()[1:]]
  from debertax.tokenizer import train_sentencepiece
  spm = train_sentencepiece(sentences, f"{prefix}/vocab", 32)
  tokenizer = Tokenizer.load(spm)
  config = _tiny_model(tokenizer.vocab_size)
  params = heads.init_params(heads.build_model(config, "rtd"), jax.random.PRNGKey(0))
  model_dir = api.save_pretrained(api.PretrainedDeberta(config, params, "rtd", False, tokenizer, spm),
                                  f"{prefix}/pretrained", "orbax")
  assert storage.exists(f"{prefix}/pretrained/debertax.json") and storage.exists(f"{prefix}/pretrained/spm.model")
  hf_dir = api.save_pretrained(api.from_pretrained(model_dir), f"{prefix}/hf", "hf")  # Hugging Face format.
  assert storage.listdir(hf_dir) == ["config.json", "model.safetensors", "spm.model"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, api.from_pretrained(hf_dir).params, params)

  run = _config("sst2", {"glue": f"{prefix}/glue"}, model_dir, **{"train.epochs": 2})
  results = finetune.run(run, f"{prefix}/ft")
  assert json.loads(storage.read_text(f"{prefix}/ft/results.json"))["glue_results"] == results["glue_results"]
  best = api.from_pretrained(f"{prefix}/ft/best_model")
  assert best.head == "cls" and best.config.num_labels == 2
  assert storage.exists(f"{prefix}/ft/predictions/dev/SST-2.tsv")
  assert not storage.exists(f"{prefix}/ft/best_model.new") and not storage.exists(f"{prefix}/ft/best_model.old")
  # Run again: the finished run is found in the bucket and only re-evaluated.
  again = finetune.run(run, f"{prefix}/ft")
  assert again["glue_results"] == results["glue_results"]


def test_missing_objects_are_named_by_url(bucket, prefix):
  with pytest.raises(FileNotFoundError, match=f"data source glob '{prefix}/nothing/\\*.txt' matched no files"):
    pretrain.run(_bucket_config(f"{prefix}/nothing/*.txt"), f"{prefix}/run")
  with pytest.raises(FileNotFoundError, match=f"{prefix}/no-model: not a directory"):
    api.from_pretrained(f"{prefix}/no-model")
  with pytest.raises(FileNotFoundError, match=f"{prefix}/vocab/spm.model"):
    Tokenizer.load(f"{prefix}/vocab/spm.model")


KILL_DURING_REMOTE_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import fsspec
import jax
import numpy as np
fsspec.config.conf["gs"] = {{"token": "anon"}}
from debertax import checkpoint, pretrain
from test_gcs import _bucket_config
original = checkpoint.TrainCheckpointer.save
def save_then_die(self, step, state, *args, **kwargs):
  # What this process holds at the step it saves, for the parent to compare with what it restores.
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  np.savez(os.path.join({dumps!r}, f"state_{{step}}.npz"),
           **{{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}})
  started = original(self, step, state, *args, **kwargs)
  if step == 4:  # The asynchronous upload of step 4 is in flight: die now, like a preempted TPU VM.
    os.kill(os.getpid(), signal.SIGKILL)
  return started
checkpoint.TrainCheckpointer.save = save_then_die
pretrain.run(_bucket_config({corpus!r}), {workdir!r})
"""


def test_sigkill_during_a_remote_save_loses_nothing_committed(bucket, prefix, tmp_path):
  corpus, workdir = _corpus_files(f"{prefix}/corpus"), f"{prefix}/run"
  script = KILL_DURING_REMOTE_SAVE.format(tests=os.path.dirname(os.path.abspath(__file__)), corpus=corpus,
                                          workdir=workdir, dumps=str(tmp_path))
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=dict(os.environ))
  assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
  committed = sorted(int(d) for d in storage.listdir(f"{workdir}/checkpoints")
                     if d.isdigit() and storage.exists(f"{workdir}/checkpoints/{d}/commit_success.txt"))
  assert committed and max(committed) in (2, 4), storage.listdir(f"{workdir}/checkpoints")
  # Nothing committed is lost: the latest committed checkpoint holds, bit for bit, the state the killed
  # process had at that step.
  vocab = Tokenizer.load(f"{workdir}/spm.model")
  abstract = train.Trainer(pretrain.resolve_config(_bucket_config(corpus), vocab)).abstract_state
  restored, _ = checkpoint.TrainCheckpointer(f"{workdir}/checkpoints", 2, 5).restore(max(committed), abstract)
  held = np.load(tmp_path / f"state_{max(committed)}.npz")
  leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
  assert sorted(held.files) == sorted(jax.tree_util.keystr(path) for path, _ in leaves)
  for path, leaf in leaves:
    np.testing.assert_array_equal(np.asarray(leaf), held[jax.tree_util.keystr(path)],
                                  err_msg=jax.tree_util.keystr(path))
  resumed = pretrain.run(_bucket_config(corpus), workdir)
  assert min(resumed["train"]) == max(committed) + 1 and max(resumed["train"]) == 6
  # The continuation follows an uninterrupted run's trajectory. Within float32 rounding, not bit for bit:
  # the reference runs in this process, and the killed child's steps came out 1 ulp off this process's
  # on the CI machine (same program, another process).
  reference = _bucket_config(_corpus_files(str(tmp_path / "corpus")))
  reference.data.vocab = f"{workdir}/spm.model"
  local = pretrain.run(reference, str(tmp_path / "local"))
  steps = sorted(resumed["train"])
  np.testing.assert_allclose(_losses(resumed, steps), _losses(local, steps), rtol=1e-6)
