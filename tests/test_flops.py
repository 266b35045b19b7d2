"""FLOP counts against independent references: the matmuls jax actually traces, and PyTorch's FLOP counter
on the Hugging Face models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from debertax import attention, flops
from debertax.config import ModelConfig
from debertax.heads import build_model, init_params


def traced_matmul_flops(fn, *args) -> float:
  """2 * m * n * k summed over every dot_general jax traces for fn(*args) (scan bodies x their length),
  after dead-code elimination (XLA drops unused values too, e.g. the generator's last layer under the EMD).
  """
  from jax._src.interpreters import partial_eval as pe  # dce_jaxpr has no public alias.

  def count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        out = eqn.outvars[0].aval.shape
        total += 2.0 * np.prod(out) * np.prod([lhs[d] for d in lhs_contract])
        del rhs, lhs_batch
      elif eqn.primitive.name in ("while", "cond"):
        raise AssertionError(f"cannot count FLOPs through {eqn.primitive.name}")
      multiplier = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
      for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else [value]:
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            total += multiplier * count(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            total += multiplier * count(sub)
    return total

  closed = jax.make_jaxpr(fn)(*args)
  jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  return count(jaxpr)


def _config(**kw):
  values = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=80,
                position_buckets=16, max_relative_positions=64)
  values.update(kw)
  return ModelConfig(**values)


def _forward(cfg, batch, length):
  model = build_model(cfg)
  params = init_params(model, jax.random.PRNGKey(0))
  ids = jnp.ones((batch, length), jnp.int32)
  return (lambda p: model.apply({"params": p}, ids, jnp.ones_like(ids))), params


@pytest.mark.parametrize("kw,length", [
    ({}, 40),  # full path, L not a multiple of the Toeplitz rows
    ({"pos_att_type": "c2p", "share_att_key": False}, 33),
    ({"relative_attention": False}, 40),
    ({"query_block_size": 8}, 200),  # blocked path with a saturation band
    ({"query_block_size": 16}, 40),  # blocked path, band covers every key tile
    ({"embedding_size": 32}, 24),
])
def test_computed_count_equals_traced_matmuls(kw, length):
  cfg = _config(**kw)
  fn, params = _forward(cfg, 2, length)
  assert flops.encoder_flops(cfg, 2, length, backward=False, count="computed") == traced_matmul_flops(fn, params)


def test_backward_is_twice_the_forward_matmuls():
  """Full path: jax's gradient multiplies every forward matmul twice more (3x in total)."""
  cfg = _config()
  fn, params = _forward(cfg, 2, 40)
  grad_total = traced_matmul_flops(jax.grad(lambda p: jnp.sum(fn(p) ** 2)), params)
  assert grad_total == flops.encoder_flops(cfg, 2, 40, backward=True, count="computed")


def test_reachable_rows():
  released = ModelConfig()
  assert flops.reachable_rows(released, 128) == 255
  assert flops.reachable_rows(released, 512) == 511
  assert flops.reachable_rows(released, 4096) == 512


def test_useful_count_is_one_dot_per_pair():
  cfg = _config()
  batch, length = 3, 50
  pairs = cfg.num_hidden_layers * 2 * 2.0 * batch * cfg.num_attention_heads * length * length * cfg.head_dim
  no_rel = cfg.replace(relative_attention=False)
  tables = cfg.num_hidden_layers * 2 * 2.0 * flops.reachable_rows(cfg, length) * cfg.hidden_size ** 2
  assert flops.encoder_flops(cfg, batch, length, backward=False) == (
      flops.encoder_flops(no_rel, batch, length, backward=False) + pairs + tables)
  assert flops.encoder_flops(cfg, batch, length, backward=True) == 3 * flops.encoder_flops(cfg, batch, length,
                                                                                            backward=False)


def _torch_flops(model, ids):
  torch = pytest.importorskip("torch")
  from torch.utils.flop_counter import FlopCounterMode
  with torch.no_grad(), FlopCounterMode(display=False) as counter:
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
  return counter.get_total_flops()


def test_bert_shaped_count_matches_pytorch_flop_counter():
  """relative_attention=False is BERT's attention: the count equals torch's for transformers.BertModel."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = _config(relative_attention=False)
  bert = transformers.BertModel(transformers.BertConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
      num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
      attn_implementation="eager"),  # the counter does not see inside the CPU SDPA kernel
      add_pooling_layer=False).eval()
  ids = torch.ones((2, 40), dtype=torch.long)
  assert _torch_flops(bert, ids) == flops.encoder_flops(cfg, 2, 40, backward=False)


def test_deberta_count_matches_pytorch_flop_counter_on_hf():
  """Hugging Face computes c2p / p2c against all 2k table rows (C = 2k instead of L) and projects all 2k
  table rows (we project the reachable ones); the rest is identical."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = _config()
  hf = transformers.DebertaV2Model(transformers.DebertaV2Config(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
      num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size, relative_attention=True,
      position_buckets=cfg.position_buckets, max_relative_positions=cfg.max_relative_positions,
      pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
      type_vocab_size=0)).eval()
  batch, length = 2, 40
  per_column = cfg.num_hidden_layers * 2 * 2.0 * batch * cfg.num_attention_heads * length * cfg.head_dim
  unreached = 2 * cfg.position_buckets - flops.reachable_rows(cfg, length)
  expected = (flops.encoder_flops(cfg, batch, length, backward=False)
              - per_column * length + per_column * 2 * cfg.position_buckets
              + cfg.num_hidden_layers * 2 * 2.0 * unreached * cfg.hidden_size ** 2)
  assert _torch_flops(hf, torch.ones((batch, length), dtype=torch.long)) == expected


def test_position_terms_grow_linearly_on_the_blocked_path():
  """Released buckets saturate at 512: on the blocked path c2p + p2c cost O(L), not O(L^2)."""
  cfg = ModelConfig(hidden_size=384, num_attention_heads=6, num_hidden_layers=1, intermediate_size=1536,
                    query_block_size=256)

  def position_flops(length):
    return (attention.attention_core_flops(cfg, 1, length)
            - attention.attention_core_flops(cfg.replace(relative_attention=False), 1, length))

  per_token = [position_flops(length) / length for length in (4096, 8192, 16384)]
  assert per_token[2] / per_token[0] < 1.1
  useful = 2 * 2.0 * 6 * 8192 * 8192 * 64
  assert position_flops(8192) < 0.35 * useful


@pytest.mark.parametrize("objective", ["rtd", "mlm"])
def test_step_flops_match_traced_step(objective):
  """RTD: generator (+2 EMD passes, MLM head on the masked slots) and discriminator, forward + backward.
  MLM: the discriminator-shaped model with the EMD and the MLM head, alone."""
  from configs import tiny
  from debertax import train as train_lib
  config = tiny.get_config()
  config.model.vocab_size = 100  # tiny.py fills it from the trained vocabulary
  config.objective = objective
  trainer = train_lib.Trainer(config)
  batch, length = int(config.train.batch_size), int(config.data.seq_len)
  data = dict(input_ids=jnp.ones((batch, length), jnp.int32), original_ids=jnp.ones((batch, length), jnp.int32),
              attention_mask=jnp.ones((batch, length), jnp.int32), mlm_mask=jnp.ones((batch, length), bool))
  params = trainer.abstract_state.params
  traced = traced_matmul_flops(
      lambda p: jax.grad(lambda p: trainer._loss(p, data, jax.random.PRNGKey(0))[0])(p), params)
  if objective == "mlm":
    counted = flops.mlm_step_flops(trainer.disc_config, batch, length, trainer.num_predictions, count="computed")
  else:
    counted = flops.rtd_step_flops(trainer.disc_config, trainer.gen_config, batch, length, trainer.num_predictions,
                                   count="computed")
  assert traced == counted


def test_mfu_rejects_nonsense():
  with pytest.raises(ValueError):
    flops.mfu(1.0, 0.0, 1.0)
  assert flops.mfu(2e12, 2.0, 1e12) == 1.0


def test_peak_flops_lookup_and_measurement(monkeypatch):
  class FakeDevice:
    platform = "gpu"
    device_kind = "NVIDIA H100 80GB HBM3"

  flops.peak_flops_per_device.cache_clear()
  monkeypatch.setattr(jax, "devices", lambda: [FakeDevice()])
  assert flops.peak_flops_per_device("bfloat16") == 989e12
  assert flops.peak_flops_per_device("float32") == 494e12
  flops.peak_flops_per_device.cache_clear()
  monkeypatch.undo()
  assert jax.devices()[0].platform == "cpu"
  assert flops.peak_flops_per_device() > 1e9  # measured on the CPU: some GFLOP/s, never a made-up number
  flops.peak_flops_per_device.cache_clear()
