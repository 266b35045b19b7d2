"""FLOP counts for the DeBERTa encoder, the MLM head and the RTD pretraining step (MFU and benchmarks).

Conventions
-----------
* Only matrix multiplications are counted: a product of [m, k] and [k, n] is 2 * m * n * k FLOPs.
  LayerNorm, softmax, GELU, masks, the skew and the embedding gathers are left out (they are a few percent
  and are memory-bound anyway), as in the usual MFU definitions (PaLM appendix B, Megatron).
* Forward + backward = 3 x forward: the backward pass multiplies every matmul twice more (the gradient
  with respect to each operand).
* Per encoder layer, with N = B * L tokens, D hidden, I FFN width, H heads, d = D / H head dim:
    Q, K, V, output projections          4 * 2 N D D
    FFN                                  2 * 2 N D I
    content scores Q K^T, probs x V      2 * 2 B H L L d
    position tables P Wk, P Wq           2 * U D D  per present term, once per layer, batch-free: U the table
                                         rows that distances within L reach (255 of the 2k = 512 at L = 128,
                                         all 512 from L = 512 on with the released buckets; HF projects 2k)
    c2p and p2c, per present term        2 B H L C d
  C is the number of position columns per query row:
    "useful":   C = L, one dot product per (query, key) pair: the least any implementation must compute.
    "computed": as this package's XLA path computes them (`attention.attention_core_flops`): C = L + T - 1
                on the full path (block-wise Toeplitz windows of T rows); on the query-blocked path for
                long sequences, only the band of key tiles within the bucket saturation distance (about
                2 * 512 + 3 Tq keys for the released configurations) instead of all L keys.
    Hugging Face computes both terms against all 2k table rows (C = 2k = 512) before its gather.
  MFU (the training loop's log and `benchmarks/bench.py`) uses the "useful" count, so that computing
  more than necessary never looks like higher utilisation, and every implementation (ours, Hugging Face,
  BERT-style attention) is credited the same work for the same shapes.
* Heads: the MLM head is dense(D, E) + the tied vocabulary projection (E, V) on the predicted positions
  only; the RTD head is dense(D, D) + dense(D, 1) on every position.
* Peak: `peak_flops_per_device` takes the vendor's dense bf16 (or fp32) figure for known accelerators and
  measures a large matmul on the CPU (there is no meaningful datasheet figure for a shared 2-core VM).
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np

from debertax.config import ModelConfig
from debertax.relative_position import distance_to_table_index

COUNTS = ("useful", "computed")

# Dense (no sparsity) peak FLOP/s per device from the vendors' datasheets, matched against jax's
# device_kind in this order (more specific names first). float32 means what XLA runs an f32 matmul with at
# default precision: TF32 tensor cores on NVIDIA, bf16 passes on TPU.
ACCELERATOR_PEAKS = (
    ("H200", {"bfloat16": 989e12, "float32": 494e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494e12}),  # SXM; the PCIe card is about 756 / 378.
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("TPU v6 lite", {"bfloat16": 918e12, "float32": 918e12}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": 197e12}),
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
)


def _attention_core_flops(cfg: ModelConfig, batch: int, length: int, count: str) -> float:
  """Q K^T, probs x V, and the c2p / p2c products of one layer (forward)."""
  if count == "useful":
    pairs = 2.0 * batch * cfg.num_attention_heads * length * length * cfg.head_dim
    terms = len(cfg.pos_att_type) if cfg.relative_attention else 0
    return (2 + terms) * pairs
  if count == "computed":
    from debertax import attention  # Lazy: the "useful" count needs no Flax.
    return attention.attention_core_flops(cfg, batch, length)
  raise ValueError(f"count={count!r}: use one of {COUNTS}")


def layer_flops(cfg: ModelConfig, batch: int, length: int, *, count: str = "useful") -> float:
  """Forward FLOPs of one encoder layer (also one Enhanced Mask Decoder pass: same shapes)."""
  tokens = batch * length
  d_model, ffn = cfg.hidden_size, cfg.intermediate_size
  flops = 4 * 2.0 * tokens * d_model * d_model  # Q, K, V and the attention output dense
  flops += 2 * 2.0 * tokens * d_model * ffn  # FFN up and down
  if cfg.relative_attention and cfg.pos_att_type:
    flops += len(cfg.pos_att_type) * 2.0 * reachable_rows(cfg, length) * d_model * d_model  # P Wk, P Wq
  return flops + _attention_core_flops(cfg, batch, length, count)


def reachable_rows(cfg: ModelConfig, length: int) -> int:
  """How many rows of the [2k, D] relative table the distances of an L-token sequence reach."""
  index = distance_to_table_index(length, cfg.position_buckets, cfg.max_relative_span)
  return int(np.unique(index).size)


def encoder_flops(cfg: ModelConfig, batch: int, length: int, *, backward: bool, count: str = "useful") -> float:
  """All encoder layers (embedding gathers are free; an embed_proj counts). x3 with `backward`."""
  flops = cfg.num_hidden_layers * layer_flops(cfg, batch, length, count=count)
  if cfg.embed_dim != cfg.hidden_size:
    flops += 2.0 * batch * length * cfg.embed_dim * cfg.hidden_size
  return 3.0 * flops if backward else flops


def mlm_head_flops(cfg: ModelConfig, num_positions: int, *, backward: bool) -> float:
  """MLM head on `num_positions` predicted positions in total (all sequences): dense(D, E) + (E, V)."""
  flops = 2.0 * num_positions * (cfg.hidden_size * cfg.embed_dim + cfg.embed_dim * cfg.vocab_size)
  return 3.0 * flops if backward else flops


def rtd_head_flops(cfg: ModelConfig, num_positions: int, *, backward: bool) -> float:
  """RTD head on every position: dense(D, D) + dense(D, 1)."""
  flops = 2.0 * num_positions * (cfg.hidden_size * cfg.hidden_size + cfg.hidden_size)
  return 3.0 * flops if backward else flops


def mlm_step_flops(cfg: ModelConfig, batch: int, length: int, num_masked: int, *, emd_steps: int = 2,
                   count: str = "useful") -> float:
  """One MLM training step with the Enhanced Mask Decoder (forward + backward; optimizer not counted).

  The encoder, then `emd_steps` passes of its last layer over the full length, with keys/values from the
  second-to-last layer. The encoder's own last-layer output is then unused, and XLA removes it, so the
  model costs (layers - 1 + emd_steps) layer passes (a framework without dead-code elimination would pay
  one more). Then the MLM head on `num_masked` predicted positions per sequence.
  """
  flops = encoder_flops(cfg, batch, length, backward=True, count=count)
  if emd_steps > 0:
    flops += 3.0 * (emd_steps - 1) * layer_flops(cfg, batch, length, count=count)
  return flops + mlm_head_flops(cfg, batch * num_masked, backward=True)


def rtd_step_flops(disc_cfg: ModelConfig, gen_cfg: ModelConfig, batch: int, length: int, num_masked: int, *,
                   emd_steps: int = 2, count: str = "useful") -> float:
  """One RTD training step (forward + backward of generator and discriminator; optimizer not counted).

  Generator: `mlm_step_flops`. Discriminator: its encoder and the RTD head on every position. Sampling and
  the optimizer update are elementwise (not counted).
  """
  gen = mlm_step_flops(gen_cfg, batch, length, num_masked, emd_steps=emd_steps, count=count)
  disc = encoder_flops(disc_cfg, batch, length, backward=True, count=count)
  disc += rtd_head_flops(disc_cfg, batch * length, backward=True)
  return gen + disc


def measure_matmul_flops(dtype: str = "float32", size: int = 4096, repeats: int = 5) -> float:
  """Best FLOP/s of a [size, size] x [size, size] jitted JAX matmul on the default device."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.dtype(dtype))
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best


@functools.lru_cache(maxsize=8)
def peak_flops_per_device(dtype: str = "bfloat16") -> float:
  """Peak dense matmul FLOP/s of one device of the default backend, for MFU.

  GPUs/TPUs: the datasheet figure for `dtype` (ACCELERATOR_PEAKS). CPU: a measured float32 matmul
  (bf16 on most CPUs is no faster), logged. An accelerator missing from the table is measured too, with a
  warning that says so, so the MFU log is never silently against a made-up peak.
  """
  import jax
  device = jax.devices()[0]
  if device.platform == "cpu":
    peak = measure_matmul_flops("float32", size=2048)
    logging.info("peak_flops_per_device: CPU, measured float32 matmul %.1f GFLOP/s", peak / 1e9)
    return peak
  for name, peaks in ACCELERATOR_PEAKS:
    if name.lower() in device.device_kind.lower():
      return peaks[dtype]
  peak = measure_matmul_flops(dtype)
  logging.warning("peak_flops_per_device: %r is not in flops.ACCELERATOR_PEAKS; using a measured %s matmul "
                  "(%.1f TFLOP/s) as the peak", device.device_kind, dtype, peak / 1e12)
  return peak


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops_per_second: float) -> float:
  """Model FLOPs utilisation: useful FLOPs per second over the hardware peak (both per device set)."""
  if seconds_per_step <= 0 or peak_flops_per_second <= 0:
    raise ValueError(f"mfu needs positive time and peak; got {seconds_per_step}, {peak_flops_per_second}")
  return flops_per_step / seconds_per_step / peak_flops_per_second
