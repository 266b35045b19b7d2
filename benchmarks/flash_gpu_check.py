"""Device check of the flash disentangled-attention kernel (`attention_impl="flash"`) on a lent GPU.

    PYTHONUNBUFFERED=1 python benchmarks/flash_gpu_check.py --out $OUT/flash_gpu_check.md
    python benchmarks/flash_gpu_check.py --dry_run          # the CPU: tiny shapes, Pallas interpret mode

1. Correctness: `flash_attention.disentangled_flash_attention` against `disentangled_attention_xla`, output
   and the gradients of q, k, v and both [2k, H, d] relative tables, at L = 512 and 2048 (B = 2, H = 6,
   d = 64, v3 buckets; one sequence 30% padding). float32 runs both paths under
   jax.default_matmul_precision("highest") and passes at max|flash - xla| <= 1e-5 * max|xla| per array.
   bfloat16 compares both paths against the float32 result and passes when flash's error is at most
   twice XLA's (+ 1e-3 of the array's scale).
2. Speed and memory: forward + backward (gradient of mean(h^2) w.r.t. every parameter) of the xsmall
   encoder (12 layers, hidden 384, 6 heads, ffn 1536; 1000-token vocabulary, so the encoder dominates; bf16
   compute, no dropout), flash vs xla, at L = 512 and 2048 with batch 8, and 8192 with batch 1.
   tokens/s = B * L / (best of the timed steps); compile time is separate; peak memory is the device's
   `memory_stats()["peak_bytes_in_use"]`.
3. The attention core alone (bf16, B x L x 6 x 64): forward, and forward + backward, flash (fused Pallas
   backward), flash_blocked (the XLA blocked-recompute backward) and xla, at L = 2048 (batch 8) and 8192
   (batch 1): separates the kernels from the rest of the model.

Every check and every timing row runs in its own subprocess, so an OOM, a lowering error or a crash is
reported on its row (and the peak memory is that row's own). --sections picks some of the three. A time budget (--budget_s, default 400 s)
skips the rows that no longer fit. Results are printed as markdown tables and written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_TAG = "RESULT_JSON "


# ------------------------------------------------------------------------------------------------
# Children (run in a fresh process each).


def _setup_child(dry_run: bool):
  sys.path.insert(0, ROOT)
  if dry_run:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _check_child(length: int, dtype_name: str, dry_run: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from debertax import flash_attention
  from debertax.attention import disentangled_attention_xla
  from debertax.relative_position import distance_to_table_index

  batch, heads, dim, buckets, span = (2, 2, 8, 8, 32) if dry_run else (2, 6, 64, 256, 512)
  backend = "interpret" if dry_run else "auto"
  rng = np.random.default_rng(length)
  scale = 1.0 / np.sqrt(3 * dim)
  q = rng.normal(size=(batch, length, heads, dim)).astype(np.float32) * scale
  k, v = (rng.normal(size=(batch, length, heads, dim)).astype(np.float32) for _ in range(2))
  kr_table = rng.normal(size=(2 * buckets, heads, dim)).astype(np.float32)
  qr_table = rng.normal(size=(2 * buckets, heads, dim)).astype(np.float32) * scale
  mask = np.ones((batch, length), bool)
  mask[-1, int(length * 0.7):] = False
  weights = rng.normal(size=q.shape).astype(np.float32)
  index = jnp.asarray(distance_to_table_index(length, buckets, span))
  terms = ("c2p", "p2c")

  def xla(q, k, v, kr, qr):
    return disentangled_attention_xla(q, k, v, kr[index], qr[index], mask, pos_terms=terms)

  def flash(q, k, v, kr, qr):
    return flash_attention.disentangled_flash_attention(
        q, k, v, mask, kr_table=kr, qr_table=qr, pos_terms=terms, position_buckets=buckets,
        max_relative_span=span, backend=backend)

  def run(fn, dtype):
    @jax.jit
    def forward_backward(*xs):
      out, vjp = jax.vjp(fn, *xs)
      return (out,) + vjp(jnp.asarray(weights, out.dtype))
    xs = [jnp.asarray(x, dtype) for x in (q, k, v, kr_table, qr_table)]
    return [np.asarray(y.astype(jnp.float32)) for y in forward_backward(*xs)]

  names = ("out", "dq", "dk", "dv", "dkr", "dqr")
  scaled_error = lambda got, ref: float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))
  if dtype_name == "float32":
    with jax.default_matmul_precision("highest"):
      expected = run(xla, jnp.float32)
      got = run(flash, jnp.float32)
    errors = {n: scaled_error(g, e) for n, g, e in zip(names, got, expected)}
    ok = all(err <= 1e-5 for err in errors.values())
    return dict(errors=errors, ok=ok)
  with jax.default_matmul_precision("highest"):
    reference = run(xla, jnp.float32)
  xla_low = run(xla, jnp.bfloat16)
  flash_low = run(flash, jnp.bfloat16)
  errors = {n: scaled_error(g, r) for n, g, r in zip(names, flash_low, reference)}
  xla_errors = {n: scaled_error(g, r) for n, g, r in zip(names, xla_low, reference)}
  ok = all(errors[n] <= 2 * xla_errors[n] + 1e-3 for n in names)
  return dict(errors=errors, xla_errors=xla_errors, ok=ok)


def _core_child(impl: str, length: int, batch: int, dry_run: bool, steps: int) -> dict:
  """The attention core alone (bf16): forward, and forward + backward, each timed separately."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from debertax import flash_attention
  from debertax.attention import disentangled_attention_xla, saturation_distance
  from debertax.relative_position import distance_to_table_index

  heads, dim, buckets, span = (2, 8, 8, 32) if dry_run else (6, 64, 256, 512)
  rng = np.random.default_rng(0)
  bf16 = jnp.bfloat16
  q, k, v = (jnp.asarray(rng.normal(size=(batch, length, heads, dim)) * 0.2, bf16) for _ in range(3))
  kr, qr = (jnp.asarray(rng.normal(size=(2 * buckets, heads, dim)) * 0.2, bf16) for _ in range(2))
  mask = jnp.ones((batch, length), bool)
  terms = ("c2p", "p2c")
  if impl.startswith("flash"):  # flash: the fused Pallas backward; flash_blocked: the XLA blocked recompute
    backward = "blocked" if impl == "flash_blocked" else "fused"
    fn = lambda q, k, v, kr, qr: flash_attention.disentangled_flash_attention(
        q, k, v, mask, kr_table=kr, qr_table=qr, pos_terms=terms, position_buckets=buckets,
        max_relative_span=span, backend="interpret" if dry_run else "auto", backward=backward)
  else:
    index = distance_to_table_index(length, buckets, span)
    saturation = saturation_distance(index)  # as the model passes it: the far-key shortcut
    fn = lambda q, k, v, kr, qr: disentangled_attention_xla(
        q, k, v, kr[jnp.asarray(index)], qr[jnp.asarray(index)], mask, pos_terms=terms, saturation=saturation)
  forward = jax.jit(fn)
  forward_backward = jax.jit(lambda *xs: jax.vjp(fn, *xs)[1](jnp.ones_like(xs[0])))
  result = dict(ok=True)
  for name, compiled in (("fwd_ms", forward), ("fwdbwd_ms", forward_backward)):
    jax.block_until_ready(compiled(q, k, v, kr, qr))  # compile + warm-up
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      jax.block_until_ready(compiled(q, k, v, kr, qr))
      times.append(time.perf_counter() - start)
    result[name] = min(times) * 1e3
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  result["peak_gib"] = peak / 2**30 if peak is not None else None
  return result


def _bench_child(impl: str, length: int, batch: int, dry_run: bool, steps: int) -> dict:
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np

  from debertax.config import ModelConfig
  from debertax.heads import build_model, init_params

  if dry_run:
    shape = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, position_buckets=8, max_position_embeddings=32)
  else:
    shape = dict(vocab_size=1000, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                 intermediate_size=1536)
  fields = dict(shape, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dtype="bfloat16",
                attention_impl=impl)
  config_cls = ModelConfig
  if dry_run and impl == "flash" and "flash_backend" not in {f.name for f in dataclasses.fields(ModelConfig)}:
    @dataclasses.dataclass(frozen=True)
    class InterpretConfig(ModelConfig):  # Only the CPU dry run needs a non-default flash backend.
      flash_backend: str = "interpret"
    config_cls = InterpretConfig
  elif dry_run and impl == "flash":
    fields["flash_backend"] = "interpret"
  model = build_model(config_cls(**fields))
  params = init_params(model, jax.random.key(0), length=8)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(4, shape["vocab_size"], size=(batch, length)), jnp.int32)
  attention_mask = jnp.ones((batch, length), jnp.int32)

  def loss(p):
    hidden = model.apply({"params": p}, ids, attention_mask)
    return jnp.mean(jnp.square(hidden.astype(jnp.float32)))

  step = jax.jit(jax.value_and_grad(loss))
  start = time.perf_counter()
  compiled = step.lower(params).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(params))  # warm-up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params))
    times.append(time.perf_counter() - start)
  best = min(times)
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return dict(tokens_per_s=batch * length / best, step_ms=best * 1e3, compile_s=compile_s,
              peak_gib=peak / 2**30 if peak is not None else None, ok=True)


# ------------------------------------------------------------------------------------------------
# Parent.


FAILURE_LOGS = []  # (child arguments, its output tail) of every failed child, for the log file.


def _run_child(args_list, timeout_s):
  """Runs this script as a child; returns (result dict or None, failure text)."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  try:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)] + args_list, capture_output=True,
                          text=True, timeout=timeout_s, env=env)
  except subprocess.TimeoutExpired as timeout:
    FAILURE_LOGS.append((args_list, str(timeout.stderr)[-4000:] if timeout.stderr else ""))
    return None, f"timeout after {timeout_s:.0f} s"
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_TAG):
      return json.loads(line[len(RESULT_TAG):]), ""
  FAILURE_LOGS.append((args_list, (proc.stdout[-2000:] + "\n" + proc.stderr[-12000:]).strip()))
  text = (proc.stderr or proc.stdout).strip().splitlines()
  if any("RESOURCE_EXHAUSTED" in l or "out of memory" in l.lower() for l in text):
    return None, "OOM (RESOURCE_EXHAUSTED)"
  errors = [l for l in text if "Error" in l or "error:" in l]
  reason = (errors[-1] if errors else (text[-1] if text else f"exit code {proc.returncode}"))
  return None, f"FAILED (exit {proc.returncode}): {reason.strip()[:300]}"


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dry_run", action="store_true", help="tiny shapes, Pallas interpret mode (the CPU)")
  parser.add_argument("--budget_s", type=float, default=400.0, help="skip rows once this much time is spent")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per speed row (best is reported)")
  parser.add_argument("--out", default="", help="also write the markdown report here")
  parser.add_argument("--sections", default="check,encoder,core",
                      help="comma list of: check (1), encoder (2), core (3)")
  parser.add_argument("--check_lengths", default="", help="comma list overriding section 1's lengths")
  parser.add_argument("--check_dtypes", default="float32,bfloat16", help="comma list for section 1")
  parser.add_argument("--keep_going", action="store_true",
                      help="run the timing rows even if the first kernel check crashed")
  parser.add_argument("--child", choices=("check", "core", "bench"), help=argparse.SUPPRESS)
  parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--dtype", help=argparse.SUPPRESS)
  parser.add_argument("--impl", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.child:
    _setup_child(args.dry_run)
    if args.child == "check":
      result = _check_child(args.length, args.dtype, args.dry_run)
    elif args.child == "core":
      result = _core_child(args.impl, args.length, args.batch, args.dry_run, args.steps)
    else:
      result = _bench_child(args.impl, args.length, args.batch, args.dry_run, args.steps)
    print(RESULT_TAG + json.dumps(result), flush=True)
    return

  started = time.perf_counter()
  dry = ["--dry_run"] if args.dry_run else []
  lengths = (16, 40, 96) if args.dry_run else (512, 2048, 8192)
  report = []

  def emit(line=""):
    print(line, flush=True)
    report.append(line)

  def remaining():
    return args.budget_s - (time.perf_counter() - started)

  if not args.dry_run:
    probe = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices()[0]; "
                            "print(jax.__version__, d.platform, getattr(d, 'device_kind', ''))"],
                           capture_output=True, text=True)
    emit(f"jax / platform / device: {probe.stdout.strip() or probe.stderr.strip()[-300:]}")
  sections = set(args.sections.split(","))
  if "check" in sections:
    emit("")
    emit("### 1. flash vs xla: max |difference| / max |xla| per array (bf16: vs the float32 result; xla's own error in brackets)")
    emit("")
    emit("| L | dtype | out | dq | dk | dv | dkr_table | dqr_table | status |")
    emit("|---|---|---|---|---|---|---|---|---|")
  kernel_crashed = any_check_ran = False
  check_lengths = [int(x) for x in args.check_lengths.split(",") if x] or lengths[:2]
  for length in (check_lengths if "check" in sections else ()):
    for dtype in args.check_dtypes.split(","):
      if remaining() < 20:
        emit(f"| {length} | {dtype} | | | | | | | skipped (time budget) |")
        continue
      result, failure = _run_child(["--child", "check", "--length", str(length), "--dtype", dtype] + dry,
                                   timeout_s=min(150.0, remaining()))
      if result is None:
        emit(f"| {length} | {dtype} | | | | | | | {failure} |")
        kernel_crashed = kernel_crashed or not any_check_ran
        continue
      any_check_ran = True
      cells = []
      for name in ("out", "dq", "dk", "dv", "dkr", "dqr"):
        cell = f"{result['errors'][name]:.1e}"
        if "xla_errors" in result:
          cell += f" ({result['xla_errors'][name]:.1e})"
        cells.append(cell)
      emit(f"| {length} | {dtype} | " + " | ".join(cells) + f" | {'PASS' if result['ok'] else 'FAIL'} |")

  if kernel_crashed and not args.keep_going:
    emit("")
    emit("The first kernel check crashed: timing rows skipped (--keep_going runs them anyway).")
    _finish(args, report, started)
    return

  if "encoder" in sections:
    emit("")
    emit("### 2. xsmall encoder forward+backward, bf16 compute")
    emit("")
    emit("| impl | L | batch | tokens/s | step ms | compile s | peak GiB | status |")
    emit("|---|---|---|---|---|---|---|---|")
  for length in (lengths if "encoder" in sections else ()):
    batch = 1 if length == lengths[-1] else 8
    for impl in ("flash", "xla"):
      if remaining() < 30:
        emit(f"| {impl} | {length} | {batch} | | | | | skipped (time budget) |")
        continue
      result, failure = _run_child(
          ["--child", "bench", "--impl", impl, "--length", str(length), "--batch", str(batch),
           "--steps", str(args.steps)] + dry, timeout_s=min(180.0, remaining()))
      if result is None:
        emit(f"| {impl} | {length} | {batch} | | | | | {failure} |")
        continue
      emit(f"| {impl} | {length} | {batch} | {result['tokens_per_s']:.0f} | {result['step_ms']:.1f} | "
           f"{result['compile_s']:.1f} | {_fmt(result['peak_gib'], '.2f')} | ok |")
  if "core" in sections:
    emit("")
    emit("### 3. attention core alone (B x L x 6 heads x 64, v3 buckets, no padding, bf16), best of the timed calls")
    emit("")
    emit("| impl | L | batch | forward ms | forward+backward ms | peak GiB | status |")
    emit("|---|---|---|---|---|---|---|")
  for length in (lengths[1:] if "core" in sections else ()):
    batch = 1 if length == lengths[-1] else 8
    for impl in ("flash", "flash_blocked", "xla"):
      if remaining() < 40:
        emit(f"| {impl} | {length} | {batch} | | | | skipped (time budget) |")
        continue
      result, failure = _run_child(
          ["--child", "core", "--impl", impl, "--length", str(length), "--batch", str(batch),
           "--steps", str(args.steps)] + dry, timeout_s=min(90.0, remaining()))
      if result is None:
        emit(f"| {impl} | {length} | {batch} | | | | {failure} |")
        continue
      emit(f"| {impl} | {length} | {batch} | {result['fwd_ms']:.2f} | {result['fwdbwd_ms']:.2f} | "
           f"{_fmt(result['peak_gib'], '.2f')} | ok |")

  _finish(args, report, started)


def _finish(args, report, started):
  report.append("")
  report.append(f"total {time.perf_counter() - started:.0f} s")
  print(report[-1], flush=True)
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(report) + "\n")
  if FAILURE_LOGS:
    log_path = (os.path.splitext(args.out)[0] if args.out else "flash_gpu_check") + "_failures.log"
    with open(log_path, "w") as f:
      for child_args, text in FAILURE_LOGS:
        f.write(f"===== {' '.join(child_args)}\n{text}\n\n")
    print(f"failure logs: {log_path}", flush=True)


if __name__ == "__main__":
  main()
