"""AdamW as the authors and Hugging Face train DeBERTa: Adam (bias-corrected, or without correction as in the
authors' code: `train.bias_correction`), decoupled weight decay (not on biases or LayerNorm parameters),
global-norm clipping, linear warmup then linear decay to zero; optionally layer-wise learning-rate decay for
fine-tuning (`train.layer_decay` < 1). configs/common.py explains the defaults.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def warmup_linear_decay(peak_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """peak * s / w for s < w, then peak * (T - s) / (T - w), clamped at 0 (w = warmup_steps, T = total_steps)."""
  warmup_steps = max(int(warmup_steps), 0)
  total_steps = max(int(total_steps), warmup_steps + 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * step / max(warmup_steps, 1)
    decay = peak_lr * jnp.maximum(0.0, (total_steps - step) / (total_steps - warmup_steps))
    return jnp.where(step < warmup_steps, warm, decay)

  return schedule


class AdamState(NamedTuple):
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam(b1: float, b2: float, eps: float, bias_correction: bool) -> optax.GradientTransformation:
  """Adam's direction m_hat / (sqrt(v_hat) + eps). Without bias correction (the authors' code) it is
  m / (sqrt(v) + eps): the second moment is underestimated early, so steps 1-1000 are 1.3x-5.5x larger than
  bias-corrected Adam's (configs/common.py)."""

  def init(params):
    zeros = lambda p: jnp.zeros_like(p, dtype=jnp.float32)
    return AdamState(jax.tree_util.tree_map(zeros, params), jax.tree_util.tree_map(zeros, params)), \
        jnp.zeros([], jnp.int32)

  def update(updates, state, params=None):
    (mu, nu), count = state
    mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, mu, updates)
    nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), nu, updates)
    count = count + 1
    if bias_correction:
      c1 = 1 - b1 ** count.astype(jnp.float32)
      c2 = 1 - b2 ** count.astype(jnp.float32)
      out = jax.tree_util.tree_map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
    else:
      out = jax.tree_util.tree_map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    return out, (AdamState(mu, nu), count)

  return optax.GradientTransformation(init, update)


def decay_mask(params):
  """True where weight decay applies: not biases, not LayerNorm scales/biases."""
  flat = traverse_util.flatten_dict(params)
  mask = {path: not (path[-1] == "bias" or any("LayerNorm" in part for part in path)) for path in flat}
  return traverse_util.unflatten_dict(mask)


_LAYER_KEY = re.compile(r"^layer_(\d+)$")


def layer_depth(path: tuple[str, ...], num_layers: int) -> int:
  """Depth of a parameter for layer-wise decay: 0 for the embeddings and what every layer shares (the
  relative-position table and its LayerNorm), i + 1 for encoder layer i (the v2 ConvLayer, applied with
  layer 0, counts as 1), num_layers + 1 for everything outside the backbone (pooler, classifier, heads)."""
  if "deberta" not in path:
    return num_layers + 1
  for part in path:
    match = _LAYER_KEY.match(part)
    if match:
      return int(match.group(1)) + 1
  return 1 if "conv" in path else 0


def layer_decay_factors(params, decay: float):
  """Per-leaf learning-rate multipliers decay ** (num_layers + 1 - depth) (see `layer_depth`)."""
  flat = traverse_util.flatten_dict(params)
  backbones = {path[:path.index("deberta")] for path in flat if "deberta" in path}
  if len(backbones) != 1:
    raise ValueError(f"train.layer_decay needs a parameter tree with exactly one 'deberta' backbone, found "
                     f"{len(backbones)} (at {sorted(backbones)})")
  layer_ids = {int(m.group(1)) for path in flat for part in path for m in [_LAYER_KEY.match(part)] if m}
  num_layers = max(layer_ids) + 1 if layer_ids else 0
  factors = {path: float(decay) ** (num_layers + 1 - layer_depth(path, num_layers)) for path in flat}
  return traverse_util.unflatten_dict(factors)


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its layer's factor; placed last, it scales that layer's learning rate."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    factors = layer_decay_factors(updates, decay)
    return jax.tree_util.tree_map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors), state

  return optax.GradientTransformation(init, update)


def make_optimizer(train_config, lr: float | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """From a `config.train` block; `lr` overrides train.lr (the generator may have its own)."""
  peak = train_config.lr if lr is None or lr < 0 else lr
  schedule = warmup_linear_decay(peak, train_config.warmup_steps, train_config.steps)
  parts = []
  if train_config.grad_clip and train_config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_config.grad_clip))
  parts.append(scale_by_adam(train_config.adam_b1, train_config.adam_b2, train_config.adam_eps,
                             train_config.bias_correction))
  if train_config.weight_decay:
    parts.append(optax.add_decayed_weights(train_config.weight_decay, mask=decay_mask))
  parts.append(optax.scale_by_learning_rate(schedule))
  layer_decay = float(train_config.get("layer_decay", 1.0))
  if not 0.0 < layer_decay <= 1.0:
    raise ValueError(f"train.layer_decay={layer_decay}: use a value in (0, 1] (1 turns it off)")
  if layer_decay < 1.0:
    parts.append(scale_by_layer_decay(layer_decay))
  return optax.chain(*parts), schedule
