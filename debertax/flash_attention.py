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

Backward (a `jax.custom_vjp`; the forward saves only the per-row softmax statistics, running max and
sum [B, H, L]): by default two fused Pallas kernels per formulation (dk/dv, dq; `flash_backward_gather`,
`flash_backward_toeplitz`) that recompute each tile from the statistics; `model.flash_backward =
"blocked"` (or `backward="blocked"`) picks a blocked XLA recompute (`flash_backward`) instead. Both are
exact (tests: 1e-5 against the XLA path).

Status (jax 0.11.2): the Triton forward kernel matches the XLA path (float32 within 2.2e-6 of the array
scale, values and all gradients, L = 512 / 2048, H200 and H100) and is faster than the XLA forward
(attention core, bf16, H200: 2.3 vs 3.0 ms at B8 x L2048, 3.9 vs 7.4 ms at B1 x L8192). With the blocked
XLA backward a training step was no faster than the XLA path (H100, xsmall, bf16: 0.83x at L = 512, 0.79x
at 2048, 1.03x at 8192; README "GPU results"). The fused backward kernels have run only in the
interpreters and been lowered for CUDA and TPU; their speed is not measured yet
(`benchmarks/flash_gpu_check.py`, section 3, times flash, flash_blocked and xla side by side). The TPU
kernels have only been checked in TPU interpret mode and by lowering.

Limits: attention-probability dropout is not implemented in the kernel (a clear error asks to set it to
zero or use the XLA path); on the CPU only the interpreters run (`backend="interpret"`: the generic Pallas
interpreter running the GPU kernel; `backend="tpu_interpret"`: TPU interpret mode running the TPU kernel).
Triton needs power-of-two tile sizes, so on the GPU the head dimension is zero-padded to a power of two
(at least 16) and blocks must be powers of two (at least 16); Mosaic needs both blocks to be multiples of
128 on a real TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from debertax.flash_backward import blocked_backward
from debertax.flash_backward_gather import fused_gather_backward
from debertax.flash_backward_toeplitz import fused_toeplitz_backward
from debertax.flash_tiles import (Settings, apply_key_status, distance_tables, dot_nt, gather_tables, heads_layout,
                                  key_status_vector, online_softmax_step, relative_table_index)

BACKENDS = ("auto", "tpu", "gpu", "interpret", "tpu_interpret")
# (block_q, block_k) per resolved backend; block sizes are rounded down for short sequences.
DEFAULT_BLOCKS = {"tpu": (128, 128), "gpu": (64, 64), "interpret": (16, 16), "tpu_interpret": (16, 16)}
# Query rows per step of the blocked-recompute backward.
DEFAULT_BACKWARD_BLOCK = {"tpu": 512, "gpu": 512, "interpret": 16, "tpu_interpret": 16}
_TPU_LANES = 128  # Per-row statistics are stored lane-replicated on TPU, the layout Mosaic handles best.
_GPU_NUM_WARPS = 4
_GPU_NUM_STAGES = 2



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
# GPU formulation: gather from per-layer [L, 2k] score tables (Triton; also the generic interpreter).


def _gather_forward_kernel(*refs, settings: Settings, num_key_blocks: int):
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
    scores = dot_nt(q, k, s.precision)
    if s.use_c2p or s.use_p2c:
      cols = start + tile_cols
      table_index = relative_table_index(rows - cols, s.position_buckets, s.max_relative_span)
      if s.use_c2p:
        scores = scores + c2p_ref[local_rows, table_index]
      if s.use_p2c:
        scores = scores + p2c_ref[cols, table_index]
    scores = apply_key_status(scores, status_ref[pl.ds(start, block_k)][None, :])
    return online_softmax_step(scores, v, row_max, row_sum, acc, s.precision)

  init = (jnp.full((block_q, 1), -jnp.inf, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
          jnp.zeros((block_q, q.shape[-1]), jnp.float32))
  row_max, row_sum, acc = lax.fori_loop(0, num_key_blocks, body, init)
  o_ref[...] = (acc / row_sum).astype(o_ref.dtype)
  max_ref[...] = row_max.reshape(block_q)  # reshape, not [:, 0]: Triton has no slicing of values.
  sum_ref[...] = row_sum.reshape(block_q)


def _gather_forward(q, k, v, key_status, kr_table, qr_table, s: Settings):
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
  c2p_tab, p2c_tab = gather_tables(q, k, kr_table, qr_table, s)
  if c2p_tab is not None:
    operands.append(c2p_tab)
    in_specs.append(pl.BlockSpec((None, None, s.block_q, c2p_tab.shape[-1]), lambda b, h, i: (b, h, i, 0)))
  if p2c_tab is not None:
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


def _toeplitz_forward_kernel(*refs, settings: Settings):
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
  scores = dot_nt(q, k, s.precision)
  if s.use_c2p:
    # window[a, u] = q_a . Kr[r = D + T_q - u] with D = i0 - j0; the tile needs u = T_q - a + b, i.e.
    # row a read from column b + T_q - a: rolling row a right by T_k + a (mod T_q + T_k) lines it up.
    window = dot_nt(q, kr_ref[...], s.precision)
    scores = scores + pltpu.roll(window, block_k, 1, stride=1, stride_axis=0)[:, :block_k]
  if s.use_p2c:
    # window[b, w] = k_b . Qr[r = D - T_k + 1 + w]; the tile needs w = a - b + T_k - 1, i.e. row b read
    # from column a + T_k - 1 - b: roll row b right by T_q + 1 + b, keep T_q columns, transpose.
    window = dot_nt(k, qr_ref[...], s.precision)
    scores = scores + pltpu.roll(window, block_q + 1, 1, stride=1, stride_axis=0)[:, :block_q].T
  scores = apply_key_status(scores, status_ref[...])

  row_max, row_sum, acc = online_softmax_step(
      scores, v_ref[...], max_scratch[:, :1], sum_scratch[:, :1], acc_scratch[...], s.precision)
  max_scratch[...] = jnp.broadcast_to(row_max, max_scratch.shape)
  sum_scratch[...] = jnp.broadcast_to(row_sum, sum_scratch.shape)
  acc_scratch[...] = acc

  @pl.when(key_block == pl.num_programs(3) - 1)
  def _finish():
    o_ref[...] = (acc_scratch[...] / sum_scratch[:, :1]).astype(o_ref.dtype)
    max_out_ref[...] = max_scratch[...]
    sum_out_ref[...] = sum_scratch[...]


def _toeplitz_forward(q, k, v, key_status, kr_table, qr_table, s: Settings):
  """q [B, H, L_q, d], k/v [B, H, L_k, d] (padded), key_status [B, L_k] -> o, row_max, row_sum."""
  batch, heads, len_q, head_dim = q.shape
  len_k = k.shape[2]
  block_q, block_k = s.block_q, s.block_k
  window = block_q + block_k
  kr_rev, qr_fwd = distance_tables(kr_table, qr_table, len_q, len_k, s)

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


def _forward(q, k, v, kr_table, qr_table, key_mask, s: Settings):
  """[B, L, H, d] inputs -> (out [B, L, H, d], row_max [B, H, L], row_sum [B, H, L])."""
  batch, length, heads, head_dim = q.shape
  len_q = s.block_q * pl.cdiv(length, s.block_q)
  len_k = s.block_k * pl.cdiv(length, s.block_k)
  key_status = key_status_vector(key_mask, len_k)
  forward = _gather_forward if s.formulation == "gather" else _toeplitz_forward
  out, row_max, row_sum = forward(heads_layout(q, len_q), heads_layout(k, len_k), heads_layout(v, len_k), key_status,
                                  kr_table, qr_table, s)
  return jnp.swapaxes(out[:, :, :length], 1, 2), row_max[:, :, :length], row_sum[:, :, :length]



@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, kr_table, qr_table, key_mask, s: Settings):
  return _forward(q, k, v, kr_table, qr_table, key_mask, s)[0]


def _flash_fwd(q, k, v, kr_table, qr_table, key_mask, s: Settings):
  out, row_max, row_sum = _forward(q, k, v, kr_table, qr_table, key_mask, s)
  return out, (q, k, v, kr_table, qr_table, key_mask, out, row_max, row_sum)


def _backward(s: Settings, residuals, d_out):
  if s.backward == "fused":
    fused = fused_gather_backward if s.formulation == "gather" else fused_toeplitz_backward
    return fused(s, residuals, d_out)
  return blocked_backward(s, residuals, d_out)


_flash.defvjp(_flash_fwd, _backward)


def disentangled_flash_attention(q, k, v, key_mask, *, kr_table=None, qr_table=None, pos_terms=(),
                                 position_buckets: int, max_relative_span: int, dropout_rate: float = 0.0,
                                 dropout_rng=None, backend: str = "auto", block_q: int | None = None,
                                 block_k: int | None = None, backward_block: int | None = None,
                                 precision=None, backward: str = "fused"):
  """Disentangled attention with Pallas flash kernels; same numbers as `disentangled_attention_xla`.

  q, k, v [B, L, H, d] with q already divided by the scale sqrt(d * (1 + #terms)); key_mask [B, L] bool.
  kr_table / qr_table [2k, H, d]: the per-layer projected relative tables, NOT gathered to distances
  (qr_table already divided by the scale); the one of a term that is off may be None. Rows are addressed
  by clamp(log_bucket(i - j) + k, 0, 2k - 1) (`position_buckets` = k > 0), or clamp(i - j + span, 0,
  2 span - 1) with span = `max_relative_span` when position_buckets <= 0.
  backend: auto | tpu | gpu | interpret (generic interpreter, GPU kernel) | tpu_interpret (TPU kernel).
  block_q / block_k / backward_block: None means the backend's default. precision: None follows
  `jax.default_matmul_precision`. backward: fused (Pallas kernels) | blocked (XLA recompute), see
  `flash_backward_gather` / `flash_backward_toeplitz` and `flash_backward`. Returns [B, L, H, d] in
  q's dtype.
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
  if backward not in ("fused", "blocked"):
    raise ValueError(f"flash attention backward={backward!r}: choose fused or blocked")
  length = q.shape[1]
  default_q, default_k = DEFAULT_BLOCKS[resolved]
  settings = Settings(
      use_c2p=use_c2p, use_p2c=use_p2c, position_buckets=int(position_buckets),
      max_relative_span=int(max_relative_span), backend=resolved,
      block_q=_fit_block(block_q or default_q, length, resolved),
      block_k=_fit_block(block_k or default_k, length, resolved),
      backward_block=int(backward_block or DEFAULT_BACKWARD_BLOCK[resolved]),
      precision=_resolve_precision(precision), backward=backward)
  return _flash(q, k, v, kr_table if use_c2p else None, qr_table if use_p2c else None,
                key_mask.astype(bool), settings)

