"""GLUE and zero-shot XNLI fine-tuning: `debertax.main` calls `run(config, workdir)` for task glue / xnli.

    python -m debertax.main --config=configs/glue.py:rte --config.init_from=DIR --workdir=W
    python -m debertax.main --config=configs/xnli.py --config.init_from=DIR --workdir=W

The run:
  1. resolves the hyperparameters (fields left None take tasks.default_hparams(task, model_size));
  2. loads the backbone from init_from (a Hugging Face or debertax directory); the pooler and classifier are
     freshly initialised from the seed (eval_only / epochs=0 instead loads a fine-tuned checkpoint whole);
  3. reads and tokenises the data (local GLUE/XNLI files or TFDS), trains for the given epochs with the
     authors' optimizer (optionally layer-wise lr decay), gradient accumulation and data-parallel sharding
     over the same mesh and logical-axis rules as pretraining;
  4. evaluates the whole dev set every epoch (the last batch is padded and the padding masked out), keeps the
     best model by the task's main metric, stops early after `early_stopping_patience` epochs without one;
  5. re-evaluates the best model, writes GLUE-submission-format predictions and results.json, prints the table.

Workdir layout:
    config.json                 the resolved config (a rerun with a different config is refused)
    checkpoints/<step>/         Orbax train state + loop position (resume after a crash, at epoch ends,
                                every train.checkpoint_every steps and on SIGTERM)
    best_model/                 debertax model directory (head "cls", spm.model, task.json): the best epoch
    predictions/<split>/<GLUE file>   e.g. predictions/dev/RTE.tsv, predictions/test/RTE.tsv
    metrics.jsonl, tensorboard/ train and eval metrics (debertax.metric_writer)
    results.json                final metrics, hyperparameters, history, wall time

Batches are padded to a few bucket lengths (debertax.inference.bucket_lengths), so the train and eval steps
compile once per bucket. A row of a step's batch that is padding (the last, partial batch of an epoch or of
the dev set) has weight 0: the loss is the weighted mean over the real rows of the whole optimizer step, and
the micro-batches of gradient accumulation sum their weighted losses before dividing, so accumulating A
micro-batches gives the full-batch gradient.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from flax import traverse_util

from debertax import checkpoint as checkpoint_lib
from debertax import compile_options, eval_metrics, hub, sharding, storage, tasks
from debertax import heads as heads_lib
from debertax import optimizer as optimizer_lib
from debertax.config import RUNTIME_FIELDS, ModelConfig, parse_pos_att_type
from debertax.inference import bucket_for, bucket_lengths, pad_rows
from debertax.metric_writer import MetricWriter
from debertax.tokenizer import Tokenizer, resolve_spm_path
from debertax.train import TrainState

_TOKENIZE_CHUNK = 50_000  # Rows per tokenizer call; larger splits log their progress.
BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "weights")
BEST_MODEL_DIR = "best_model"
TASK_META = "task.json"
# The dev split whose predictions are written in the format (and under the file name) of this test split.
_SUBMISSION_SPLIT_OF = {"dev": "test", "dev_matched": "test_matched", "dev_mismatched": "test_mismatched",
                        "test": "test", "test_matched": "test_matched", "test_mismatched": "test_mismatched"}


# Data ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EncodedSplit:
  """One tokenised split. input_ids / token_type_ids: N unpadded int32 rows; labels [N] (int32 class ids or
  float32 scores; None when unlabelled); indices [N]: the GLUE index column, or the row position when the file
  has none."""
  name: str
  task: str  # The task whose metrics apply (mnli for XNLI's training set, xnli for its evaluation sets).
  input_ids: list
  token_type_ids: list
  labels: np.ndarray | None
  indices: np.ndarray
  language: str | None = None
  numbered_by_position: bool = False

  def __len__(self) -> int:
    return len(self.input_ids)

  @property
  def lengths(self) -> np.ndarray:
    return np.array([len(row) for row in self.input_ids], np.int64)


def encode_split(name: str, task: str, result: tasks.ReadResult, tokenizer: Tokenizer, max_length: int,
                 language: str | None = None) -> EncodedSplit:
  """Tokenises `[CLS] A [SEP] (B [SEP])`, truncated longest-first to max_length."""
  examples = result.examples
  if not examples:
    raise ValueError(f"{task} {name}: no examples to encode")
  pairs = [e.text_b for e in examples]
  has_pair = [p is not None for p in pairs]
  if any(has_pair) and not all(has_pair):
    raise ValueError(f"{task} {name}: some rows have a second text and some do not")
  encoded = {"input_ids": [], "token_type_ids": []}
  for start in range(0, len(examples), _TOKENIZE_CHUNK):
    chunk = slice(start, start + _TOKENIZE_CHUNK)
    part = tokenizer([e.text_a for e in examples[chunk]], pairs[chunk] if all(has_pair) else None,
                     max_length=max_length, truncation=True, padding=False)
    encoded["input_ids"] += part["input_ids"]
    encoded["token_type_ids"] += part["token_type_ids"]
    if len(examples) > _TOKENIZE_CHUNK:
      logging.info("%s %s: tokenised %d of %d rows", task, name, min(start + _TOKENIZE_CHUNK, len(examples)),
                   len(examples))
  labels = [e.label for e in examples]
  if all(label is None for label in labels):
    label_array = None
  elif any(label is None for label in labels):
    raise ValueError(f"{task} {name}: some rows are labelled and some are not")
  else:
    label_array = np.asarray(labels, np.float32 if tasks.get_task(task).is_regression else np.int32)
  numbered_by_position = any(e.index is None for e in examples)
  indices = (np.arange(len(examples), dtype=np.int64) if numbered_by_position
             else np.asarray([e.index for e in examples], np.int64))
  return EncodedSplit(name, task, encoded["input_ids"], encoded["token_type_ids"], label_array, indices, language,
                      numbered_by_position)


@dataclasses.dataclass
class TaskData:
  """train: the training split (None for eval-only runs); evals: labelled splits scored every epoch and at the
  end; finals: further splits predicted at the end only (test files, and XNLI languages not used to select)."""
  train: EncodedSplit | None
  evals: dict
  finals: dict


def _read(task: str, split: str, config, language: str | None = None) -> tasks.ReadResult:
  """One split from the local directory of the config, or else from TFDS."""
  spec = tasks.get_task(task)
  local_root = config.xnli.eval_dir if task == "xnli" else config.data_dir
  if local_root:
    if task == "xnli":
      return tasks.read_xnli_split(local_root, split, [language], on_bad_row=config.on_bad_row)[language]
    return tasks.read_glue_split(task, local_root, split, on_bad_row=config.on_bad_row)
  tfds_name = "multi_nli" if (config.task == "xnli" and task == "mnli") else None
  try:
    return tasks.read_tfds(task, split, language=language, tfds_name=tfds_name,
                           data_dir=config.tfds_data_dir or None, download=bool(config.tfds_download),
                           on_bad_row=config.on_bad_row)
  except ImportError as e:
    raise RuntimeError(f"TFDS is not importable ({e}); set --config.data_dir to a local GLUE directory") from e
  except Exception as e:  # TFDS raises many types for a missing or unprepared dataset.
    where = "--config.xnli.eval_dir" if task == "xnli" else "--config.data_dir"
    first_line = (str(e).strip().splitlines() or [""])[0][:200]
    raise RuntimeError(f"TFDS {tfds_name or spec.tfds_name} split {split!r} is not available "
                       f"({type(e).__name__}: {first_line}); prepare it (--config.tfds_download=True) or set "
                       f"{where} to local files") from e


def _local_split_exists(task: str, split: str, config, language: str | None = None) -> bool:
  """Whether an optional split (a test set) has a local file; TFDS always serves the GLUE/XNLI test splits."""
  spec = tasks.get_task(task)
  if task == "xnli":
    return not config.xnli.eval_dir or storage.isfile(storage.join(config.xnli.eval_dir,
                                                                   spec.file_name(split, language)))
  if not config.data_dir:
    return True
  return storage.isfile(storage.join(config.data_dir, spec.data_dir_name, spec.file_name(split)))


def xnli_languages(config) -> tuple[str, ...]:
  languages = tuple(lang.strip() for lang in config.xnli.languages.split(",") if lang.strip())
  unknown = [lang for lang in languages if lang not in tasks.XNLI_LANGUAGES]
  if unknown or not languages:
    raise ValueError(f"config.xnli.languages={config.xnli.languages!r}: unknown or no languages {unknown}; "
                     f"choose from {','.join(tasks.XNLI_LANGUAGES)}")
  return languages


def load_task_data(config, tokenizer: Tokenizer, max_length: int, with_train: bool) -> TaskData:
  """Reads and tokenises every split the run needs (see TaskData)."""
  start = time.time()
  train = None
  if config.task == "xnli":
    languages = xnli_languages(config)
    if with_train:
      if config.xnli.translate_train_all:
        train = _translate_train_all(config, tokenizer, max_length, languages)
      else:
        train = encode_split("train", "mnli", _read("mnli", "train", config), tokenizer, max_length)
    select = ("en",) if config.xnli.select_on == "en" else languages
    if config.xnli.select_on not in ("en", "avg"):
      raise ValueError(f"config.xnli.select_on={config.xnli.select_on!r}: use 'en' or 'avg'")
    if "en" in select and "en" not in languages:
      raise ValueError("config.xnli.select_on='en' needs 'en' in config.xnli.languages")
    evals, finals = {}, {}
    for language in languages:
      target = evals if language in select else finals
      target[f"dev/{language}"] = encode_split(f"dev/{language}", "xnli", _read("xnli", "dev", config, language),
                                               tokenizer, max_length, language)
    for language in languages:
      if _local_split_exists("xnli", "test", config, language):
        finals[f"test/{language}"] = encode_split(
            f"test/{language}", "xnli", _read("xnli", "test", config, language), tokenizer, max_length, language)
      else:
        logging.info("No XNLI test file for %s under %s; scoring dev only", language, config.xnli.eval_dir)
  else:
    task = config.task_name
    spec = tasks.get_task(task)
    if with_train:
      train = encode_split("train", task, _read(task, "train", config), tokenizer, max_length)
    evals = {split: encode_split(split, task, _read(task, split, config), tokenizer, max_length)
             for split in spec.eval_splits}
    finals = {}
    for split, _ in spec.submission_files:
      if _local_split_exists(task, split, config):
        finals[split] = encode_split(split, task, _read(task, split, config), tokenizer, max_length)
      else:
        logging.info("No %s %s file under %s: no test submission is written", spec.display_name, split,
                     config.data_dir)
  if train is not None and config.max_train_examples > 0 and len(train) > config.max_train_examples:
    logging.info("Keeping the first %d of %d training rows (config.max_train_examples)",
                 config.max_train_examples, len(train))
    n = int(config.max_train_examples)
    train = dataclasses.replace(train, input_ids=train.input_ids[:n], token_type_ids=train.token_type_ids[:n],
                                labels=train.labels[:n], indices=train.indices[:n])
  if train is not None and train.labels is None:
    raise ValueError(f"{train.task} train: the training file has no labels")
  for split in evals.values():
    if split.labels is None:
      raise ValueError(f"{split.task} {split.name}: the evaluation file has no labels")
  sizes = {name: len(split) for name, split in {**({"train": train} if train else {}), **evals, **finals}.items()}
  logging.info("Data ready in %.1f s: %s rows (max_length %d)", time.time() - start, sizes, max_length)
  return TaskData(train, evals, finals)


def _translate_train_all(config, tokenizer, max_length, languages) -> EncodedSplit:
  """Every language's translated MNLI training file, concatenated in the language order of the config."""
  if not config.xnli.translate_train_dir:
    raise ValueError("config.xnli.translate_train_all needs config.xnli.translate_train_dir "
                     "(a folder of train-<lang>.tsv files)")
  parts = []
  for language in languages:
    path = storage.join(config.xnli.translate_train_dir, f"train-{language}.tsv")
    if not storage.isfile(path):
      raise FileNotFoundError(f"{path}: no translate-train file for language {language!r}")
    parts.append(encode_split("train", "mnli", tasks.read_tsv("xnli", path, on_bad_row=config.on_bad_row),
                              tokenizer, max_length, language))
  return EncodedSplit("train", "mnli", [r for p in parts for r in p.input_ids],
                      [r for p in parts for r in p.token_type_ids], np.concatenate([p.labels for p in parts]),
                      np.arange(sum(len(p) for p in parts)))


# Configuration ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunSettings:
  """Hyperparameters after the task defaults are filled in."""
  lr: float
  epochs: int
  warmup_steps: int
  batch_size: int
  eval_batch_size: int
  max_length: int
  classifier_dropout: float
  grad_accum_steps: int
  model_size: str


def infer_model_size(model_config: ModelConfig) -> str:
  """Which default hyperparameter row applies: the configs/common.py size with this depth and width, else
  the size of the same width class (narrower than 384: "tiny"), with a warning naming the choice."""
  from configs import common
  for size, shape in common.SIZES.items():
    if (shape["num_hidden_layers"], shape["hidden_size"]) == (model_config.num_hidden_layers,
                                                              model_config.hidden_size):
      return size
  width = model_config.hidden_size
  size = "tiny" if width < 384 else "xsmall" if width < 768 else "base" if width < 1024 else "large"
  logging.warning("config.model_size='auto': a %d-layer, %d-wide model is none of the released sizes; using "
                  "the %r defaults (learning rate x%g of the large table); set --config.model_size to choose",
                  model_config.num_hidden_layers, width, size, tasks.LR_SCALE_BY_SIZE[size])
  return size


def schedule_for_run(config, settings: RunSettings, total_steps: int) -> RunSettings:
  """Caps a default warmup at tasks.MAX_WARMUP_FRACTION of the run; warns when the schedule cannot reach
  its peak learning rate (a warmup as long as the run)."""
  if total_steps <= 0:
    return settings
  if config.train.warmup_steps is None:
    warmup = tasks.warmup_for_run(settings.warmup_steps, total_steps)
    if warmup != settings.warmup_steps:
      logging.info("Warmup %d -> %d steps (at most %d%% of the run's %d steps)", settings.warmup_steps, warmup,
                   round(100 * tasks.MAX_WARMUP_FRACTION), total_steps)
      settings = dataclasses.replace(settings, warmup_steps=warmup)
  if settings.warmup_steps >= total_steps:
    logging.warning("config.train.warmup_steps=%d >= the run's %d optimizer steps: the learning rate never "
                    "reaches its peak %g (it stops at %.3g)", settings.warmup_steps, total_steps, settings.lr,
                    settings.lr * (total_steps - 1) / max(settings.warmup_steps, 1))
  return settings


def resolve_settings(config, model_config: ModelConfig) -> RunSettings:
  size = infer_model_size(model_config) if config.model_size == "auto" else config.model_size
  hp = tasks.default_hparams(config.task_name, size)
  train = config.train
  pick = lambda value, default: default if value is None else value
  settings = RunSettings(
      lr=float(pick(train.lr, hp.learning_rate)), epochs=int(pick(train.epochs, hp.epochs)),
      warmup_steps=int(pick(train.warmup_steps, hp.warmup_steps)), batch_size=int(pick(train.batch_size,
                                                                                        hp.batch_size)),
      eval_batch_size=int(pick(train.eval_batch_size, pick(train.batch_size, hp.batch_size))),
      max_length=int(pick(train.max_length, hp.max_length)),
      classifier_dropout=float(pick(config.model.cls_dropout, hp.classifier_dropout)),
      grad_accum_steps=int(train.grad_accum_steps), model_size=size)
  if settings.epochs < 0 or settings.batch_size < 1 or settings.eval_batch_size < 1 or settings.max_length < 3:
    raise ValueError(f"config.train: need epochs >= 0, batch sizes >= 1 and max_length >= 3, got {settings}")
  if settings.grad_accum_steps < 1 or settings.batch_size % settings.grad_accum_steps:
    raise ValueError(f"config.train.batch_size={settings.batch_size} is not a multiple of "
                     f"config.train.grad_accum_steps={settings.grad_accum_steps}")
  return settings


# config.model fields that may differ from init_from's config.json: they do not change the parameters.
_NON_ARCHITECTURE_FIELDS = RUNTIME_FIELDS | {"hidden_dropout_prob", "attention_probs_dropout_prob", "pooler_dropout",
                                             "cls_dropout"}


def _model_overrides(config) -> dict:
  return {k: v for k, v in config.model.to_dict().items() if v is not None}


def build_model_config(config, loaded: ModelConfig | None, tokenizer: Tokenizer, num_labels: int) -> ModelConfig:
  """The checkpoint's architecture (or configs/common.py's for a random init) with config.model overrides."""
  overrides = _model_overrides(config)
  if loaded is not None:
    normalised = lambda key, value: parse_pos_att_type(value) if key == "pos_att_type" else value
    clash = {k: (v, getattr(loaded, k)) for k, v in overrides.items()
             if k not in _NON_ARCHITECTURE_FIELDS and normalised(k, v) != getattr(loaded, k)}
    if clash:
      raise ValueError(f"config.model sets architecture field(s) that differ from init_from (config, checkpoint): "
                       f"{clash}; the architecture comes from the checkpoint")
    model_config = loaded.replace(**overrides, num_labels=num_labels)
  else:
    from configs import common
    size = config.model_size
    if size == "auto":  # The shape must then come from config.model; the hyperparameter row follows from it.
      if "hidden_size" not in overrides or "num_hidden_layers" not in overrides:
        raise ValueError("a random initialisation with config.model_size='auto' needs the shape in config.model "
                         "(at least hidden_size and num_hidden_layers), or --config.model_size="
                         f"{'|'.join(tasks.MODEL_SIZES)}")
      size = "xsmall"  # the released v3 settings; the overrides give the shape
    values = common.model_config(size, vocab_size=tokenizer.vocab_size).to_dict()
    values.update(overrides)
    model_config = ModelConfig.from_dict({**values, "num_labels": num_labels})
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                     f"{model_config.vocab_size}")
  return model_config


# The trainer --------------------------------------------------------------------------------------------------
class Finetuner:
  """Sharded train/eval steps of a sequence classifier (see the module docstring for the batch layout)."""

  def __init__(self, model_config: ModelConfig, settings: RunSettings, config, steps: int, mesh=None,
               seed: int = 0):
    """config: the run's config (train.* optimizer fields and mesh); steps: optimizer steps of the schedule."""
    self.model_config = model_config
    self.settings = settings
    self.regression = model_config.num_labels == 1
    self.model = heads_lib.build_model(model_config, "cls")
    self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    self.seed = seed
    data_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    micro = settings.batch_size // settings.grad_accum_steps
    for name, size in (("batch_size / grad_accum_steps", micro), ("eval_batch_size", settings.eval_batch_size)):
      if size % data_shards:
        raise ValueError(f"config.train.{name}={size} is not divisible by the {data_shards} data-parallel "
                         f"devices of the mesh {dict(self.mesh.shape)}")
    if (settings.batch_size // jax.process_count()) * jax.process_count() != settings.batch_size:
      raise ValueError(f"config.train.batch_size={settings.batch_size} is not divisible by the "
                       f"{jax.process_count()} processes")
    opt_config = ml_collections.ConfigDict(dict(
        lr=settings.lr, warmup_steps=settings.warmup_steps, steps=max(steps, 1),
        grad_clip=config.train.grad_clip, adam_b1=config.train.adam_b1,
        adam_b2=config.train.adam_b2, adam_eps=config.train.adam_eps,
        bias_correction=config.train.bias_correction, weight_decay=config.train.weight_decay,
        layer_decay=config.train.layer_decay))
    self.tx, self.schedule = optimizer_lib.make_optimizer(opt_config)

    self.batch_sharding = sharding.batch_sharding(self.mesh)
    boxed_params = heads_lib.abstract_params(self.model)
    self.param_shardings = sharding.logical_shardings(boxed_params, self.mesh)
    abstract_opt = jax.eval_shape(self.tx.init, nn.unbox(boxed_params))
    self.state_shardings = TrainState(
        step=sharding.replicated(self.mesh), params=self.param_shardings,
        opt_state=sharding.opt_state_shardings(abstract_opt, boxed_params, self.param_shardings, self.mesh),
        rng=sharding.replicated(self.mesh))
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=nn.unbox(boxed_params),
                          opt_state=abstract_opt, rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    self.abstract_state = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, self.state_shardings)
    batch_shardings = {k: self.batch_sharding for k in BATCH_KEYS}
    replicated = sharding.replicated(self.mesh)
    self._init_params = jax.jit(lambda rng: heads_lib.init_params(self.model, rng),
                                out_shardings=self.param_shardings)
    self._init_opt = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)
    self._step = compile_options.jit(
        self._train_step, in_shardings=(self.state_shardings, batch_shardings),
        out_shardings=(self.state_shardings, replicated), donate_argnums=0)
    self._predict = compile_options.jit(
        self._predict_step, in_shardings=(self.param_shardings, batch_shardings), out_shardings=replicated)

  # State --------------------------------------------------------------------------------------------------
  def fresh_params(self):
    """Random parameters for the whole classifier (from the seed), sharded."""
    with sharding.MeshRules(self.mesh):
      return self._init_params(jax.random.PRNGKey(self.seed))

  def place_params(self, params):
    """Host (or device) parameters -> the model's sharding; the tree must match the classifier's exactly."""
    expected = traverse_util.flatten_dict(self.abstract_state.params)
    got = traverse_util.flatten_dict(params)
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(np.shape(got[k])) != tuple(expected[k].shape))
    if missing or extra or wrong:
      raise ValueError("parameters do not fit the classifier: missing %s, unexpected %s, wrong shape %s" % (
          ["/".join(k) for k in missing[:5]], ["/".join(k) for k in extra[:5]],
          [("/".join(k), np.shape(got[k]), expected[k].shape) for k in wrong[:5]]))
    return jax.device_put(params, self.param_shardings)

  def init_state(self, params) -> TrainState:
    with sharding.MeshRules(self.mesh):
      opt_state = self._init_opt(params)
    rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(self.seed), 1), sharding.replicated(self.mesh))
    return TrainState(step=jax.device_put(jnp.zeros([], jnp.int32), sharding.replicated(self.mesh)),
                      params=params, opt_state=opt_state, rng=rng)

  # Steps --------------------------------------------------------------------------------------------------
  def _weighted_loss_sum(self, params, batch, rng):
    """-> (sum of weight * per-example loss, sum of weights) over a [b, L] micro-batch."""
    logits = self.model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                              batch["token_type_ids"], deterministic=False, rngs={"dropout": rng})
    if self.regression:
      per_example = jnp.square(logits[:, 0] - batch["labels"])
    else:
      log_probs = jax.nn.log_softmax(logits, axis=-1)
      per_example = -jnp.take_along_axis(log_probs, batch["labels"].astype(jnp.int32)[:, None], axis=-1)[:, 0]
    weights = batch["weights"]
    return jnp.sum(per_example * weights), jnp.sum(weights)

  def _accumulated_grads(self, params, batch, rng):
    """-> (gradient of the weighted mean loss over the step's real rows, that loss, the number of real rows).

    Rows arrive interleaved (global row i * accum + a is row i of micro-batch a; see step_rows), so that the
    reshape below leaves every device its share of every micro-batch. Micro-batches add up weighted loss sums
    and weights; dividing once at the end makes A micro-batches equal one full batch."""
    accum = self.settings.grad_accum_steps
    micro = self.settings.batch_size // accum
    micro_batches = jax.tree_util.tree_map(lambda x: x.reshape((micro, accum) + x.shape[1:]).swapaxes(0, 1), batch)
    grad_fn = jax.value_and_grad(self._weighted_loss_sum, has_aux=True)

    def accumulate(carry, inputs):
      grads, loss, weight = carry
      micro_batch, index = inputs
      (micro_loss, micro_weight), micro_grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
      return (jax.tree_util.tree_map(jnp.add, grads, micro_grads), loss + micro_loss, weight + micro_weight), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (grads, loss_sum, weight_sum), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), (micro_batches, jnp.arange(accum)))
    denominator = jnp.maximum(weight_sum, 1.0)
    return jax.tree_util.tree_map(lambda g: g / denominator, grads), loss_sum / denominator, weight_sum

  def _train_step(self, state: TrainState, batch):
    grads, loss, examples = self._accumulated_grads(state.params, batch, jax.random.fold_in(state.rng, state.step))
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "learning_rate": self.schedule(state.step),
               "examples": examples}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def gradients(self, state: TrainState, batch: dict):
    """For tests and diagnostics: (grads, loss) of one step's batch, without an update."""
    fn = compile_options.jit(
        lambda s, b: self._accumulated_grads(s.params, b, jax.random.fold_in(s.rng, s.step))[:2])
    with sharding.MeshRules(self.mesh):
      return fn(state, self._global(batch))

  def _predict_step(self, params, batch):
    """-> float32 logits [B, num_labels]."""
    return self.model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                            batch["token_type_ids"], deterministic=True)

  def _global(self, batch: dict) -> dict:
    """A global batch (every host holds all rows) -> this host's slice, as global sharded arrays."""
    n = batch["input_ids"].shape[0]
    local = n // jax.process_count()
    rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    return sharding.global_batch({k: batch[k][rows] for k in BATCH_KEYS}, self.batch_sharding, BATCH_KEYS)

  def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    with sharding.MeshRules(self.mesh):
      return self._step(state, self._global(batch))

  def predict(self, params, split: EncodedSplit, filler: list[int], pad_id: int, min_bucket: int) -> np.ndarray:
    """Logits [N, num_labels] for every row of `split` (sorted by length into padded batches of
    eval_batch_size; the padding rows of the last batch are dropped)."""
    size = self.settings.eval_batch_size
    buckets = bucket_lengths(self.settings.max_length, min(min_bucket, self.settings.max_length))
    order = np.argsort(-split.lengths, kind="stable")
    out = np.zeros((len(split), self.model_config.num_labels), np.float32)
    for start in range(0, len(order), size):
      chunk = order[start:start + size]
      rows = np.full(size, -1, np.int64)
      rows[:len(chunk)] = chunk
      batch = make_batch(split, rows, bucket_for(int(split.lengths[chunk].max()), buckets), filler, pad_id)
      with sharding.MeshRules(self.mesh):
        logits = self._predict(params, self._global(batch))
      out[chunk] = np.asarray(logits.addressable_shards[0].data)[:len(chunk)]
    return out


def make_batch(split: EncodedSplit, rows: np.ndarray, length: int, filler: list[int], pad_id: int) -> dict:
  """Rows (positions, -1 = padding slot) -> arrays [len(rows), length] plus labels and weights [len(rows)]."""
  batch = pad_rows(split.input_ids, split.token_type_ids, rows, length, pad_id, filler)
  valid = batch.pop("valid")
  label_dtype = np.float32 if tasks.get_task(split.task).is_regression else np.int32
  labels = np.zeros(len(rows), label_dtype)
  if split.labels is not None:
    labels[valid] = split.labels[rows[valid]]
  batch["labels"] = labels
  batch["weights"] = valid.astype(np.float32)
  return batch


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffled row order of `epoch` (a pure function of seed and epoch, so a resumed run repeats it)."""
  return np.random.default_rng([seed, epoch]).permutation(num_rows)


def step_rows(order: np.ndarray, step: int, batch_size: int, accum: int) -> np.ndarray:
  """Rows of optimizer step `step` of an epoch (-1 pads a final partial batch), interleaved for the train step:
  micro-batch a is the a-th consecutive slice of the step's rows, and position i * accum + a holds its row i."""
  rows = np.full(batch_size, -1, np.int64)
  chunk = order[step * batch_size:(step + 1) * batch_size]
  rows[:len(chunk)] = chunk
  return rows.reshape(accum, batch_size // accum).T.reshape(-1)


# Metrics ------------------------------------------------------------------------------------------------------
def predictions_from_logits(task: str, logits: np.ndarray) -> np.ndarray:
  """Class ids [N] (argmax) or, for regression, the scores [N]."""
  return logits[:, 0] if tasks.get_task(task).is_regression else np.argmax(logits, axis=-1)


def score_split(split: EncodedSplit, logits: np.ndarray) -> dict[str, float]:
  return eval_metrics.compute_task_metrics(split.task, predictions_from_logits(split.task, logits), split.labels)


def selection_value(config, scores: dict[str, dict[str, float]]) -> float:
  """The number that picks the best epoch: the task's main metric on its first eval split (dev, MNLI
  dev_matched), or for XNLI the English dev accuracy / the mean over the evaluated languages."""
  if config.task == "xnli":
    return float(np.mean([m["accuracy"] for m in scores.values()]))
  spec = tasks.get_task(config.task_name)
  return float(scores[spec.eval_splits[0]][spec.main_metric])


def _better(value: float, best: float | None) -> bool:
  """nan (e.g. Pearson of constant predictions) never beats a number, but the first epoch is always kept."""
  if best is None:
    return True
  if math.isnan(value):
    return False
  return math.isnan(best) or value > best


# The run ------------------------------------------------------------------------------------------------------
def _check_workdir_config(workdir: str, config_json: str):
  path = storage.join(workdir, "config.json")
  if storage.exists(path):
    previous = storage.read_text(path)
    if json.loads(previous) != json.loads(config_json):
      old, new = (traverse_util.flatten_dict(json.loads(s), sep=".") for s in (previous, config_json))
      diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      raise ValueError(f"{path}: this workdir was used with a different config (keys {diff}); use a new --workdir "
                       f"or the same config to resume")
  else:
    storage.write_atomic(path, config_json)


@dataclasses.dataclass
class InitialModel:
  """What init_from (or the random-init settings) provide."""
  config: ModelConfig | None  # None: random initialisation (shape from config.model_size and config.model).
  params: Any  # Host parameters: {"deberta": ...}, the whole classifier for eval-only, or None.
  tokenizer: Tokenizer
  spm_path: str  # Copied into best_model/ so that it loads with its tokenizer.
  source: str


def load_initial(config, num_labels: int, eval_only: bool) -> InitialModel:
  from debertax import api
  spm_path = resolve_spm_path(config.vocab) if config.vocab else None
  if not config.init_from:
    if eval_only:
      raise ValueError("config.eval_only (or train.epochs=0) needs config.init_from: a fine-tuned checkpoint")
    if not config.allow_random_init:
      raise ValueError("config.init_from is empty: give a pretrained model directory, or set "
                       "--config.allow_random_init=True to fine-tune from random weights")
    if spm_path is None:
      raise ValueError("a random initialisation needs config.vocab (an spm.model)")
    return InitialModel(None, None, Tokenizer.load(spm_path), spm_path, "random initialisation")
  init_dir = hub.resolve_model_dir(config.init_from)  # A Hub id becomes its local snapshot.
  if not storage.isdir(init_dir):
    raise FileNotFoundError(f"config.init_from={config.init_from}: not a directory")
  if eval_only:
    loaded = api.from_pretrained(init_dir)
    if loaded.head != "cls" or loaded.config.num_labels != num_labels:
      raise ValueError(f"config.init_from={config.init_from} holds head={loaded.head!r} with "
                       f"{loaded.config.num_labels} labels; evaluation only needs a fine-tuned classifier with "
                       f"{num_labels} label(s)")
  else:
    loaded = api.from_pretrained(init_dir, head="none")
  spm_path = spm_path or loaded.spm_path
  if spm_path is None:
    raise ValueError(f"config.init_from={config.init_from} has no spm.model; set config.vocab")
  return InitialModel(loaded.config, jax.device_get(loaded.params), Tokenizer.load(spm_path), spm_path,
                      config.init_from)


def _save_best(workdir: str, params, model_config: ModelConfig, tokenizer_path: str | None, task_meta: dict):
  """Writes best_model/ next to the old one and swaps, so a crash leaves a complete best model on disk."""
  final = storage.join(workdir, BEST_MODEL_DIR)
  fresh, old = final + ".new", final + ".old"
  storage.rmtree(fresh)
  checkpoint_lib.save_model_dir(fresh, params, model_config, "cls", False, tokenizer_path)
  if jax.process_index() == 0:
    storage.write_atomic(storage.join(fresh, TASK_META), json.dumps(task_meta, indent=2))
    if storage.exists(final):
      storage.rmtree(old)
      storage.rename(final, old)
    storage.rename(fresh, final)
    storage.rmtree(old)


def _recover_best_dir(workdir: str):
  """After a crash during the swap in _save_best, the complete copy is best_model.new or best_model.old."""
  final = storage.join(workdir, BEST_MODEL_DIR)
  for leftover in (final + ".new", final + ".old"):
    if not storage.exists(final) and checkpoint_lib.is_model_dir(leftover) and storage.exists(
        storage.join(leftover, TASK_META)):
      storage.rename(leftover, final)
    storage.rmtree(leftover)


def write_predictions(workdir: str, split: EncodedSplit, logits: np.ndarray) -> str | None:
  """GLUE-submission-format file for a GLUE split (dev files use the name of the matching test file)."""
  if split.task == "xnli" or split.name not in _SUBMISSION_SPLIT_OF:
    return None
  out_dir = storage.join(workdir, "predictions", split.name)
  path = tasks.write_glue_submission(split.task, _SUBMISSION_SPLIT_OF[split.name], split.indices,
                                     predictions_from_logits(split.task, logits), out_dir)
  return str(path)


def result_tables(results: dict) -> str:
  """The GLUE table (paper layout) or the XNLI table(s) of a results dict."""
  if results["task"] == "xnli":
    out = []
    for split in ("dev", "test"):
      per_language = results["xnli"].get(split, {})
      if per_language:
        setting = "translate-train-all" if results.get("translate_train_all") else "zero-shot"
        out.append(f"XNLI {split} accuracy ({setting}):")
        out.append(eval_metrics.format_xnli_table(per_language))
    return "\n".join(out)
  return eval_metrics.format_glue_table(results["glue_results"])


def run(config, workdir: str, mesh=None) -> dict:
  """Fine-tunes (or, with eval_only / epochs=0, evaluates) and returns the results dict (also results.json)."""
  wall_start = time.time()
  workdir = storage.absolute(workdir)
  storage.makedirs(workdir)
  primary = jax.process_index() == 0
  if config.task not in ("glue", "xnli"):
    raise ValueError(f"config.task={config.task!r}: finetune.run handles glue and xnli")
  spec = tasks.get_task(config.task_name)
  if config.task == "glue" and spec.name not in tasks.GLUE_TASK_NAMES:
    raise ValueError(f"config.task_name={config.task_name!r}: not a GLUE task; choose one of "
                     f"{tasks.GLUE_TASK_NAMES}")
  if config.on_bad_row not in ("error", "skip"):
    raise ValueError(f"config.on_bad_row={config.on_bad_row!r}: use 'error' or 'skip'")
  num_labels = spec.num_labels
  eval_only = bool(config.eval_only) or config.train.epochs == 0

  initial = load_initial(config, num_labels, eval_only)
  tokenizer = initial.tokenizer
  model_config = build_model_config(config, initial.config, tokenizer, num_labels)
  settings = resolve_settings(config, model_config)
  if not eval_only:
    model_config = model_config.replace(cls_dropout=settings.classifier_dropout)
  data = load_task_data(config, tokenizer, settings.max_length, with_train=not eval_only)
  steps_per_epoch = math.ceil(len(data.train) / settings.batch_size) if data.train is not None else 0
  total_steps = steps_per_epoch * (0 if eval_only else settings.epochs)
  settings = schedule_for_run(config, settings, total_steps)
  resolved = ml_collections.ConfigDict(config.to_dict())
  with resolved.unlocked():
    resolved.resolved = dataclasses.asdict(settings)
  if primary:
    _check_workdir_config(workdir, resolved.to_json_best_effort(indent=2, sort_keys=True))
  logging.info("%s %s: %s", "Evaluating" if eval_only else "Fine-tuning", config.task_name, settings)
  finetuner = Finetuner(model_config, settings, config, total_steps, mesh=mesh, seed=int(config.seed))
  filler = [tokenizer.cls_id, tokenizer.sep_id]
  min_bucket = int(config.train.min_bucket_length)
  task_meta = {"task": config.task_name, "label_names": list(spec.label_names) if spec.label_names else None,
               "train_task": "mnli" if config.task == "xnli" else config.task_name}

  def evaluate(params, splits: dict) -> tuple[dict, dict]:
    logits = {name: finetuner.predict(params, split, filler, tokenizer.pad_id, min_bucket)
              for name, split in splits.items()}
    scores = {name: score_split(splits[name], logits[name]) for name in splits if splits[name].labels is not None}
    return scores, logits

  history: list[dict] = []
  best_epoch = None
  if not eval_only:
    history, best_epoch = _train(config, workdir, finetuner, data, steps_per_epoch, initial, task_meta, evaluate)
    best_dir = storage.join(workdir, BEST_MODEL_DIR)
    _, best_params, _, _ = checkpoint_lib.load_model_dir(best_dir)
    params = finetuner.place_params(best_params)
    evaluated_from = best_dir
  else:
    params = finetuner.place_params(initial.params)
    evaluated_from = config.init_from
    logging.info("Evaluation only: %s (head cls, %d labels)", config.init_from, num_labels)

  # Final evaluation of the kept model on every split, predictions, results.
  final_start = time.time()
  scores, logits = evaluate(params, {**data.evals, **data.finals})
  logging.info("Evaluated %s on %s in %.1f s", evaluated_from, list({**data.evals, **data.finals}),
               time.time() - final_start)
  prediction_files = []
  if primary:
    for name, split in {**data.evals, **data.finals}.items():
      path = write_predictions(workdir, split, logits[name])
      if path:
        prediction_files.append(path)
        if split.numbered_by_position:
          logging.info("%s has no index column: its prediction rows are numbered by position", name)
  results = {"task": config.task_name, "model": evaluated_from, "init_from": config.init_from,
             "settings": dataclasses.asdict(settings), "seed": int(config.seed), "eval_only": eval_only,
             "best_epoch": best_epoch, "metrics": scores, "history": history,
             "train_examples": len(data.train) if data.train is not None else 0,
             "predictions": prediction_files, "wall_time_s": round(time.time() - wall_start, 1)}
  if config.task == "xnli":
    results["translate_train_all"] = bool(config.xnli.translate_train_all)
    results["xnli"] = {split: {n.split("/")[1]: m["accuracy"] for n, m in scores.items() if n.startswith(split + "/")}
                       for split in ("dev", "test")}
  else:
    results["glue_results"] = ({"mnli_m": scores["dev_matched"], "mnli_mm": scores["dev_mismatched"]}
                               if spec.name == "mnli" else {spec.name: scores["dev"]})
  if primary:
    storage.write_atomic(storage.join(workdir, "results.json"), json.dumps(results, indent=2))
    logging.info("Results (%s, %.0f s) in %s/results.json:\n%s", evaluated_from, results["wall_time_s"], workdir,
                 result_tables(results))
  return results


def _train(config, workdir, finetuner: Finetuner, data: TaskData, steps_per_epoch: int, initial: InitialModel,
           task_meta: dict, evaluate):
  """The epoch loop with resume, per-epoch evaluation, best-model keeping and early stopping.

  Returns (history: one dict per evaluated epoch, best epoch)."""
  primary = jax.process_index() == 0
  ckpt = checkpoint_lib.TrainCheckpointer(storage.join(workdir, "checkpoints"), save_every=1, keep=1)
  writer = MetricWriter(workdir, enabled=primary)
  train, settings, model_config = data.train, finetuner.settings, finetuner.model_config
  accum = settings.grad_accum_steps
  filler, pad_id = [initial.tokenizer.cls_id, initial.tokenizer.sep_id], initial.tokenizer.pad_id
  loop = {"epoch": 0, "step_in_epoch": 0, "best": None, "best_epoch": None, "bad_epochs": 0, "history": []}
  if primary:
    _recover_best_dir(workdir)
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_states = ckpt.restore(latest, finetuner.abstract_state)
    loop = data_states[0]
    logging.info("Resumed from %s/checkpoints/%d (epoch %d, step %d of the epoch)", workdir, latest,
                 loop["epoch"], loop["step_in_epoch"])
  else:
    params = finetuner.fresh_params()
    if initial.params is not None:
      params = finetuner.place_params({**params, "deberta": initial.params["deberta"]})
      logging.info("Initialised the backbone from %s; the pooler and classifier (%d label(s)) are freshly "
                   "initialised from seed %d", initial.source, model_config.num_labels, int(config.seed))
    else:
      logging.warning("Every parameter is randomly initialised (seed %d; config.allow_random_init)",
                      int(config.seed))
    state = finetuner.init_state(params)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(finetuner.abstract_state.params))
  logging.info("%s: %d training rows, %d steps per epoch x %d epochs, batch %d (%d x %d accumulated), %s parameters, "
               "mesh %s", config.task_name, len(train), steps_per_epoch, settings.epochs, settings.batch_size,
               accum, settings.batch_size // accum, f"{n_params:,}", dict(finetuner.mesh.shape))
  buckets = bucket_lengths(settings.max_length, min(int(config.train.min_bucket_length), settings.max_length))
  lengths = train.lengths
  step = int(state.step)
  log_every = max(int(config.train.log_every), 1)
  checkpoint_every = int(config.train.checkpoint_every)
  timer, timed_tokens, compiled_lengths = time.time(), 0, set()
  preemption = checkpoint_lib.Preemption()
  try:
    while loop["epoch"] < settings.epochs:
      epoch = loop["epoch"]
      order = epoch_order(len(train), int(config.seed), epoch)
      for step_in_epoch in range(loop["step_in_epoch"], steps_per_epoch):
        rows = step_rows(order, step_in_epoch, settings.batch_size, accum)
        length = bucket_for(int(lengths[rows[rows >= 0]].max()), buckets)
        batch = make_batch(train, rows, length, filler, pad_id)
        if length not in compiled_lengths:  # This step compiles: keep it out of the throughput window.
          compile_start = time.time()
          state, metrics = finetuner.step(state, batch)
          jax.block_until_ready(metrics)
          compiled_lengths.add(length)
          logging.info("Compiled and ran the train step for length %d in %.1f s", length, time.time() - compile_start)
          timer, timed_tokens = time.time(), 0
        else:
          state, metrics = finetuner.step(state, batch)
          timed_tokens += int(batch["attention_mask"][batch["weights"] > 0].sum())
        step += 1
        loop["step_in_epoch"] = step_in_epoch + 1
        if step % log_every == 0 or step_in_epoch + 1 == steps_per_epoch:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          elapsed = max(time.time() - timer, 1e-9)
          metrics.update(epoch=epoch + (step_in_epoch + 1) / steps_per_epoch, tokens_per_sec=timed_tokens / elapsed)
          writer.write(step, metrics)
          timer, timed_tokens = time.time(), 0
        inside_epoch = step_in_epoch + 1 < steps_per_epoch  # The epoch's last step is saved after its eval.
        saved = checkpoint_every > 0 and step % checkpoint_every == 0 and inside_epoch
        if saved:
          ckpt.save(step, state, {0: loop}, force=True)
        if preemption.agreed(step) and inside_epoch:
          if not saved:
            ckpt.save(step, state, {0: loop}, force=True)
          ckpt.wait()
          raise checkpoint_lib.Preempted(
              f"SIGTERM: saved step {step} (epoch {epoch + 1}, step {step_in_epoch + 1} of {steps_per_epoch}) to "
              f"{workdir}/checkpoints; rerun the same command to resume")
      # End of the epoch: evaluate on the whole dev set, keep the best, maybe stop.
      eval_start = time.time()
      scores, _ = evaluate(state.params, data.evals)
      value = selection_value(config, scores)
      record = {"epoch": epoch + 1, "step": step, "selection": value,
                **{f"{name}/{k}": v for name, m in scores.items() for k, v in m.items()}}
      writer.write(step, {k: v for k, v in record.items() if k != "step"}, prefix="eval")
      improved = _better(value, loop["best"])
      if improved:
        loop.update(best=value, best_epoch=epoch + 1, bad_epochs=0)
        _save_best(workdir, state.params, model_config, initial.spm_path, {**task_meta, "epoch": epoch + 1,
                                                                   "selection": value})
        logging.info("Epoch %d: new best %s %.4f, saved %s/%s", epoch + 1, _selection_name(config), value,
                     workdir, BEST_MODEL_DIR)
      else:
        loop["bad_epochs"] += 1
        logging.info("Epoch %d: %s %.4f (best %.4f at epoch %d, %d epoch(s) without improvement)", epoch + 1,
                     _selection_name(config), value, loop["best"], loop["best_epoch"], loop["bad_epochs"])
      loop["history"].append({**record, "eval_seconds": round(time.time() - eval_start, 1)})
      loop.update(epoch=epoch + 1, step_in_epoch=0)
      patience = int(config.train.early_stopping_patience)
      stop = patience > 0 and loop["bad_epochs"] >= patience
      if stop:
        loop["stopped_early"] = True
        loop["epoch"] = settings.epochs  # A resumed run must not train on.
      ckpt.save(step, state, {0: loop}, force=True)
      timer = time.time()
      if preemption.agreed(step, force_sync=True) and not stop and loop["epoch"] < settings.epochs:
        ckpt.wait()
        raise checkpoint_lib.Preempted(f"SIGTERM: saved the end of epoch {epoch + 1} (step {step}) to "
                                       f"{workdir}/checkpoints; rerun the same command to resume")
      if stop:
        logging.info("Early stopping after epoch %d: no better %s for %d epoch(s)", epoch + 1,
                     _selection_name(config), patience)
        break
  finally:
    preemption.restore()
    ckpt.close()
    writer.close()
  if loop["best_epoch"] is None:
    raise RuntimeError(f"{workdir}: training ended without an evaluated epoch (epochs={settings.epochs})")
  return loop["history"], loop["best_epoch"]


def _selection_name(config) -> str:
  if config.task == "xnli":
    return "XNLI dev accuracy (" + ("en" if config.xnli.select_on == "en" else "mean over languages") + ")"
  spec = tasks.get_task(config.task_name)
  return f"{spec.eval_splits[0]} {spec.main_metric}"
