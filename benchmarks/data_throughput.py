"""Will the input pipeline keep a TPU host fed? One process of `PretrainingIterator` against what one host's
chips consume at the MFU goal.

    .venv/bin/python benchmarks/data_throughput.py [--vocab_sizes=2000,32000,128000] [--vocab=path/spm.model ...]
        [--text='../shared/data/text/**/*.txt'] [--seq_len=512] [--batch_size=64] [--seconds=30]

For each vocabulary (trained here with `debertax.tokenizer.train_sentencepiece` on the same text, cached in
--workdir, or given with --vocab), one process reads the text files (one document per line) through the
whole pipeline (bounded reads, tokenisation, packing, shuffling, masking) for --seconds after a warm-up of
--warmup_batches, and reports real (non-pad) tokens per second. The consumption side is computed, not
measured: the mdeberta-base RTD step's FLOPs per token (`flops.rtd_step_flops`, 80 predictions per 512
tokens, 251k vocabulary) and the bf16 peaks of `flops.ACCELERATOR_PEAKS`, at --mfu, for one host of 4 TPU v4
chips and of 8 TPU v5e chips. Prints a markdown table and the command that reproduces it, and writes both
to --output. Run it on an otherwise idle machine: it measures one process, whose SentencePiece batch
encoding uses every core (the packing and masking run in the process's one Python thread).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_list("vocab_sizes", ["2000", "32000", "128000"], "Vocabulary sizes to train and measure.")
flags.DEFINE_multi_string("vocab", [], "spm.model files to measure as well (e.g. mdeberta-v3-base's).")
flags.DEFINE_string("text", os.path.join(os.path.dirname(ROOT), "shared", "data", "text", "**", "*.txt"),
                    "Text files (a glob), one document per line.")
flags.DEFINE_integer("seq_len", 512, "Sequence length.")
flags.DEFINE_integer("batch_size", 64, "Sequences per batch (one host's share).")
flags.DEFINE_float("seconds", 30.0, "Measured seconds per vocabulary, after the warm-up.")
flags.DEFINE_integer("warmup_batches", 3, "Batches read before the clock starts.")
flags.DEFINE_float("mfu", 0.45, "Model FLOPs utilisation of the consumption column.")
flags.DEFINE_string("workdir", "/tmp/data_throughput", "Where trained vocabularies are cached.")
flags.DEFINE_string("output", "", "Markdown report (default: <workdir>/REPORT.md).")

HOSTS = (("TPU v4", 4), ("TPU v5 lite", 8))  # (ACCELERATOR_PEAKS name, chips per host)


def vocabulary(size: int) -> str:
  """A `size`-piece vocabulary trained on --text (cached by size and text)."""
  from debertax.data import source_lines
  from debertax.tokenizer import train_sentencepiece
  directory = os.path.join(FLAGS.workdir, f"vocab_{size}")
  path = os.path.join(directory, "spm.model")
  stamp = os.path.join(directory, "source.json")
  if os.path.exists(path) and os.path.exists(stamp) and json.load(open(stamp)) == {"text": FLAGS.text}:
    return path
  started = time.time()
  print(f"[vocab {size}] training on {FLAGS.text} ...", flush=True)
  train_sentencepiece(source_lines(FLAGS.text, on_bad_line="skip"), directory, size)
  with open(stamp, "w") as f:
    json.dump({"text": FLAGS.text}, f)
  print(f"[vocab {size}] {time.time() - started:.0f} s", flush=True)
  return path


def measure(spm_path: str) -> dict:
  from debertax.data import DataConfig, PretrainingIterator
  from debertax.tokenizer import Tokenizer
  tokenizer = Tokenizer.load(spm_path)
  config = DataConfig(source=FLAGS.text, vocab_path=spm_path, seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size,
                      on_bad_line="skip")
  iterator = PretrainingIterator(config, tokenizer, 0, 1)
  for _ in range(FLAGS.warmup_batches):
    next(iterator)
  tokens = batches = 0
  started = time.perf_counter()
  while time.perf_counter() - started < FLAGS.seconds:
    batch = next(iterator)
    tokens += int(batch["attention_mask"].sum())
    batches += 1
  elapsed = time.perf_counter() - started
  return {"vocab": os.path.relpath(spm_path, ROOT) if spm_path.startswith(ROOT) else spm_path,
          "pieces": tokenizer.vocab_size, "tokens_per_s": tokens / elapsed, "batches": batches}


def consumption() -> tuple[list[tuple[str, int, float]], float]:
  """([(accelerator, chips per host, tokens/s one host consumes)] for mdeberta-base at --mfu, FLOPs per token)."""
  from configs import mdeberta_base
  from debertax import flops
  from debertax.train import model_configs
  config = mdeberta_base.get_config()
  disc, gen = model_configs(config)
  per_token = flops.rtd_step_flops(disc, gen, 1, FLAGS.seq_len, -(-FLAGS.seq_len * 80 // 512)) / FLAGS.seq_len
  peaks = dict(flops.ACCELERATOR_PEAKS)
  return [(name, chips, FLAGS.mfu * peaks[name]["bfloat16"] * chips / per_token) for name, chips in HOSTS], per_token


def main(argv):
  del argv
  os.makedirs(FLAGS.workdir, exist_ok=True)
  paths = [vocabulary(int(size)) for size in FLAGS.vocab_sizes] + list(FLAGS.vocab)
  rows = []
  for path in paths:
    result = measure(path)
    print(f"[measure] {result['pieces']:,} pieces: {result['tokens_per_s']:,.0f} tokens/s", flush=True)
    rows.append(result)
  hosts, per_token = consumption()
  from debertax.compile_options import CPU_MALLOC_TUNABLES
  command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT), *sys.argv])
  lines = ["# Input pipeline throughput vs one TPU host's consumption", "",
           f"Command: `{command}` (GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}; the project's "
           f"setting is {CPU_MALLOC_TUNABLES})", "",
           f"One `PretrainingIterator` process, seq {FLAGS.seq_len}, batch {FLAGS.batch_size}, {FLAGS.text}, "
           f"{FLAGS.seconds:g} s per vocabulary after {FLAGS.warmup_batches} warm-up batches; real (non-pad) "
           "tokens.", "",
           "| vocabulary | pieces | tokens/s (1 process) | " + " | ".join(
               f"processes for one {name} host ({chips} chips)" for name, chips, _ in hosts) + " |",
           "|---|---|---|" + "---|" * len(hosts)]
  for row in rows:
    needed = " | ".join(f"{rate / row['tokens_per_s']:.2f}" for _, _, rate in hosts)
    lines.append(f"| {row['vocab']} | {row['pieces']:,} | {row['tokens_per_s']:,.0f} | {needed} |")
  lines += ["", f"Consumption (computed): the mdeberta-base RTD step costs {per_token / 1e9:.2f} GFLOP per token "
            "(generator + discriminator, forward + backward, MLM head on 80 of 512 positions); at "
            f"{FLAGS.mfu:.0%} MFU in bf16 " + "; ".join(
                f"one {name} host of {chips} chips consumes {rate:,.0f} tokens/s" for name, chips, rate in hosts)
            + ". A 'processes' value above 1 means one pipeline process cannot keep that host fed."]
  report = "\n".join(lines)
  output = FLAGS.output or os.path.join(FLAGS.workdir, "REPORT.md")
  with open(output, "w") as f:
    f.write(report + "\n")
  print(report)
  print(f"\n(written to {output})")


if __name__ == "__main__":
  app.run(main)
