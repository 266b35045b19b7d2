"""compile_options.jit: the memory-optimised CPU scheduler makes rematerialisation effective, and changes
no numbers."""

import jax
import jax.numpy as jnp
import numpy as np

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
