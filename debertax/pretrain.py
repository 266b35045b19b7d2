"""The pretraining loop (RTD, or plain MLM): vocabulary, data, resume, train, evaluate, checkpoint, export.

Everything lands in the workdir:
    spm.model                 the vocabulary (trained here when config.data.vocab is empty)
    checkpoints/<step>/       Orbax: train state + every host's data position
    metrics.jsonl, tensorboard/
    export/discriminator/, export/generator/   Hugging Face directories (at the end, or --mode=export);
                              export/mlm/ under config.objective="mlm"
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
from absl import logging

from debertax import checkpoint as checkpoint_lib
from debertax import convert, eval_metrics, flops, hub, rtd, storage
from debertax.data import DataConfig, EmptySplitError, PretrainingIterator, source_lines
from debertax.metric_writer import MetricWriter
from debertax.tokenizer import Tokenizer, train_sentencepiece
from debertax.train import Trainer

EVAL_BATCHES = 4
EVAL_SEED_OFFSET = 1_000_003


def materialise_default_corpus(config, workdir: str):
  """source="default" -> a copy of the embedded corpus in the workdir, used from then on.

  The corpus is harvested from the running interpreter's standard library, and what a module exposes can
  differ by a paragraph between processes; a saved data position must keep meaning the same text, so a
  run reads (and a resumed run re-reads) the workdir's own copy.
  """
  if config.data.source != "default":
    return config
  path = storage.join(workdir, "default_corpus.txt")
  if jax.process_index() == 0 and not storage.exists(path):
    from debertax.corpus import default_corpus_lines
    storage.write_atomic(path, "".join(line.replace("\n", " ") + "\n" for line in default_corpus_lines()))
  _sync("default_corpus")
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.source = path
  return config


def prepare_vocab(config, workdir: str) -> Tokenizer:
  """Loads config.data.vocab, or trains a SentencePiece model on the training source into the workdir."""
  if config.data.vocab:
    return Tokenizer.load(_spm_file(config.data.vocab))
  path = storage.join(workdir, "spm.model")
  if storage.exists(path):
    return Tokenizer.load(path)
  if config.data.train_vocab_size <= 0:
    raise ValueError("config.data.vocab is empty and config.data.train_vocab_size is 0: give a spm.model "
                     "path or a vocabulary size to train")
  logging.info("Training a %d-piece SentencePiece vocabulary on %s", config.data.train_vocab_size,
               config.data.source)
  if jax.process_index() == 0:
    train_sentencepiece(source_lines(config.data.source, text_feature=config.data.text_feature,
                                     on_bad_line=config.data.on_bad_line),
                        workdir, config.data.train_vocab_size)
  _sync("vocab")
  return Tokenizer.load(path)


def resolve_config(config, tokenizer: Tokenizer):
  """Fills model.vocab_size = -1 from the tokenizer and checks that the vocabulary fits the model."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.vocab_size == -1:
    config.model.vocab_size = tokenizer.vocab_size
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f"the vocabulary has {tokenizer.vocab_size} ids (with [MASK]) but config.model.vocab_size "
                     f"is {config.model.vocab_size}")
  if config.train.batch_size % jax.process_count():
    raise ValueError(f"config.train.batch_size={config.train.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  return config


def data_config(config, tokenizer: Tokenizer, split: str = "train") -> DataConfig:
  """split: "train" or "eval" (the documents held out by config.data.holdout_every, with another seed)."""
  holdout_every = int(config.data.get("holdout_every", 0))
  if split not in ("train", "eval"):
    raise ValueError(f"split={split!r}: expected train or eval")
  return DataConfig(
      source=config.data.source, vocab_path="", seq_len=config.data.seq_len,
      batch_size=config.train.batch_size // jax.process_count(),
      seed=config.seed + (EVAL_SEED_OFFSET if split == "eval" else 0),
      mask_prob=config.data.mask_prob, max_predictions=config.data.max_predictions or None,
      shuffle_window=config.data.shuffle_buffer, on_bad_line=config.data.on_bad_line,
      text_feature=config.data.text_feature, split=split if holdout_every > 0 else "all",
      holdout_every=holdout_every)


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _all_data_states(iterator: PretrainingIterator) -> dict:
  """Every host's iterator position (all hosts call this; the result is the same everywhere)."""
  state = iterator.get_state()
  if jax.process_count() == 1:
    return {0: state}
  import json
  from jax.experimental import multihost_utils
  encoded = np.frombuffer(json.dumps(state).encode(), np.uint8)
  length = int(np.max(multihost_utils.process_allgather(np.array([len(encoded)]))))
  padded = np.zeros(length, np.uint8)
  padded[: len(encoded)] = encoded
  gathered = multihost_utils.process_allgather(padded)
  return {i: json.loads(bytes(row).rstrip(b"\0").decode()) for i, row in enumerate(np.asarray(gathered))}


def initial_params_from(config, trainer: Trainer):
  """Continue-training from released / converted checkpoints (config.init_from, init_generator_from)."""
  from debertax import api
  if trainer.objective == "mlm":
    if config.init_generator_from:
      raise ValueError("config.init_generator_from is for RTD pretraining; the MLM objective trains one model, "
                       "given by config.init_from alone")
    model = api.from_pretrained(config.init_from, head="mlm", use_emd=True)
    _check_shape("init_from", model.config, trainer.disc_config)
    return {"mlm": jax.device_get(model.params)}
  if not config.init_generator_from:
    raise ValueError("config.init_from needs config.init_generator_from too (the generator is a separate "
                     "checkpoint, e.g. pytorch_model.generator.bin converted with --emd)")
  disc = api.from_pretrained(config.init_from, head="rtd")
  gen = api.from_pretrained(config.init_generator_from, head="mlm", use_emd=True)
  _check_shape("init_from", disc.config, trainer.disc_config)
  _check_shape("init_generator_from", gen.config, trainer.gen_config)
  disc_params = jax.device_get(disc.params)
  gen_params = jax.device_get(gen.params)
  emb = dict(disc_params["deberta"]["embeddings"])
  sharing = trainer.models.sharing
  if sharing == "es":
    emb.pop("word_embeddings", None)
  elif sharing == "gdes":  # Released E_D = E_G + E_delta, so E_delta = E_D - E_G.
    e_g = gen_params["deberta"]["embeddings"]["word_embeddings"]["embedding"]
    emb["word_embeddings"] = {"embedding": emb["word_embeddings"]["embedding"] - e_g}
  disc_params = {**disc_params, "deberta": {**disc_params["deberta"], "embeddings": emb}}
  return {"generator": gen_params, "discriminator": disc_params}


def _check_shape(name: str, loaded, expected):
  keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
  diff = {k: (getattr(loaded, k), getattr(expected, k)) for k in keys if getattr(loaded, k) != getattr(expected, k)}
  if diff:
    raise ValueError(f"config.{name}: checkpoint shape differs from the config (checkpoint, config): {diff}")


def export(trainer: Trainer, state, workdir: str, spm_path: str | None, tag: str = "") -> str:
  """One Hugging Face directory per model: export/{discriminator,generator} (RTD) or export/mlm (MLM)."""
  out = storage.join(workdir, "export" + (f"_{tag}" if tag else ""))
  params = trainer.export_params(state)
  if jax.process_index() == 0:
    for name, (model_config, head) in trainer.models.export_heads.items():
      convert.write_hf_directory(params[name], model_config, storage.join(out, name), spm_model=spm_path, **head)
    logging.info("Exported Hugging Face directories to %s/{%s}", out, ",".join(trainer.models.export_heads))
  return out


# The average pairwise cosine of each exported model's word embedding, as the paper's Table 1 names them.
COSINE_METRICS = {"generator": "cosine_E_G", "discriminator": "cosine_E_D", "mlm": "cosine_E"}


def evaluate(trainer: Trainer, state, eval_batches) -> dict:
  losses, logits, labels = [], [], []
  for batch in eval_batches:
    aux = jax.device_get(trainer.evaluate(state, batch))
    losses.append({k: float(v) for k, v in aux.items() if np.ndim(v) == 0})
    if "rtd_logits" in aux:
      valid = np.asarray(aux["token_mask"]).astype(bool)
      logits.append(np.asarray(aux["rtd_logits"])[valid])
      labels.append(np.asarray(aux["rtd_labels"])[valid])
  out = {k: float(np.mean([d[k] for d in losses])) for k in losses[0] if k not in ("tokens", "masked_tokens")}
  if logits:
    out["rtd_auc"] = eval_metrics.binary_auc(np.concatenate(logits), np.concatenate(labels))
  for name, params in trainer.export_params(state).items():
    embedding = params["deberta"]["embeddings"]["word_embeddings"]["embedding"]
    out[COSINE_METRICS[name]] = rtd.average_pairwise_cosine(embedding)
  return out


def run(config, workdir: str, mode: str = "train") -> dict:
  """mode: 'train' (resumes automatically) or 'export' (the latest checkpoint -> Hugging Face dirs).

  Returns {"train": {step: metrics}, "eval": {step: metrics}} for the logged steps of this invocation.
  """
  workdir = storage.absolute(workdir)
  storage.makedirs(workdir)
  primary = jax.process_index() == 0
  config = materialise_default_corpus(config, workdir)
  tokenizer = prepare_vocab(config, workdir)
  spm_path = config.data.vocab and _spm_file(config.data.vocab) or storage.join(workdir, "spm.model")
  config = resolve_config(config, tokenizer)
  if primary:
    storage.write_atomic(storage.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

  trainer = Trainer(config)
  ckpt = checkpoint_lib.TrainCheckpointer(storage.join(workdir, "checkpoints"), config.train.checkpoint_every,
                                          config.train.keep_checkpoints)
  iterator = PretrainingIterator(data_config(config, tokenizer), tokenizer)
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_states = ckpt.restore(latest, trainer.abstract_state)
    iterator.set_state(data_states[jax.process_index()])
    logging.info("Resumed from %s/checkpoints/%d", workdir, latest)
  elif mode == "export":
    raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to export")
  elif config.init_from:
    state = trainer.state_from_params(initial_params_from(config, trainer), config.seed)
    logging.info("Initialised from %s", " and ".join(p for p in (config.init_from, config.init_generator_from) if p))
  else:
    state = trainer.init(config.seed)
  if mode == "export":
    export(trainer, state, workdir, spm_path, tag=f"step{int(state.step)}")
    ckpt.close()
    return {"train": {}, "eval": {}}

  eval_iterator = PretrainingIterator(data_config(config, tokenizer, "eval"), tokenizer)
  try:
    eval_batches = [next(eval_iterator) for _ in range(EVAL_BATCHES)]
  except EmptySplitError as e:
    raise ValueError(f"{e}: the corpus is too small for config.data.holdout_every={config.data.holdout_every}; "
                     "set it lower, or to 0 to evaluate on training documents") from None
  if config.data.get("holdout_every", 0) > 0:
    logging.info("Evaluation: %d batches from %d held-out documents (1 in %d by text hash; training skips "
                 "them)%s", EVAL_BATCHES, eval_iterator.documents_read, config.data.holdout_every,
                 ", read more than once" if eval_iterator.epoch > 0 else "")
  else:
    logging.warning("Evaluation batches come from the training documents (config.data.holdout_every=0)")
  writer = MetricWriter(workdir, enabled=primary)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(trainer.abstract_state.params))
  shape = (config.train.batch_size, config.data.seq_len, trainer.num_predictions)
  if trainer.objective == "mlm":
    what = f"MLM pretraining (config.objective=mlm): {trainer.disc_config.num_hidden_layers} layers"
    step_flops = flops.mlm_step_flops(trainer.disc_config, *shape)
  else:
    what = (f"RTD pretraining: {config.rtd.embedding_sharing} sharing, discriminator "
            f"{trainer.disc_config.num_hidden_layers} layers, generator {trainer.gen_config.num_hidden_layers} layers")
    step_flops = flops.rtd_step_flops(trainer.disc_config, trainer.gen_config, *shape)
  logging.info("%s, %s trainable parameters, mesh %s, %d devices", what, f"{n_params:,}", dict(trainer.mesh.shape),
               jax.device_count())
  peak = flops.peak_flops_per_device() * jax.device_count()
  tokens_per_step = config.train.batch_size * config.data.seq_len

  preemption = checkpoint_lib.Preemption()
  step = int(state.step)
  # A job with a wall-clock limit can stop after max_steps_per_run steps; the next run resumes.
  stop_at = config.train.steps
  if config.train.get("max_steps_per_run", 0) > 0:
    stop_at = min(stop_at, step + config.train.max_steps_per_run)
  history = {"train": {}, "eval": {}}  # step -> metrics, returned to the caller.
  if step == 0:  # The untrained baseline, so every curve starts from a measured point.
    history["eval"][0] = evaluate(trainer, state, eval_batches)
    writer.write(0, history["eval"][0], prefix="eval")
  last_log_time, last_log_step = time.time(), step
  try:
    while step < stop_at:
      state, metrics = trainer.step(state, next(iterator))
      step += 1
      if step % config.train.log_every == 0 or step == config.train.steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.time() - last_log_time
        steps_done = step - last_log_step
        metrics["tokens_per_sec"] = tokens_per_step * steps_done / elapsed
        metrics["mfu"] = step_flops * steps_done / elapsed / peak
        writer.write(step, metrics)
        history["train"][step] = metrics
        last_log_time, last_log_step = time.time(), step
      if step % config.train.eval_every == 0 or step == config.train.steps:
        history["eval"][step] = evaluate(trainer, state, eval_batches)
        writer.write(step, history["eval"][step], prefix="eval")
        last_log_time = time.time()  # Evaluation time is not training throughput.
      final = step == stop_at
      preempted = preemption.agreed(step)
      if preempted or final or ckpt.manager.should_save(step):
        ckpt.save(step, state, _all_data_states(iterator), force=preempted or final)
      if preempted:
        ckpt.wait()
        logging.warning("Saved step %d after SIGTERM; exiting", step)
        break
    else:
      if step == config.train.steps and config.train.export_at_end:
        export(trainer, state, workdir, spm_path)
      elif step < config.train.steps:
        logging.info("Stopped after %d steps this run (train.max_steps_per_run); rerun to resume", step)
  finally:
    preemption.restore()
    ckpt.close()
    writer.close()
  return history


def _spm_file(path: str) -> str:
  """config.data.vocab -> the spm.model file: the path, the spm.model in a directory, or a Hub model's."""
  path = hub.resolve_vocab(path)
  return storage.join(path, "spm.model") if storage.isdir(path) else path
