"""Where the time of one jitted training step goes, per XLA op, on any backend.

    python benchmarks/profile_step.py --length 2048 --batch 1 --dtype bfloat16            # a GPU
    python benchmarks/profile_step.py --length 512   # this CPU, GLIBC_TUNABLES as in the README
    python benchmarks/profile_step.py --step rtd --size base --length 512 --batch 32 --dtype bfloat16 \
        --vocab 128100                                  # the full RTD step of configs/deberta_v3_base.py

`--step rtd` profiles `debertax.train.Trainer.step` of configs/deberta_v3_<size>.py (generator,
discriminator, both optimizer updates; random ids, 15% masked) instead of the encoder alone.

Runs `--steps` steps of the xsmall encoder's gradient step (the same step as `benchmarks/bench.py`'s
`fwdbwd` rows) under `jax.profiler.trace`, reads the trace's Chrome-format events, and prints a markdown
table of the ops that took the most time per step, each with its HLO instruction (shape, fusion kind, the
source op that XLA records in `op_name`) from the compiled module, grouped over the layers. On a GPU only
device events (kernels, copies) are counted; on the CPU the XLA ops on the host threads. Durations of ops
that run concurrently overlap, so the column sums may exceed the step time.
`--hlo FILE` also writes the optimised HLO text.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import SIZES  # noqa: E402  (the model shapes bench.py times; it also puts the repo on sys.path)

_HOST_BOOKKEEPING = ("Thunk", "$", "Pjit", "Common", "Slinky", "PjRt", "Execute")


def hlo_instructions(hlo_text: str) -> dict[str, str]:
  """Instruction name -> a short description: result shape, opcode (fusion kind / custom-call target), and
  the source op, with layer numbers replaced by N so that the 12 layers group together."""
  described = {}
  for line in hlo_text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\([^()]*\)|\S+) ([\w\-]+)\(", line)  # tuple shapes too
    if not match:
      continue
    name, shape, opcode = match.groups()
    kind = re.search(r"kind=(\w+)", line)
    target = re.search(r'custom_call_target="([^"]+)"', line)
    source = re.search(r'op_name="([^"]+)"', line)
    what = opcode + (f":{kind.group(1)}" if kind else "") + (f":{target.group(1)}" if target else "")
    op = re.sub(r"layer_\d+", "layer_N", source.group(1)) if source else ""
    op = re.sub(r"^jit\([^)]*\)/", "", op)
    described[name] = f"{shape[:60]} {what} {op[-90:]}"
  return described


def device_events(trace: dict) -> tuple[list[dict], str]:
  """The complete ('X') events to count, and which kind they are ('device' or 'host')."""
  names = {}
  for event in trace.get("traceEvents", []):
    if event.get("ph") == "M" and event.get("name") == "process_name":
      names[event.get("pid")] = str(event.get("args", {}).get("name", ""))
  device_pids = {pid for pid, name in names.items() if re.search(r"/device:(GPU|TPU)", name)}
  complete = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
  if device_pids:
    return [e for e in complete if e.get("pid") in device_pids], "device"
  return [e for e in complete if not e.get("name", "").startswith(_HOST_BOOKKEEPING)], "host"


def kernel_key(event: dict) -> str:
  """The HLO instruction an event belongs to: its 'hlo_op' argument when the profiler records one (GPU
  kernels), else the event name (on the CPU, the instruction's name)."""
  args = event.get("args") or {}
  return str(args.get("hlo_op") or args.get("long_name") or event["name"]).split(" ")[0]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="xsmall", choices=sorted(SIZES))
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--impl", default="xla", choices=("xla", "flash"))
  parser.add_argument("--query-block-size", type=int, default=0, help="model.query_block_size (0: automatic)")
  parser.add_argument("--no-relative", action="store_true", help="relative_attention=False")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--hlo", default="", help="also write the optimised HLO text here")
  parser.add_argument("--step", default="encoder", choices=("encoder", "rtd"),
                      help="encoder: the xsmall-style encoder's gradient step; rtd: the full RTD train step")
  parser.add_argument("--vocab", type=int, default=128100, help="--step rtd: the vocabulary size")
  args = parser.parse_args(argv)

  import jax

  step, hlo_text, tokens = (_rtd_step if args.step == "rtd" else _encoder_step)(args)
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(hlo_text)
  for _ in range(2):
    jax.block_until_ready(step())
  best = float("inf")
  for _ in range(args.steps):
    start = time.perf_counter()
    jax.block_until_ready(step())
    best = min(best, time.perf_counter() - start)

  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(args.steps):
        jax.block_until_ready(step())
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
      sys.exit(f"profile_step: jax.profiler wrote no *.trace.json.gz under {trace_dir}")
    with gzip.open(files[0]) as f:
      trace = json.load(f)
  events, where = device_events(trace)
  described = hlo_instructions(hlo_text)
  per_op = collections.defaultdict(lambda: [0.0, 0])
  for event in events:
    label = described.get(kernel_key(event)) or f"(not in HLO) {event['name'][:80]}"
    per_op[label][0] += event["dur"] / 1e3 / args.steps  # microseconds -> ms per step
    per_op[label][1] += 1
  total = sum(ms for ms, _ in per_op.values())
  print(f"## profile: {args.step} step, {args.size}, L={args.length}, B={args.batch}, {args.dtype}, "
        f"impl={args.impl}, query_block_size={args.query_block_size}, relative_attention={not args.no_relative}"
        + (f", vocabulary {args.vocab}" if args.step == "rtd" else ""))
  print(f"\n{jax.devices()[0].device_kind} ({jax.default_backend()}); best step {best * 1e3:.1f} ms "
        f"({tokens / best:.0f} tokens/s); {where} events summed per step: {total:.1f} ms\n")
  print("| ms / step | share | events / step | HLO instruction (shape, opcode[:kind][:target], source op) |")
  print("|---|---|---|---|")
  for label, (ms, count) in sorted(per_op.items(), key=lambda item: -item[1][0])[:args.top]:
    print(f"| {ms:.2f} | {100 * ms / max(total, 1e-9):.1f}% | {count / args.steps:.0f} | `{label}` |")



def _encoder_step(args):
  """The encoder's value-and-gradient step -> (a function running one step, optimised HLO, tokens)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from debertax.compile_options import jit
  from debertax.config import ModelConfig
  from debertax.heads import build_model, init_params

  layers, hidden, heads, ffn = SIZES[args.size]
  cfg = ModelConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=ffn, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    dtype=args.dtype, attention_impl=args.impl, query_block_size=args.query_block_size,
                    relative_attention=not args.no_relative)
  model = build_model(cfg, "none")
  params = init_params(model, jax.random.PRNGKey(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (args.batch, args.length)), jnp.int32)
  mask = jnp.ones_like(ids)

  def loss(p):
    hidden_states = model.apply({"params": p}, ids, mask, deterministic=True)
    return jnp.mean(jnp.square(hidden_states.astype(jnp.float32)))

  compiled = jit(jax.value_and_grad(loss)).lower(params).compile()
  return lambda: compiled(params), compiled.as_text(), args.batch * args.length


def _rtd_step(args):
  """Trainer.step of configs/deberta_v3_<size>.py -> (a function running one step, optimised HLO, tokens)."""
  import importlib

  import numpy as np

  from debertax import train

  config = importlib.import_module(f"configs.deberta_v3_{args.size}").get_config()
  config.model.vocab_size = args.vocab
  config.model.dtype = args.dtype
  config.model.attention_impl = args.impl
  config.model.query_block_size = args.query_block_size
  if args.impl == "flash":
    config.model.attention_probs_dropout_prob = 0.0
  config.train.batch_size = args.batch
  config.data.seq_len = args.length
  trainer = train.Trainer(config)
  holder = {"state": trainer.init(0)}
  rng = np.random.default_rng(0)
  original = rng.integers(5, args.vocab, (args.batch, args.length)).astype(np.int32)
  mlm_mask = rng.random((args.batch, args.length)) < float(config.data.mask_prob)
  batch = dict(input_ids=np.where(mlm_mask, 4, original).astype(np.int32), original_ids=original,
               attention_mask=np.ones((args.batch, args.length), np.int32), mlm_mask=mlm_mask)

  def step():
    holder["state"], metrics = trainer.step(holder["state"], batch)
    return metrics

  return step, trainer.lower_step().compile().as_text(), args.batch * args.length


if __name__ == "__main__":
  main()
