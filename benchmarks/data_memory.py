"""Peak memory of the pretraining data pipeline on a corpus and on the same corpus 10x larger.

    python benchmarks/data_memory.py
    python benchmarks/data_memory.py --base_mb=5 \\
        --base_text=/work/shared/data/text/leipzig/sentences/eng_wikipedia_2016_10K-sentences.txt

Writes a text corpus of --base_mb MB (lines of --base_text, or of the embedded default corpus,
repeated) and one --scale times larger, then runs one full epoch of `PretrainingIterator` over each
in a fresh subprocess and prints a markdown table of the subprocess's resident memory: after
start-up (imports, tokenizer, iterator) and its peak over the epoch. A streaming pipeline keeps the
peak the same whatever the corpus size. The vocabulary is --vocab, or a 2000-piece one trained on
the embedded corpus first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_float("base_mb", 2.0, "Size of the 1x corpus in MB.")
flags.DEFINE_integer("scale", 10, "Size of the large corpus in multiples of the base one.")
flags.DEFINE_string("base_text", None, "Text file whose lines make the corpus (default: embedded corpus).")
flags.DEFINE_string("vocab", None, "spm.model or its directory (default: train a small one).")
flags.DEFINE_integer("seq_len", 512, "Sequence length.")
flags.DEFINE_integer("batch_size", 16, "Per-host batch size.")
flags.DEFINE_integer("shuffle_window", 256, "Shuffle window in sequences.")
# Internal: run one measurement in this process and print it as JSON.
flags.DEFINE_string("child_corpus", None, "(internal) corpus to measure in this process.")


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field (this benchmark needs Linux)")


def _measure_child() -> None:
    from debertax.data import DataConfig, PretrainingIterator

    config = DataConfig(
        source=FLAGS.child_corpus, vocab_path=FLAGS.vocab, seq_len=FLAGS.seq_len,
        batch_size=FLAGS.batch_size, shuffle_window=FLAGS.shuffle_window,
    )
    iterator = PretrainingIterator(config, process_index=0, process_count=1)
    startup_kib = _memory_kib("VmRSS")
    started = time.perf_counter()
    batches = tokens = 0
    while iterator.epoch == 0:
        batch = next(iterator)
        batches += 1
        tokens += int(batch["attention_mask"].sum())
    print(json.dumps({
        "startup_kib": startup_kib,
        "peak_kib": _memory_kib("VmHWM"),
        "batches": batches,
        "tokens": tokens,
        "seconds": time.perf_counter() - started,
    }))


def _write_corpus(path: str, lines: list[str], target_bytes: int) -> int:
    written = 0
    with open(path, "w", encoding="utf-8") as corpus:
        while written < target_bytes:
            for line in lines:
                corpus.write(line + "\n")
                written += len(line.encode("utf-8")) + 1
                if written >= target_bytes:
                    break
    return written


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.child_corpus:
        _measure_child()
        return
    from debertax.corpus import default_corpus_lines
    from debertax.tokenizer import train_sentencepiece

    with tempfile.TemporaryDirectory() as workdir:
        if FLAGS.base_text:
            with open(FLAGS.base_text, encoding="utf-8") as text:
                lines = [line.rstrip("\n") for line in text if line.strip()]
        else:
            lines = list(default_corpus_lines())
        vocab = FLAGS.vocab
        if vocab is None:
            vocab = train_sentencepiece(default_corpus_lines(), os.path.join(workdir, "vocab"), 2000)
        rows = []
        for scale in (1, FLAGS.scale):
            corpus = os.path.join(workdir, f"corpus_{scale}x.txt")
            size = _write_corpus(corpus, lines, int(FLAGS.base_mb * scale * 1e6))
            command = [
                sys.executable, os.path.abspath(__file__), f"--child_corpus={corpus}", f"--vocab={vocab}",
                f"--seq_len={FLAGS.seq_len}", f"--batch_size={FLAGS.batch_size}",
                f"--shuffle_window={FLAGS.shuffle_window}",
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            rows.append((scale, size, result))
            os.remove(corpus)
    source = FLAGS.base_text or "embedded default corpus"
    print(f"\nOne epoch of PretrainingIterator, seq_len {FLAGS.seq_len}, batch {FLAGS.batch_size}, "
          f"shuffle window {FLAGS.shuffle_window}; text from {source}.\n")
    print("| corpus | size (MB) | batches | tokens/s | RSS after start-up (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for scale, size, result in rows:
        print(f"| {scale}x | {size / 1e6:.1f} | {result['batches']:,} | "
              f"{result['tokens'] / result['seconds']:,.0f} | {result['startup_kib'] / 1024:.0f} | "
              f"{result['peak_kib'] / 1024:.0f} |")


if __name__ == "__main__":
    app.run(main)
