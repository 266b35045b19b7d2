"""XLA options for every jitted function debertax runs: `jit` is `jax.jit` with them.

On the CPU, XLA's default scheduler orders the program for thread-level concurrency, which keeps many
more buffers alive at once and defeats rematerialisation entirely: it schedules the recomputed forward
values next to the originals (measured: a 12-layer MLP under jax.checkpoint needed 660 MiB of temporaries
with it, 348 MiB with the memory-optimised scheduler). The memory-optimised scheduler cut the xsmall
encoder's forward+backward peak at L = 512, batch 8 from 5.15 to 4.15 GB with the same step time
(`benchmarks/bench.py`). Other backends keep their own schedulers.

`CPU_MALLOC_TUNABLES` is the glibc malloc setting we run CPU jobs under (it has to be in the environment
before the process starts, so it is documented and logged, not set here).
"""

from __future__ import annotations

import os
import platform

import jax
from absl import logging

# XLA's temporaries and PyTorch's intermediates are large, short-lived buffers. Past glibc's mmap threshold
# each one is a fresh mapping that is page-faulted (and zeroed by the kernel) on every step and unmapped on
# free. hugetlb=1 backs the heap with transparent huge pages; mmap_max=0 keeps large blocks on the heap, and
# the 64 GiB trim threshold keeps freed heap memory for the next step instead of returning it to the OS.
# Measured on 2 cores (xsmall encoder, L = 512, batch 8, forward+backward, interleaved runs): glibc's
# defaults 9.1-9.7 s per step with 1.0-1.2M page faults; this setting 7.2-7.5 s with 27-49k. XLA's peak
# RSS is unchanged; a process keeps its peak memory until it exits.
CPU_MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:"
                       "glibc.malloc.trim_threshold=68719476736")

CPU_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options() -> dict:
  """The options for the default backend (none outside the CPU)."""
  return dict(CPU_OPTIONS) if jax.default_backend() == "cpu" else {}


def jit(fn, **kwargs):
  """jax.jit(fn, **kwargs) with `compiler_options()`."""
  return jax.jit(fn, compiler_options=compiler_options(), **kwargs)


def log_cpu_malloc_hint() -> None:
  """On a glibc CPU host without GLIBC_TUNABLES, log (once, at startup) the setting that speeds XLA up."""
  if jax.default_backend() != "cpu" or "GLIBC_TUNABLES" in os.environ or platform.libc_ver()[0] != "glibc":
    return
  logging.info("CPU run without GLIBC_TUNABLES: GLIBC_TUNABLES=%s makes large XLA buffers reuse heap memory "
               "instead of page-faulting every step (1.2-1.3x faster training steps on 2 cores; see README)",
               CPU_MALLOC_TUNABLES)
