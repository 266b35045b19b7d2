"""Pretraining data: streaming text -> packed sequences -> dynamically masked MLM batches.

Sources (`DataConfig.source`)
  "default"             the embedded corpus of `debertax.corpus` (about 2 MB, in memory);
  a path or a glob      UTF-8 text files ("/data/*.txt", "gs://bucket/corpus/**/*.txt": any path
                        debertax.storage reads), ONE DOCUMENT PER LINE; blank lines are
                        skipped. Files are streamed with bounded reads: a line longer than
                        `max_line_bytes` is cut (at a space where possible) into chunks, and every
                        chunk is a document of its own. A glob's matches that are directories are
                        ignored. A UTF-8 byte-order mark at the start of a file is dropped.
  "tfds:NAME[:SPLIT]"   a prepared TFDS dataset (array_record format, read with
                        `tfds.data_source`; SPLIT defaults to "train"), one document per record,
                        text taken from the feature `text_feature` ("text").
  "hf:PATH[@REV][:CONFIG][:SPLIT]"   a Hugging Face dataset (the Hub, or a local dataset directory),
                        streamed with `datasets`; one document per row, text in `text_feature`.
  *.parquet, *.jsonl, *.json, *.ndjson, *.csv (also compressed; files or globs, local or gs://)
                        read by `datasets`' own readers, one document per row (debertax/hf_source.py).

Sharding (per host): process p of n reads
  * of every file, the lines whose first byte lies in bytes [size*p/n, size*(p+1)/n);
  * of an indexed source (default corpus, TFDS), the records [N*p/n, N*(p+1)/n);
  * of a `datasets` stream, `split_dataset_by_node(p, n)`: whole files when n divides their number.
The shards are disjoint and cover the corpus, and each host reads only its share of the bytes (a
`datasets` stream whose file count n does not divide: every host reads all, keeps every n-th row).

Packing: documents are tokenized (`Tokenizer.encode_ids`) and concatenated into sequences of
exactly `seq_len` ids `[CLS] doc_a... [SEP] doc_b... [SEP]`: a [SEP] closes every document and every
sequence, a document that does not fit continues in the next sequence (which starts with [CLS]),
and no sequence holds [SEP] [SEP] or starts with [CLS] [SEP]. Padding ([PAD], attention 0) appears
only in the last sequence of a shard's epoch and, as one [PAD], when a document ends one token
short of filling a sequence.

Held-out split: with `split="train"` / `"eval"` and `holdout_every=N`, one document in N, chosen by a
hash of its text, belongs to the evaluation split only; the training iterator never yields it, the
evaluation iterator yields nothing else. The choice needs no index of the corpus and is the same on
every host, in every epoch and after a resume.

Order: each epoch visits the text files in an order shuffled by (seed, epoch) (a `datasets` stream
reads its files in the same order every epoch), and the packed sequences
are shuffled within consecutive windows of `shuffle_window` sequences by (seed, host, epoch,
window). Iteration is infinite: the epoch counter increases and the corpus is read again.

Masking (DeBERTa-v3 recipe): in every sequence, round(mask_prob * n) of its n non-special tokens
(special: [PAD], [CLS], [SEP], [UNK], [MASK] and control pieces; at least one, at most
`max_predictions`) are selected for prediction; each selected token becomes [MASK] with
probability `mask_token_prob`, a random non-special token with `random_token_prob`, and stays
unchanged otherwise (defaults 1.0 / 0.0 / 0.0: all [MASK]). The choice is a pure
function of (seed, global example index), the global index of host p's k-th example being
k * n + p, so batches are reproducible and resume exactly.

Bad input raises BadInputError naming "file:line" (or "tfds:NAME:SPLIT record N"): bytes that are
not UTF-8, or NUL bytes (a binary file). With on_bad_line="skip" such lines are dropped and counted
in `bad_lines_skipped` (again in every epoch), and the first ten are logged. A corpus without any
text, a glob matching no file and a missing vocabulary raise errors naming what is missing.

State: `PretrainingIterator.get_state()` is a small JSON-serialisable dict holding the epoch, the
shuffle window being emitted (its index, the position where its text starts, how many of its
sequences were emitted), the number of examples emitted and of bad lines skipped, and a fingerprint
of everything that gives positions their meaning. `set_state` re-reads that one window and skips
the emitted sequences, so memory stays flat however large the corpus is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator

import numpy as np

from debertax import hf_source
from debertax.sources import (TFDS_PREFIX, BadInputError, BadLine, IndexedTextSource, Position,  # noqa: F401
                              TextFileSource, TextSource, default_corpus, expand_paths, open_tfds)
from debertax.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

STATE_FORMAT = "debertax.data.PretrainingIterator/1"
DEFAULT_SOURCE = "default"

# Released DeBERTa recipe: at most 80 predictions in a 512-token sequence.
_PREDICTIONS_PER_512_TOKENS = 80
# Domain separators so the shuffle and the masking streams never share a seed.
_SHUFFLE_STREAM = 0x5348
_MASK_STREAM = 0x4D41
_LOGGED_BAD_LINES = 10


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Pretraining data settings (see the module docstring for the meaning of each)."""

    source: str = DEFAULT_SOURCE
    vocab_path: str = ""  # spm.model, or a directory holding it
    seq_len: int = 512
    batch_size: int = 8  # per host
    seed: int = 0
    mask_prob: float = 0.15
    max_predictions: int | None = None  # None: 80 per 512 tokens, rounded up
    mask_token_prob: float = 1.0
    random_token_prob: float = 0.0
    shuffle_window: int = 256  # sequences; 1 keeps the reading order
    on_bad_line: str = "error"  # or "skip": drop lines that are not UTF-8 text and count them
    max_line_bytes: int = 1 << 20
    text_feature: str = "text"  # TFDS feature holding the text
    tfds_data_dir: str | None = None
    tokenize_batch_size: int = 64  # documents per sentencepiece call
    # Held-out documents: 1 in `holdout_every` documents (chosen by a hash of the text, so the choice is
    # the same on every host, epoch and resume) belongs to the evaluation split. split="train" skips them,
    # "eval" reads only them, "all" reads everything (holdout_every is then ignored).
    split: str = "all"
    holdout_every: int = 0

    def __post_init__(self):
        def require(condition: bool, message: str):
            if not condition:
                raise ValueError(f"DataConfig: {message}")

        require(self.seq_len >= 4, f"seq_len must be >= 4, got {self.seq_len}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        require(0.0 < self.mask_prob <= 1.0, f"mask_prob must be in (0, 1], got {self.mask_prob}")
        require(
            self.max_predictions is None or self.max_predictions >= 1,
            f"max_predictions must be >= 1 or None, got {self.max_predictions}",
        )
        require(
            self.mask_token_prob >= 0 and self.random_token_prob >= 0
            and self.mask_token_prob + self.random_token_prob <= 1.0 + 1e-9,
            f"mask_token_prob ({self.mask_token_prob}) and random_token_prob "
            f"({self.random_token_prob}) must be >= 0 and sum to at most 1",
        )
        require(self.shuffle_window >= 1, f"shuffle_window must be >= 1, got {self.shuffle_window}")
        require(
            self.on_bad_line in ("error", "skip"),
            f"on_bad_line must be 'error' or 'skip', got {self.on_bad_line!r}",
        )
        require(self.max_line_bytes >= 16, f"max_line_bytes must be >= 16, got {self.max_line_bytes}")
        require(self.tokenize_batch_size >= 1, "tokenize_batch_size must be >= 1")
        require(self.split in ("all", "train", "eval"), f"split must be all, train or eval, got {self.split!r}")
        require(self.split == "all" or self.holdout_every >= 2,
                f"split={self.split!r} needs holdout_every >= 2 (1 document in N held out), got {self.holdout_every}")

    @property
    def predictions_cap(self) -> int:
        if self.max_predictions is not None:
            return self.max_predictions
        return math.ceil(self.seq_len * _PREDICTIONS_PER_512_TOKENS / 512)


# ----------------------------------------------------------------------------------------- sources
def open_source(config: DataConfig, process_index: int = 0, process_count: int = 1) -> TextSource:
    """The TextSource for `config.source`, sharded for host `process_index` of `process_count`."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    spec = config.source
    if spec == DEFAULT_SOURCE:
        lines = default_corpus()
        return IndexedTextSource(
            "default corpus", len(lines), lambda indices: [lines[i] for i in indices],
            process_index, process_count, skip_bad_records=False,
        )
    if spec.startswith(TFDS_PREFIX):
        return open_tfds(spec, config, process_index, process_count)
    if spec.startswith(hf_source.HF_PREFIX):
        return hf_source.open_hub_dataset(spec, config, process_index, process_count)
    paths = expand_paths(spec)
    builder = hf_source.builder_for(spec)
    if builder:
        return hf_source.open_data_files(spec, paths, builder, config, process_index, process_count)
    return TextFileSource(
        spec, paths, process_index, process_count, config.seed,
        config.max_line_bytes, skip_bad_lines=config.on_bad_line == "skip",
    )


def source_lines(
    source: str,
    *,
    text_feature: str = "text",
    tfds_data_dir: str | None = None,
    on_bad_line: str = "error",
    max_line_bytes: int = 1 << 20,
    max_documents: int = 0,
    progress: Callable[[str], None] | None = None,
    progress_every: int = 100_000,
) -> Iterator[str]:
    """The document texts of `source` (whole corpus, one epoch, reading order), e.g. to train a
    vocabulary. Stops after `max_documents` (0: all). `progress` receives a line of counts every
    `progress_every` documents and at the end; skipped bad lines are counted there."""
    config = DataConfig(source=source, text_feature=text_feature, tfds_data_dir=tfds_data_dir,
                        on_bad_line=on_bad_line, max_line_bytes=max_line_bytes)
    corpus = open_source(config)
    started = time.monotonic()
    documents = skipped = text_bytes = 0

    def report(prefix: str):
        if progress is not None:
            progress(f"{prefix}{documents:,} documents, {text_bytes / 1e6:,.1f} MB, {skipped} bad lines "
                     f"skipped, {time.monotonic() - started:,.0f} s ({corpus.description})")

    for _, text in corpus.read(None, epoch=0):
        if isinstance(text, BadLine):
            if skipped < _LOGGED_BAD_LINES:
                logger.warning("skipping bad input: %s", text.describe())
            skipped += 1
            continue
        yield text
        documents += 1
        text_bytes += len(text.encode("utf-8"))
        if documents % progress_every == 0:
            report("  ")
        if documents == max_documents:
            break
    report("read ")


# ------------------------------------------------------------------------------------------ packing
@dataclasses.dataclass(frozen=True)
class PackedSequence:
    """One packed sequence: `token_ids` [seq_len] int32, the first `length` of them real."""

    token_ids: np.ndarray
    length: int


class EmptySplitError(ValueError):
    """The train or eval split of a source holds no document (see DataConfig.holdout_every)."""


def is_held_out(text: str, holdout_every: int) -> bool:
    """Whether a document belongs to the evaluation split: 1 in `holdout_every` by a hash of its text."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % holdout_every == 0


def pack_documents(
    documents: Iterator[tuple[Position, list[int]]],
    seq_len: int,
    cls_id: int,
    sep_id: int,
    pad_id: int,
    first_token_offset: int = 0,
) -> Iterator[tuple[PackedSequence, dict | None]]:
    """Pack tokenized documents into sequences (layout in the module docstring).

    Yields (sequence, resume) where `resume` = {"document": position, "token_offset": k} restarts
    packing right after this sequence (None after the last one). The first document's first
    `first_token_offset` tokens are skipped, as when resuming.
    """
    content_capacity = seq_len - 1  # after [CLS]; the last slot is always [SEP]
    buffer: list[int] = []

    def emit() -> PackedSequence:
        ids = np.full(seq_len, pad_id, np.int32)
        ids[0] = cls_id
        ids[1 : 1 + len(buffer)] = buffer
        length = 1 + len(buffer)
        if buffer[-1] != sep_id:  # a document still open: close the sequence
            ids[length] = sep_id
            length += 1
        buffer.clear()
        return PackedSequence(ids, length)

    skip = first_token_offset
    for position, token_ids in documents:
        start, skip = skip, 0
        if start >= len(token_ids):  # no text, or already packed before a resume
            continue
        for index in range(start, len(token_ids)):
            if len(buffer) == content_capacity - 1:
                yield emit(), {"document": position, "token_offset": index}
            buffer.append(token_ids[index])
        # Close the document. Ending with [SEP] one slot early would need [SEP] [SEP] or a
        # document starting in the final slot, so that sequence ends here with one [PAD].
        buffer.append(sep_id)
        if len(buffer) >= content_capacity - 1:
            yield emit(), {"document": position, "token_offset": len(token_ids)}
    if buffer:
        yield emit(), None


# ------------------------------------------------------------------------------------------ masking
class DynamicMasker:
    """Selects MLM positions per sequence as a pure function of (seed, global example index)."""

    def __init__(self, config: DataConfig, tokenizer: Tokenizer):
        self._config = config
        self._mask_id = tokenizer.mask_id
        self._is_special = np.zeros(tokenizer.vocab_size, bool)
        self._is_special[list(tokenizer.special_ids)] = True
        self._random_token_ids = np.flatnonzero(~self._is_special).astype(np.int32)

    def __call__(
        self, original_ids: np.ndarray, attention_mask: np.ndarray, example_indices: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """original_ids, attention_mask [B, L] int32 and example_indices [B] ->
        (input_ids [B, L] int32 with the replacements, mlm_mask [B, L] bool)."""
        config = self._config
        input_ids = original_ids.copy()
        mlm_mask = np.zeros(original_ids.shape, bool)
        for row, example_index in enumerate(example_indices):
            candidates = np.flatnonzero(~self._is_special[original_ids[row]] & (attention_mask[row] > 0))
            if candidates.size == 0:
                continue
            rng = np.random.default_rng([config.seed, _MASK_STREAM, int(example_index)])
            count = min(config.predictions_cap, max(1, math.floor(config.mask_prob * candidates.size + 0.5)))
            chosen = np.sort(rng.choice(candidates, size=count, replace=False))
            mlm_mask[row, chosen] = True
            draw = rng.random(count)
            to_mask = chosen[draw < config.mask_token_prob]
            input_ids[row, to_mask] = self._mask_id
            randomized = chosen[(draw >= config.mask_token_prob)
                                & (draw < config.mask_token_prob + config.random_token_prob)]
            if randomized.size:
                input_ids[row, randomized] = rng.choice(self._random_token_ids, size=randomized.size)
        return input_ids, mlm_mask


# ----------------------------------------------------------------------------------------- iterator
def _json_copy(value):
    return json.loads(json.dumps(value))


class PretrainingIterator:
    """Infinite iterator of masked MLM batches for this host; resumable with get/set_state.

    Each batch is a dict of numpy arrays (B = config.batch_size, L = config.seq_len):
      input_ids [B, L] int32 (masked), original_ids [B, L] int32, attention_mask [B, L] int32,
      mlm_mask [B, L] bool (positions selected for prediction).
    """

    def __init__(
        self,
        config: DataConfig,
        tokenizer: Tokenizer | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        self.config = config
        self.process_index = process_index
        self.process_count = process_count
        if tokenizer is None:
            if not config.vocab_path:
                raise FileNotFoundError("DataConfig.vocab_path is empty: text input needs spm.model")
            tokenizer = Tokenizer.load(config.vocab_path)
        self.tokenizer = tokenizer
        self.source = open_source(config, process_index, process_count)
        self._masker = DynamicMasker(config, tokenizer)
        self._fingerprint = {
            "source": config.source,
            "corpus": self.source.fingerprint(),
            "vocab_size": tokenizer.vocab_size,
            "seq_len": config.seq_len,
            "seed": config.seed,
            "shuffle_window": config.shuffle_window,
            "max_line_bytes": config.max_line_bytes,
            "text_feature": config.text_feature,
            "split": [config.split, config.holdout_every if config.split != "all" else 0],
            "process_index": process_index,
            "process_count": process_count,
        }
        self._epoch = 0
        self._window_index = 0
        self._window_start: dict | None = None  # None: the start of the epoch
        self._window_emitted = 0
        self._examples_emitted = 0
        self._bad_lines_before_window = 0
        self._bad_lines_in_window = 0
        self._window: list[PackedSequence] | None = None
        self._window_order: np.ndarray | None = None
        self._next_window_start: dict | None = None
        self._window_is_last = False
        self._packer: Iterator[tuple[PackedSequence, dict | None]] | None = None
        self._epoch_has_text = False
        self.documents_read = 0  # documents of this split tokenized by this iterator (a diagnostic)

    # ------------------------------------------------------------------------------- state
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def examples_emitted(self) -> int:
        return self._examples_emitted

    @property
    def bad_lines_skipped(self) -> int:
        return self._bad_lines_before_window + self._bad_lines_in_window

    def get_state(self) -> dict:
        """Small JSON-serialisable position; `set_state` on a fresh iterator continues from here."""
        return _json_copy({
            "format": STATE_FORMAT,
            "epoch": self._epoch,
            "window_index": self._window_index,
            "window_start": self._window_start,
            "window_emitted": self._window_emitted,
            "examples_emitted": self._examples_emitted,
            "bad_lines_skipped_before_window": self._bad_lines_before_window,
            "fingerprint": self._fingerprint,
        })

    def set_state(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"data state: format is {state.get('format')!r}, expected {STATE_FORMAT!r}")
        saved = state["fingerprint"]
        for key, value in self._fingerprint.items():
            if saved.get(key) != value:
                raise ValueError(
                    f"data state: fingerprint key {key!r} was {saved.get(key)!r} when saved but is "
                    f"{value!r} now; positions would not mean the same data"
                )
        self._epoch = int(state["epoch"])
        self._window_index = int(state["window_index"])
        self._window_start = _json_copy(state["window_start"])
        self._window_emitted = int(state["window_emitted"])
        self._examples_emitted = int(state["examples_emitted"])
        self._bad_lines_before_window = int(state["bad_lines_skipped_before_window"])
        self._bad_lines_in_window = 0
        self._window = None
        self._packer = None
        # Resuming inside an epoch means the epoch already produced text.
        self._epoch_has_text = self._window_index > 0 or self._window_start is not None

    # ---------------------------------------------------------------------------- reading
    def _tokenized_documents(self, start: Position | None) -> Iterator[tuple[Position, list[int]]]:
        """Documents from `start` with their token ids; bad lines are counted when the packer
        reaches them (not when read ahead), so the count matches the resume position exactly."""
        documents = self.source.read(start, self._epoch)
        if self.config.split != "all":
            keep_held_out = self.config.split == "eval"
            documents = ((position, text) for position, text in documents
                         if isinstance(text, BadLine)
                         or is_held_out(text, self.config.holdout_every) == keep_held_out)
        while True:
            batch = list(itertools.islice(documents, self.config.tokenize_batch_size))
            if not batch:
                return
            token_ids = iter(self.tokenizer.encode_batch(
                [text for _, text in batch if not isinstance(text, BadLine)]))
            for position, text in batch:
                if isinstance(text, BadLine):
                    if self.bad_lines_skipped < _LOGGED_BAD_LINES:
                        logger.warning("skipping bad input: %s", text.describe())
                    self._bad_lines_in_window += 1
                else:
                    self.documents_read += 1
                    yield position, next(token_ids)

    def _new_packer(self, start: dict | None) -> Iterator[tuple[PackedSequence, dict | None]]:
        document = start["document"] if start else None
        return pack_documents(
            self._tokenized_documents(document),
            self.config.seq_len,
            self.tokenizer.cls_id,
            self.tokenizer.sep_id,
            self.tokenizer.pad_id,
            first_token_offset=start["token_offset"] if start else 0,
        )

    def _load_window(self) -> None:
        """Pack the current window from `_window_start` (continuing the live packer when it is
        already there) and compute its shuffled order."""
        if self._packer is None:
            self._packer = self._new_packer(self._window_start)
        self._bad_lines_in_window = 0
        sequences: list[PackedSequence] = []
        resume = None
        for sequence, resume in self._packer:
            sequences.append(sequence)
            if len(sequences) == self.config.shuffle_window:
                break
        self._window_is_last = resume is None
        if self._window_is_last:
            self._packer = None
        self._next_window_start = resume
        self._window = sequences
        rng = np.random.default_rng(
            [self.config.seed, _SHUFFLE_STREAM, self.process_index, self._epoch, self._window_index]
        )
        self._window_order = rng.permutation(len(sequences))
        if sequences:
            self._epoch_has_text = True

    def _advance_window(self) -> None:
        self._bad_lines_before_window += self._bad_lines_in_window
        self._bad_lines_in_window = 0
        if self._window_is_last:
            if not self._epoch_has_text:
                if self.config.split != "all":
                    raise EmptySplitError(
                        f"data source {self.source.description} has no text in its {self.config.split} split "
                        f"(1 in {self.config.holdout_every} documents held out)")
                raise ValueError(f"data source {self.source.description} has no text")
            self._epoch += 1
            self._window_index = 0
            self._window_start = None
            self._epoch_has_text = False
        else:
            self._window_index += 1
            self._window_start = self._next_window_start
        self._window_emitted = 0
        self._window = None

    def _next_sequence(self) -> PackedSequence:
        while True:
            if self._window is None:
                self._load_window()
            if self._window_emitted < len(self._window):
                sequence = self._window[self._window_order[self._window_emitted]]
                self._window_emitted += 1
                return sequence
            self._advance_window()

    def __iter__(self) -> "PretrainingIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        config = self.config
        original_ids = np.empty((config.batch_size, config.seq_len), np.int32)
        attention_mask = np.zeros((config.batch_size, config.seq_len), np.int32)
        example_indices = np.empty(config.batch_size, np.int64)
        for row in range(config.batch_size):
            sequence = self._next_sequence()
            original_ids[row] = sequence.token_ids
            attention_mask[row, : sequence.length] = 1
            example_indices[row] = self._examples_emitted * self.process_count + self.process_index
            self._examples_emitted += 1
        input_ids, mlm_mask = self._masker(original_ids, attention_mask, example_indices)
        return {
            "input_ids": input_ids,
            "original_ids": original_ids,
            "attention_mask": attention_mask,
            "mlm_mask": mlm_mask,
        }
