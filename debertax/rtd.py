"""ELECTRA-style replaced token detection with DeBERTaV3's embedding sharing (GDES / ES / NES).

Trainable parameters: {"generator": MLM-with-EMD params, "discriminator": RTD params}. The discriminator's
word (and absolute position) embedding slot means different things per mode:
  gdes  the slot holds E_delta (initialised to zero); the discriminator uses stop_gradient(E_G) + E_delta,
        so the RTD loss updates only E_delta and the MLM loss only E_G;
  es    the slot does not exist; the discriminator uses E_G itself and both losses update it;
  nes   the slot holds the discriminator's own embedding, independent of E_G.
One backward pass of L_MLM + lambda * L_RTD gives every mode its defining gradients: the sample is drawn
under stop_gradient, so the generator's only link to the RTD loss is the shared embedding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from debertax import heads
from debertax.config import ModelConfig

SHARING_MODES = ("gdes", "es", "nes")
_SHARED = ("word_embeddings", "position_embeddings")


def generator_config(disc: ModelConfig, rtd_config) -> ModelConfig:
  """Same width (unless generator_hidden_size says otherwise), half depth by default.

  A narrower generator (ELECTRA's 1/4 - 1/2 of the discriminator's width) keeps the discriminator's
  embedding width through embed_proj, so that GDES / ES can still share one embedding matrix.
  """
  changes = {"num_hidden_layers": int(rtd_config.generator_layers)}
  width = int(rtd_config.get("generator_hidden_size", -1))
  if width > 0 and width != disc.hidden_size:
    changes.update(hidden_size=width, intermediate_size=4 * width,
                   num_attention_heads=max(1, width // disc.head_dim), embedding_size=disc.embed_dim)
  return disc.replace(**changes)


class RTDModels:
  """The generator and discriminator modules and how their embeddings are tied."""

  parts = ("generator", "discriminator")  # The top-level keys of the parameters (one optimizer each).

  def __init__(self, disc_config: ModelConfig, gen_config: ModelConfig, embedding_sharing: str):
    if embedding_sharing not in SHARING_MODES:
      raise ValueError(f"config.rtd.embedding_sharing={embedding_sharing!r}; choose one of {SHARING_MODES}")
    if embedding_sharing != "nes" and gen_config.embed_dim != disc_config.embed_dim:
      raise ValueError(f"embedding sharing ({embedding_sharing}) needs equal embedding sizes, got generator "
                       f"{gen_config.embed_dim} and discriminator {disc_config.embed_dim}")
    self.disc_config, self.gen_config, self.sharing = disc_config, gen_config, embedding_sharing
    self.generator = heads.build_model(gen_config, "mlm", use_emd=True)
    self.discriminator = heads.build_model(disc_config, "rtd")
    # What pretrain.export writes: name -> (config, convert.write_hf_directory head arguments).
    self.export_heads = {"discriminator": (disc_config, {"head": "rtd"}),
                         "generator": (gen_config, {"head": "mlm", "use_emd": True})}

  # Parameters -------------------------------------------------------------------------------------
  def init(self, rng, length: int = 8, boxed: bool = False):
    gen_rng, disc_rng = jax.random.split(rng)
    gen = heads.init_params(self.generator, gen_rng, length, boxed=True)
    disc = heads.init_params(self.discriminator, disc_rng, length, boxed=True)
    disc_emb = dict(disc["deberta"]["embeddings"])
    for name in _SHARED:
      if name not in disc_emb:
        continue
      if self.sharing == "es":
        del disc_emb[name]
      elif self.sharing == "gdes":
        disc_emb[name] = jax.tree_util.tree_map(jnp.zeros_like, disc_emb[name])  # E_delta starts at zero.
    disc = {**disc, "deberta": {**disc["deberta"], "embeddings": disc_emb}}
    params = {"generator": gen, "discriminator": disc}
    return params if boxed else nn.unbox(params)

  def discriminator_params(self, params, for_export: bool = False):
    """The discriminator's effective parameters; for_export drops the stop_gradient (E_G + E_delta)."""
    gen_emb = params["generator"]["deberta"]["embeddings"]
    disc = params["discriminator"]
    disc_emb = dict(disc["deberta"]["embeddings"])
    for name in _SHARED:
      if name not in gen_emb or (self.sharing != "es" and name not in disc_emb):
        continue
      if self.sharing == "es":
        if self._disc_uses(name):
          disc_emb[name] = gen_emb[name]
      elif self.sharing == "gdes":
        base = gen_emb[name] if for_export else jax.lax.stop_gradient(gen_emb[name])
        disc_emb[name] = jax.tree_util.tree_map(jnp.add, base, disc_emb[name])
    return {**disc, "deberta": {**disc["deberta"], "embeddings": disc_emb}}

  def exported(self, params) -> dict:
    """The parameters of each model in `export_heads` (the discriminator's embedding is E_G + E_delta)."""
    return {"generator": params["generator"], "discriminator": self.discriminator_params(params, for_export=True)}

  def _disc_uses(self, name: str) -> bool:
    return name == "word_embeddings" or self.disc_config.position_biased_input

  # Forward ----------------------------------------------------------------------------------------
  def losses(self, params, batch, rng, *, num_predictions: int, rtd_lambda: float, temperature: float = 1.0,
             deterministic: bool = False):
    """batch: input_ids (masked), original_ids, attention_mask [B, L] int; mlm_mask [B, L] bool.

    Returns (total loss, aux dict of scalar metrics and per-token arrays for evaluation).
    """
    ids, original = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["original_ids"])
    attention_mask, mlm_mask = jnp.asarray(batch["attention_mask"]), jnp.asarray(batch["mlm_mask"]).astype(bool)
    gen_rng, sample_rng, disc_rng = jax.random.split(rng, 3)

    positions, valid, targets = masked_slots(mlm_mask, original, num_predictions)

    logits = self.generator.apply({"params": params["generator"]}, ids, attention_mask,
                                  deterministic=deterministic, positions=positions,
                                  rngs={"dropout": gen_rng})  # [B, P, V] float32
    mlm_loss, mlm_acc = masked_lm_loss(logits, targets, valid)
    n_masked = jnp.maximum(valid.sum(), 1)

    # No gradient through the sample: it is data for the discriminator.
    sampled = jax.random.categorical(sample_rng, jax.lax.stop_gradient(logits) / temperature, axis=-1)
    disc_ids, replaced = corrupt(original, positions, valid, sampled)

    disc_logits = self.discriminator.apply({"params": self.discriminator_params(params)}, disc_ids,
                                           attention_mask, deterministic=deterministic,
                                           rngs={"dropout": disc_rng})  # [B, L]
    rtd_loss, rtd_acc = replaced_token_loss(disc_logits, replaced, attention_mask)
    token_weight = attention_mask.astype(jnp.float32)
    n_tokens = jnp.maximum(token_weight.sum(), 1.0)
    total = mlm_loss + rtd_lambda * rtd_loss
    aux = {"loss": total, "mlm_loss": mlm_loss, "mlm_accuracy": mlm_acc, "rtd_loss": rtd_loss,
           "rtd_accuracy": rtd_acc,
           "replaced_ratio": jnp.sum(replaced * token_weight) / n_tokens,
           "replaced_of_masked": jnp.sum(replaced) / n_masked,
           "masked_tokens": valid.sum().astype(jnp.float32), "tokens": token_weight.sum(),
           "rtd_logits": disc_logits, "rtd_labels": replaced, "token_mask": attention_mask}
    return total, aux


def masked_slots(mlm_mask, original, num_predictions: int):
  """The masked slots as a fixed-size list (P = the pipeline's cap), padded with invalid slots.

  mlm_mask [B, L] bool; original [B, L] int. Returns positions [B, P] int (the masked ones first, in order),
  valid [B, P] bool, and the original ids there, targets [B, P].
  """
  order = jnp.argsort(~mlm_mask, axis=1, stable=True)
  positions = order[:, :num_predictions]
  return (positions, jnp.take_along_axis(mlm_mask, positions, axis=1),
          jnp.take_along_axis(original, positions, axis=1))


def masked_lm_loss(logits, targets, valid):
  """Generator loss: cross-entropy averaged over the valid masked slots, and the argmax accuracy there.

  logits [B, P, V] float; targets [B, P] int; valid [B, P] bool. Returns (loss, accuracy) scalars.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  n_masked = jnp.maximum(valid.sum(), 1)
  return jnp.sum(nll * valid) / n_masked, jnp.sum((jnp.argmax(logits, -1) == targets) * valid) / n_masked


def replaced_token_loss(disc_logits, replaced, attention_mask):
  """Discriminator loss: sigmoid BCE with label 1 = replaced, averaged over real (non-pad) tokens.

  disc_logits [B, L] float; replaced [B, L] bool; attention_mask [B, L] (1 = real token).
  Returns (loss, accuracy of `logit > 0 == replaced`) scalars.
  """
  token_weight = attention_mask.astype(jnp.float32)
  bce = sigmoid_bce(disc_logits.astype(jnp.float32), replaced.astype(jnp.float32))
  n_tokens = jnp.maximum(token_weight.sum(), 1.0)
  return jnp.sum(bce * token_weight) / n_tokens, jnp.sum(((disc_logits > 0) == replaced) * token_weight) / n_tokens


def corrupt(original, positions, valid, sampled):
  """Discriminator input and labels: original ids with the valid masked slots set to the samples.

  original [B, L]; positions, valid, sampled [B, P]. A sample equal to the original is labelled original.
  Returns (ids [B, L], replaced [B, L] bool).
  """
  targets = jnp.take_along_axis(original, positions, axis=1)
  sampled = jnp.where(valid, sampled, targets).astype(original.dtype)
  rows = jnp.arange(original.shape[0])[:, None]
  disc_ids = jnp.asarray(original).at[rows, positions].set(sampled)
  return disc_ids, disc_ids != original


def sigmoid_bce(logits, labels):
  """Numerically stable sigmoid binary cross-entropy."""
  return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def average_pairwise_cosine(embedding, max_rows: int = 2048, seed: int = 0) -> float:
  """Mean cosine similarity over distinct pairs of rows (paper Table 1); a fixed random sample of rows
  keeps it O(max_rows^2) for 128k-250k vocabularies."""
  embedding = np.asarray(embedding, np.float32)
  if embedding.shape[0] > max_rows:
    rows = np.random.default_rng(seed).choice(embedding.shape[0], max_rows, replace=False)
    embedding = embedding[np.sort(rows)]
  unit = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
  n = unit.shape[0]
  total = unit.sum(0)
  # sum_{i != j} u_i.u_j = |sum u|^2 - sum |u_i|^2.
  pair_sum = float(total @ total - np.sum(unit * unit))
  return pair_sum / (n * (n - 1))
