"""Lowering for accelerators this machine does not have (jax.export, platforms=[...]), so that a kernel or
step change that cannot lower for a TPU or a GPU fails here rather than on a user's pod. Lowering runs the
Pallas -> Mosaic / Triton translation and the sharding annotations; the device compiler itself does not run.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from debertax import flash_attention, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": "xla.gpu.triton"}
# Triton kernels are serialised for a specific GPU; export refuses them unless told that the target is known.
TRITON_OK = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("terms", [("c2p", "p2c"), ("c2p",), ("p2c",)], ids="+".join)
@pytest.mark.parametrize("length", [200, 512, 2048])
@pytest.mark.parametrize("backend,platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_flash_kernel_forward_and_gradient_lower(backend, platform, length, terms, dtype):
  """The released attention shape (head dim 64, 256 log buckets over a 512 span); 200: not a block multiple."""
  qkv = jax.ShapeDtypeStruct((2, length, 4, 64), dtype)
  table = jax.ShapeDtypeStruct((512, 4, 64), dtype)
  mask = jax.ShapeDtypeStruct((2, length), jnp.bool_)

  def gradients(q, k, v, kr_table, qr_table, key_mask):
    def loss(q, k, v, kr_table, qr_table):
      out = flash_attention.disentangled_flash_attention(
          q, k, v, key_mask, kr_table=kr_table, qr_table=qr_table, pos_terms=terms, position_buckets=256,
          max_relative_span=512, backend=backend)
      return jnp.sum(out.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, kr_table, qr_table)

  exported = jax.export.export(jax.jit(gradients), platforms=[platform], disabled_checks=TRITON_OK)(
      qkv, qkv, qkv, table, table, mask)
  # The forward kernel and the fused backward's dk/dv and dq kernels.
  assert exported.mlir_module().count(CUSTOM_CALL[platform]) == 3


def _base_config(attention_impl):
  spec = importlib.util.spec_from_file_location("deberta_v3_base", os.path.join(ROOT, "configs", "deberta_v3_base.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.vocab_size = 128100  # The released vocabulary.
  config.model.dtype = "bfloat16"
  config.train.batch_size = 8  # Abstract inputs: the batch size changes nothing but the shapes.
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 4, 1
  if attention_impl == "flash":
    config.model.attention_impl, config.model.flash_backend = "flash", "tpu"
    config.model.attention_probs_dropout_prob = 0.0
  return config


@pytest.mark.parametrize("attention_impl", ["xla", "flash"])
def test_base_rtd_train_step_lowers_for_tpu_on_8_devices(attention_impl):
  """configs/deberta_v3_base.py's full step (generator, discriminator, both optimizer updates), bf16, L 512,
  data 2 x fsdp 4. With the flash kernel every attention call runs per device shard (a bare Mosaic call
  cannot be partitioned and does not lower under a mesh)."""
  config = _base_config(attention_impl)
  trainer = train.Trainer(config, mesh=sharding.make_mesh(config.mesh, devices=jax.devices()[:8]))
  exported = trainer.export_step(["tpu"])
  assert exported.nr_devices == 8
  module = exported.mlir_module()
  # Attention calls: 12 discriminator layers, 6 generator layers and the generator's Enhanced Mask Decoder
  # pass, each a forward kernel and the fused backward's two kernels.
  layers = config.model.num_hidden_layers + config.rtd.generator_layers + 1
  assert module.count(CUSTOM_CALL["tpu"]) == (3 * layers if attention_impl == "flash" else 0)
