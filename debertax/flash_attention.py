"""Flash (tiled, online-softmax) disentangled attention as Pallas kernels: `attention_impl = "flash"`.

    score[i, j] = q_i . k_j  +  q_i . Kr[idx(i - j)]  +  k_j . Qr[idx(i - j)]      (q and Qr pre-scaled)

computed tile by tile (T_q queries x T_k keys) with a FlashAttention-2 style online softmax, so no [L, L]
array is ever materialised, in the forward or the backward pass. Masked keys get float32 `finfo.min`
(exactly like the XLA path, so a fully padded sequence gives uniform, finite probabilities); the keys
added by the internal padding to a whole number of blocks get -inf, so they never carry weight.

Two ways to add the relative terms to a tile, one per backend, because the two compilers can express
different things:

* GPU (Triton), the "gather" formulation (as in FlashDeBERTa). Per layer, ordinary XLA matmuls build the
  tables c2p_tab = Q Kr^T and p2c_tab = K Qr^T of shape [B, H, L, 2k] (linear in L). Inside each tile the
  bucket index idx(i - j) is recomputed from (i, j) with the log-bucket formula in float32
  (`relative_table_index`, equal to `relative_position.log_bucket` for every distance), and the terms are
  gathered from the table rows: c2p_tab[i, idx] and p2c_tab[j, idx]. Triton addresses memory through
  pointer tensors, so a gather is just a load with computed offsets. Triton cannot slice or permute a
  tile held in registers, which rules out the Toeplitz skew below.
* TPU (Mosaic), the "toeplitz" formulation. Mosaic cannot gather with per-element indices, but it has a
  strided lane rotation (`pltpu.roll(..., stride=1, stride_axis=0)`, one XLU op). For a tile only
  T_q + T_k - 1 distances are reachable, so one [T_q, d] x [d, T_q + T_k] matmul against that window of
  the per-distance table (Kr gathered to distances [L_k + L_q, H, d], linear in L) followed by the
  strided roll (a skew) gives the c2p tile; p2c is the same with K against the Qr window, then a
  transpose. The distance tables are DMA'd per tile with element-offset BlockSpecs, so VMEM use does not
  grow with L.

Backward: `jax.custom_vjp` with a blocked recompute (backend independent, exact). The forward saves only
the per-row softmax statistics (running max and sum, [B, H, L]); the backward walks query blocks of
`backward_block` rows under `lax.scan`, recomputes each block's scores with XLA, rebuilds the
probabilities from the saved statistics and accumulates dq, dk, dv and the gradients of both relative
tables. Live memory is O(B H T L) per step. The position terms use key tiles of T: only the tiles within
the saturation distance S of the block (|i - j| >= S maps to the first/last table row; S = 512 for the
released configurations) get Toeplitz products against 2T - 1 distances, the far keys get per-row (c2p)
and per-key (p2c) constants, so the position work per block is O(S), not O(L).

Status (jax 0.11.2): the Triton forward kernel matches the XLA path (float32 within 2.2e-6 of the array
scale, values and all gradients, L = 512 / 2048, H200 and H100) and is faster than the XLA forward
(attention core, bf16, H200: 2.3 vs 3.0 ms at B8 x L2048, 3.9 vs 7.4 ms at B1 x L8192). A training step is
no faster than the XLA path (H100, xsmall, bf16: 0.83x at L = 512, 0.79x at 2048, 1.03x at 8192; README
"GPU results"), because the backward is XLA code: a fused backward kernel is the next step. The TPU kernel
has only been checked in TPU interpret mode and by lowering.

Limits: attention-probability dropout is not implemented in the kernel (a clear error asks to set it to
zero or use the XLA path); on the CPU only the interpreters run (`backend="interpret"`: the generic Pallas
interpreter running the GPU kernel; `backend="tpu_interpret"`: TPU interpret mode running the TPU kernel).
Triton needs power-of-two tile sizes, so on the GPU the head dimension is zero-padded to a power of two
(at least 16) and blocks must be powers of two (at least 16); Mosaic needs both blocks to be multiples of
128 on a real TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from debertax.attention import relative_shift, take_table_rows
from debertax.relative_position import distance_to_table_index

BACKENDS = ("auto", "tpu", "gpu", "interpret", "tpu_interpret")
# (block_q, block_k) per resolved backend; block sizes are rounded down for short sequences.
DEFAULT_BLOCKS = {"tpu": (128, 128), "gpu": (64, 64), "interpret": (16, 16), "tpu_interpret": (16, 16)}
# Query rows per step of the blocked-recompute backward.
DEFAULT_BACKWARD_BLOCK = {"tpu": 512, "gpu": 512, "interpret": 16, "tpu_interpret": 16}
_FORMULATION = {"tpu": "toeplitz", "tpu_interpret": "toeplitz", "gpu": "gather", "interpret": "gather"}
_TPU_LANES = 128  # Per-row statistics are stored lane-replicated on TPU, the layout Mosaic handles best.
_GPU_NUM_WARPS = 4
_GPU_NUM_STAGES = 2

# Key status in the per-key int32 vector the kernels read: attend, user-masked (score -> finfo.min, like
# the XLA path), or internal padding beyond L (score -> -inf: never weighted, even in a fully masked row).
_KEY_VALID, _KEY_MASKED, _KEY_PADDING = 1, 0, -1


# --------------------------------------------------------------------------------------------------
# The bucket index, traceable inside kernels.


def relative_table_index(distance, position_buckets: int, max_relative_span: int):
  """int32 distances r = i - j (any shape) -> int32 rows of the [2k, ...] relative table.

  Same numbers as `relative_position.distance_to_table_index`: clamp(log_bucket(r) + k, 0, 2k - 1), with
  the log bucket computed in float32 as in `relative_position.log_bucket`. Only elementwise ops that both
  Triton and XLA lower, so the kernels can call it on a whole [T_q, T_k] tile of distances.
  """
  distance = distance.astype(jnp.int32)
  if position_buckets <= 0:
    span = max_relative_span
    return jnp.clip(distance + span, 0, 2 * span - 1)
  half = position_buckets
  mid = position_buckets // 2
  max_position = max_relative_span
  abs_r = jnp.where((distance < mid) & (distance > -mid), mid - 1, jnp.abs(distance))
  ratio = abs_r.astype(jnp.float32) / jnp.float32(mid)
  # The denominator is a host constant computed exactly as the NumPy reference does.
  denom = np.log(np.float32((max_position - 1) / mid)).astype(np.float32)
  log_pos = jnp.ceil((jnp.log(ratio) / denom) * jnp.float32(mid - 1)) + jnp.float32(mid)
  # |r| = max_position - 1 is the one distance whose quotient is exactly mid - 1 in the reference (the
  # same log on both sides of the division); pin it so that a device log one ulp off cannot round it up.
  # Every other distance is at least 1e-4 from an integer (checked in the tests), far beyond float32 error.
  log_pos = jnp.where(abs_r == max_position - 1, jnp.float32(mid + mid - 1), log_pos)
  magnitude = jnp.where(abs_r <= mid, abs_r, log_pos.astype(jnp.int32))
  bucket = jnp.where(distance < 0, -magnitude, magnitude)
  bucket = jnp.where(abs_r <= mid, distance, bucket)
  return jnp.clip(bucket + half, 0, 2 * half - 1)


# --------------------------------------------------------------------------------------------------
# Static settings.


@dataclasses.dataclass(frozen=True)
class _Settings:
  """Everything static about one call (hashable: it is a nondiff argument of the custom_vjp)."""

  use_c2p: bool
  use_p2c: bool
  position_buckets: int
  max_relative_span: int
  backend: str  # resolved: tpu | gpu | interpret | tpu_interpret
  block_q: int
  block_k: int
  backward_block: int
  precision: lax.Precision | None

  @property
  def formulation(self) -> str:
    return _FORMULATION[self.backend]


def _resolve_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"flash attention backend={backend!r}: choose one of {BACKENDS}")
  if backend != "auto":
    return backend
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu"
  raise ValueError(f"attention_impl='flash' has no kernel for the {platform!r} backend: use "
                   "attention_impl='xla', or backend 'interpret'/'tpu_interpret' (slow, for tests)")


def _resolve_precision(precision):
  """None follows `jax.default_matmul_precision`, which Pallas kernels would otherwise ignore."""
  if precision is not None:
    return lax.Precision(precision) if isinstance(precision, str) else precision
  configured = jax.config.jax_default_matmul_precision
  if configured is None:
    return None
  names = {"highest": lax.Precision.HIGHEST, "float32": lax.Precision.HIGHEST,
           "high": lax.Precision.HIGH, "tensorfloat32": lax.Precision.HIGH, "bfloat16_3x": lax.Precision.HIGH,
           "default": lax.Precision.DEFAULT, "bfloat16": lax.Precision.DEFAULT,
           "fastest": lax.Precision.DEFAULT}
  if configured not in names:
    raise ValueError(f"flash attention: unsupported jax_default_matmul_precision={configured!r}")
  return names[configured]


def _fit_block(requested: int, length: int, backend: str) -> int:
  """Shrinks a block for short sequences (never below what the backend can tile) and validates it."""
  if requested <= 0:
    raise ValueError(f"flash attention block sizes must be positive, got {requested}")
  if backend == "gpu":
    if requested & (requested - 1) or requested < 16:
      raise ValueError(f"flash attention on GPU (Triton) needs power-of-two blocks >= 16, got {requested}")
    return min(requested, max(16, pl.next_power_of_2(length)))
  if backend == "tpu":
    if requested % 128:
      raise ValueError(f"flash attention on TPU (Mosaic) needs blocks that are multiples of 128, got {requested}")
    return min(requested, 128 * pl.cdiv(length, 128))
  if requested % 8:
    raise ValueError(f"flash attention blocks must be multiples of 8, got {requested}")
  return min(requested, 8 * pl.cdiv(length, 8))


# --------------------------------------------------------------------------------------------------
# Kernel pieces shared by both formulations.


def _dot_nt(a, b, precision):
  """a [M, K] . b [N, K]^T -> float32 [M, N]."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _dot_nn(a, b, precision):
  """a [M, K] . b [K, N] -> float32 [M, N]."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _apply_key_status(scores, key_status):
  """scores [T_q, T_k] float32, key_status [1, T_k] int32 -> masked scores."""
  scores = jnp.where(key_status == _KEY_VALID, scores, jnp.finfo(jnp.float32).min)
  return jnp.where(key_status == _KEY_PADDING, -jnp.inf, scores)


def _online_softmax_step(scores, v, row_max, row_sum, acc, precision):
  """One FlashAttention-2 update. scores [T_q, T_k] f32, v [T_k, d]; row_max/row_sum [T_q, 1]; acc [T_q, d]."""
  new_max = jnp.maximum(row_max, jnp.max(scores, axis=1, keepdims=True))
  correction = jnp.exp(row_max - new_max)  # 0 on the first tile (row_max = -inf), never NaN.
  probs = jnp.exp(scores - new_max)
  row_sum = correction * row_sum + jnp.sum(probs, axis=1, keepdims=True)
  acc = correction * acc + _dot_nn(probs.astype(v.dtype), v, precision)
  return new_max, row_sum, acc


# --------------------------------------------------------------------------------------------------
# GPU formulation: gather from per-layer [L, 2k] score tables (Triton; also the generic interpreter).


def _gather_forward_kernel(*refs, settings: _Settings, num_key_blocks: int):
  """One program per (batch, head, query block); loops over all key blocks.

  Refs: q [T_q, d]; k, v [L_k, d]; key_status [L_k] int32; [c2p_tab [T_q, 2k]]; [p2c_tab [L_k, 2k]];
  outputs o [T_q, d], row_max [T_q], row_sum [T_q] (float32).
  """
  s = settings
  q_ref, k_ref, v_ref, status_ref, *rest = refs
  c2p_ref = rest.pop(0) if s.use_c2p else None
  p2c_ref = rest.pop(0) if s.use_p2c else None
  o_ref, max_ref, sum_ref = rest
  block_q, block_k = s.block_q, s.block_k

  q = q_ref[...]
  query_block = pl.program_id(2)
  local_rows = lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  rows = query_block * block_q + local_rows
  tile_cols = lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)

  def body(key_block, carry):
    row_max, row_sum, acc = carry
    start = pl.multiple_of(key_block * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    scores = _dot_nt(q, k, s.precision)
    if s.use_c2p or s.use_p2c:
      cols = start + tile_cols
      table_index = relative_table_index(rows - cols, s.position_buckets, s.max_relative_span)
      if s.use_c2p:
        scores = scores + c2p_ref[local_rows, table_index]
      if s.use_p2c:
        scores = scores + p2c_ref[cols, table_index]
    scores = _apply_key_status(scores, status_ref[pl.ds(start, block_k)][None, :])
    return _online_softmax_step(scores, v, row_max, row_sum, acc, s.precision)

  init = (jnp.full((block_q, 1), -jnp.inf, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
          jnp.zeros((block_q, q.shape[-1]), jnp.float32))
  row_max, row_sum, acc = lax.fori_loop(0, num_key_blocks, body, init)
  o_ref[...] = (acc / row_sum).astype(o_ref.dtype)
  max_ref[...] = row_max.reshape(block_q)  # reshape, not [:, 0]: Triton has no slicing of values.
  sum_ref[...] = row_sum.reshape(block_q)


def _gather_forward(q, k, v, key_status, kr_table, qr_table, s: _Settings):
  """q [B, H, L_q, d], k/v [B, H, L_k, d] (padded), key_status [B, L_k] -> o, row_max, row_sum."""
  batch, heads, len_q, head_dim = q.shape
  len_k = k.shape[2]
  # Triton tiles need power-of-two sizes (and >= 16 for tl.dot): zero columns change no dot product.
  padded_dim = max(16, pl.next_power_of_2(head_dim)) if s.backend == "gpu" else head_dim
  pad_dim = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, padded_dim - head_dim)])

  operands = [pad_dim(q), pad_dim(k), pad_dim(v), key_status]
  in_specs = [
      pl.BlockSpec((None, None, s.block_q, padded_dim), lambda b, h, i: (b, h, i, 0)),
      pl.BlockSpec((None, None, len_k, padded_dim), lambda b, h, i: (b, h, 0, 0)),
      pl.BlockSpec((None, None, len_k, padded_dim), lambda b, h, i: (b, h, 0, 0)),
      pl.BlockSpec((None, len_k), lambda b, h, i: (b, 0)),
  ]
  f32 = jnp.float32
  if s.use_c2p:  # [B, H, L_q, 2k]: row i holds q_i . Kr[m] for every table row m.
    c2p_tab = jnp.einsum("bhid,mhd->bhim", q, kr_table, precision=s.precision, preferred_element_type=f32)
    operands.append(c2p_tab)
    in_specs.append(pl.BlockSpec((None, None, s.block_q, c2p_tab.shape[-1]), lambda b, h, i: (b, h, i, 0)))
  if s.use_p2c:  # [B, H, L_k, 2k]: row j holds k_j . Qr[m].
    p2c_tab = jnp.einsum("bhjd,mhd->bhjm", k, qr_table, precision=s.precision, preferred_element_type=f32)
    operands.append(p2c_tab)
    in_specs.append(pl.BlockSpec((None, None, len_k, p2c_tab.shape[-1]), lambda b, h, i: (b, h, 0, 0)))

  out_shape = [jax.ShapeDtypeStruct((batch, heads, len_q, padded_dim), q.dtype),
               jax.ShapeDtypeStruct((batch, heads, len_q), f32),
               jax.ShapeDtypeStruct((batch, heads, len_q), f32)]
  out_specs = [pl.BlockSpec((None, None, s.block_q, padded_dim), lambda b, h, i: (b, h, i, 0)),
               pl.BlockSpec((None, None, s.block_q), lambda b, h, i: (b, h, i)),
               pl.BlockSpec((None, None, s.block_q), lambda b, h, i: (b, h, i))]
  kernel = functools.partial(_gather_forward_kernel, settings=s, num_key_blocks=len_k // s.block_k)
  if s.backend == "gpu":
    extra = dict(compiler_params=pltriton.CompilerParams(num_warps=_GPU_NUM_WARPS, num_stages=_GPU_NUM_STAGES))
  else:
    extra = dict(interpret=True)
  out, row_max, row_sum = pl.pallas_call(
      kernel, grid=(batch, heads, len_q // s.block_q), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, name="disentangled_flash_gather", **extra)(*operands)
  return out[..., :head_dim], row_max, row_sum


# --------------------------------------------------------------------------------------------------
# TPU formulation: Toeplitz windows of per-distance tables plus a strided roll (Mosaic).


def _toeplitz_forward_kernel(*refs, settings: _Settings):
  """Grid (batch, head, query block, key block); the key-block axis is the sequential reduction.

  Refs: q [T_q, d]; k, v [T_k, d]; key_status [1, T_k] int32; [kr window [T_q + T_k, d], reversed
  distance order]; [qr window [T_q + T_k, d], forward distance order]; outputs o [T_q, d] and
  row_max, row_sum [T_q, 128] (lane-replicated); scratch row_max, row_sum [T_q, 128], acc [T_q, d].
  """
  s = settings
  q_ref, k_ref, v_ref, status_ref, *rest = refs
  kr_ref = rest.pop(0) if s.use_c2p else None
  qr_ref = rest.pop(0) if s.use_p2c else None
  o_ref, max_out_ref, sum_out_ref, max_scratch, sum_scratch, acc_scratch = rest
  block_q, block_k = s.block_q, s.block_k
  key_block = pl.program_id(3)

  @pl.when(key_block == 0)
  def _init():
    max_scratch[...] = jnp.full(max_scratch.shape, -jnp.inf, jnp.float32)
    sum_scratch[...] = jnp.zeros(sum_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  q = q_ref[...]
  k = k_ref[...]
  scores = _dot_nt(q, k, s.precision)
  if s.use_c2p:
    # window[a, u] = q_a . Kr[r = D + T_q - u] with D = i0 - j0; the tile needs u = T_q - a + b, i.e.
    # row a read from column b + T_q - a: rolling row a right by T_k + a (mod T_q + T_k) lines it up.
    window = _dot_nt(q, kr_ref[...], s.precision)
    scores = scores + pltpu.roll(window, block_k, 1, stride=1, stride_axis=0)[:, :block_k]
  if s.use_p2c:
    # window[b, w] = k_b . Qr[r = D - T_k + 1 + w]; the tile needs w = a - b + T_k - 1, i.e. row b read
    # from column a + T_k - 1 - b: roll row b right by T_q + 1 + b, keep T_q columns, transpose.
    window = _dot_nt(k, qr_ref[...], s.precision)
    scores = scores + pltpu.roll(window, block_q + 1, 1, stride=1, stride_axis=0)[:, :block_q].T
  scores = _apply_key_status(scores, status_ref[...])

  row_max, row_sum, acc = _online_softmax_step(
      scores, v_ref[...], max_scratch[:, :1], sum_scratch[:, :1], acc_scratch[...], s.precision)
  max_scratch[...] = jnp.broadcast_to(row_max, max_scratch.shape)
  sum_scratch[...] = jnp.broadcast_to(row_sum, sum_scratch.shape)
  acc_scratch[...] = acc

  @pl.when(key_block == pl.num_programs(3) - 1)
  def _finish():
    o_ref[...] = (acc_scratch[...] / sum_scratch[:, :1]).astype(o_ref.dtype)
    max_out_ref[...] = max_scratch[...]
    sum_out_ref[...] = sum_scratch[...]


def _distance_tables(kr_table, qr_table, len_q: int, len_k: int, s: _Settings):
  """[2k, H, d] tables -> per-distance tables [H, L_q + L_k, d] for r in [-(L_k - 1), L_q].

  c2p comes back in reversed order (row t <-> r = L_q - t), p2c in forward order (row t <-> r = t - L_k + 1).
  """
  reach = max(len_q + 1, len_k)
  full = distance_to_table_index(reach, s.position_buckets, s.max_relative_span)  # r in [-(reach-1), reach-1]
  index = full[reach - 1 - (len_k - 1): reach - 1 + len_q + 1]
  kr_rev = jnp.swapaxes(take_table_rows(kr_table, index[::-1]), 0, 1) if s.use_c2p else None
  qr_fwd = jnp.swapaxes(take_table_rows(qr_table, index), 0, 1) if s.use_p2c else None
  return kr_rev, qr_fwd


def _toeplitz_forward(q, k, v, key_status, kr_table, qr_table, s: _Settings):
  """q [B, H, L_q, d], k/v [B, H, L_k, d] (padded), key_status [B, L_k] -> o, row_max, row_sum."""
  batch, heads, len_q, head_dim = q.shape
  len_k = k.shape[2]
  block_q, block_k = s.block_q, s.block_k
  window = block_q + block_k
  kr_rev, qr_fwd = _distance_tables(kr_table, qr_table, len_q, len_k, s)

  operands = [q, k, v, key_status[:, None, :]]
  in_specs = [
      pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, j: (b, h, i, 0)),
      pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, i, j: (b, h, j, 0)),
      pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, i, j: (b, h, j, 0)),
      pl.BlockSpec((None, 1, block_k), lambda b, h, i, j: (b, 0, j)),
  ]
  # Element-offset windows: tile (i, j) reaches distances D - T_k + 1 .. D + T_q - 1 with D = i T_q - j T_k.
  if s.use_c2p:
    operands.append(kr_rev)
    in_specs.append(pl.BlockSpec(
        (None, pl.Element(window), pl.Element(head_dim)),
        lambda b, h, i, j: (h, len_q - i * block_q + j * block_k - block_q, 0)))
  if s.use_p2c:
    operands.append(qr_fwd)
    in_specs.append(pl.BlockSpec(
        (None, pl.Element(window), pl.Element(head_dim)),
        lambda b, h, i, j: (h, i * block_q - j * block_k + len_k - block_k, 0)))

  f32 = jnp.float32
  out_shape = [jax.ShapeDtypeStruct((batch, heads, len_q, head_dim), q.dtype),
               jax.ShapeDtypeStruct((batch, heads, len_q, _TPU_LANES), f32),
               jax.ShapeDtypeStruct((batch, heads, len_q, _TPU_LANES), f32)]
  out_specs = [pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, j: (b, h, i, 0)),
               pl.BlockSpec((None, None, block_q, _TPU_LANES), lambda b, h, i, j: (b, h, i, 0)),
               pl.BlockSpec((None, None, block_q, _TPU_LANES), lambda b, h, i, j: (b, h, i, 0))]
  scratch = [pltpu.VMEM((block_q, _TPU_LANES), f32), pltpu.VMEM((block_q, _TPU_LANES), f32),
             pltpu.VMEM((block_q, head_dim), f32)]
  extra = dict(compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")))
  if s.backend == "tpu_interpret":
    extra["interpret"] = pltpu.InterpretParams()
  out, row_max, row_sum = pl.pallas_call(
      functools.partial(_toeplitz_forward_kernel, settings=s),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=(batch, heads, len_q // block_q, len_k // block_k),
          in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape, name="disentangled_flash_toeplitz", **extra)(*operands)
  return out, row_max[..., 0], row_sum[..., 0]


# --------------------------------------------------------------------------------------------------
# Forward wrapper, blocked-recompute backward, custom_vjp.


def _forward(q, k, v, kr_table, qr_table, key_mask, s: _Settings):
  """[B, L, H, d] inputs -> (out [B, L, H, d], row_max [B, H, L], row_sum [B, H, L])."""
  batch, length, heads, head_dim = q.shape
  len_q = s.block_q * pl.cdiv(length, s.block_q)
  len_k = s.block_k * pl.cdiv(length, s.block_k)
  to_heads = lambda x, padded: jnp.pad(jnp.swapaxes(x, 1, 2), [(0, 0), (0, 0), (0, padded - length), (0, 0)])
  key_status = jnp.where(key_mask, _KEY_VALID, _KEY_MASKED).astype(jnp.int32)
  key_status = jnp.pad(key_status, [(0, 0), (0, len_k - length)], constant_values=_KEY_PADDING)
  forward = _gather_forward if s.formulation == "gather" else _toeplitz_forward
  out, row_max, row_sum = forward(to_heads(q, len_q), to_heads(k, len_k), to_heads(v, len_k), key_status,
                                  kr_table, qr_table, s)
  return jnp.swapaxes(out[:, :, :length], 1, 2), row_max[:, :, :length], row_sum[:, :, :length]


def _saturation_distance(index: np.ndarray) -> int:
  """Smallest S >= 1 such that idx(r) = idx(+-(P-1)) for every |r| >= S (on the matching side).

  index [2P-1] is `distance_to_table_index(P, ...)` (element r + P - 1). Log buckets saturate at
  S = max_relative_span (512 in every released configuration): beyond it c2p and p2c do not depend on the
  exact distance, which the backward uses to skip the Toeplitz products for far key tiles.
  """
  padded = (index.shape[0] + 1) // 2
  r = np.arange(-(padded - 1), padded)
  varies = ((r >= 0) & (index != index[-1])) | ((r <= 0) & (index != index[0]))
  return int(np.abs(r[varies]).max()) + 1 if varies.any() else 1


@dataclasses.dataclass(frozen=True)
class _BackwardGeometry:
  """Static layout of the blocked backward: query blocks and key tiles of T rows, P = nb * T."""

  block: int  # T
  num_blocks: int  # nb
  span: int  # key tiles per query block that get Toeplitz products (those within S of the block)
  near: int  # tiles on each side of the diagonal that reach a non-saturated distance

  @property
  def padded(self) -> int:
    return self.block * self.num_blocks

  @property
  def has_far_tiles(self) -> bool:
    return self.span < self.num_blocks


def _block_scores(block_index, q_blk, k_tiles, kr_rev, kr_far, qr_windows, qr_far, s: _Settings,
                  g: _BackwardGeometry):
  """Float32 scores [B, H, T, P] of query block `block_index` against all P (padded) keys, with XLA.

  q_blk [B, T, H, d]; k_tiles [nb, B, T, H, d]. kr_rev [2P - 1, H, d]: the c2p table per distance in
  reversed order (row u <-> r = P - 1 - u). qr_windows [2nb - 1, 2T - 1, H, d]: per tile offset
  delta = a - c (window e = nb - 1 - delta), the p2c table over the 2T - 1 distances delta T - (T - 1)
  .. delta T + T - 1. kr_far / qr_far [2, H, d]: the saturated rows for r >= S (keys far left) and
  r <= -S (far right). Only the `span` key tiles around the diagonal get Toeplitz products; the far keys
  get per-row (c2p) and per-key (p2c) constants, so each block costs O(P) memory and O(S) position work.
  """
  f32, precision = jnp.float32, s.precision
  num_tiles, batch, block, heads, _ = k_tiles.shape
  padded = num_tiles * block
  keys = jnp.moveaxis(k_tiles, 0, 1).reshape(batch, padded, heads, -1)
  scores = jnp.einsum("bthd,bjhd->bhtj", q_blk, keys, precision=precision, preferred_element_type=f32)
  if not (s.use_c2p or s.use_p2c):
    return scores
  first_tile = jnp.clip(block_index - g.near, 0, g.num_blocks - g.span)
  lo = first_tile * block  # first key of the band
  row0 = block_index * block
  band = 0.0
  if s.use_c2p:
    # Window column m <-> r = row0 + T - 1 - lo - m over the band's span*T keys (reversed table rows).
    width = g.span * block + block - 1
    window = lax.dynamic_slice_in_dim(kr_rev, padded - block - row0 + lo, width)
    c2p = jnp.einsum("bthd,mhd->bhtm", q_blk, window, precision=precision, preferred_element_type=f32)
    band = band + relative_shift(c2p)  # [B, H, T, span*T]
  if s.use_p2c:
    tiles = lax.dynamic_slice_in_dim(k_tiles, first_tile, g.span)  # [span, B, T, H, d]
    windows = lax.dynamic_slice_in_dim(qr_windows, g.num_blocks - 1 - block_index + first_tile, g.span)
    p2c = jnp.einsum("cbuhd,cwhd->bhcuw", tiles, windows, precision=precision, preferred_element_type=f32)
    p2c = relative_shift(p2c)  # [B, H, span, T keys, T queries]
    band = band + jnp.transpose(p2c, (0, 1, 4, 2, 3)).reshape(batch, heads, block, g.span * block)
  if not g.has_far_tiles:
    return scores + band
  key = jnp.arange(padded)
  left = key < lo  # r = i - j >= S: the last table row; right of the band: r <= -S, the first row.
  right = key >= lo + g.span * block
  background = jnp.zeros(scores.shape, f32)
  if s.use_c2p:
    rows = jnp.einsum("bthd,shd->bhts", q_blk, kr_far, precision=precision, preferred_element_type=f32)
    background = background + jnp.where(left, rows[..., :1], jnp.where(right, rows[..., 1:], 0.0))
  if s.use_p2c:
    cols = jnp.einsum("bjhd,shd->bhsj", keys, qr_far, precision=precision, preferred_element_type=f32)
    background = background + jnp.where(left, cols[:, :, :1], jnp.where(right, cols[:, :, 1:], 0.0))
  return scores + lax.dynamic_update_slice_in_dim(background, band, lo, axis=3)


def _backward(s: _Settings, residuals, d_out):
  """Blocked recompute: scan over query blocks of T rows, rebuild probabilities from the saved row max
  and row sum, accumulate dk, dv and the relative-table gradients. Live memory O(B H T P)."""
  q, k, v, kr_table, qr_table, key_mask, out, row_max, row_sum = residuals
  batch, length, heads, head_dim = q.shape
  f32 = jnp.float32
  block = min(s.backward_block, length)
  num_blocks = pl.cdiv(length, block)
  padded = num_blocks * block  # queries and keys are both padded to P = nb * T
  index = distance_to_table_index(padded, s.position_buckets, s.max_relative_span)
  near = pl.cdiv(_saturation_distance(index) - 1, block)
  geometry = _BackwardGeometry(block=block, num_blocks=num_blocks, span=min(2 * near + 1, num_blocks),
                               near=near)

  def prepare(kr_table, qr_table):
    """Tables -> the per-distance operands of `_block_scores`, r in [-(P-1), P-1] (beyond L - 1 only
    padded rows or keys read them)."""
    kr_rev = kr_far = qr_windows = qr_far = None
    if s.use_c2p:
      kr_rev = take_table_rows(kr_table, index)[::-1]
      kr_far = jnp.stack([kr_rev[0], kr_rev[-1]])
    if s.use_p2c:
      qr_dist = take_table_rows(qr_table, index)  # row u <-> r = u - (P - 1)
      starts = [(num_blocks - 1 - e) * block + padded - block for e in range(2 * num_blocks - 1)]
      qr_windows = jnp.stack([lax.slice_in_dim(qr_dist, st, st + 2 * block - 1) for st in starts])
      qr_far = jnp.stack([qr_dist[-1], qr_dist[0]])
    return kr_rev, kr_far, qr_windows, qr_far

  tables, prepare_vjp = jax.vjp(prepare, kr_table, qr_table)

  def pad_rows(x, axis, value=0.0):
    return jnp.pad(x, [(0, 0)] * axis + [(0, padded - length)] + [(0, 0)] * (x.ndim - axis - 1),
                   constant_values=value)

  def blocks(x, axis, value=0.0):  # [..., L, ...] -> [nb, ..., T, ...] along `axis`
    x = pad_rows(x, axis, value)
    x = x.reshape(x.shape[:axis] + (num_blocks, block) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  k_tiles = blocks(k, 1)
  v_pad = pad_rows(v, 1)
  # Keys: attend / masked (finfo.min, as the forward) / padding (-inf: probability exactly 0).
  key_valid = pad_rows(key_mask, 1, False)[:, None, None, :]
  key_real = (jnp.arange(padded) < length)[None, None, None, :]
  delta = jnp.einsum("blhd,blhd->bhl", d_out.astype(f32), out.astype(f32))  # [B, H, L]
  # Padded query rows get row_max = +inf, so their recomputed probabilities are exactly 0.
  xs = (jnp.arange(num_blocks), blocks(q, 1), blocks(d_out, 1), blocks(row_max, 2, jnp.inf),
        blocks(row_sum, 2, 1.0), blocks(delta, 2))
  add = lambda total, part: None if total is None else total + part.astype(f32)

  def step(carry, x):
    dk_tiles, dv, d_tables = carry
    index, q_blk, do_blk, max_blk, sum_blk, delta_blk = x
    scores, scores_vjp = jax.vjp(
        lambda q_blk, k_tiles, tables: _block_scores(index, q_blk, k_tiles, *tables, s, geometry),
        q_blk, k_tiles, tables)
    scores = jnp.where(key_real, jnp.where(key_valid, scores, jnp.finfo(f32).min), -jnp.inf)
    probs = jnp.exp(scores - max_blk[..., None]) / sum_blk[..., None]
    d_probs = jnp.einsum("bthd,bjhd->bhtj", do_blk, v_pad, precision=s.precision, preferred_element_type=f32)
    dv = dv + jnp.einsum("bhtj,bthd->bjhd", probs.astype(v.dtype), do_blk, precision=s.precision,
                         preferred_element_type=f32)
    d_scores = jnp.where(key_valid, probs * (d_probs - delta_blk[..., None]), 0.0)
    dq_blk, dk_part, d_tables_part = scores_vjp(d_scores)
    d_tables = jax.tree_util.tree_map(add, d_tables, d_tables_part, is_leaf=lambda x: x is None)
    return (dk_tiles + dk_part.astype(f32), dv, d_tables), dq_blk.astype(f32)

  zeros = lambda x: None if x is None else jnp.zeros(x.shape, f32)
  carry = (jnp.zeros(k_tiles.shape, f32), jnp.zeros(v_pad.shape, f32),
           jax.tree_util.tree_map(zeros, tables, is_leaf=lambda x: x is None))
  (dk_tiles, dv, d_tables), dq_blocks = lax.scan(step, carry, xs)
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, padded, heads, head_dim)[:, :length]
  d_tables = jax.tree_util.tree_map(lambda d, t: None if d is None else d.astype(t.dtype), d_tables, tables,
                                    is_leaf=lambda x: x is None)
  dkr_table, dqr_table = prepare_vjp(d_tables)
  return (unblock(dq_blocks).astype(q.dtype), unblock(dk_tiles).astype(k.dtype),
          dv[:, :length].astype(v.dtype), dkr_table, dqr_table, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, kr_table, qr_table, key_mask, s: _Settings):
  return _forward(q, k, v, kr_table, qr_table, key_mask, s)[0]


def _flash_fwd(q, k, v, kr_table, qr_table, key_mask, s: _Settings):
  out, row_max, row_sum = _forward(q, k, v, kr_table, qr_table, key_mask, s)
  return out, (q, k, v, kr_table, qr_table, key_mask, out, row_max, row_sum)


_flash.defvjp(_flash_fwd, _backward)


def disentangled_flash_attention(q, k, v, key_mask, *, kr_table=None, qr_table=None, pos_terms=(),
                                 position_buckets: int, max_relative_span: int, dropout_rate: float = 0.0,
                                 dropout_rng=None, backend: str = "auto", block_q: int | None = None,
                                 block_k: int | None = None, backward_block: int | None = None,
                                 precision=None):
  """Disentangled attention with Pallas flash kernels; same numbers as `disentangled_attention_xla`.

  q, k, v [B, L, H, d] with q already divided by the scale sqrt(d * (1 + #terms)); key_mask [B, L] bool.
  kr_table / qr_table [2k, H, d]: the per-layer projected relative tables, NOT gathered to distances
  (qr_table already divided by the scale); the one of a term that is off may be None. Rows are addressed
  by clamp(log_bucket(i - j) + k, 0, 2k - 1) (`position_buckets` = k > 0), or clamp(i - j + span, 0,
  2 span - 1) with span = `max_relative_span` when position_buckets <= 0.
  backend: auto | tpu | gpu | interpret (generic interpreter, GPU kernel) | tpu_interpret (TPU kernel).
  block_q / block_k / backward_block: None means the backend's default. precision: None follows
  `jax.default_matmul_precision`. Returns [B, L, H, d] in q's dtype.
  """
  if dropout_rate > 0.0 and dropout_rng is not None:
    raise ValueError("attention_impl='flash' has no attention-probability dropout: set "
                     "model.attention_probs_dropout_prob=0 or use attention_impl='xla'")
  bad = [t for t in pos_terms if t not in ("c2p", "p2c")]
  if bad:
    raise ValueError(f"flash attention: unknown position term(s) {bad}; allowed: c2p, p2c")
  use_c2p, use_p2c = "c2p" in pos_terms, "p2c" in pos_terms
  if use_c2p and kr_table is None or use_p2c and qr_table is None:
    raise ValueError("flash attention: pos_terms asks for c2p/p2c but kr_table/qr_table is missing")
  if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape or key_mask.shape != q.shape[:2]:
    raise ValueError(f"flash attention: q, k, v must share [B, L, H, d] and key_mask be [B, L]; got "
                     f"{q.shape}, {k.shape}, {v.shape}, {key_mask.shape}")
  for name, table in (("kr_table", kr_table if use_c2p else None), ("qr_table", qr_table if use_p2c else None)):
    if table is not None and (table.ndim != 3 or table.shape[1:] != q.shape[2:]):
      raise ValueError(f"flash attention: {name} must be [2k, H, d] with H, d = {q.shape[2:]}; got {table.shape}")
  resolved = _resolve_backend(backend)
  length = q.shape[1]
  default_q, default_k = DEFAULT_BLOCKS[resolved]
  settings = _Settings(
      use_c2p=use_c2p, use_p2c=use_p2c, position_buckets=int(position_buckets),
      max_relative_span=int(max_relative_span), backend=resolved,
      block_q=_fit_block(block_q or default_q, length, resolved),
      block_k=_fit_block(block_k or default_k, length, resolved),
      backward_block=int(backward_block or DEFAULT_BACKWARD_BLOCK[resolved]),
      precision=_resolve_precision(precision))
  return _flash(q, k, v, kr_table if use_c2p else None, qr_table if use_p2c else None,
                key_mask.astype(bool), settings)
