"""Plain masked-language-model pretraining (`config.objective="mlm"`): the paper's baseline for RTD.

One model of the discriminator's shape (config.model) with the MLM head and the Enhanced Mask Decoder,
trained on the same masked batches as the RTD generator, as DeBERTa (v1/v2) was pretrained; DeBERTaV3
measures RTD against it. No generator, no sampling, no discriminator: the `rtd` block of the config has
no effect. Same interface as `rtd.RTDModels`, so the train step, the checkpoints and the export do not
depend on the objective.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from debertax import heads
from debertax.config import ModelConfig
from debertax.rtd import masked_lm_loss, masked_slots

OBJECTIVES = ("rtd", "mlm")


class MLMModel:
  """The masked language model and its export: parameters {"mlm": ...}, exported as export/mlm/."""

  parts = ("mlm",)

  def __init__(self, model_config: ModelConfig):
    self.config = model_config
    self.model = heads.build_model(model_config, "mlm", use_emd=True)
    self.export_heads = {"mlm": (model_config, {"head": "mlm", "use_emd": True})}

  def init(self, rng, length: int = 8, boxed: bool = False):
    params = {"mlm": heads.init_params(self.model, rng, length, boxed=True)}
    return params if boxed else nn.unbox(params)

  def exported(self, params) -> dict:
    return {"mlm": params["mlm"]}

  def losses(self, params, batch, rng, *, num_predictions: int, deterministic: bool = False, **unused_rtd):
    """batch: input_ids (masked), original_ids, attention_mask [B, L] int; mlm_mask [B, L] bool.

    Returns (MLM loss over the masked slots, aux dict of scalar metrics and the token mask).
    The keyword arguments of the RTD objective (rtd_lambda, temperature) are accepted and unused.
    """
    ids, original = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["original_ids"])
    attention_mask, mlm_mask = jnp.asarray(batch["attention_mask"]), jnp.asarray(batch["mlm_mask"]).astype(bool)
    positions, valid, targets = masked_slots(mlm_mask, original, num_predictions)
    logits = self.model.apply({"params": params["mlm"]}, ids, attention_mask, deterministic=deterministic,
                              positions=positions, rngs={"dropout": rng})  # [B, P, V] float32
    mlm_loss, mlm_acc = masked_lm_loss(logits, targets, valid)
    aux = {"loss": mlm_loss, "mlm_loss": mlm_loss, "mlm_accuracy": mlm_acc,
           "masked_tokens": valid.sum().astype(jnp.float32), "tokens": attention_mask.astype(jnp.float32).sum(),
           "token_mask": attention_mask}
    return mlm_loss, aux
