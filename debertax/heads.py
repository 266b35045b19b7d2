"""Task heads and the top-level models: backbone only, MLM (with the Enhanced Mask Decoder), RTD, and
sequence classification/regression. Module names follow the checkpoint prefixes (`lm_predictions.lm_head`,
`mask_predictions`, `pooler`, `classifier`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from debertax import layers
from debertax.config import ModelConfig
from debertax.model import Deberta

HEADS = ("none", "mlm", "rtd", "cls")


def gather_positions(hidden, positions):
  """hidden [B, L, D], positions [B, P] int -> [B, P, D]."""
  return jnp.take_along_axis(hidden, positions[:, :, None], axis=1)


class LMHead(nn.Module):
  """dense(D, E) -> act -> LN -> x @ word_embeddings^T + bias  (`lm_predictions.lm_head`, tied)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, hidden, word_embeddings):
    """hidden [B, P, D]; word_embeddings [V, E] -> float32 logits [B, P, V]."""
    cfg = self.config
    x = layers.dense(cfg, cfg.embed_dim, ("embed", "embed_in"), "dense")(hidden)
    x = layers.activation(cfg.hidden_act)(x)
    x = layers.layer_norm(cfg, "LayerNorm", "embed_in")(x)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                      (cfg.vocab_size,), jnp.dtype(cfg.param_dtype))
    logits = jnp.einsum("bpe,ve->bpv", x, word_embeddings.astype(x.dtype), preferred_element_type=jnp.float32)
    return logits + bias


class LMPredictions(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, hidden, word_embeddings):
    return LMHead(self.config, name="lm_head")(hidden, word_embeddings)


class RTDHead(nn.Module):
  """LN(h + h[:, 0]) -> dense(D, D) -> act -> dense(D, 1): one replaced-token logit per position."""

  config: ModelConfig

  @nn.compact
  def __call__(self, hidden):
    """hidden [B, L, D] -> float32 logits [B, L]."""
    cfg = self.config
    x = layers.layer_norm(cfg, "LayerNorm")(hidden + hidden[:, :1])
    x = layers.dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "dense")(x)
    x = layers.activation(cfg.hidden_act)(x)
    x = layers.dense(cfg, 1, ("embed_out", "labels"), "classifier")(x)
    return x[..., 0].astype(jnp.float32)


class ContextPooler(nn.Module):
  """h[:, 0] -> dropout -> dense(D, D) -> act."""

  config: ModelConfig

  @nn.compact
  def __call__(self, hidden, deterministic=True):
    cfg = self.config
    x = nn.Dropout(cfg.pooler_dropout)(hidden[:, 0], deterministic=deterministic)
    x = layers.dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "dense")(x)
    return layers.activation(cfg.pooler_hidden_act)(x)


class DebertaModel(nn.Module):
  """Backbone only: last hidden states [B, L, D]."""

  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True):
    return Deberta(self.config, name="deberta")(input_ids, attention_mask, token_type_ids,
                                               deterministic).last_hidden_state


class DebertaForMaskedLM(nn.Module):
  """MLM logits. With `use_emd` (the RTD generator) the Enhanced Mask Decoder produces them."""

  config: ModelConfig
  use_emd: bool = False

  def setup(self):
    self.deberta = Deberta(self.config, with_position_embeddings=self.use_emd)
    self.lm_predictions = LMPredictions(self.config)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True, positions=None):
    """-> float32 logits [B, L, V], or [B, P, V] at `positions` [B, P] (cheaper: only masked slots)."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    out = self.deberta(input_ids, attention_mask, token_type_ids, deterministic)
    hidden = (self.deberta.enhanced_mask_decoder(out, attention_mask, deterministic=deterministic)
              if self.use_emd else out.last_hidden_state)
    if positions is not None:
      hidden = gather_positions(hidden, positions)
    return self.lm_predictions(hidden, self.deberta.word_embedding_matrix())


class DebertaForRTD(nn.Module):
  """Replaced-token detection (the ELECTRA discriminator): logits [B, L]."""

  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True):
    hidden = Deberta(self.config, name="deberta")(input_ids, attention_mask, token_type_ids,
                                                 deterministic).last_hidden_state
    return RTDHead(self.config, name="mask_predictions")(hidden)


class DebertaForSequenceClassification(nn.Module):
  """ContextPooler -> dropout(cls_dropout) -> classifier: logits [B, num_labels] (1 = regression)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True):
    cfg = self.config
    hidden = Deberta(cfg, name="deberta")(input_ids, attention_mask, token_type_ids,
                                         deterministic).last_hidden_state
    pooled = ContextPooler(cfg, name="pooler")(hidden, deterministic)
    pooled = nn.Dropout(cfg.classifier_dropout)(pooled, deterministic=deterministic)
    logits = layers.dense(cfg, cfg.num_labels, ("embed_out", "labels"), "classifier")(pooled)
    return logits.astype(jnp.float32)


def build_model(config: ModelConfig, head: str = "none", use_emd: bool = False) -> nn.Module:
  """head: 'none' (backbone), 'mlm' (use_emd for the generator), 'rtd', or 'cls'."""
  if head == "none":
    return DebertaModel(config)
  if head == "mlm":
    return DebertaForMaskedLM(config, use_emd=use_emd)
  if head == "rtd":
    return DebertaForRTD(config)
  if head == "cls":
    return DebertaForSequenceClassification(config)
  raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")


def init_params(model: nn.Module, rng, length: int = 8, boxed: bool = False):
  """Random parameters for `model` (plain pytree unless `boxed`, which keeps the logical axis names)."""
  ids = jnp.zeros((1, length), jnp.int32)
  variables = model.init({"params": rng, "dropout": rng}, ids, jnp.ones_like(ids))
  params = variables["params"]
  return params if boxed else nn.unbox(params)


def abstract_params(model: nn.Module, length: int = 8):
  """Parameter ShapeDtypeStructs via jax.eval_shape (allocates nothing), still boxed with logical axes."""
  return jax.eval_shape(lambda rng: init_params(model, rng, length, boxed=True), jax.random.PRNGKey(0))
