"""The plan command (debertax.plan) and the microbatched train step it recommends for large batches."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import common
from debertax import sharding, train

from test_train import _batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two encoder layers keep the compile short; the plan is otherwise the tiny config's.
SMALL_TINY = ("--config.model.num_hidden_layers=2",)


def _run_plan(*args, timeout=240):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  return subprocess.run([sys.executable, "-m", "debertax.plan", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _table(stdout: str) -> dict:
  """The plan's numbers: memory rows in bytes, the parameter count, collective counts."""
  out = {}
  for name in ("parameters", "optimizer state", "batch, step and rng", "= arguments (compiled)",
               "outputs not aliased to donated arguments", "activations and temporaries", "total"):
    match = re.search(rf"^  {re.escape(name)}\s+([\d,]+)\s+[\d.]+$", stdout, re.M)
    assert match, f"no {name!r} row in:\n{stdout}"
    out[name] = int(match.group(1).replace(",", ""))
  out["num_params"] = int(re.search(r"trainable parameters ([\d,]+)", stdout).group(1).replace(",", ""))
  for kind in ("all-reduce", "all-gather"):
    out[kind] = int(re.search(rf"^  {kind}\s+(\d+)", stdout, re.M).group(1))
  out["fits_v4"] = re.search(r"fits TPU v4 \(32 GiB\): (\w+)", stdout).group(1)
  return out


def test_plan_on_8_simulated_devices_replicated_vs_fsdp():
  plans = {}
  for fsdp, limit_gib in ((1, 32), (8, 0.01)):
    result = _run_plan("--config=configs/tiny.py", "--devices=8", "--config.mesh.data=-1",
                       f"--config.mesh.fsdp={fsdp}", f"--max_gib_per_device={limit_gib}", *SMALL_TINY)
    assert "on 8 simulated devices" in result.stdout, result.stderr[-3000:]
    plans[fsdp] = _table(result.stdout)
    if plans[fsdp]["total"] <= limit_gib * 1024**3:
      assert result.returncode == 0, result.stderr[-3000:]
    else:  # The launch scripts' guard: the table, then a one-line error and exit status 3.
      assert result.returncode == 3
      assert "the step needs 0.0" in result.stderr and "--max_gib_per_device=0.01" in result.stderr
  replicated, sharded = plans[1], plans[8]
  for plan in plans.values():
    # The shard sizes the plan attributes to parameters and optimizer state are exactly what XLA
    # allocates for the step's arguments.
    assert plan["parameters"] + plan["optimizer state"] + plan["batch, step and rng"] == \
        plan["= arguments (compiled)"]
    assert plan["activations and temporaries"] > 0
    assert plan["total"] == (plan["= arguments (compiled)"] + plan["outputs not aliased to donated arguments"]
                             + plan["activations and temporaries"])
    assert plan["fits_v4"] == "yes"
  # Replicated float32 parameters: 4 bytes each on every device; Adam keeps two float32 moments.
  assert replicated["parameters"] == 4 * replicated["num_params"]
  assert replicated["optimizer state"] >= 2 * replicated["parameters"]
  # fsdp=8 splits every parameter with a hidden dimension eight ways; LayerNorm-free leaves stay whole.
  assert replicated["parameters"] / 8 <= sharded["parameters"] < replicated["parameters"] / 4
  assert sharded["optimizer state"] < replicated["optimizer state"] / 4
  # Data parallelism all-reduces gradients; fsdp also all-gathers the parameters it uses.
  assert replicated["all-reduce"] > 0
  assert sharded["all-gather"] > replicated["all-gather"]


def test_plan_mesh_that_does_not_divide_devices_is_a_one_line_error():
  result = _run_plan("--config=configs/tiny.py", "--devices=8", "--config.mesh.data=3", timeout=120)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if "debertax.plan: error" in line]
  assert len(lines) == 1 and "config.mesh" in lines[0] and "8" in lines[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_plan_refuses_to_run_after_jax_has_started():
  from debertax import plan
  jax.devices()  # This process's devices are fixed now.
  with pytest.raises(RuntimeError, match="fresh process"):
    plan.simulate_cpu_devices(64)


# Microbatches ---------------------------------------------------------------------------------------
def _config(microbatches=1, mesh=(1, 2, 1), hidden=32, objective="rtd"):
  model = common.model_config("xsmall", num_hidden_layers=1, hidden_size=hidden, num_attention_heads=4,
                              intermediate_size=2 * hidden, vocab_size=128, position_buckets=8,
                              max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  config = common.pretrain_config(model, lr=1e-3, batch_size=16, steps=100, warmup_steps=0)
  config.rtd.generator_layers = 2
  # A near-zero temperature makes the generator's sample its argmax, so a run in slices draws the same
  # replacements as the whole batch (the random streams differ per slice).
  config.rtd.temperature = 1e-6
  config.data.seq_len = 16
  config.data.max_predictions = 3  # Below the masked count of some rows: the cap must be honoured.
  config.train.microbatches = microbatches
  config.objective = objective
  if objective == "mlm":  # The Enhanced Mask Decoder needs two layers; the RTD case keeps the faster compile.
    config.model.num_hidden_layers = 2
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  return config


def _trainer(config):
  """On as many of this process's devices as config.mesh needs (fewer devices compile and run faster)."""
  size = int(np.prod([config.mesh[axis] for axis in sharding.MESH_AXES]))
  return train.Trainer(config, mesh=sharding.make_mesh(config.mesh, devices=jax.devices()[:size]))


@pytest.mark.parametrize("objective", ["rtd", "mlm"])
def test_microbatches_give_the_full_batch_step_and_evaluation(objective):
  batches = _batches(2, mlm_rate=0.25, pad_from=9)
  runs = {}
  initial = None
  for microbatches in (1, 4):
    trainer = _trainer(_config(microbatches, objective=objective))
    initial = trainer.init(0) if initial is None else initial  # Same shapes and shardings for both.
    state = jax.tree_util.tree_map(jax.numpy.copy, initial)  # The step donates its input.
    steps = []
    for batch in batches:
      state, metrics = trainer.step(state, batch)
      steps.append({k: float(v) for k, v in metrics.items()})
    evaluation = jax.device_get(trainer.evaluate(state, batches[0]))
    runs[microbatches] = steps, evaluation, jax.device_get(state.params)
  (full_steps, full_eval, full_params), (sliced_steps, sliced_eval, sliced_params) = runs[1], runs[4]
  assert full_steps[1]["loss"] != full_steps[0]["loss"]  # The first update changed something.
  for full, sliced in zip(full_steps, sliced_steps):
    assert full.keys() == sliced.keys()
    for key in full:
      np.testing.assert_allclose(sliced[key], full[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert full_eval.keys() == sliced_eval.keys()
  for key in full_eval:
    np.testing.assert_allclose(sliced_eval[key], full_eval[key], rtol=1e-5, atol=1e-5, err_msg=key)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6), full_params,
                         sliced_params)


def test_microbatches_must_split_the_batch_over_the_mesh():
  with pytest.raises(ValueError, match=r"config.train.microbatches=3 must be >= 1 and divide"):
    _trainer(_config(microbatches=3))
  # 16 / 16 = 1 sequence per slice cannot spread over data x fsdp = 2 devices.
  with pytest.raises(ValueError, match=r"1 sequences per microbatch, not divisible by the 2-way"):
    _trainer(_config(microbatches=16))


def test_trainer_and_lowering_allocate_no_parameters():
  before = sum(x.nbytes for x in jax.live_arrays())
  trainer = _trainer(_config(mesh=(1, 1, 1), hidden=256))
  lowered = trainer.lower_step()
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(trainer.abstract_state.params))
  assert param_bytes > 4_000_000
  assert "all-reduce" not in lowered.as_text()  # One device: nothing to communicate.
  assert sum(x.nbytes for x in jax.live_arrays()) - before < 1024


def test_count_collectives_separates_the_loop_body():
  from debertax import plan
  hlo = """HloModule jit_step

%add (x: f32[], y: f32[]) -> f32[] {
  ROOT %sum = f32[] add(f32[] %x, f32[] %y)
}

%slice_grads (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %all-reduce-start.2 = f32[8]{0} all-reduce-start(f32[8]{0} %g), replica_groups={}, to_apply=%add
  %all-reduce-done.2 = f32[8]{0} all-reduce-done(f32[8]{0} %all-reduce-start.2)
  %all-gather.7 = f32[16]{0} all-gather(f32[8]{0} %w), dimensions={0}
  ROOT %t = (s32[], f32[8]) tuple(s32[] %i, f32[8]{0} %all-reduce-done.2)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[16] {
  %all-gather = f32[16]{0} all-gather(f32[8]{0} %a), dimensions={0}
  %loop = (s32[], f32[8]) while((s32[], f32[8]) %init), condition=%cond, body=%slice_grads
  %all-reduce = (f32[8]{0}, f32[16]{0}) all-reduce(f32[8]{0} %x, f32[16]{0} %y), to_apply=%add
  ROOT %out = f32[16]{0} add(f32[16]{0} %all-gather, f32[16]{0} %all-gather)
}
"""
  counts = plan.count_collectives(hlo)
  assert counts["all-reduce"] == (2, 1)  # The async pair counts once; the tuple-shaped one counts too.
  assert counts["all-gather"] == (2, 1)
  assert counts["reduce-scatter"] == counts["all-to-all"] == counts["collective-permute"] == (0, 0)
