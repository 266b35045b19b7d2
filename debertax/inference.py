"""Batch inference with length buckets: classification, fill-mask, replaced-token scores, sentence embeddings.

    model = debertax.from_pretrained("DIR")                     # any head for embed(); cls/mlm/rtd for the rest
    predictor = model.predictor(max_length=512, batch_size=32)  # or inference.Predictor(model, ...)
    logits = predictor.classify(texts, text_pairs)              # [N, num_labels]
    predictor.fill_mask(["The capital of France is [MASK]."])   # top-k candidates per [MASK]
    predictor.rtd_scores(texts)                                 # P(replaced) per token (discriminators)
    predictor.embed(texts)                                      # [N, D] mean of the last hidden states
    predictor.stats                                             # tokens, seconds, tokens/s, compiled shapes

Shapes. Every batch is padded to `batch_size` rows and to the smallest bucket length that holds its longest
row; the buckets are min_length * 2^k up to max_length (plus max_length itself). Inputs are sorted by length
first, so each batch pads little, and the outputs come back in input order. A handful of shapes therefore
serve any input: each jitted function compiles at most once per bucket (`TRACES` counts it); fill-mask also
pads the [MASK] slots per row to a power of two, so it compiles once per (bucket, slot count) pair.

Command line (one JSON object per input row is written, in input order; embed may write .npy):

    python -m debertax.inference classify  --model=DIR --input=x.tsv   --output=y.jsonl
    python -m debertax.inference fill-mask --model=GEN --input=x.jsonl --output=y.jsonl --top_k=5
    python -m debertax.inference rtd       --model=DISC --input=x.tsv  --output=y.jsonl
    python -m debertax.inference embed     --model=DIR --input=x.tsv   --output=y.npy

Input: .jsonl rows {"text": ..., "text_pair": ...} (field names: --text_field, --pair_field), or .tsv rows
`text` / `text<TAB>text_pair` without a header, or a headed TSV with --columns=sentence1,sentence2 (GLUE files).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import json
import math
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from debertax import compile_options, storage
from debertax import heads as heads_lib
from debertax.config import ModelConfig

# Traces per jitted inference function (name -> count); a trace is a compilation for a new input shape.
TRACES: collections.Counter = collections.Counter()

KINDS = ("classify", "fill_mask", "rtd", "embed")


# Buckets and padding (shared with fine-tuning) ------------------------------------------------------------
def bucket_lengths(max_length: int, min_length: int = 16) -> tuple[int, ...]:
  """min_length * 2^k below max_length, then max_length: e.g. (16, 32, 64, 128, 200) for 200."""
  if max_length < 1 or min_length < 1:
    raise ValueError(f"bucket lengths need max_length >= 1 and min_length >= 1, got {max_length}, {min_length}")
  lengths, length = [], min_length
  while length < max_length:
    lengths.append(length)
    length *= 2
  return tuple(lengths) + (max_length,)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length."""
  for bucket in buckets:
    if length <= bucket:
      return bucket
  raise ValueError(f"a row of {length} tokens does not fit the largest bucket {buckets[-1]}")


def pad_rows(input_ids: Sequence[np.ndarray], token_type_ids: Sequence[np.ndarray], rows: np.ndarray,
             length: int, pad_id: int, filler: Sequence[int]) -> dict[str, np.ndarray]:
  """Stacks the given rows (positions into the lists; -1 = an empty slot) into [len(rows), length] arrays.

  Empty slots hold `filler` (e.g. [CLS] [SEP]) rather than only padding, so that no row attends to nothing;
  `valid` [len(rows)] marks the real rows, and callers must ignore the others.
  """
  n = len(rows)
  out = {"input_ids": np.full((n, length), pad_id, np.int32), "token_type_ids": np.zeros((n, length), np.int32),
         "attention_mask": np.zeros((n, length), np.int32), "valid": rows >= 0}
  for slot, row in enumerate(rows):
    ids = np.asarray(filler, np.int32) if row < 0 else input_ids[row]
    if len(ids) > length:
      raise ValueError(f"row {row} has {len(ids)} tokens, more than the padded length {length}")
    out["input_ids"][slot, :len(ids)] = ids
    out["attention_mask"][slot, :len(ids)] = 1
    if row >= 0:
      out["token_type_ids"][slot, :len(ids)] = token_type_ids[row]
  return out


# Jitted functions, one per (config, kind) and shared by every Predictor --------------------------------------
@functools.lru_cache(maxsize=32)
def _jitted(config: ModelConfig, kind: str, use_emd: bool = False, top_k: int = 0):
  if kind == "classify":
    model = heads_lib.build_model(config, "cls")

    def fn(params, ids, mask, types):
      TRACES["classify"] += 1
      return model.apply({"params": params}, ids, mask, types, deterministic=True)  # [B, C] float32
  elif kind == "rtd":
    model = heads_lib.build_model(config, "rtd")

    def fn(params, ids, mask, types):
      TRACES["rtd"] += 1
      return jax.nn.sigmoid(model.apply({"params": params}, ids, mask, types, deterministic=True))  # [B, L]
  elif kind == "embed":
    model = heads_lib.build_model(config, "none")

    def fn(params, ids, mask, types):
      TRACES["embed"] += 1
      hidden = model.apply({"params": {"deberta": params["deberta"]}}, ids, mask, types, deterministic=True)
      weights = mask.astype(jnp.float32)[:, :, None]
      return jnp.sum(hidden.astype(jnp.float32) * weights, axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
  elif kind == "fill_mask":
    model = heads_lib.build_model(config, "mlm", use_emd=use_emd)

    def fn(params, ids, mask, types, positions):
      TRACES["fill_mask"] += 1
      logits = model.apply({"params": params}, ids, mask, types, deterministic=True, positions=positions)
      probs, top_ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)  # [B, P, k] each
      return top_ids, probs
  else:
    raise ValueError(f"unknown inference kind {kind!r}; choose one of {KINDS}")
  return compile_options.jit(fn)


@dataclasses.dataclass
class InferenceStats:
  """Counts over a Predictor's lifetime. tokens: real (non-pad) tokens; padded_tokens: what was computed."""
  texts: int = 0
  batches: int = 0
  tokens: int = 0
  padded_tokens: int = 0
  seconds: float = 0.0  # Tokenisation + device time + host copies.
  shapes: set = dataclasses.field(default_factory=set)  # Distinct padded [batch, length] shapes (compilations).

  @property
  def tokens_per_second(self) -> float:
    return self.tokens / self.seconds if self.seconds > 0 else 0.0

  def as_dict(self) -> dict:
    return {"texts": self.texts, "batches": self.batches, "tokens": self.tokens,
            "padded_tokens": self.padded_tokens, "seconds": round(self.seconds, 3),
            "tokens_per_sec": round(self.tokens_per_second, 1), "batch_shapes": len(self.shapes)}


class Predictor:
  """Bucketed batch inference over a `PretrainedDeberta` (see the module docstring)."""

  def __init__(self, model, max_length: int = 512, batch_size: int = 32, min_length: int = 16,
               log_every: int = 0):
    if model.tokenizer is None:
      raise ValueError("text inference needs a tokenizer, but the model directory has no spm.model")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.model = model
    self.tokenizer = model.tokenizer
    self.max_length = int(max_length)
    self.batch_size = int(batch_size)
    self.buckets = bucket_lengths(self.max_length, min(min_length, self.max_length))
    self.log_every = log_every
    self.stats = InferenceStats()

  # Shared batching ------------------------------------------------------------------------------------------
  def _encode(self, texts, text_pairs):
    texts = [texts] if isinstance(texts, str) else list(texts)
    if text_pairs is not None:
      text_pairs = [text_pairs] if isinstance(text_pairs, str) else list(text_pairs)
    if not texts:
      raise ValueError("no texts to run inference on")
    return self.tokenizer(texts, text_pairs, max_length=self.max_length, truncation=True, padding=False)

  def _batches(self, encoded):
    """Yields (positions of the real rows [n], padded batch dict) in length-sorted order."""
    ids, types = encoded["input_ids"], encoded["token_type_ids"]
    order = np.argsort([-len(row) for row in ids], kind="stable")
    filler = [self.tokenizer.cls_id, self.tokenizer.sep_id]
    for start in range(0, len(order), self.batch_size):
      rows = np.full(self.batch_size, -1, np.int64)
      chunk = order[start:start + self.batch_size]
      rows[:len(chunk)] = chunk
      length = bucket_for(max(len(ids[r]) for r in chunk), self.buckets)
      batch = pad_rows(ids, types, rows, length, self.tokenizer.pad_id, filler)
      self.stats.batches += 1
      self.stats.tokens += int(batch["attention_mask"][batch["valid"]].sum())
      self.stats.padded_tokens += batch["input_ids"].size
      self.stats.shapes.add(batch["input_ids"].shape)
      if self.log_every and self.stats.batches % self.log_every == 0:
        logging.info("inference: %d batches, %s", self.stats.batches, self.stats.as_dict())
      yield chunk, batch

  def _run(self, kind: str, texts, text_pairs=None, **extra) -> tuple[dict, list]:
    """-> (the tokenised inputs, per-input outputs in input order).

    Each output is the function's result for that row; for fill_mask it is (top ids [P, k], probs [P, k],
    [MASK] positions [P] with -1 for unused slots).
    """
    start = time.perf_counter()
    encoded = self._encode(texts, text_pairs)
    outputs: list = [None] * len(encoded["input_ids"])
    fn = _jitted(self.model.config, kind, **extra)
    for chunk, batch in self._batches(encoded):
      args = [self.model.params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]]
      if kind == "fill_mask":
        positions = _mask_positions(batch["input_ids"], self.tokenizer.mask_id)
        args.append(np.maximum(positions, 0))  # Unused slots read position 0 and are dropped below.
      result = jax.device_get(fn(*args))
      for slot, row in enumerate(chunk):
        outputs[row] = ((result[0][slot], result[1][slot], positions[slot]) if kind == "fill_mask"
                        else result[slot])
    self.stats.texts += len(outputs)
    self.stats.seconds += time.perf_counter() - start
    return encoded, outputs

  # Tasks ----------------------------------------------------------------------------------------------------
  def classify(self, texts, text_pairs=None) -> np.ndarray:
    """float32 logits [N, num_labels] (num_labels == 1: a regression score). Needs the 'cls' head."""
    self.model._require("cls", "classify")
    _, outputs = self._run("classify", texts, text_pairs)
    return np.stack(outputs).astype(np.float32)

  def embed(self, texts, text_pairs=None) -> np.ndarray:
    """float32 [N, D]: the mean of the encoder's last hidden states over every non-padding token, [CLS] and
    [SEP] included (no trained pooling). Works with any head."""
    _, outputs = self._run("embed", texts, text_pairs)
    return np.stack(outputs).astype(np.float32)

  def rtd_scores(self, texts) -> list[list[tuple[str, float]]]:
    """Per text, (token piece, P(replaced)) for every token except [CLS]/[SEP]. Needs the 'rtd' head."""
    self.model._require("rtd", "rtd_scores")
    encoded, outputs = self._run("rtd", texts)
    skip = {self.tokenizer.cls_id, self.tokenizer.sep_id}
    return [[(self.tokenizer.id_to_piece(int(t)), float(p)) for t, p in zip(ids, probs[:len(ids)])
             if int(t) not in skip] for ids, probs in zip(encoded["input_ids"], outputs)]

  def fill_mask(self, texts, top_k: int = 5) -> list[list[dict]]:
    """Per text, per [MASK] in order: {"position", "candidates": [{"token", "id", "prob"}, ...top_k]}.
    Needs the 'mlm' head (a generator)."""
    self.model._require("mlm", "fill_mask")
    top_k = min(int(top_k), self.model.config.vocab_size)
    _, outputs = self._run("fill_mask", texts, use_emd=bool(self.model.use_emd), top_k=top_k)
    return [[{"position": int(position),
              "candidates": [{"token": self.tokenizer.id_to_piece(int(t)), "id": int(t), "prob": float(p)}
                             for t, p in zip(top_ids[slot], probs[slot])]}
             for slot, position in enumerate(positions) if position >= 0]
            for top_ids, probs, positions in outputs]


def _mask_positions(input_ids: np.ndarray, mask_id: int) -> np.ndarray:
  """[B, P] positions of [MASK] tokens, P = a power of two >= the most masks in a row (so few shapes);
  unused slots are -1 on the host (0 goes to the device)."""
  is_mask = input_ids == mask_id
  most = int(is_mask.sum(axis=1).max()) if is_mask.size else 0
  width = 1 << max(0, math.ceil(math.log2(max(most, 1))))
  positions = np.full((input_ids.shape[0], width), -1, np.int32)
  for row in range(input_ids.shape[0]):
    found = np.flatnonzero(is_mask[row])
    positions[row, :len(found)] = found
  return positions


# Input files ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class InputRows:
  texts: list
  text_pairs: list | None
  lines: list  # 1-based source line of each row (for the output and for error messages)


def read_inputs(path: str, text_field: str = "text", pair_field: str = "text_pair", columns: str = "",
                on_bad_row: str = "error") -> InputRows:
  """Reads texts (and pairs) from .jsonl or .tsv (see the module docstring); bad rows raise 'file:line: ...'
  (or are skipped and counted with on_bad_row='skip')."""
  if on_bad_row not in ("error", "skip"):
    raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
  if not storage.isfile(path):
    raise FileNotFoundError(f"{path}: no such input file")
  jsonl = path.endswith((".jsonl", ".json"))
  if not jsonl and not path.endswith((".tsv", ".txt")):
    raise ValueError(f"{path}: use a .jsonl or .tsv input file")
  texts, pairs, lines, skipped = [], [], [], []
  wanted = [c.strip() for c in columns.split(",") if c.strip()]
  positions = None
  with storage.open_file(path, encoding="utf-8-sig") as handle:
    for number, raw in enumerate(handle, start=1):
      line = raw.rstrip("\n").rstrip("\r")
      if not line:  # Blank lines (a trailing newline) are not rows; a line of tabs or spaces is a bad row.
        continue
      try:
        if jsonl:
          try:
            record = json.loads(line)
          except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e.msg})") from None
          if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"expected an object with a string {text_field!r}")
          pair = record.get(pair_field)
          if pair is not None and not isinstance(pair, str):
            raise ValueError(f"{pair_field!r} must be a string")
          row = (record[text_field], pair)
        else:
          fields = line.split("\t")
          if wanted and positions is None:  # The header line.
            missing = [c for c in wanted if c not in fields]
            if missing:
              raise ValueError(f"header has no column(s) {missing} (columns: {fields})")
            positions = [fields.index(c) for c in wanted]
            continue
          if positions is not None:
            if len(fields) <= max(positions):
              raise ValueError(f"expected at least {max(positions) + 1} tab-separated columns, got {len(fields)}")
            fields = [fields[p] for p in positions]
          if len(fields) not in (1, 2):
            raise ValueError(f"expected 1 or 2 tab-separated columns (text, text_pair), got {len(fields)}")
          row = (fields[0], fields[1] if len(fields) == 2 else None)
        if not row[0].strip() or (row[1] is not None and not row[1].strip()):
          raise ValueError("empty text")
        if texts and (row[1] is None) != (pairs[0] is None):
          raise ValueError("mixes single texts and text pairs; use one kind per file")
      except ValueError as e:
        if on_bad_row == "error":
          raise ValueError(f"{path}:{number}: {e}") from None
        skipped.append(f"{path}:{number}: {e}")
        continue
      texts.append(row[0])
      pairs.append(row[1])
      lines.append(number)
  if skipped:
    logging.warning("%s: skipped %d bad rows (first: %s)", path, len(skipped), skipped[0])
  if not texts:
    raise ValueError(f"{path}: no input rows")
  return InputRows(texts, pairs if pairs[0] is not None else None, lines)


def _label_names(model_dir: str) -> list | None:
  """Label names a fine-tuning run stored next to the model (best_model/task.json), if any."""
  path = storage.join(model_dir, "task.json")
  if not storage.exists(path):
    return None
  return json.loads(storage.read_text(path)).get("label_names")


def main(argv=None) -> int:
  import argparse
  parser = argparse.ArgumentParser(prog="python -m debertax.inference", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=["classify", "fill-mask", "rtd", "embed"])
  parser.add_argument("--model", required=True, help="Hugging Face or debertax model directory (local or "
                      "gs://), or a Hugging Face Hub model id such as microsoft/deberta-v3-base[@revision]")
  parser.add_argument("--input", required=True, help=".jsonl or .tsv")
  parser.add_argument("--output", required=True, help=".jsonl (embed: also .npy)")
  parser.add_argument("--max_length", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--min_bucket", type=int, default=16, help="smallest padded length")
  parser.add_argument("--dtype", default=None, help="compute dtype, e.g. bfloat16 (parameters stay float32)")
  parser.add_argument("--top_k", type=int, default=5, help="fill-mask candidates per [MASK]")
  parser.add_argument("--text_field", default="text")
  parser.add_argument("--pair_field", default="text_pair")
  parser.add_argument("--columns", default="", help="headed TSV: the text (and pair) column names")
  parser.add_argument("--on_bad_row", default="error", choices=["error", "skip"])
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)

  from debertax import api, hub
  try:
    rows = read_inputs(args.input, args.text_field, args.pair_field, args.columns, args.on_bad_row)
    model_dir = hub.resolve_model_dir(args.model)
    model = api.from_pretrained(model_dir, dtype=args.dtype)
    predictor = Predictor(model, max_length=args.max_length, batch_size=args.batch_size, min_length=args.min_bucket,
                          log_every=50)
    if args.command == "classify":
      records = classification_records(predictor.classify(rows.texts, rows.text_pairs), _label_names(model_dir))
    elif args.command == "fill-mask":
      if rows.text_pairs is not None:
        raise ValueError(f"{args.input}: fill-mask takes single texts")
      records = [{"masks": masks} for masks in predictor.fill_mask(rows.texts, args.top_k)]
    elif args.command == "rtd":
      if rows.text_pairs is not None:
        raise ValueError(f"{args.input}: rtd takes single texts")
      records = [{"tokens": [t for t, _ in scores], "replaced_prob": [round(p, 6) for _, p in scores]}
                 for scores in predictor.rtd_scores(rows.texts)]
    else:
      embeddings = predictor.embed(rows.texts, rows.text_pairs)
      records = None if args.output.endswith(".npy") else [{"embedding": e.tolist()} for e in embeddings]
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if records is None:
    buffer = io.BytesIO()
    np.save(buffer, embeddings)
    storage.write_atomic(args.output, buffer.getvalue())
  else:
    storage.write_atomic(args.output, "".join(json.dumps({"line": line, **record}) + "\n"
                                              for line, record in zip(rows.lines, records)))
  stats = predictor.stats.as_dict()
  logging.info("%s: %d rows -> %s; %d tokens in %.2f s = %.1f tokens/s (%d padded tokens computed, %d batch "
               "shapes)", args.command, len(rows.texts), args.output, stats["tokens"], stats["seconds"],
               stats["tokens_per_sec"], stats["padded_tokens"], stats["batch_shapes"])
  print(json.dumps({"command": args.command, "output": args.output, **stats}))
  return 0


def classification_records(logits: np.ndarray, label_names: list | None) -> list[dict]:
  """Regression (one logit): {"score"}; else {"label", "label_name" (when known), "probs"}."""
  if logits.shape[1] == 1:
    return [{"score": float(row[0])} for row in logits]
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  records = []
  for row in probs:
    label = int(np.argmax(row))
    record = {"label": label, "probs": [round(float(p), 6) for p in row]}
    if label_names:
      record["label_name"] = label_names[label]
    records.append(record)
  return records


if __name__ == "__main__":
  sys.exit(main())
