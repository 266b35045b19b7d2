"""Training parity: debertax (JAX) against transformers + torch, same initial weights, batches and optimizer.

    python benchmarks/training_parity.py --steps 1000 --models mlm,emd,rtd,cls,reg --out runs/training_parity \
        [--corpus default|PATH] [--vocab spm.model] [--lr 1e-3] [--warmup 100] [--authors-adam]

Models (each trained from the same initial parameters on the same batches in both frameworks):
  mlm  the generator as a plain MLM (heads.build_model(cfg, "mlm")) against DebertaV2ForMaskedLM (legacy=False);
       loss: rtd.masked_lm_loss over the masked slots / transformers' own cross-entropy over the same positions
  emd  the generator with the Enhanced Mask Decoder against a hand-written torch EMD on DebertaV2Model
       (torch_reference.EMDMaskedLM); the same MLM loss
  rtd  the discriminator (head "rtd") against torch_reference.Discriminator; rtd.replaced_token_loss / sigmoid
       BCE over the real tokens, on fixed corrupted batches (masked slots replaced by random ids)
  cls  sequence classification, 3 labels, through debertax.finetune.Finetuner (the fine-tuning step users run)
       against DebertaV2ForSequenceClassification; cross-entropy
  reg  the same with num_labels=1: regression, MSE
Optimizer: debertax.optimizer.make_optimizer (bias-corrected AdamW, decoupled weight decay off biases and
LayerNorms, global-norm clipping, warmup then linear decay) against torch.optim.AdamW with the same two parameter
groups, torch.nn.utils.clip_grad_norm_ and each step's learning rate read from our schedule. --authors-adam
switches both sides to Adam without bias correction (torch: torch_reference.AuthorsAdamW). Dropout 0, float32.

Data: --corpus PATH (a text file, one document per line) or --corpus default (the embedded corpus, written to
OUT/default_corpus.txt) goes through debertax.data.PretrainingIterator with a SentencePiece vocabulary (--vocab,
or one trained into OUT/vocab); without --corpus a synthetic Zipf-distributed token stream with the same layout
([CLS] ... [SEP], 15% masked, the last row of every batch padded). RTD batches replace the masked slots by random
ids; classification labels are the most frequent class of token id % 3 in the sequence, regression targets 5 x
the share of tokens with id % 3 == 0.

Shapes (configs/tiny.py): hidden 128, 4 heads, FFN 512, 2 layers for the generators (mlm, emd), 4 for the rest;
L = --length (128), batch --batch-size (16). Ours: jitted gradients and a jitted optimizer update (the Finetuner's
one jitted step for cls / reg). Time per step: the median wall time and the mean process CPU time (all threads;
with --threads 1 robust to other load on the machine) of steps 2..N, so compilation and PyTorch's first step are
left out; the frameworks run one after the other, never at once. --threads N pins the process to N cores and
torch to N threads. GLIBC_TUNABLES=debertax.compile_options.CPU_MALLOC_TUNABLES is set for the whole process (it
re-executes itself) unless --no-malloc-tunables or GLIBC_TUNABLES is already set.

Writes OUT/README.md (command, settings, tables), OUT/losses.png (the loss curves and their relative difference per
model) and OUT/losses.json (every step's losses, times and torch's gradient norms).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import shlex
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import traverse_util  # noqa: E402

from debertax import compile_options, convert, finetune, rtd, sharding  # noqa: E402
from debertax import heads as heads_lib  # noqa: E402
from debertax import optimizer as optimizer_lib  # noqa: E402
from debertax.config import ModelConfig  # noqa: E402

KINDS = ("mlm", "emd", "rtd", "cls", "reg")
NUM_CLASSES = 3
FIRST_STEPS = 20  # The window of the strict per-step comparison.
_TUNABLES_MARK = "_TRAINING_PARITY_SET_TUNABLES"


# Shapes and optimizer -----------------------------------------------------------------------------------------
def model_config(kind: str, vocab_size: int, **overrides) -> ModelConfig:
  """configs/tiny.py's shape (v3 settings, dropout 0): 2 layers for the generators, 4 for the rest."""
  values = dict(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2 if kind in ("mlm", "emd") else 4,
                num_attention_heads=4, intermediate_size=512, max_position_embeddings=128, position_buckets=64,
                max_relative_positions=128, relative_attention=True, pos_att_type="p2c|c2p", share_att_key=True,
                norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pooler_dropout=0.0, cls_dropout=0.0)
  values.update(overrides)
  return for_kind(ModelConfig(**values), kind)


def for_kind(config: ModelConfig, kind: str) -> ModelConfig:
  """num_labels: 3 classes for cls, 1 for the regression head."""
  if kind == "cls":
    return config.replace(num_labels=NUM_CLASSES)
  if kind == "reg":
    return config.replace(num_labels=1)
  return config


def train_config(lr: float = 1e-3, warmup_steps: int = 100, steps: int = 1000, grad_clip: float = 1.0,
                 weight_decay: float = 0.01, bias_correction: bool = True) -> ml_collections.ConfigDict:
  """A `make_optimizer` block (the fields of config.train it reads)."""
  return ml_collections.ConfigDict(dict(lr=lr, warmup_steps=warmup_steps, steps=steps, grad_clip=grad_clip,
                                        adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6, bias_correction=bias_correction,
                                        weight_decay=weight_decay, layer_decay=1.0))


# Batches ------------------------------------------------------------------------------------------------------
def num_predictions(length: int) -> int:
  """The data pipeline's cap on prediction slots per row (80 per 512 tokens)."""
  return math.ceil(length * 80 / 512)


def synthetic_pretraining_batch(rng: np.random.Generator, batch: int, length: int, vocab_size: int,
                                mask_prob: float = 0.15) -> dict:
  """A PretrainingIterator-style batch of Zipf-distributed ids (ids 0-3 special, vocab_size - 1 = [MASK]).

  Row b: [CLS] tokens [SEP], then padding; the last row ends at a random length in [L/2, L). At least one and
  about mask_prob of every row's tokens are masked. Returns input_ids (masked), original_ids, attention_mask
  [B, L] int32 and mlm_mask [B, L] bool.
  """
  mask_id = vocab_size - 1
  ranks = np.arange(4, mask_id)
  probs = 1.0 / (ranks - 3 + 10.0)
  original = rng.choice(ranks, size=(batch, length), p=probs / probs.sum()).astype(np.int32)
  lengths = np.full(batch, length)
  lengths[-1] = rng.integers(length // 2, length)
  attention_mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  original[:, 0] = 1
  original[np.arange(batch), lengths - 1] = 2
  original[attention_mask == 0] = 0
  mlm_mask = np.zeros((batch, length), bool)
  for row, n in enumerate(lengths):
    count = max(1, int(round(mask_prob * (n - 2))))
    mlm_mask[row, 1 + rng.choice(n - 2, size=count, replace=False)] = True
  input_ids = np.where(mlm_mask, mask_id, original).astype(np.int32)
  return {"input_ids": input_ids, "original_ids": original, "attention_mask": attention_mask, "mlm_mask": mlm_mask}


def kind_batch(kind: str, raw: dict, rng: np.random.Generator, vocab_size: int, mask_id: int,
               predictions: int) -> dict:
  """A pretraining-style batch -> the inputs and targets of one parity kind (numpy, the same for both sides).

  mlm/emd: input_ids, attention_mask [B, L]; positions [B, P] (the masked slots first, as RTDModels.losses
  orders them), valid [B, P] bool, targets [B, P]. rtd: input_ids (masked slots replaced by random ids),
  attention_mask, replaced [B, L] bool. cls/reg: input_ids (the original text), attention_mask,
  token_type_ids [B, L]; labels [B] (int32 classes or float32 scores); weights [B] (Finetuner's row weights).
  """
  original, mask, mlm_mask = raw["original_ids"], raw["attention_mask"], raw["mlm_mask"].astype(bool)
  if kind in ("mlm", "emd"):
    positions = np.argsort(~mlm_mask, axis=1, kind="stable")[:, :predictions].astype(np.int32)
    return {"input_ids": np.asarray(raw["input_ids"], np.int32), "attention_mask": np.asarray(mask, np.int32),
            "positions": positions, "valid": np.take_along_axis(mlm_mask, positions, axis=1),
            "targets": np.take_along_axis(original, positions, axis=1).astype(np.int32)}
  if kind == "rtd":
    sampled = rng.integers(4, mask_id, size=original.shape)
    ids = np.where(mlm_mask, sampled, original).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.asarray(mask, np.int32), "replaced": ids != original}
  if kind in ("cls", "reg"):
    real = (original >= 4) & (original != mask_id) & (mask > 0)
    counts = np.stack([np.sum(real & (original % 3 == c), axis=1) for c in range(3)], axis=1)
    labels = (5.0 * counts[:, 0] / np.maximum(real.sum(1), 1)).astype(np.float32) if kind == "reg" \
        else np.argmax(counts, axis=1).astype(np.int32)
    return {"input_ids": np.asarray(original, np.int32), "attention_mask": np.asarray(mask, np.int32),
            "token_type_ids": np.zeros_like(original, np.int32), "labels": labels,
            "weights": np.ones(original.shape[0], np.float32)}
  raise ValueError(f"unknown parity kind {kind!r}; choose one of {KINDS}")


def make_batches(kind: str, raws: list, vocab_size: int, mask_id: int, predictions: int, seed: int = 0) -> list:
  rng = np.random.default_rng([seed, KINDS.index(kind)])
  return [kind_batch(kind, raw, rng, vocab_size, mask_id, predictions) for raw in raws]


def synthetic_batches(kind: str, steps: int, batch: int, length: int, vocab_size: int, seed: int = 0) -> list:
  """`steps` batches of `kind` from the synthetic stream (the tests' data)."""
  rng = np.random.default_rng(seed)
  raws = [synthetic_pretraining_batch(rng, batch, length, vocab_size) for _ in range(steps)]
  return make_batches(kind, raws, vocab_size, vocab_size - 1, num_predictions(length), seed)


# Parameters ---------------------------------------------------------------------------------------------------
def build_model(kind: str, config: ModelConfig):
  return heads_lib.build_model(config, {"emd": "mlm", "reg": "cls"}.get(kind, kind), use_emd=kind == "emd")


def initial_params(kind: str, config: ModelConfig, seed: int = 0, perturb: float = 0.0):
  """Our random initialisation; `perturb` > 0 adds perturb * N(0, 1) to every LayerNorm and bias (which start
  at 1 and 0), so that every parameter matters from the first step."""
  params = jax.device_get(heads_lib.init_params(build_model(kind, config), jax.random.PRNGKey(seed)))
  if perturb:
    rng = np.random.default_rng(seed + 1)
    flat = traverse_util.flatten_dict(params)
    flat = {path: (v + perturb * rng.standard_normal(v.shape)).astype(v.dtype)
            if path[-1] in ("bias", "scale") else v for path, v in flat.items()}
    params = traverse_util.unflatten_dict(flat)
  return jax.tree_util.tree_map(np.asarray, params)


def torch_params_as_ours(kind: str, config: ModelConfig, model) -> dict:
  """The torch model's parameters, renamed and transposed into our tree (debertax.convert)."""
  from benchmarks import torch_reference
  head = {"emd": "mlm", "reg": "cls"}.get(kind, kind)
  return convert.hf_state_to_params(torch_reference.state_as_numpy(model), config, head, use_emd=kind == "emd",
                                    source=f"torch {kind} model")


# The JAX side ------------------------------------------------------------------------------------------------
def loss_fn(kind: str, model):
  """(params, batch) -> the scalar training loss of mlm / emd / rtd (cls and reg go through the Finetuner)."""

  def fn(params, batch):
    if kind in ("mlm", "emd"):
      logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], deterministic=False,
                           positions=batch["positions"], rngs={"dropout": jax.random.PRNGKey(0)})  # [B, P, V]
      return rtd.masked_lm_loss(logits, batch["targets"], batch["valid"])[0]
    if kind == "rtd":
      logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], deterministic=False,
                           rngs={"dropout": jax.random.PRNGKey(0)})  # [B, L]
      return rtd.replaced_token_loss(logits, batch["replaced"], batch["attention_mask"])[0]
    raise ValueError(f"{kind}: no plain loss (classification runs through the Finetuner)")

  return fn


@functools.lru_cache(maxsize=None)
def _value_and_grad(kind: str, config: ModelConfig):
  """The jitted (loss, gradients) of a kind, compiled once per model however many optimizers train it."""
  return compile_options.jit(jax.value_and_grad(loss_fn(kind, build_model(kind, config))))


class JaxTrainer:
  """Our side of one run: jitted gradients + the jitted make_optimizer update, or for cls/reg the Finetuner's step
  (debertax.finetune, what fine-tuning runs)."""

  def __init__(self, kind: str, config: ModelConfig, params, opt_config: ml_collections.ConfigDict,
               batch_size: int):
    self.kind = kind
    if kind in ("cls", "reg"):
      self._init_finetuner(config, params, opt_config, batch_size)
      return
    self.tx, self.schedule = optimizer_lib.make_optimizer(opt_config)
    self.params = jax.device_put(params)
    self.opt_state = self.tx.init(self.params)
    self._grads = _value_and_grad(kind, config)

    def update(params, opt_state, grads):
      updates, opt_state = self.tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    self._update = compile_options.jit(update)

  def _init_finetuner(self, config: ModelConfig, params, opt_config, batch_size: int):
    settings = finetune.RunSettings(
        lr=float(opt_config.lr), epochs=1, warmup_steps=int(opt_config.warmup_steps), batch_size=batch_size,
        eval_batch_size=batch_size, max_length=config.max_position_embeddings,
        classifier_dropout=float(config.classifier_dropout), grad_accum_steps=1, model_size="base")
    run_config = ml_collections.ConfigDict({"train": {k: opt_config[k] for k in (
        "grad_clip", "adam_b1", "adam_b2", "adam_eps", "bias_correction", "weight_decay", "layer_decay")}})
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    self.finetuner = finetune.Finetuner(config, settings, run_config, int(opt_config.steps), mesh=mesh)
    self.schedule = self.finetuner.schedule
    self.state = self.finetuner.init_state(self.finetuner.place_params(params))

  def step(self, batch: dict) -> float:
    """One optimizer step; returns the loss before it (waits for the result)."""
    if self.kind in ("cls", "reg"):
      self.state, metrics = self.finetuner.step(self.state, batch)
      return float(metrics["loss"])
    loss, grads = self._grads(self.params, batch)
    self.params, self.opt_state = self._update(self.params, self.opt_state, grads)
    return float(loss)

  def current_params(self):
    params = self.state.params if self.kind in ("cls", "reg") else self.params
    return jax.tree_util.tree_map(np.asarray, jax.device_get(params))


# Both sides ----------------------------------------------------------------------------------------------------
def run_pair(kind: str, config: ModelConfig, opt_config: ml_collections.ConfigDict, batches: list, params,
             log_every: int = 0) -> dict:
  """Trains `kind` from `params` on `batches` in both frameworks (ours first, then torch).

  Returns losses_jax / losses_torch [steps] float64, seconds_* / cpu_seconds_* [steps] (wall and process CPU
  time of each step, compilation included in the first), grad_norms [steps] (torch's, before clipping),
  params_jax / params_torch (our tree after the last step), schedule.
  """
  from benchmarks import torch_reference

  out = {}
  ours = JaxTrainer(kind, config, params, opt_config, batch_size=len(batches[0]["input_ids"]))
  out.update(_timed_steps(ours.step, batches, f"{kind} jax  ", log_every, "jax"),
             params_jax=ours.current_params(), schedule=ours.schedule)
  model = torch_reference.load_params(torch_reference.build(kind, config), params)
  theirs = torch_reference.Trainer(kind, model, params, opt_config, ours.schedule)
  out.update(_timed_steps(theirs.step, batches, f"{kind} torch", log_every, "torch"),
             grad_norms=np.array(theirs.grad_norms), params_torch=torch_params_as_ours(kind, config, model))
  return out


def _timed_steps(step, batches, label: str, log_every: int, suffix: str) -> dict:
  """Runs step(batch) over the batches: losses_<suffix>, seconds_<suffix>, cpu_seconds_<suffix> [steps]."""
  losses, seconds, cpu = [], [], []
  for index, batch in enumerate(batches):
    start, start_cpu = time.perf_counter(), time.process_time()
    losses.append(step(batch))
    seconds.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
    if log_every and (index + 1) % log_every == 0:
      print(f"  {label} step {index + 1}: loss {losses[-1]:.5f}", flush=True)
  return {f"losses_{suffix}": np.array(losses), f"seconds_{suffix}": np.array(seconds),
          f"cpu_seconds_{suffix}": np.array(cpu)}


def max_relative_difference(ours, theirs, steps: int = FIRST_STEPS) -> float:
  """max over the first `steps` steps of |ours - theirs| / |theirs|."""
  ours, theirs = np.asarray(ours[:steps], np.float64), np.asarray(theirs[:steps], np.float64)
  return float(np.max(np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1e-30)))


def parameter_differences(ours, theirs) -> dict:
  """Per leaf (path joined by '/'): max |ours - theirs|; every leaf of each tree must be in the other."""
  a, b = traverse_util.flatten_dict(ours), traverse_util.flatten_dict(theirs)
  if set(a) != set(b):
    raise ValueError(f"parameter trees differ: only ours {sorted(set(a) - set(b))}, "
                     f"only torch {sorted(set(b) - set(a))}")
  return {"/".join(path): float(np.max(np.abs(np.asarray(a[path], np.float64) - np.asarray(b[path], np.float64))))
          for path in sorted(a)}


# The command --------------------------------------------------------------------------------------------------
def _ensure_malloc_tunables(args) -> str:
  """Re-executes this script with GLIBC_TUNABLES set (it must be in the environment before the process starts)."""
  if args.no_malloc_tunables:
    if "GLIBC_TUNABLES" in os.environ:
      env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
      os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    return "unset (--no-malloc-tunables)"
  if os.environ.pop(_TUNABLES_MARK, None):
    return f"{os.environ['GLIBC_TUNABLES']} (set by training_parity.py)"
  if "GLIBC_TUNABLES" in os.environ:
    return f"{os.environ['GLIBC_TUNABLES']} (from the environment)"
  env = {**os.environ, "GLIBC_TUNABLES": compile_options.CPU_MALLOC_TUNABLES, _TUNABLES_MARK: "1"}
  os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
  raise AssertionError("unreachable")


def _pretraining_stream(args, steps: int):
  """-> (raw batches, vocab_size, mask_id, description) from --corpus, or the synthetic stream."""
  if not args.corpus:
    rng = np.random.default_rng(args.seed)
    raws = [synthetic_pretraining_batch(rng, args.batch_size, args.length, args.vocab_size) for _ in range(steps)]
    return raws, args.vocab_size, args.vocab_size - 1, f"synthetic Zipf stream, vocabulary {args.vocab_size}"
  from debertax.data import DataConfig, PretrainingIterator, source_lines
  from debertax.tokenizer import Tokenizer, train_sentencepiece
  source = args.corpus
  if source == "default":
    from debertax.corpus import default_corpus_lines
    source = os.path.join(args.out, "default_corpus.txt")
    with open(source, "w", encoding="utf-8") as f:
      for line in default_corpus_lines():
        f.write(line.replace("\n", " ") + "\n")
  if args.vocab:
    tokenizer = Tokenizer.load(args.vocab)
  else:
    tokenizer = Tokenizer.load(train_sentencepiece(source_lines(source), os.path.join(args.out, "vocab"),
                                                   args.vocab_size))
  data = DataConfig(source=source, seq_len=args.length, batch_size=args.batch_size, seed=args.seed,
                    max_predictions=num_predictions(args.length), shuffle_window=64)
  iterator = PretrainingIterator(data, tokenizer, process_index=0, process_count=1)
  raws = [next(iterator) for _ in range(steps)]
  what = (f"{args.corpus if args.corpus != 'default' else 'the embedded default corpus'} through "
          f"PretrainingIterator, SentencePiece vocabulary {tokenizer.vocab_size} (with [MASK])")
  return raws, tokenizer.vocab_size, tokenizer.mask_id, what


def _report_steps(steps: int) -> list[int]:
  shown = [s for s in (1, 10, 100, 500, 1000) if s <= steps]
  return shown + ([steps] if steps not in shown else [])


def _tables(results: dict, steps: int) -> str:
  shown = _report_steps(steps)
  lines = ["| model | framework | " + " | ".join(f"loss @ {s}" for s in shown)
           + " | wall ms / step (median) | CPU ms / step (mean) |", "|---|---|" + "---|" * (len(shown) + 2)]
  for kind, r in results.items():
    for name, key in (("debertax (JAX)", "jax"), ("transformers (torch)", "torch")):
      losses, seconds, cpu = r[f"losses_{key}"], r[f"seconds_{key}"][1:], r[f"cpu_seconds_{key}"][1:]
      wall = 1000 * float(np.median(seconds)) if len(seconds) else float("nan")
      cpu = 1000 * float(np.mean(cpu)) if len(cpu) else float("nan")
      lines.append(f"| {kind} | {name} | " + " | ".join(f"{losses[s - 1]:.5f}" for s in shown)
                   + f" | {wall:.1f} | {cpu:.1f} |")
  last = min(100, steps)
  lines += ["", f"| model | max rel. loss diff, steps 1-{min(FIRST_STEPS, steps)} | mean abs loss diff, last {last} "
            f"steps | max abs param diff at the end (leaf) | steps clipped | JAX first step (compile) s |",
            "|---|---|---|---|---|---|"]
  for kind, r in results.items():
    diffs = parameter_differences(r["params_jax"], r["params_torch"])
    worst = max(diffs, key=diffs.get)
    tail = float(np.mean(np.abs(r["losses_jax"][-last:] - r["losses_torch"][-last:])))
    lines.append(f"| {kind} | {max_relative_difference(r['losses_jax'], r['losses_torch']):.2e} | {tail:.2e} | "
                 f"{diffs[worst]:.2e} ({worst}) | {_clipped(r)} | {r['seconds_jax'][0]:.1f} |")
  return "\n".join(lines)


def _clipped(result: dict) -> str:
  norms = result["grad_norms"]
  return f"{int(np.sum(norms > result['grad_clip']))} / {len(norms)}" if len(norms) else "no clipping"


def _plot(results: dict, path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")  # No display on servers.
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, len(results), figsize=(4.5 * len(results), 6.5), squeeze=False, sharex="col")
  for column, (kind, r) in enumerate(results.items()):
    steps = np.arange(1, len(r["losses_jax"]) + 1)
    top, bottom = axes[0][column], axes[1][column]
    top.plot(steps, r["losses_torch"], "-", label="transformers (torch)", linewidth=2.5, alpha=0.6)
    top.plot(steps, r["losses_jax"], "--", label="debertax (JAX)", linewidth=1)
    top.set_title(f"{kind}: training loss")
    top.legend(fontsize=7)
    rel = np.abs(r["losses_jax"] - r["losses_torch"]) / np.maximum(np.abs(r["losses_torch"]), 1e-30)
    bottom.semilogy(steps, np.maximum(rel, 1e-12), linewidth=0.8)
    bottom.set_title(f"{kind}: |JAX - torch| / |torch|")
    bottom.set_xlabel("step")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--models", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
  parser.add_argument("--out", default="runs/training_parity", help="output directory (README.md, losses.png)")
  parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
  parser.add_argument("--warmup", type=int, default=100, help="warmup steps (then linear decay to 0 at --steps)")
  parser.add_argument("--weight-decay", type=float, default=0.01)
  parser.add_argument("--grad-clip", type=float, default=1.0)
  parser.add_argument("--authors-adam", action="store_true", help="Adam without bias correction on both sides")
  parser.add_argument("--corpus", default="", help="text file, or 'default' (embedded corpus); empty: synthetic")
  parser.add_argument("--vocab", default="", help="spm.model for --corpus (default: train one into OUT/vocab)")
  parser.add_argument("--vocab-size", type=int, default=2000, help="synthetic vocabulary / trained SentencePiece")
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--threads", type=int, default=0,
                      help="pin the process to this many cores and torch to as many threads (0: all). On a shared "
                           "machine 1 keeps torch's thread pool from waiting on descheduled threads")
  parser.add_argument("--no-malloc-tunables", action="store_true", help="do not set GLIBC_TUNABLES")
  args = parser.parse_args(argv)
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  unknown = sorted(set(models) - set(KINDS))
  if unknown or not models:
    parser.error(f"--models: unknown {unknown}; choose from {','.join(KINDS)}")
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(os.path.abspath(__file__), os.getcwd()),
                                                          *sys.argv[1:]])
  malloc = _ensure_malloc_tunables(args)

  if args.threads > 0:  # Before JAX or torch start their thread pools.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
  import torch
  import transformers
  if args.threads > 0:
    torch.set_num_threads(args.threads)
  os.makedirs(args.out, exist_ok=True)
  raws, vocab_size, mask_id, data_text = _pretraining_stream(args, args.steps)
  opt = train_config(lr=args.lr, warmup_steps=args.warmup, steps=args.steps, grad_clip=args.grad_clip,
                     weight_decay=args.weight_decay, bias_correction=not args.authors_adam)
  header = [
      "## Training parity: debertax (JAX) against transformers + torch", "", f"Command: `{command}`", "",
      f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}; host {platform.node()}, "
      f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable by this run), {jax.default_backend()} backend",
      f"- Versions: jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
      f"transformers {transformers.__version__}",
      f"- GLIBC_TUNABLES (both frameworks, one process): {malloc}",
      "- Load average before the run (1/5/15 min): " + " / ".join(f"{x:.1f}" for x in os.getloadavg())
      + " (other processes on the machine slow both frameworks)",
      f"- Data: {data_text}; batch {args.batch_size} x L {args.length}, "
      f"{num_predictions(args.length)} prediction slots per row",
      f"- Optimizer: {'Adam without bias correction' if args.authors_adam else 'bias-corrected AdamW'}, "
      f"peak lr {args.lr}, warmup {args.warmup}, linear decay to 0 at step {args.steps}, weight decay "
      f"{args.weight_decay} (not on biases / LayerNorms), global-norm clip {args.grad_clip}, eps 1e-6; "
      "dropout 0, float32",
      "- Shapes: hidden 128, 4 heads, FFN 512, position_buckets 64; 2 layers (mlm, emd), 4 (rtd, cls, reg)"]
  usable = len(os.sched_getaffinity(0))
  if args.threads != 1 and os.getloadavg()[0] > usable - 0.5:
    header.append(f"- Warning: load average {os.getloadavg()[0]:.1f} on {usable} usable cores. torch's thread pool "
                  "waits on descheduled threads (measured here: 1.2 s instead of 8 ms per tiny step): the wall "
                  "times say little; rerun with --threads 1")
  header.append("")
  print("\n".join(header), flush=True)
  results = {}
  for kind in models:
    config = model_config(kind, vocab_size)
    batches = make_batches(kind, raws, vocab_size, mask_id, num_predictions(args.length), args.seed)
    params = initial_params(kind, config, args.seed)
    print(f"### {kind}", flush=True)
    results[kind] = run_pair(kind, config, opt, batches, params, log_every=max(args.steps // 5, 1))
    results[kind]["grad_clip"] = args.grad_clip
  table = _tables(results, args.steps)
  print("\n" + table, flush=True)
  png = _plot(results, os.path.join(args.out, "losses.png"))
  with open(os.path.join(args.out, "README.md"), "w") as f:
    f.write("\n".join(header) + "\n" + table + f"\n\n![loss curves]({os.path.basename(png)})\n")
  with open(os.path.join(args.out, "losses.json"), "w") as f:
    json.dump({kind: {key: r[key].tolist() for key in ("losses_jax", "losses_torch", "seconds_jax", "seconds_torch",
                                                       "cpu_seconds_jax", "cpu_seconds_torch", "grad_norms")}
               for kind, r in results.items()}, f)
  print(f"\nwrote {os.path.join(args.out, 'README.md')}, {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
