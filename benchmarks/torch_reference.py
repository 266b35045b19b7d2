"""The PyTorch side of the training-parity check (`benchmarks/training_parity.py`, `tests/test_training_parity.py`).

transformers' DebertaV2* models where they exist (the MLM with the legacy=False head, sequence classification and
regression), hand-written heads on `DebertaV2Model` where transformers has none (the Enhanced Mask Decoder and the
replaced-token-detection head), each loss written the way a PyTorch user writes it, and the optimizers:
torch.optim.AdamW (bias-corrected) and `AuthorsAdamW`, the update rule without bias correction. Weights go between
the frameworks through `debertax.convert` (Hugging Face state-dict names), so a torch model built here loads our
initial parameters with `load_state_dict(strict=True)`.

Shapes: B batch, L length, D hidden, V vocabulary, P prediction slots.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from flax import traverse_util
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta

from debertax import convert
from debertax import optimizer as optimizer_lib
from debertax.config import ModelConfig

KINDS = ("mlm", "emd", "rtd", "cls", "reg")


def hf_config(config: ModelConfig) -> transformers.DebertaV2Config:
  """Our architecture as a DebertaV2Config (through `to_hf_dict`, the export path), every dropout set to 0."""
  values = config.to_hf_dict()
  values.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pooler_dropout=0.0, cls_dropout=0.0)
  return transformers.DebertaV2Config(**values)


class EMDMaskedLM(nn.Module):
  """The generator's MLM with the Enhanced Mask Decoder on transformers' DebertaV2Model (which has no EMD).

  kv = the output of encoder layer L-1, query = kv + absolute position embeddings; the last encoder layer (its
  own weights) runs twice with Q from the query, K/V from kv and the residual from the query; then the
  legacy=False MLM head, tied to the word embeddings.
  """

  def __init__(self, config: transformers.DebertaV2Config):
    super().__init__()
    if config.num_hidden_layers < 2:
      raise ValueError("the Enhanced Mask Decoder needs at least 2 encoder layers")
    if getattr(config, "embedding_size", config.hidden_size) != config.hidden_size:
      raise ValueError("this reference supports embedding_size == hidden_size only")
    self.deberta = transformers.DebertaV2Model(config)
    # v3 backbones have no absolute positions; the EMD's table lives where the released generators keep it
    # (deberta.embeddings.position_embeddings). With position_biased_input=False the embeddings never add it.
    self.deberta.embeddings.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
    self.lm_predictions = hf_deberta.DebertaV2OnlyMLMHead(config)
    self.steps = 2

  def forward(self, input_ids, attention_mask):
    """input_ids, attention_mask [B, L] int64 -> logits [B, L, V]."""
    out = self.deberta(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    kv = out.hidden_states[-2]  # hidden_states[0] is the embedding output, [i + 1] the output of layer i.
    encoder = self.deberta.encoder
    length = input_ids.shape[1]
    query = kv + self.deberta.embeddings.position_embeddings(torch.arange(length, device=input_ids.device)[None])
    mask = encoder.get_attention_mask(attention_mask)
    relative_pos = encoder.get_rel_pos(kv, query)
    rel_embeddings = encoder.get_rel_embedding()
    for _ in range(self.steps):
      query = encoder.layer[-1](kv, mask, query_states=query, relative_pos=relative_pos,
                                rel_embeddings=rel_embeddings)[0]
    return self.lm_predictions(query, self.deberta.embeddings.word_embeddings)


class RTDHead(nn.Module):
  """LN(h + h[:, 0]) -> dense(D, D) -> act -> dense(D, 1) (`mask_predictions`, the authors' discriminator head)."""

  def __init__(self, config: transformers.DebertaV2Config):
    super().__init__()
    self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    self.dense = nn.Linear(config.hidden_size, config.hidden_size)
    self.act = ACT2FN[config.hidden_act]
    self.classifier = nn.Linear(config.hidden_size, 1)

  def forward(self, hidden):
    """hidden [B, L, D] -> logits [B, L]."""
    x = self.LayerNorm(hidden + hidden[:, :1])
    return self.classifier(self.act(self.dense(x)))[..., 0]


class Discriminator(nn.Module):
  """DebertaV2Model + `RTDHead`: one replaced-token logit per position."""

  def __init__(self, config: transformers.DebertaV2Config):
    super().__init__()
    self.deberta = transformers.DebertaV2Model(config)
    self.mask_predictions = RTDHead(config)

  def forward(self, input_ids, attention_mask):
    """-> logits [B, L]."""
    return self.mask_predictions(self.deberta(input_ids, attention_mask=attention_mask).last_hidden_state)


def build(kind: str, config: ModelConfig) -> nn.Module:
  """The torch model of a parity kind (see KINDS), randomly initialised (load our weights with `load_params`)."""
  hf = hf_config(config)
  if kind == "mlm":
    hf.legacy = False  # The authors' head names (lm_predictions.lm_head); to_hf_dict says so too.
    return transformers.DebertaV2ForMaskedLM(hf)
  if kind == "emd":
    return EMDMaskedLM(hf)
  if kind == "rtd":
    return Discriminator(hf)
  if kind in ("cls", "reg"):
    hf.num_labels = 1 if kind == "reg" else config.num_labels
    return transformers.DebertaV2ForSequenceClassification(hf)
  raise ValueError(f"unknown parity kind {kind!r}; choose one of {KINDS}")


def load_params(model: nn.Module, params) -> nn.Module:
  """Copies our parameter tree into the torch model; every tensor on both sides must be matched."""
  state = {k: torch.from_numpy(np.array(v)) for k, v in convert.params_to_hf_state(params).items()}
  model.load_state_dict(state, strict=True)
  return model


def state_as_numpy(model: nn.Module) -> dict[str, np.ndarray]:
  """The torch model's parameters by Hugging Face name (what `convert.hf_state_to_params` reads)."""
  return {name: p.detach().cpu().numpy().copy() for name, p in model.named_parameters()}


def decay_names(params) -> set[str]:
  """Hugging Face names of the parameters `debertax.optimizer.decay_mask` decays."""
  flat = traverse_util.flatten_dict(optimizer_lib.decay_mask(params))
  return {convert._hf_name(path) for path, decayed in flat.items() if decayed}


class AuthorsAdamW(torch.optim.Optimizer):
  """debertax.optimizer's update rule in torch: p -= lr * (m / (sqrt(v) + eps) + wd * p).

  Without bias correction (the authors' Adam) m and v are used as they are; with it, m / (1 - b1^t) and
  v / (1 - b2^t). The decay term uses the parameter before this step's update, as optax.add_decayed_weights
  does (torch.optim.AdamW's p *= 1 - lr * wd before its Adam step is the same first-order rule).
  """

  def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
               bias_correction: bool = False):
    super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                  bias_correction=bias_correction))

  @torch.no_grad()
  def step(self, closure=None):
    loss = None
    if closure is not None:
      with torch.enable_grad():
        loss = closure()
    for group in self.param_groups:
      b1, b2 = group["betas"]
      for p in group["params"]:
        if p.grad is None:
          continue
        state = self.state[p]
        if not state:
          state["step"] = 0
          state["exp_avg"] = torch.zeros_like(p)
          state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(p.grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        if group["bias_correction"]:
          t = state["step"]
          update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + group["eps"])
        else:
          update = m / (v.sqrt() + group["eps"])
        if group["weight_decay"]:
          update = update + group["weight_decay"] * p
        p.sub_(group["lr"] * update)
    return loss


def make_optimizer(model: nn.Module, params, train_config) -> torch.optim.Optimizer:
  """The torch optimizer for a `make_optimizer` config block: torch.optim.AdamW when bias_correction, else
  `AuthorsAdamW`; two parameter groups, decayed / not decayed by the same `decay_mask` as ours. The learning
  rate is set before every step (`set_lr`) from our schedule."""
  decayed = decay_names(params)
  named = dict(model.named_parameters())
  unknown = decayed - set(named)
  if unknown:
    raise ValueError(f"decayed parameters missing from the torch model: {sorted(unknown)}")
  groups = [{"params": [p for n, p in named.items() if n in decayed], "weight_decay": train_config.weight_decay},
            {"params": [p for n, p in named.items() if n not in decayed], "weight_decay": 0.0}]
  betas = (train_config.adam_b1, train_config.adam_b2)
  if train_config.bias_correction:
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=train_config.adam_eps)
  return AuthorsAdamW(groups, lr=0.0, betas=betas, eps=train_config.adam_eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
  for group in optimizer.param_groups:
    group["lr"] = lr


def loss(kind: str, model: nn.Module, batch: dict) -> torch.Tensor:
  """The training loss of one batch (numpy arrays; see training_parity.make_batches for the keys)."""
  ids = torch.from_numpy(np.asarray(batch["input_ids"], np.int64))
  mask = torch.from_numpy(np.asarray(batch["attention_mask"], np.int64))
  if kind == "mlm":  # transformers' own loss: cross-entropy over the labelled (masked) slots.
    return model(input_ids=ids, attention_mask=mask, labels=torch.from_numpy(mlm_labels(batch))).loss
  if kind == "emd":
    logits = model(ids, mask)
    return nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(mlm_labels(batch)).flatten(),
                                       ignore_index=-100)
  if kind == "rtd":
    logits = model(ids, mask)
    labels = torch.from_numpy(np.asarray(batch["replaced"], np.float32))
    weight = mask.to(logits.dtype)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (bce * weight).sum() / weight.sum().clamp(min=1.0)
  if kind in ("cls", "reg"):  # transformers' own loss: CrossEntropyLoss / MSELoss.
    labels = np.asarray(batch["labels"], np.float32 if kind == "reg" else np.int64)
    return model(input_ids=ids, attention_mask=mask, labels=torch.from_numpy(labels)).loss
  raise ValueError(f"unknown parity kind {kind!r}")


def mlm_labels(batch: dict) -> np.ndarray:
  """[B, L] int64: the original id at every valid prediction slot, -100 (ignored) elsewhere."""
  positions, valid, targets = (np.asarray(batch[k]) for k in ("positions", "valid", "targets"))
  labels = np.full(np.shape(batch["input_ids"]), -100, np.int64)
  rows, slots = np.nonzero(valid)
  labels[rows, positions[rows, slots]] = targets[rows, slots]
  return labels


class Trainer:
  """One torch training run: model, optimizer, clipping, our schedule's learning rate per step."""

  def __init__(self, kind: str, model: nn.Module, params, train_config, schedule):
    self.kind, self.model, self.schedule = kind, model, schedule
    self.grad_clip = float(train_config.grad_clip or 0.0)
    self.optimizer = make_optimizer(model, params, train_config)
    self.step_count = 0
    self.grad_norms = []  # Global gradient norms before clipping.
    model.train()  # Dropout is 0 everywhere: train mode is what a training loop runs.

  def step(self, batch: dict) -> float:
    """One optimizer step; returns the loss before it."""
    set_lr(self.optimizer, float(self.schedule(self.step_count)))
    self.optimizer.zero_grad(set_to_none=True)
    value = loss(self.kind, self.model, batch)
    value.backward()
    if self.grad_clip > 0:
      self.grad_norms.append(float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)))
    self.optimizer.step()
    self.step_count += 1
    return float(value.detach())
