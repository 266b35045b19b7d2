"""XLA options for every jitted function debertax runs: `jit` is `jax.jit` with them.

On the CPU, XLA's default scheduler orders the program for thread-level concurrency, which keeps many
more buffers alive at once and defeats rematerialisation entirely: it schedules the recomputed forward
values next to the originals (measured: a 12-layer MLP under jax.checkpoint needed 660 MiB of temporaries
with it, 348 MiB with the memory-optimised scheduler). The memory-optimised scheduler cut the xsmall
encoder's forward+backward peak at L = 512, batch 8 from 5.15 to 4.15 GB with the same step time
(`benchmarks/bench.py`). Other backends keep their own schedulers.
"""

from __future__ import annotations

import jax

CPU_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options() -> dict:
  """The options for the default backend (none outside the CPU)."""
  return dict(CPU_OPTIONS) if jax.default_backend() == "cpu" else {}


def jit(fn, **kwargs):
  """jax.jit(fn, **kwargs) with `compiler_options()`."""
  return jax.jit(fn, compiler_options=compiler_options(), **kwargs)
