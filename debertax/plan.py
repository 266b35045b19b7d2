"""Memory and communication plan of a config's RTD train step on N devices, without those devices.

    python -m debertax.plan --config=configs/deberta_v3_large.py --devices=256 \\
        --config.mesh.fsdp=64 --config.model.dtype=bfloat16 --config.model.remat=True \\
        --config.train.batch_size=8192 --config.train.microbatches=4

It simulates N CPU devices (jax_num_cpu_devices=N, the config form of XLA_FLAGS=
--xla_force_host_platform_device_count=N, and jax_platforms=cpu, also on a TPU VM), builds the config's mesh over them, and lowers and compiles the full train step (generator,
discriminator, both optimizer updates) for abstract inputs: `Trainer.abstract_state` and
`Trainer.abstract_batch()` are ShapeDtypeStructs with shardings, so no parameter is allocated. It prints
  * per-device bytes: parameters and optimizer state (the shard sizes of the abstract state), and the
    compiled executable's arguments, outputs and temporaries (activations, gradients, collective
    buffers), with their total against 16 GiB (TPU v5e) and 32 GiB (TPU v4);
  * which parameter dimensions are sharded over which mesh axis, with an example parameter;
  * the collectives in the compiled HLO by kind, and how many of them run once per microbatch.
The numbers come from XLA:CPU's buffer assignment. TPU's compiler fuses and schedules differently, so
read the temporaries as an estimate, not a guarantee. Known XLA:CPU differences: the gradient reductions
a TPU does as reduce-scatter show up as all-reduce; and under remat with dropout, the random bits of
every layer's recomputed dropout stay alive together (about 0.35 GiB per layer at 8 x 512 tokens of the
large shape; without dropout the temporaries do not grow with depth), which a TPU's scheduler may avoid.

Jax fixes its devices at its first operation, so the plan must run in a fresh process: `python -m
debertax.plan` from the command line, or a subprocess; where jax has already run it stops with an error.
Compiling a 24-layer model for 64-256 devices takes minutes and 3-5 GB of host memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time

import jax
import ml_collections
from absl import app, flags
from flax import linen as nn
from flax import traverse_util
from ml_collections import config_flags

from debertax import sharding, train
from debertax.tokenizer import Tokenizer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml-collections pretraining config.",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", None, "Number of devices to simulate (the slice's global count).")
_MAX_GIB = flags.DEFINE_float("max_gib_per_device", None, "Exit with status 3 when the step's total per device "
                              "exceeds this (a launch script's guard: 16 for TPU v5e, 32 for v4).")

GIB = 1024**3
TARGETS = (("TPU v5e", 16 * GIB), ("TPU v4", 32 * GIB))
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_PLAN_XLA_FLAGS = (
    # LLVM code generation is most of XLA:CPU's compile time and does not change buffer assignment
    # (the memory figures), so the plan turns its optimisation off.
    "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
    # XLA:CPU drops the optimization barriers that keep jax.checkpoint's recomputation apart from the
    # forward pass, after which CSE merges the two and remat saves nothing; TPU and GPU keep them.
    # Keeping them makes model.remat=True show its real effect (measured: 4 large layers at 8 x 512
    # tokens, 3.4 GiB of temporaries without the barriers, 0.9 GiB with them).
    "--xla_disable_hlo_passes=cse_barrier_expander",
)


@dataclasses.dataclass
class Plan:
  config_name: str
  num_devices: int
  mesh_shape: dict  # axis -> size
  batch_size: int
  seq_len: int
  microbatches: int
  dtype: str
  remat: bool
  num_params: int
  params_bytes: int  # Per device, from the abstract state's shardings.
  opt_state_bytes: int
  other_args_bytes: int  # Batch, step and rng.
  argument_bytes: int  # From the compiled executable's memory analysis ...
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  sharded_dims: list  # (logical axis, mesh axis, mesh size, example path, global shape, shard shape)
  replicated_axes: list  # Logical axes that map to no mesh axis (or only size-1 axes).
  collectives: dict  # kind -> (count in the step, of which inside the microbatch loop)
  lower_seconds: float
  compile_seconds: float

  @property
  def total_bytes(self) -> int:
    """Peak estimate: inputs + outputs that do not reuse a donated input + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


# Measuring ----------------------------------------------------------------------------------------
def resolve_vocab_size(config):
  """model.vocab_size = -1 means 'the vocabulary of this run': read it from data.vocab, or take the size
  that data.train_vocab_size will train ([MASK] is added after the SentencePiece pieces)."""
  if config.model.vocab_size != -1:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  if config.data.vocab:
    config.model.vocab_size = Tokenizer.load(config.data.vocab).vocab_size
  elif config.data.train_vocab_size > 0:
    config.model.vocab_size = int(config.data.train_vocab_size) + 1
  else:
    raise ValueError("config.model.vocab_size is -1 but neither config.data.vocab nor "
                     "config.data.train_vocab_size says how large the vocabulary will be")
  return config


def per_device_bytes(abstract_tree) -> int:
  """Sum over the leaves of one device's shard (ShapeDtypeStructs with shardings)."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(abstract_tree):
    total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
  return total


def sharded_dimensions(trainer) -> tuple[list, list]:
  """(rows for the logical axes that split some parameter, logical axes that stay whole).

  A row: (logical axis, mesh axis, its size, example parameter path, global shape, per-device shape);
  the example is the largest parameter with a dimension of that logical axis.
  """
  rules = sharding.describe_param_sharding(trainer.abstract_boxed.params)
  specs = traverse_util.flatten_dict(nn.get_partition_spec(trainer.abstract_boxed.params))
  abstract = traverse_util.flatten_dict(trainer.abstract_state.params)
  examples = {}  # logical axis -> (path, abstract leaf)
  for path, spec in specs.items():
    leaf = abstract[path]
    for logical in spec:
      if logical and (logical not in examples or math.prod(leaf.shape) > math.prod(examples[logical][1].shape)):
        examples[logical] = ("/".join(path), leaf)
  rows, whole = [], []
  for logical, mesh_axis in rules.items():
    size = trainer.mesh.shape.get(mesh_axis, 1)  # Unmapped axes read "None": no mesh axis, size 1.
    if size == 1:
      whole.append(logical)
      continue
    path, leaf = examples[logical]
    rows.append((logical, mesh_axis, size, path, tuple(leaf.shape), leaf.sharding.shard_shape(leaf.shape)))
  return rows, whole


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLEE = re.compile(r"(?:body|condition|to_apply|calls)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE_BODY = re.compile(r"\swhile\(.*body=%?([\w.\-]+)")


def count_collectives(hlo_text: str) -> dict:
  """kind -> (instructions in the compiled module, of which in a while-loop body such as the microbatch
  scan). Async pairs (-start/-done) count once."""
  computations, callees, current = {}, {}, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(1)
      computations[current], callees[current] = [], set()
      continue
    if current is None:
      continue
    computations[current].append(line)
    callees[current].update(_CALLEE.findall(line))
    for branches in _BRANCHES.findall(line):
      callees[current].update(b.strip().lstrip("%") for b in branches.split(","))
  in_loop = set()
  pending = [body for lines in computations.values() for line in lines for body in _WHILE_BODY.findall(line)]
  while pending:
    name = pending.pop()
    if name not in in_loop:
      in_loop.add(name)
      pending.extend(callees.get(name, ()))
  counts = {}
  for kind in COLLECTIVES:
    opcode = re.compile(rf"\s{kind}(?:-start)?\(")
    total = looped = 0
    for name, lines in computations.items():
      found = sum(1 for line in lines if " = " in line and opcode.search(line.split(" = ", 1)[1]))
      total += found
      looped += found if name in in_loop else 0
    counts[kind] = (total, looped)
  return counts


def build_plan(config, config_name: str = "") -> Plan:
  """Lowers and compiles the train step for the devices jax sees now (see the module docstring)."""
  config = resolve_vocab_size(config)
  trainer = train.Trainer(config)
  start = time.time()
  lowered = trainer.lower_step()
  lowered_at = time.time()
  compiled = lowered.compile()
  compiled_at = time.time()
  memory = compiled.memory_analysis()
  abstract = trainer.abstract_state
  params_bytes = per_device_bytes(abstract.params)
  opt_state_bytes = per_device_bytes(abstract.opt_state)
  other_args = per_device_bytes((abstract.step, abstract.rng, trainer.abstract_batch()))
  rows, whole = sharded_dimensions(trainer)
  return Plan(
      config_name=config_name, num_devices=jax.device_count(), mesh_shape=dict(trainer.mesh.shape),
      batch_size=int(config.train.batch_size), seq_len=int(config.data.seq_len),
      microbatches=trainer.microbatches, dtype=str(config.model.dtype), remat=bool(config.model.remat),
      num_params=sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract.params)),
      params_bytes=params_bytes, opt_state_bytes=opt_state_bytes, other_args_bytes=other_args,
      argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
      sharded_dims=rows, replicated_axes=whole, collectives=count_collectives(compiled.as_text()),
      lower_seconds=lowered_at - start, compile_seconds=compiled_at - lowered_at)


# Reporting ----------------------------------------------------------------------------------------
def _gib(n: int) -> str:
  return f"{n / GIB:8.3f}"


def format_plan(plan: Plan) -> str:
  shards = plan.mesh_shape["data"] * plan.mesh_shape["fsdp"]
  per_device = plan.batch_size // shards
  mesh = " ".join(f"{axis}={size}" for axis, size in plan.mesh_shape.items())
  lines = [
      f"debertax plan: {plan.config_name} on {plan.num_devices} simulated devices (XLA:CPU estimate)",
      f"mesh {mesh} | batch {plan.batch_size} x {plan.seq_len} tokens = {per_device} sequences per device, "
      f"microbatches {plan.microbatches} -> {per_device // plan.microbatches} per device at a time | "
      f"dtype {plan.dtype} | remat {plan.remat}",
      f"trainable parameters {plan.num_params:,} | lowered in {plan.lower_seconds:.1f} s, "
      f"compiled in {plan.compile_seconds:.1f} s",
      "",
      f"{'memory per device':<44}{'bytes':>18}{'GiB':>10}",
  ]
  rows = [
      ("parameters", plan.params_bytes),
      ("optimizer state", plan.opt_state_bytes),
      ("batch, step and rng", plan.other_args_bytes),
      ("= arguments (compiled)", plan.argument_bytes),
      ("outputs not aliased to donated arguments", plan.output_bytes - plan.alias_bytes),
      ("activations and temporaries", plan.temp_bytes),
      ("total", plan.total_bytes),
  ]
  lines += [f"  {name:<42}{value:>18,}{_gib(value):>10}" for name, value in rows]
  for name, capacity in TARGETS:
    verdict = "yes" if plan.total_bytes <= capacity else "NO"
    lines.append(f"  fits {name} ({capacity // GIB} GiB): {verdict} "
                 f"({(capacity - plan.total_bytes) / GIB:+.2f} GiB headroom)")
  if plan.total_bytes > TARGETS[0][1]:
    lines.append("  (temporaries grow with the sequences per device at a time: raise config.train.microbatches, "
                 "set config.model.remat=True, or shard more)")
  lines += ["", "sharded parameter dimensions (logical axis -> mesh axis; largest parameter with it: "
            "global -> per-device shape)"]
  for logical, mesh_axis, size, path, shape, shard in plan.sharded_dims:
    lines.append(f"  {logical:<10} -> {mesh_axis} ({size}): {path} {list(shape)} -> {list(shard)}")
  if not plan.sharded_dims:
    lines.append("  none: every parameter is replicated on every device")
  if plan.replicated_axes:
    lines.append(f"  whole on every device: {', '.join(plan.replicated_axes)}")
  loop_note = f"in the microbatch loop (x{plan.microbatches} per step)" if plan.microbatches > 1 else "in a loop"
  lines += ["", f"{'collectives in the compiled step':<44}{'count':>8}   {loop_note}"]
  for kind, (total, looped) in plan.collectives.items():
    lines.append(f"  {kind:<42}{total:>8}   {looped}")
  return "\n".join(lines)


# Entry point --------------------------------------------------------------------------------------
def simulate_cpu_devices(count: int):
  """Makes jax create `count` CPU devices (and no accelerator backend); must run before jax's first
  operation, which fixes the device set for the life of the process."""
  existing = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = " ".join([existing, *(f for f in _PLAN_XLA_FLAGS if f.split("=")[0] not in existing)])
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)  # Takes precedence over --xla_force_host_platform_device_count.
  except RuntimeError as e:
    raise RuntimeError("debertax.plan sets the device count, which jax fixes at its first operation: run it in "
                       "a fresh process (`python -m debertax.plan ...`)") from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/<name>.py is required")
  if not _DEVICES.value or _DEVICES.value < 1:
    raise app.UsageError("--devices=N (a positive device count) is required")
  simulate_cpu_devices(_DEVICES.value)
  try:
    plan = build_plan(_CONFIG.value, config_name=config_flags.get_config_filename(flags.FLAGS["config"]))
  except ValueError as e:  # Config errors name their key; show them as one line, not a traceback.
    print(f"debertax.plan: error: {e}", file=sys.stderr)
    return 1
  print(format_plan(plan))
  if _MAX_GIB.value is not None and plan.total_bytes > _MAX_GIB.value * GIB:
    print(f"debertax.plan: error: the step needs {plan.total_bytes / GIB:.2f} GiB per device, more than "
          f"--max_gib_per_device={_MAX_GIB.value:g}", file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  app.run(main)
