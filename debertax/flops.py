"""Model FLOP counts (for MFU) and the per-device peak they are compared with.

Counting rule: a matmul [m, k] x [k, n] is 2*m*n*k FLOPs; elementwise work, softmax and LayerNorm are not
counted; forward+backward = 3x forward. The relative-attention terms are counted as the useful work of the
definition (one length-d dot product per (query, key) pair and term), whatever formulation computes them.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from debertax.config import ModelConfig


def encoder_flops(cfg: ModelConfig, batch: int, length: int, *, backward: bool = False, layer_passes=None) -> float:
  """Forward (x3 with backward) FLOPs of the encoder stack for a [batch, length] input."""
  d, ffn = cfg.hidden_size, cfg.intermediate_size
  layers = cfg.num_hidden_layers if layer_passes is None else layer_passes
  tokens = batch * length
  terms = len(cfg.pos_att_type) if cfg.relative_attention else 0
  per_token = 2 * (4 * d * d + 2 * d * ffn) + 2 * 2 * length * d + terms * 2 * length * d
  per_layer_tables = terms * 2 * (2 * cfg.position_table_half) * d * d  # Shared by the batch.
  embed_proj = 2 * cfg.embed_dim * d * tokens if cfg.embed_dim != d else 0
  forward = layers * (per_token * tokens + per_layer_tables) + embed_proj
  return forward * (3 if backward else 1)


def mlm_head_flops(cfg: ModelConfig, num_positions: int) -> float:
  """Forward FLOPs of the MLM head on `num_positions` predicted slots (dense + tied vocabulary matmul)."""
  return 2 * num_positions * (cfg.hidden_size * cfg.embed_dim + cfg.embed_dim * cfg.vocab_size)


def rtd_step_flops(disc: ModelConfig, gen: ModelConfig, batch: int, length: int, num_predictions: int) -> float:
  """One RTD training step: generator (encoder + 2 EMD passes + MLM head on the masked slots) and
  discriminator (encoder + RTD head), forward and backward."""
  generator = encoder_flops(gen, batch, length, layer_passes=gen.num_hidden_layers + 2)
  generator += mlm_head_flops(gen, batch * num_predictions)
  discriminator = encoder_flops(disc, batch, length) + 2 * batch * length * (disc.hidden_size ** 2 + disc.hidden_size)
  return 3.0 * (generator + discriminator)


_PEAK_BY_KIND = {  # Dense bf16 FLOP/s per chip, from the vendors' data sheets.
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


@functools.lru_cache(maxsize=None)
def peak_flops_per_device() -> float:
  """Data-sheet peak for known accelerators; on other devices (the CPU) a measured float32 matmul ceiling."""
  kind = jax.devices()[0].device_kind
  for name, peak in _PEAK_BY_KIND.items():
    if kind.startswith(name):
      return peak
  return measure_matmul_ceiling()


def measure_matmul_ceiling(size: int = 2048, repeats: int = 5) -> float:
  """Best observed FLOP/s of a [size, size] float32 matmul on device 0."""
  x = jax.device_put(jnp.ones((size, size), jnp.float32), jax.devices()[0])
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best
