"""Small building blocks shared by the model: dense, LayerNorm, embeddings and activations.

Every parameter carries logical axis names (MaxText style); `debertax.sharding` maps them onto the mesh.
Logical names: vocab, embed (hidden D), embed_in (embedding_size), heads (H*d), mlp (FFN), rel (2k),
positions, conv_window, labels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from debertax.config import ModelConfig


def activation(name: str):
  """Hugging Face ACT2FN names. 'gelu' is the exact erf form (jax.nn.gelu defaults to tanh)."""
  if name in ("gelu", "gelu_python"):
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_fast"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  return {"relu": jax.nn.relu, "tanh": jnp.tanh, "silu": jax.nn.silu, "swish": jax.nn.silu,
          "sigmoid": jax.nn.sigmoid}[name]


def compute_dtype(cfg: ModelConfig):
  return jnp.dtype(cfg.dtype)


def dense(cfg: ModelConfig, features: int, axes: tuple[str, str], name: str, use_bias: bool = True):
  return nn.Dense(
      features, use_bias=use_bias, dtype=compute_dtype(cfg), param_dtype=jnp.dtype(cfg.param_dtype),
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]),
      name=name)


def layer_norm(cfg: ModelConfig, name: str, axis_name: str = "embed"):
  # use_fast_variance=False: E[x^2]-E[x]^2 loses precision against PyTorch's two-pass variance.
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=compute_dtype(cfg), param_dtype=jnp.dtype(cfg.param_dtype),
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis_name,)),
      name=name)


def embed(cfg: ModelConfig, num: int, features: int, axes: tuple[str, str], name: str):
  return nn.Embed(
      num, features, dtype=compute_dtype(cfg), param_dtype=jnp.dtype(cfg.param_dtype),
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), axes),
      name=name)
