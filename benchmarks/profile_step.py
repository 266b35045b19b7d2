"""Where the time of one jitted encoder forward+backward step goes, per XLA op, on any backend.

    python benchmarks/profile_step.py --length 2048 --batch 1 --dtype bfloat16            # a GPU
    python benchmarks/profile_step.py --length 512   # this CPU, GLIBC_TUNABLES as in the README

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
  args = parser.parse_args(argv)

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
  hlo_text = compiled.as_text()
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(hlo_text)
  for _ in range(2):
    jax.block_until_ready(compiled(params))
  best = float("inf")
  for _ in range(args.steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params))
    best = min(best, time.perf_counter() - start)

  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(args.steps):
        jax.block_until_ready(compiled(params))
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
  print(f"## profile: {args.size}, L={args.length}, B={args.batch}, {args.dtype}, impl={args.impl}, "
        f"query_block_size={args.query_block_size}, relative_attention={not args.no_relative}")
  print(f"\n{jax.devices()[0].device_kind} ({jax.default_backend()}); best step {best * 1e3:.1f} ms "
        f"({args.batch * args.length / best:.0f} tokens/s); {where} events summed per step: {total:.1f} ms\n")
  print("| ms / step | share | events / step | HLO instruction (shape, opcode[:kind][:target], source op) |")
  print("|---|---|---|---|")
  for label, (ms, count) in sorted(per_op.items(), key=lambda item: -item[1][0])[:args.top]:
    print(f"| {ms:.2f} | {100 * ms / max(total, 1e-9):.1f}% | {count / args.steps:.0f} | `{label}` |")


if __name__ == "__main__":
  main()
