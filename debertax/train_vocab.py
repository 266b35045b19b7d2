"""Train a DeBERTa-style SentencePiece vocabulary on a pretraining source.

    python -m debertax.train_vocab --source=default --vocab_size=8000 --output_dir=/tmp/vocab
    python -m debertax.train_vocab --source='/data/*.txt' --vocab_size=128000 --output_dir=vocab
    python -m debertax.train_vocab --source=tfds:c4/en --vocab_size=128000 --output_dir=vocab \\
        --max_documents=20000000

--source takes the same specs as the pretraining data (`debertax.data`): "default" (the embedded
corpus), a text file or glob (one document per line) or "tfds:NAME[:SPLIT]". Documents are read in
the pipeline's order; the trainer keeps a uniform sample of --max_sentences sentences (lines) in
memory. Writes OUTPUT_DIR/spm.model with [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3; [MASK] is id
--vocab_size when the tokenizer loads it.

`source_lines` (from `debertax.data`) is re-exported here for callers that train a vocabulary
themselves. Flags are defined only when this module runs as a program, so importing it defines none.
"""

from __future__ import annotations

import time

from absl import app, flags

from debertax.data import source_lines
from debertax.tokenizer import Tokenizer, train_sentencepiece

__all__ = ["source_lines", "main"]

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("source", "default", "'default', a text file or glob, or 'tfds:NAME[:SPLIT]'.")
    flags.DEFINE_integer("vocab_size", None, "SentencePiece pieces, the 4 special pieces included.")
    flags.DEFINE_string("output_dir", None, "Directory that receives spm.model.")
    flags.DEFINE_integer("max_documents", 0, "Stop reading after this many documents (0: all).")
    flags.DEFINE_integer("max_sentences", 2_000_000, "Sentences the trainer samples and holds in memory.")
    flags.DEFINE_float("character_coverage", 0.9995, "Share of characters the pieces must cover.")
    flags.DEFINE_string("text_feature", "text", "TFDS feature that holds the text.")
    flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir (default: TFDS's own).")
    flags.DEFINE_enum("on_bad_line", "error", ["error", "skip"], "Undecodable lines: stop or skip.")
    flags.DEFINE_integer("max_line_bytes", 1 << 20, "Longer lines are read as several documents.")
    flags.DEFINE_integer("progress_every", 100_000, "Print progress every this many documents.")
    flags.mark_flags_as_required(["vocab_size", "output_dir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    started = time.monotonic()
    documents = source_lines(
        FLAGS.source,
        text_feature=FLAGS.text_feature,
        tfds_data_dir=FLAGS.tfds_data_dir,
        on_bad_line=FLAGS.on_bad_line,
        max_line_bytes=FLAGS.max_line_bytes,
        max_documents=FLAGS.max_documents,
        progress=lambda line: print(line, flush=True),
        progress_every=FLAGS.progress_every,
    )
    model_path = train_sentencepiece(
        documents,
        FLAGS.output_dir,
        FLAGS.vocab_size,
        input_sentence_size=FLAGS.max_sentences,
        character_coverage=FLAGS.character_coverage,
    )
    tokenizer = Tokenizer.load(model_path)
    sample = "DeBERTa improves BERT with disentangled attention."
    print(f"wrote {model_path} in {time.monotonic() - started:,.0f} s: {tokenizer.vocab_size} ids "
          f"([MASK]={tokenizer.mask_id}); {sample!r} -> {tokenizer.encode_pieces(sample)}", flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
