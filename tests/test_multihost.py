"""Two real JAX processes (jax.distributed over localhost, CPU collectives) run the pretraining entry point.

The two processes, 2 CPU devices each, run `python -m debertax.main` on the tiny config with every
parameter split over all 4 devices (mesh fsdp=4), so each host holds only half of every sharded tensor.
Against a single process that feeds the same global batches (host 0's rows, then host 1's) to the
same mesh on 4 devices, the test checks:
  * the losses of every step (metrics.jsonl, written by process 0 only, each step once);
  * the checkpoint both processes wrote restores in one process to the single-process parameters, and
    holds each host's own data position (each host read only its shard of the corpus);
  * evaluation and the Hugging Face export, which gather arrays spread over both hosts, ran.
"""

import dataclasses
import itertools
import json
import os
import re
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from debertax import checkpoint as checkpoint_lib
from debertax import pretrain, sharding, train
from debertax.data import PretrainingIterator, source_lines
from debertax.tokenizer import Tokenizer, train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
STEPS = 3
OVERRIDES = (
    "--config.model.num_hidden_layers=2", "--config.data.seq_len=64", "--config.data.max_predictions=10",
    "--config.data.shuffle_buffer=8", "--config.train.batch_size=8",
    f"--config.train.steps={STEPS}", "--config.train.log_every=1", f"--config.train.eval_every={STEPS}",
    f"--config.train.checkpoint_every={STEPS}", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _vocabulary(directory) -> str:
  """A small SentencePiece model from the start of the embedded corpus (seconds, not the half minute
  that training on the whole corpus takes)."""
  return train_sentencepiece(itertools.islice(source_lines("default"), 3000), directory, 300)


def _start_two_processes(workdir: str, vocab: str, overrides=OVERRIDES):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}", JAX_PLATFORMS="cpu")
  port = _free_port()
  procs = []
  for process_id in range(NUM_PROCESSES):
    log = open(os.path.join(os.path.dirname(workdir), f"process_{process_id}.log"), "w")
    procs.append((subprocess.Popen(
        [sys.executable, "-m", "debertax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
         f"--coordinator_address=localhost:{port}", f"--num_processes={NUM_PROCESSES}",
         f"--process_id={process_id}", f"--config.data.vocab={vocab}", *overrides],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  return procs


def _run_two_processes(workdir: str, vocab: str, timeout: float = 240, overrides=OVERRIDES, while_running=None):
  procs = _start_two_processes(workdir, vocab, overrides)
  if while_running is not None:
    while_running([proc for proc, _ in procs])
  try:
    for proc, _ in procs:
      proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  logs = [open(log.name).read() for _, log in procs]
  for process_id, (proc, _) in enumerate(procs):
    assert proc.returncode == 0, f"process {process_id} exited with {proc.returncode}:\n{logs[process_id][-4000:]}"
  return logs


def _single_process_reference(config, tokenizer):
  """The same global batches (host 0's rows, then host 1's) on one process with the same 4-device mesh."""
  devices = jax.devices()[:NUM_PROCESSES * DEVICES_PER_PROCESS]
  trainer = train.Trainer(config, mesh=sharding.make_mesh(config.mesh, devices=devices))
  per_host = dataclasses.replace(pretrain.data_config(config, tokenizer),
                                 batch_size=config.train.batch_size // NUM_PROCESSES)
  iterators = [PretrainingIterator(per_host, tokenizer, process_index=p, process_count=NUM_PROCESSES)
               for p in range(NUM_PROCESSES)]
  state = trainer.init(config.seed)
  losses = []
  for _ in range(STEPS):
    host_batches = [next(it) for it in iterators]
    batch = {k: np.concatenate([b[k] for b in host_batches]) for k in train.BATCH_KEYS}
    state, metrics = trainer.step(state, batch)
    losses.append([float(metrics[k]) for k in ("loss", "mlm_loss", "rtd_loss")])
  return trainer, state, np.array(losses), [it.get_state() for it in iterators]


@pytest.mark.skipif(jax.device_count() < NUM_PROCESSES * DEVICES_PER_PROCESS, reason="needs 4 CPU devices")
def test_two_processes_match_one(tmp_path):
  workdir = str(tmp_path / "run")
  logs = _run_two_processes(workdir, _vocabulary(tmp_path / "vocab"))
  assert "jax.distributed: process 1 of 2, 2 local / 4 global devices" in logs[1]

  # The run's own resolved config, written by process 0.
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tokenizer = Tokenizer.load(config.data.vocab)
  trainer, state, reference, data_states = _single_process_reference(config, tokenizer)

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train_records = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))  # Once each: process 0 only.
  got = np.array([[r[k] for k in ("loss", "mlm_loss", "rtd_loss")] for r in train_records])
  np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
  evals = {r["step"]: r for r in records if r["split"] == "eval"}
  assert len(evals) == len([r for r in records if r["split"] == "eval"])  # Once each.
  assert 0.0 <= evals[STEPS]["rtd_auc"] <= 1.0

  ckpt = checkpoint_lib.TrainCheckpointer(os.path.join(workdir, "checkpoints"), STEPS, 2, async_save=False)
  try:
    assert ckpt.latest_step() == STEPS
    restored, saved_data_states = ckpt.restore(STEPS, trainer.abstract_state)
  finally:
    ckpt.close()
  assert int(restored.step) == STEPS
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                                 atol=1e-6),
                         jax.device_get(restored.params), jax.device_get(state.params))
  # Each host saved its own position in its own shard, the one the reference reached with the same rows.
  assert sorted(saved_data_states) == list(range(NUM_PROCESSES))
  for process_index in range(NUM_PROCESSES):
    assert saved_data_states[process_index] == data_states[process_index]
    assert saved_data_states[process_index]["fingerprint"]["process_index"] == process_index
    assert saved_data_states[process_index]["fingerprint"]["process_count"] == NUM_PROCESSES

  # The export gathered the generator's embedding from both hosts.
  exported = os.path.join(workdir, "export", "generator", "model.safetensors")
  from safetensors.numpy import load_file
  tensors = load_file(exported)
  embedding = next(v for k, v in tensors.items() if k.endswith("word_embeddings.weight"))
  np.testing.assert_allclose(
      embedding, jax.device_get(state.params["generator"]["deberta"]["embeddings"]["word_embeddings"]["embedding"]),
      rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.device_count() < NUM_PROCESSES * DEVICES_PER_PROCESS, reason="needs 4 CPU devices")
def test_sigterm_to_one_host_stops_both_at_the_same_step(tmp_path):
  """A preemption notice reaches the hosts of a slice at different times; here only process 1 gets SIGTERM.
  The hosts compare flags every 10 steps and leave together: both save the same step collectively and exit
  cleanly. (A host that left alone would wait in the collective save, and the other in its next step.)"""
  import signal
  import time
  workdir = str(tmp_path / "run")
  overrides = [o for o in OVERRIDES if not o.startswith(("--config.train.steps", "--config.train.eval_every",
                                                          "--config.train.checkpoint_every"))]
  overrides += ["--config.train.steps=100000", "--config.train.eval_every=100000",
                "--config.train.checkpoint_every=100000"]
  metrics = os.path.join(workdir, "metrics.jsonl")

  def signal_process_1_after_step_3(procs):
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if os.path.exists(metrics) and sum('"train"' in line for line in open(metrics)) >= 3:
        procs[1].send_signal(signal.SIGTERM)
        return
      time.sleep(0.5)

  logs = _run_two_processes(workdir, _vocabulary(tmp_path / "vocab"), overrides=overrides,
                            while_running=signal_process_1_after_step_3)
  saved = [re.findall(r"Saved step (\d+) after SIGTERM", log) for log in logs]
  assert saved[0] and saved[0] == saved[1], saved
  step = int(saved[0][0])
  assert step % 10 == 0 and step >= 10
  saved_steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert saved_steps[-1] == step, saved_steps  # (Orbax also keeps its first save, step 1.)
  assert "SIGTERM received" in logs[1] and "SIGTERM received" not in logs[0]
