"""GLUE fine-tuning: `python -m debertax.main --config=configs/glue.py:<task> --config.init_from=DIR --workdir=W`.

<task> is one of cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte. Fields left at None take the task's default
from `debertax.tasks.default_hparams(task, model_size)` when the run starts (so `--config.model_size=large`
changes them too); the resolved values are logged and written to W/config.json.

Data: `--config.data_dir=GLUE_ROOT` reads GLUE-format TSVs (GLUE_ROOT/RTE/train.tsv, ...); empty reads the
TFDS dataset glue/<task> prepared under `tfds_data_dir` (or downloaded with `--config.tfds_download=True`).
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from debertax.config import ModelConfig
from debertax.tasks import GLUE_TASK_NAMES

# ModelConfig fields a run may override; None keeps the checkpoint's value (or the configs/common.py shape of
# model_size for a random initialisation). num_labels always comes from the task.
_MODEL_FIELD_TYPES = {"embedding_size": int, "cls_dropout": float, "pos_att_type": str}


def model_overrides() -> ml_collections.ConfigDict:
  """Every ModelConfig field as a typed placeholder (None = not overridden)."""
  block = ml_collections.ConfigDict()
  for field in dataclasses.fields(ModelConfig):
    if field.name == "num_labels":
      continue
    field_type = _MODEL_FIELD_TYPES.get(field.name, type(field.default))
    block[field.name] = config_dict.placeholder(field_type)
  return block


def finetune_config(task_name: str) -> ml_collections.ConfigDict:
  """The fields shared by GLUE and XNLI fine-tuning."""
  c = ml_collections.ConfigDict()
  c.task_name = task_name
  c.seed = 0
  # Which row of tasks.default_hparams: xsmall | small | base | large, or "auto" (from the checkpoint shape).
  c.model_size = "auto"
  c.init_from = ""  # Hugging Face or debertax directory; its backbone is loaded, pooler/classifier are new.
  c.allow_random_init = False  # Needed to fine-tune from random weights when init_from is empty.
  c.vocab = ""  # spm.model (file or directory); empty: the one in init_from.
  c.eval_only = False  # Evaluate init_from (a fine-tuned checkpoint with its classifier); same as epochs=0.
  c.model = model_overrides()

  c.data_dir = ""  # Local GLUE root (CoLA/, MRPC/, ...); empty: TFDS.
  c.tfds_data_dir = ""  # Where TFDS datasets are prepared; empty: the TFDS default.
  c.tfds_download = False
  c.on_bad_row = "error"  # error | skip
  c.max_train_examples = 0  # >0: keep only the first N training rows (file order) for short runs.

  c.train = ml_collections.ConfigDict()
  c.train.lr = config_dict.placeholder(float)
  c.train.epochs = config_dict.placeholder(int)
  c.train.warmup_steps = config_dict.placeholder(int)
  c.train.batch_size = config_dict.placeholder(int)  # Global batch per optimizer step.
  c.train.max_length = config_dict.placeholder(int)
  c.train.eval_batch_size = config_dict.placeholder(int)  # None: the training batch size.
  c.train.grad_accum_steps = 1  # The batch is split into this many micro-batches.
  c.train.layer_decay = 1.0  # <1: layer-wise learning-rate decay (embeddings get decay ** (layers + 1)).
  c.train.weight_decay = 0.01
  c.train.adam_b1 = 0.9
  c.train.adam_b2 = 0.999
  c.train.adam_eps = 1e-6
  # Bias-corrected Adam (as torch AdamW, which the Hugging Face recipes use). The authors' Adam has none: its
  # first steps are up to ~5x larger, and with the table's short warmups a fine-tuning run then stays at the
  # majority class (measured on SST-2; see the README's "Training that learns").
  c.train.bias_correction = True
  c.train.grad_clip = 1.0
  c.train.early_stopping_patience = 0  # >0: stop after this many epochs without a better dev metric.
  c.train.min_bucket_length = 16  # Batches are padded to min_bucket_length * 2^k (capped at max_length).
  c.train.log_every = 50
  c.train.checkpoint_every = 0  # >0: also save the train state every N steps (always at each epoch end).

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all remaining devices.
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c


def get_config(task: str = "rte"):
  task = task.strip().lower()
  if task not in GLUE_TASK_NAMES:
    raise ValueError(f"configs/glue.py:{task}: unknown GLUE task {task!r}; choose one of {GLUE_TASK_NAMES}")
  c = finetune_config(task)
  c.task = "glue"
  return c
