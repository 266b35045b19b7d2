"""The DeBERTa-v2/v3 backbone: embeddings, post-LN encoder layers, the optional v2 ConvLayer.

Parameter names mirror the Hugging Face state dict (`embeddings/word_embeddings`, `encoder/layer_3/
attention/self/query_proj`, ...) so that conversion is a rename plus transposes. Tensor shapes: B batch,
L length, D hidden, E embedding_size, H heads, d head dim, k position_buckets.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from debertax import layers
from debertax.attention import DisentangledSelfAttention
from debertax.config import ModelConfig

ACTIVATION_AXES = ("act_batch", "act_length", "act_embed")


class Embeddings(nn.Module):
  """word (+ absolute position if position_biased_input) (+ token type) -> embed_proj -> LN -> mask."""

  config: ModelConfig
  with_position_embeddings: bool = False  # The generator's Enhanced Mask Decoder needs them even in v3.

  def setup(self):
    cfg = self.config
    self.word_embeddings = layers.embed(cfg, cfg.vocab_size, cfg.embed_dim, ("vocab", "embed_in"),
                                        "word_embeddings")
    if cfg.position_biased_input or self.with_position_embeddings:
      self.position_embeddings = layers.embed(cfg, cfg.max_position_embeddings, cfg.embed_dim,
                                              ("positions", "embed_in"), "position_embeddings")
    if cfg.type_vocab_size > 0:
      self.token_type_embeddings = layers.embed(cfg, cfg.type_vocab_size, cfg.embed_dim,
                                                ("token_types", "embed_in"), "token_type_embeddings")
    if cfg.embed_dim != cfg.hidden_size:
      self.embed_proj = layers.dense(cfg, cfg.hidden_size, ("embed_in", "embed"), "embed_proj", use_bias=False)
    self.LayerNorm = layers.layer_norm(cfg, "LayerNorm")
    self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

  def __call__(self, input_ids, mask, token_type_ids=None, deterministic=True):
    """input_ids [B, L] int; mask [B, L] -> (embedded [B, L, D], absolute positions [1, L, D] or None)."""
    cfg = self.config
    length = input_ids.shape[1]
    x = self.word_embeddings(input_ids)
    position_emb = None
    if cfg.position_biased_input or self.with_position_embeddings:
      if length > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {length} exceeds max_position_embeddings="
                         f"{cfg.max_position_embeddings}, which this model's absolute positions need")
      position_emb = self.position_embeddings(jnp.arange(length)[None, :])
      if cfg.position_biased_input:
        x = x + position_emb
    if cfg.type_vocab_size > 0:
      if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
      x = x + self.token_type_embeddings(token_type_ids)
    if cfg.embed_dim != cfg.hidden_size:
      x = self.embed_proj(x)
      if position_emb is not None:
        position_emb = self.embed_proj(position_emb)
    x = self.LayerNorm(x)
    x = x * mask[:, :, None].astype(x.dtype)
    x = self.dropout(x, deterministic=deterministic)
    return nn.with_logical_constraint(x, ACTIVATION_AXES), position_emb


class SelfOutput(nn.Module):
  """dense -> dropout -> LayerNorm(x + residual); used after attention and after the FFN."""

  config: ModelConfig
  input_axis: str = "heads"  # Logical name of the input features: "heads" after attention, "mlp" after the FFN.

  @nn.compact
  def __call__(self, x, residual, deterministic=True):
    cfg = self.config
    x = layers.dense(cfg, cfg.hidden_size, (self.input_axis, "embed"), "dense")(x)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    return layers.layer_norm(cfg, "LayerNorm")(x + residual)


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, hidden, key_mask, rel_table, query=None, deterministic=True):
    context = DisentangledSelfAttention(self.config, name="self")(
        hidden, key_mask, rel_table, query=query, deterministic=deterministic)
    residual = hidden if query is None else query
    return SelfOutput(self.config, name="output")(context, residual, deterministic)


class Intermediate(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    x = layers.dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "dense")(x)
    return layers.activation(cfg.hidden_act)(x)


class Layer(nn.Module):
  """One post-LN block. With `query`, Q comes from it and K/V from `hidden` (Enhanced Mask Decoder)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, hidden, key_mask, rel_table, query=None, deterministic=True):
    attn = Attention(self.config, name="attention")(hidden, key_mask, rel_table, query, deterministic)
    ffn = Intermediate(self.config, name="intermediate")(attn)
    out = SelfOutput(self.config, "mlp", name="output")(ffn, attn, deterministic)
    return nn.with_logical_constraint(out, ACTIVATION_AXES)


class ConvLayer(nn.Module):
  """DeBERTa-v2 xlarge/xxlarge: conv over the embedding output, merged into layer 0's output."""

  config: ModelConfig

  @nn.compact
  def __call__(self, embedded, layer0_out, mask, deterministic=True):
    cfg = self.config
    ksize = cfg.conv_kernel_size
    pad = (ksize - 1) // 2
    out = nn.Conv(
        cfg.hidden_size, (ksize,), padding=[(pad, pad)], feature_group_count=cfg.conv_groups,
        dtype=layers.compute_dtype(cfg), param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                                 ("conv_window", "embed_group", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name="conv")(embedded)
    mask_f = mask[:, :, None].astype(out.dtype)
    out = out * mask_f
    out = layers.activation(cfg.conv_act)(nn.Dropout(cfg.hidden_dropout_prob)(out, deterministic=deterministic))
    return layers.layer_norm(cfg, "LayerNorm")(layer0_out + out) * mask_f


class Encoder(nn.Module):
  config: ModelConfig

  def setup(self):
    cfg = self.config
    # static_argnums counts the module as 0: (hidden, key_mask, rel_table, query, deterministic).
    layer_cls = nn.remat(Layer, static_argnums=(5,)) if cfg.remat else Layer
    self.layer = [layer_cls(cfg) for _ in range(cfg.num_hidden_layers)]
    if cfg.relative_attention:
      self.rel_embeddings = layers.embed(cfg, 2 * cfg.position_table_half, cfg.hidden_size, ("rel", "embed"),
                                         "rel_embeddings")
      if cfg.norm_rel_ebd == "layer_norm":
        self.LayerNorm = layers.layer_norm(cfg, "LayerNorm")
    if cfg.conv_kernel_size > 0:
      self.conv = ConvLayer(cfg)

  def relative_table(self):
    """P = LayerNorm(rel_embeddings) [2k, D], computed once per forward pass; None without relative attention."""
    cfg = self.config
    if not cfg.relative_attention:
      return None
    table = self.rel_embeddings.embedding
    return self.LayerNorm(table) if cfg.norm_rel_ebd == "layer_norm" else table.astype(layers.compute_dtype(cfg))

  def __call__(self, embedded, mask, deterministic=True):
    """embedded [B, L, D] -> list of every layer's output (num_hidden_layers x [B, L, D])."""
    key_mask = mask.astype(bool)
    rel_table = self.relative_table()
    hidden, outputs = embedded, []
    for index, layer in enumerate(self.layer):
      out = layer(hidden, key_mask, rel_table, None, deterministic)
      if index == 0 and self.config.conv_kernel_size > 0:
        out = self.conv(embedded, out, mask, deterministic)
      outputs.append(out)
      hidden = out
    return outputs

  def decode_with_last_layer(self, kv, query, mask, deterministic=True):
    """Runs the last layer with queries from `query` and keys/values from `kv` (one EMD step)."""
    return self.layer[-1](kv, mask.astype(bool), self.relative_table(), query, deterministic)


@dataclasses.dataclass
class BackboneOutput:
  last_hidden_state: jax.Array  # [B, L, D]
  hidden_states: list  # every layer's output, [B, L, D] each
  position_embeddings: jax.Array | None  # [1, L, D] absolute positions (for the EMD) or None


class Deberta(nn.Module):
  """Embeddings + encoder; the `deberta.` prefix of checkpoints."""

  config: ModelConfig
  with_position_embeddings: bool = False

  def setup(self):
    self.embeddings = Embeddings(self.config, self.with_position_embeddings)
    self.encoder = Encoder(self.config)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True):
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    embedded, position_emb = self.embeddings(input_ids, attention_mask, token_type_ids, deterministic)
    outputs = self.encoder(embedded, attention_mask, deterministic)
    return BackboneOutput(outputs[-1], outputs, position_emb)

  def word_embedding_matrix(self):
    """[V, E] word embeddings, for the tied MLM output projection."""
    return self.embeddings.word_embeddings.embedding

  def enhanced_mask_decoder(self, out: BackboneOutput, attention_mask, steps=2, deterministic=True):
    """EMD: K/V = output of layer L-1, queries start at (that + absolute positions), run the last layer."""
    if out.position_embeddings is None:
      raise ValueError("the Enhanced Mask Decoder needs absolute position embeddings")
    if len(out.hidden_states) < 2:
      raise ValueError("the Enhanced Mask Decoder needs at least 2 encoder layers")
    kv = out.hidden_states[-2]
    query = kv + out.position_embeddings.astype(kv.dtype)
    for _ in range(steps):
      query = self.encoder.decode_with_last_layer(kv, query, attention_mask, deterministic)
    return query
