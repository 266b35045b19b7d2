"""debertax (JAX/XLA) against Hugging Face PyTorch, side by side, on the same shapes and machine.

    python benchmarks/bench.py \
        --sizes xsmall --lengths 128,512 --modes fwd,fwdbwd --rows ours,ours_norel,hf_deberta,hf_bert

Rows (each runs in its own subprocess, so its peak memory is its own):
  ours         debertax encoder, the XLA attention path
  ours_norel   the same with relative_attention=False: plain BERT-style attention in the same framework,
               the ceiling for what the position terms may cost
  ours_flash   debertax encoder with attention_impl="flash" (the Pallas kernel; TPU/GPU only, reported as an
               error on the CPU, and with --dropout: the kernel has no attention-probability dropout)
  hf_deberta   transformers' DebertaV2Model with the same configuration (eager, its only attention)
  hf_bert      transformers' BertModel of the same size (its default attention implementation, printed)
  rtd          the full RTD pretraining step (generator + discriminator + optimizer) of debertax.train
Modes: fwd (inference), fwdbwd (gradient of a scalar loss, mean of squared last hidden states, w.r.t. every
parameter; loss.backward() on the PyTorch side), adamw (fwdbwd + an AdamW update; optax / torch.optim).
Encoders use a 1000-token vocabulary (the encoder cost, not the 128k embedding) and no dropout (`--dropout`
turns it on, train mode for both frameworks). `--dtype bfloat16` runs our model with bf16 compute (float32
parameters, float32 scores and softmax) and the PyTorch rows under torch.autocast(bfloat16).

Measurements: compile time (JAX lower + compile; the first PyTorch step) is reported separately and never
counted in tokens/s; `--warmup` steps are excluded; tokens/s uses the best of `--steps` timed steps (the
machine may be shared). Peak memory: peak RSS of the row's process on the CPU (ru_maxrss; it includes the
framework's own footprint, printed as "base" = RSS before the first step), device peak bytes on a GPU.
GFLOP/s counts the same "useful" FLOPs for every row (debertax.flops: c2p and p2c as one dot product per
query-key pair), so it is comparable across rows; "% ceiling" divides it by a large matmul measured in the
same run, per framework and dtype.
GLIBC_TUNABLES=debertax.compile_options.CPU_MALLOC_TUNABLES (huge pages, large blocks kept on the heap and
reused) is set for every row, both frameworks, unless --no-malloc-tunables is given or GLIBC_TUNABLES is
already set; the header says which setting was used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

SIZES = {  # layers, hidden, heads, ffn
    "xsmall": (12, 384, 6, 1536),
    "small": (6, 768, 12, 3072),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}
ROWS = ("ours", "ours_norel", "ours_flash", "hf_deberta", "hf_bert", "rtd")
MODES = ("fwd", "fwdbwd", "adamw")


# ------------------------------------------------------------------------------------------------------
# Child side: one row, one shape, printed as one JSON line.
# ------------------------------------------------------------------------------------------------------
def _rss_bytes(pid: int | str = "self") -> int:
  """Current resident set size of a process (0 once it has gone)."""
  try:
    with open(f"/proc/{pid}/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return 0


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB.


def _time_steps(run, sync, warmup: int, steps: int) -> tuple[list[float], list[float]]:
  """Wall-clock and process CPU seconds of each timed step (CPU time: all threads of this process)."""
  for _ in range(warmup):
    sync(run())
  times, cpu_times = [], []
  for _ in range(steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    sync(run())
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  return times, cpu_times


def _child_ours(spec: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from debertax import flops
  from debertax.compile_options import jit
  from debertax.config import ModelConfig
  from debertax.heads import build_model, init_params

  layers, hidden, heads, ffn = SIZES[spec["size"]]
  dropout = 0.1 if spec["dropout"] else 0.0
  cfg = ModelConfig(vocab_size=spec["vocab"], hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, intermediate_size=ffn, hidden_dropout_prob=dropout,
                    attention_probs_dropout_prob=dropout, dtype=spec["dtype"],
                    relative_attention=spec["row"] != "ours_norel", query_block_size=spec["query_block_size"],
                    attention_impl="flash" if spec["row"] == "ours_flash" else "xla")
  model = build_model(cfg, "none")
  params = init_params(model, jax.random.PRNGKey(0))
  batch, length = spec["batch"], spec["length"]
  ids = jnp.asarray(np.random.default_rng(0).integers(0, spec["vocab"], (batch, length)), jnp.int32)
  mask = jnp.ones_like(ids)
  deterministic = not spec["dropout"]

  def hidden_states(p, rng):
    return model.apply({"params": p}, ids, mask, deterministic=deterministic, rngs={"dropout": rng})

  def loss(p, rng):
    return jnp.mean(jnp.square(hidden_states(p, rng).astype(jnp.float32)))

  mode = spec["mode"]
  rng = jax.random.PRNGKey(1)
  if mode == "fwd":
    fn, args = jit(hidden_states), (params, rng)
  elif mode == "fwdbwd":
    fn, args = jit(jax.value_and_grad(loss)), (params, rng)
  else:
    tx = optax.adamw(1e-4, weight_decay=0.01)

    def train_step(p, opt_state, rng):
      value, grads = jax.value_and_grad(loss)(p, rng)
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state, value

    fn, args = jit(train_step, donate_argnums=(0, 1)), (params, tx.init(params), rng)
  base_rss = _rss_bytes()
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  state = {"args": args}

  def run():
    out = compiled(*state["args"])
    if mode == "adamw":
      state["args"] = (out[0], out[1], rng)
    return out

  times, cpu_times = _time_steps(run, jax.block_until_ready, spec["warmup"], spec["steps"])
  device = jax.devices()[0]
  result = dict(times=times, cpu_times=cpu_times, compile_s=compile_s, backend=device.platform)
  if device.platform == "cpu":
    result.update(peak_bytes=_peak_rss_bytes(), base_bytes=base_rss)
  else:
    stats = device.memory_stats() or {}
    result.update(peak_bytes=stats.get("peak_bytes_in_use"), base_bytes=None)
  result["flops"] = flops.encoder_flops(cfg, batch, length, backward=mode != "fwd")
  result["flops_computed"] = flops.encoder_flops(cfg, batch, length, backward=mode != "fwd", count="computed")
  return result


def _hf_config(spec):
  import transformers

  layers, hidden, heads, ffn = SIZES[spec["size"]]
  dropout = 0.1 if spec["dropout"] else 0.0
  common = dict(vocab_size=spec["vocab"], hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=ffn, hidden_act="gelu", hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout)
  if spec["row"] == "hf_deberta":
    return transformers.DebertaV2Model, transformers.DebertaV2Config(
        **common, max_position_embeddings=512, type_vocab_size=0, layer_norm_eps=1e-7, relative_attention=True,
        max_relative_positions=-1, position_buckets=256, pos_att_type="p2c|c2p", share_att_key=True,
        norm_rel_ebd="layer_norm", position_biased_input=False)
  return transformers.BertModel, transformers.BertConfig(
      **common, max_position_embeddings=max(512, spec["length"]), type_vocab_size=2, layer_norm_eps=1e-12)


def _child_hf(spec: dict) -> dict:
  import contextlib

  import torch

  from debertax import flops
  from debertax.config import ModelConfig

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  model_cls, config = _hf_config(spec)
  model = model_cls(config).to(device)
  model.train(spec["dropout"])
  batch, length = spec["batch"], spec["length"]
  ids = torch.randint(0, spec["vocab"], (batch, length), device=device)
  mask = torch.ones_like(ids)
  autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if spec["dtype"] == "bfloat16"
              else contextlib.nullcontext())
  mode = spec["mode"]
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01) if mode == "adamw" else None

  def run():
    if mode == "fwd":
      with torch.no_grad(), autocast:
        return model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.zero_grad(set_to_none=True)
    with autocast:
      out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    loss = out.float().square().mean()
    loss.backward()  # Outside autocast, as PyTorch recommends.
    if optimizer is not None:
      optimizer.step()
    return loss

  sync = (lambda _: torch.cuda.synchronize()) if device.type == "cuda" else (lambda _: None)
  base_rss = _rss_bytes()
  start = time.perf_counter()
  sync(run())  # The first step: PyTorch's one-time costs (allocator warm-up), reported as "compile".
  compile_s = time.perf_counter() - start
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  times, cpu_times = _time_steps(run, sync, spec["warmup"], spec["steps"])
  result = dict(times=times, cpu_times=cpu_times, compile_s=compile_s, backend=device.type,
                torch_threads=torch.get_num_threads(),
                attn_implementation=getattr(model.config, "_attn_implementation", None))
  if device.type == "cpu":
    result.update(peak_bytes=_peak_rss_bytes(), base_bytes=base_rss)
  else:
    result.update(peak_bytes=torch.cuda.max_memory_allocated(), base_bytes=None)
  layers, hidden, heads, ffn = SIZES[spec["size"]]
  ours = ModelConfig(vocab_size=spec["vocab"], hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, relative_attention=spec["row"] == "hf_deberta")
  result["flops"] = flops.encoder_flops(ours, batch, length, backward=mode != "fwd")
  return result


def _child_rtd(spec: dict) -> dict:
  try:
    from debertax import train as train_lib
  except ImportError as err:
    return {"skipped": f"debertax.train not available yet ({err})"}
  import importlib

  import jax
  import numpy as np

  from debertax import flops

  config = importlib.import_module(f"configs.deberta_v3_{spec['size']}").get_config()
  config.model.vocab_size = spec["vocab"]
  config.model.dtype = spec["dtype"]
  config.model.query_block_size = spec["query_block_size"]
  config.train.batch_size = spec["batch"]
  config.data.seq_len = spec["length"]
  trainer = train_lib.Trainer(config)
  state = trainer.init(0)
  batch, length = spec["batch"], spec["length"]
  rng = np.random.default_rng(0)
  original = rng.integers(5, spec["vocab"], (batch, length)).astype(np.int32)
  mlm_mask = rng.random((batch, length)) < float(config.data.mask_prob)
  inputs = np.where(mlm_mask, 4, original).astype(np.int32)  # Any fixed [MASK] id: the cost is the same.
  data = dict(input_ids=inputs, original_ids=original, attention_mask=np.ones((batch, length), np.int32),
              mlm_mask=mlm_mask)
  holder = {"state": state}

  def run():
    holder["state"], metrics = trainer.step(holder["state"], data)
    return metrics

  base_rss = _rss_bytes()
  start = time.perf_counter()
  jax.block_until_ready(run())  # Trainer.step compiles on its first call.
  compile_s = time.perf_counter() - start
  times, cpu_times = _time_steps(run, jax.block_until_ready, spec["warmup"], spec["steps"])
  device = jax.devices()[0]
  result = dict(times=times, cpu_times=cpu_times, compile_s=compile_s, compile_includes_first_step=True,
                backend=device.platform)
  if device.platform == "cpu":
    result.update(peak_bytes=_peak_rss_bytes(), base_bytes=base_rss)
  else:
    result.update(peak_bytes=(device.memory_stats() or {}).get("peak_bytes_in_use"), base_bytes=None)
  result["flops"] = flops.rtd_step_flops(trainer.disc_config, trainer.gen_config, batch, length,
                                         trainer.num_predictions)
  return result


def _child_matmul(spec: dict) -> dict:
  """Best FLOP/s of a large square matmul, per framework and dtype: the ceiling for '% ceiling'.

  Returns the rate over wall time and over process CPU time / threads in use (for --metric cpu)."""
  size, dtype, repeats = spec["size"], spec["dtype"], 5
  threads = len(os.sched_getaffinity(0))
  if spec["row"] == "matmul_jax":
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul)
    run, sync = (lambda: matmul(a, b)), jax.block_until_ready
  else:
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    a = torch.randn(size, size, device=device, dtype=dt)
    b = torch.randn(size, size, device=device, dtype=dt)
    run = lambda: torch.matmul(a, b)
    sync = (lambda _: torch.cuda.synchronize()) if device.type == "cuda" else (lambda _: None)
    threads = min(threads, torch.get_num_threads())
  times, cpu_times = _time_steps(run, sync, 1, repeats)
  flops = 2.0 * size ** 3
  return {"flops_per_s": flops / min(times), "flops_per_cpu_s": flops / (min(cpu_times) / threads)}


def run_child(spec: dict) -> dict:
  threads = spec.get("threads", 0)
  if threads > 0:  # Pin before any framework starts its thread pools.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    if spec["row"].startswith(("hf_", "matmul_torch")):
      import torch
      torch.set_num_threads(threads)
  row = spec["row"]
  if row in ("ours", "ours_norel", "ours_flash"):
    return _child_ours(spec)
  if row in ("hf_deberta", "hf_bert"):
    return _child_hf(spec)
  if row == "rtd":
    return _child_rtd(spec)
  if row in ("matmul_jax", "matmul_torch"):
    return _child_matmul(spec)
  raise ValueError(f"unknown row {row!r}")


# ------------------------------------------------------------------------------------------------------
# Parent side: machine info, the subprocesses, the table.
# ------------------------------------------------------------------------------------------------------
def _child_env(args) -> tuple[dict, str]:
  env = dict(os.environ)
  from debertax.compile_options import CPU_MALLOC_TUNABLES
  if args.no_malloc_tunables:
    env.pop("GLIBC_TUNABLES", None)
    setting = "unset (--no-malloc-tunables)"
  elif "GLIBC_TUNABLES" in env:
    setting = f"{env['GLIBC_TUNABLES']} (from the environment)"
  else:
    env["GLIBC_TUNABLES"] = CPU_MALLOC_TUNABLES
    setting = f"{CPU_MALLOC_TUNABLES} (set by bench.py)"
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # GPU: memory_stats peaks, not the pool size.
  return env, setting


def _spawn(spec: dict, env: dict, timeout: int, max_rss_bytes: float = float("inf")) -> dict:
  """Runs one row in its own process; kills it past `timeout` seconds or `max_rss_bytes` of RSS (so that a
  row that cannot fit, such as Hugging Face at L = 8192, is reported instead of taking the machine down)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, cwd=REPO)
    start, peak, killed_for = time.monotonic(), 0, None
    while proc.poll() is None:
      peak = max(peak, _rss_bytes(proc.pid))
      if peak > max_rss_bytes:
        killed_for = f"over the --max-memory-gb limit ({peak / 2**30:.1f} GiB RSS)"
      elif time.monotonic() - start > timeout:
        killed_for = f"timed out after {timeout} s"
      if killed_for:
        proc.kill()
        proc.wait()
        return {"error": killed_for}
      time.sleep(0.2)
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
  for line in reversed(stdout.splitlines()):
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  lines = (stderr or stdout).strip().splitlines()
  tail = lines[-3:]
  why = "killed (likely out of memory)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
  sys.stderr.write(f"[bench] {spec['row']} {spec.get('size')} L={spec.get('length')} {spec.get('mode')}: {why}\n"
                   + "\n".join(tail) + "\n")
  # The exception line, not JAX's traceback-filtering notice that follows it.
  raised = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line)]
  reason = (raised or tail or [""])[-1]
  return {"error": why + (": " + reason[:160] if reason else "")}


def _total_memory_bytes() -> float:
  try:
    with open("/proc/meminfo") as f:
      return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024.0
  except (OSError, StopIteration):
    return float("inf")


def _machine_info(env_setting: str) -> list[str]:
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  total = _total_memory_bytes()
  mem = f"{total / 2**30:.1f} GiB" if total < float("inf") else "unknown"
  versions = []
  for module in ("jax", "jaxlib", "flax", "torch", "transformers"):
    try:
      versions.append(f"{module} {__import__(module).__version__}")
    except ImportError:
      versions.append(f"{module} (not installed)")
  lines = [f"- CPU: {cpu}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable), memory {mem}",
           f"- Python {platform.python_version()}; " + ", ".join(versions),
           f"- GLIBC_TUNABLES for every row: {env_setting}",
           f"- XLA_FLAGS: {os.environ.get('XLA_FLAGS') or '(unset)'}",
           "- Load average before the run (1/5/15 min): " + " / ".join(f"{x:.1f}" for x in os.getloadavg())
           + " (other processes on the machine slow both frameworks)"]
  try:
    import jax
    lines.append(f"- JAX devices: {', '.join(sorted({d.device_kind for d in jax.devices()}))} "
                 f"({jax.default_backend()})")
  except ImportError:
    pass
  try:
    import torch
    lines.append(f"- torch: {torch.get_num_threads()} threads"
                 + (f", CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", CPU"))
  except ImportError:
    pass
  return lines


def _fmt_bytes(n):
  return "-" if n is None else f"{n / 2**30:.2f}"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="xsmall,base")
  parser.add_argument("--lengths", default="128,512,2048")
  parser.add_argument("--modes", default="fwd,fwdbwd", help=f"comma list of {MODES}")
  parser.add_argument("--rows", default="ours,ours_norel,hf_deberta,hf_bert,rtd", help=f"comma list of {ROWS}")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--long-batch", type=int, default=1, help="batch for lengths >= --long-from")
  parser.add_argument("--long-from", type=int, default=2048)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per row (best is reported)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  parser.add_argument("--rounds", type=int, default=1,
                      help="run every row this many times, interleaved, and keep each row's best (noisy machines)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--vocab", type=int, default=1000)
  parser.add_argument("--dropout", action="store_true", help="dropout 0.1 in train mode (both frameworks)")
  parser.add_argument("--query-block-size", type=int, default=0,
                      help="model.query_block_size for our rows (0: automatic, see debertax/attention.py)")
  parser.add_argument("--matmul-size", type=int, default=3072)
  parser.add_argument("--no-matmul", action="store_true", help="skip the matmul ceiling measurement")
  parser.add_argument("--child-timeout", type=int, default=1200)
  parser.add_argument("--max-memory-gb", type=float, default=0.0,
                      help="kill a row whose RSS passes this many GiB and report it (0: 85%% of the machine's memory)")
  parser.add_argument("--no-malloc-tunables", action="store_true",
                      help="do not set GLIBC_TUNABLES for the rows (glibc's default malloc behaviour)")
  parser.add_argument("--threads", type=int, default=0,
                      help="pin every row to this many cores (0: all). With 1, process CPU time is a load-robust "
                           "measure of each framework's work")
  parser.add_argument("--metric", default="wall", choices=("wall", "cpu"),
                      help="what tokens/s and the ratios divide by: best wall-clock step, or best process CPU "
                           "seconds per step divided by the threads in use (robust on a loaded machine when "
                           "--threads 1)")
  parser.add_argument("--json", help="also write every raw result to this file")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.child:
    print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
    return

  rows = [r for r in args.rows.split(",") if r]
  modes = [m for m in args.modes.split(",") if m]
  for name, values, allowed in (("rows", rows, ROWS), ("modes", modes, MODES),
                                ("sizes", args.sizes.split(","), SIZES)):
    bad = [v for v in values if v not in allowed]
    if bad:
      parser.error(f"unknown {name} {bad}; choose from {list(allowed)}")
  env, env_setting = _child_env(args)
  max_rss = args.max_memory_gb * 2**30 if args.max_memory_gb > 0 else 0.85 * _total_memory_bytes()
  command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)] + sys.argv[1:])
  print(f"## debertax benchmark ({args.dtype})\n\nCommand: `{command}`\n")
  print("\n".join(_machine_info(env_setting)) + "\n", flush=True)

  ceilings = {}
  if not args.no_matmul:
    for framework in ("jax", "torch"):
      res = _spawn({"row": f"matmul_{framework}", "size": args.matmul_size, "dtype": args.dtype,
                    "threads": args.threads}, env, args.child_timeout, max_rss)
      ceilings[framework] = res.get("flops_per_s" if args.metric == "wall" else "flops_per_cpu_s")
    print(f"Matmul ceiling ({args.matmul_size}^3, {args.dtype}): " + ", ".join(
        f"{k} {v / 1e9:.0f} GFLOP/s" if v else f"{k} failed" for k, v in ceilings.items()) + "\n", flush=True)

  usable = len(os.sched_getaffinity(0))
  threads_in_use = min(args.threads, usable) if args.threads > 0 else usable

  def step_s(res):
    """Seconds per step under --metric: the best wall time, or the best CPU time / threads in use."""
    if args.metric == "wall":
      return min(res["times"])
    return min(res["cpu_times"]) / threads_in_use

  if args.metric == "cpu":
    print(f"tokens/s, ms/step, ratios and GFLOP/s below use process CPU seconds / {threads_in_use} thread(s), "
          "not wall time.\n")
  header = ("| size | L | B | mode | row | tokens/s | ms/step | compile s | peak GiB (base) | vs HF DeBERTa | "
            "vs HF BERT | GFLOP/s | % ceiling |")
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  all_results = []
  for size in args.sizes.split(","):
    for length in (int(x) for x in args.lengths.split(",")):
      batch = args.long_batch if length >= args.long_from else args.batch
      for mode in modes:
        shape_rows = [r for r in rows if r != "rtd"]
        if "rtd" in rows and mode == modes[-1]:
          shape_rows.append("rtd")  # One RTD row per shape (it is always a full training step).
        results = {}
        for _ in range(args.rounds):
          for row in shape_rows:
            spec = dict(row=row, size=size, length=length, batch=batch, mode=mode if row != "rtd" else "rtd",
                        steps=args.steps, warmup=args.warmup, dtype=args.dtype, vocab=args.vocab,
                        dropout=args.dropout, query_block_size=args.query_block_size, threads=args.threads)
            res = _spawn(spec, env, args.child_timeout, max_rss)
            res["spec"] = spec
            best = results.get(row)
            if best is None or ("times" in res and ("times" not in best or step_s(res) < step_s(best))):
              results[row] = res
        all_results.extend(results.values())
        tps = {r: batch * length / step_s(v) for r, v in results.items() if "times" in v}
        for row in shape_rows:
          res = results[row]
          label = "rtd step" if row == "rtd" else mode
          if "times" not in res:
            why = res.get("skipped") or res.get("error")
            print(f"| {size} | {length} | {batch} | {label} | {row} | {why} | | | | | | | |", flush=True)
            continue
          best = step_s(res)
          rate = res["flops"] / best
          framework = "torch" if row.startswith("hf_") else "jax"
          ceiling = ceilings.get(framework)
          vs = lambda ref: (f"{tps[row] / tps[ref]:.2f}x" if ref in tps and row != "rtd" else "")
          peak = f"{_fmt_bytes(res['peak_bytes'])} ({_fmt_bytes(res.get('base_bytes'))})"
          extra = f" [{res['attn_implementation']}]" if res.get("attn_implementation") else ""
          share = f"{100 * rate / ceiling:.0f}%" if ceiling else "-"
          print(f"| {size} | {length} | {batch} | {label} | {row}{extra} | {tps[row]:.0f} | {best * 1e3:.0f} | "
                f"{res['compile_s']:.1f} | {peak} | {vs('hf_deberta')} | {vs('hf_bert')} | {rate / 1e9:.1f} | "
                f"{share} |", flush=True)
  print("\nLoad average after the run (1/5/15 min): " + " / ".join(f"{x:.1f}" for x in os.getloadavg()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(command=command, ceilings=ceilings, glibc_tunables=env_setting, results=all_results), f,
                indent=1)


if __name__ == "__main__":
  main()
