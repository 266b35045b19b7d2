"""compile_options: the memory-optimised CPU scheduler makes rematerialisation effective and changes no
numbers; the recommended glibc malloc setting really reuses large buffers."""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging

from debertax import compile_options


def _loss(weights, x):
  layer = jax.checkpoint(lambda w, h: jnp.tanh(jax.nn.gelu(h @ w[0], approximate=False) @ w[1]) + h)
  for w in weights:
    x = layer(w, x)
  return jnp.sum(x ** 2)


def _inputs(layers=6, length=512, width=64, ffn=512):
  keys = jax.random.split(jax.random.PRNGKey(0), 2 * layers + 1)
  weights = [(jax.random.normal(keys[2 * i], (width, ffn)) * 0.05,
              jax.random.normal(keys[2 * i + 1], (ffn, width)) * 0.05) for i in range(layers)]
  return weights, jax.random.normal(keys[-1], (length, width))


def test_cpu_options_only_on_cpu():
  assert jax.default_backend() == "cpu"
  assert compile_options.compiler_options() == compile_options.CPU_OPTIONS


def test_remat_reduces_temporaries_and_values_match():
  weights, x = _inputs()
  grad = jax.grad(_loss)
  plain = jax.jit(grad).lower(weights, x).compile()
  ours = compile_options.jit(grad).lower(weights, x).compile()
  plain_temp = plain.memory_analysis().temp_size_in_bytes
  ours_temp = ours.memory_analysis().temp_size_in_bytes
  # Rematerialised: each layer keeps its [L, ffn] activations only while its backward runs, so the
  # temporaries hold about one layer's worth instead of all six.
  ffn_activation = 512 * 512 * 4
  assert ours_temp < plain_temp - 3 * ffn_activation, (ours_temp, plain_temp)
  for a, b in zip(jax.tree_util.tree_leaves(plain(weights, x)), jax.tree_util.tree_leaves(ours(weights, x))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


_REUSE_PROBE = """
import resource, numpy as np
def faults_of_one_step():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  buffer = np.empty(64 * 2**20, np.uint8)  # 64 MiB: past glibc's largest dynamic mmap threshold
  buffer[::4096] = 1                       # touch every 4 KiB page, as a step writing its temporaries does
  del buffer
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_step()
print(faults_of_one_step())
"""


def _second_step_faults(tunables):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  out = subprocess.run([sys.executable, "-c", _REUSE_PROBE], env=env, capture_output=True, text=True, check=True)
  return int(out.stdout.split()[-1])


def test_cpu_malloc_tunables_reuse_large_buffers_without_page_faults():
  if platform.libc_ver()[0] != "glibc":
    pytest.skip("GLIBC_TUNABLES is a glibc setting")
  # glibc's default: a 64 MiB block is a fresh mapping every time, faulted page by page again (16384 pages
  # of 4 KiB, fewer where transparent huge pages back it). With our setting the freed block is reused.
  default_faults = _second_step_faults(None)
  tuned_faults = _second_step_faults(compile_options.CPU_MALLOC_TUNABLES)
  assert default_faults >= 32, default_faults  # at least one fault per 2 MiB huge page
  assert tuned_faults < 16, tuned_faults


def test_cpu_malloc_hint_logged_only_without_tunables(monkeypatch):
  messages = []
  monkeypatch.setattr(logging, "info", lambda fmt, *args: messages.append(fmt % args))
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  compile_options.log_cpu_malloc_hint()
  if platform.libc_ver()[0] == "glibc":
    assert len(messages) == 1 and compile_options.CPU_MALLOC_TUNABLES in messages[0]
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  compile_options.log_cpu_malloc_hint()
  assert len(messages) <= 1
