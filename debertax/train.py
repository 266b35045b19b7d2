"""The sharded RTD train step: state initialisation, the jitted step and evaluation.

    trainer = Trainer(config)                 # config: an ml-collections pretraining config
    state = trainer.init(seed)                # parameters + optimizer state, sharded over the mesh
    state, metrics = trainer.step(state, batch)

Parameters and optimizer state are placed by the logical-axis rules of `debertax.sharding`; the batch is
split over data x fsdp; the step donates the old state. With `config.rtd.decoupled` the generator and the
discriminator have separate optimizers (separate clipping and learning rates), as in the authors' code.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from debertax import optimizer as optimizer_lib
from debertax import rtd, sharding
from debertax.config import ModelConfig

BATCH_KEYS = ("input_ids", "original_ids", "attention_mask", "mlm_mask")
PARTS = ("generator", "discriminator")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def num_predictions(config) -> int:
  """Masked slots per sequence the step reserves: the pipeline's cap (80 per 512 tokens by default)."""
  if config.data.get("max_predictions"):
    return int(config.data.max_predictions)
  return -(-int(config.data.seq_len) * 80 // 512)


def model_configs(config) -> tuple[ModelConfig, ModelConfig]:
  disc = ModelConfig.from_dict(config.model)
  return disc, rtd.generator_config(disc, config.rtd)


class Trainer:

  def __init__(self, config, mesh=None):
    self.config = config
    self.disc_config, self.gen_config = model_configs(config)
    self.models = rtd.RTDModels(self.disc_config, self.gen_config, config.rtd.embedding_sharing)
    self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    self.num_predictions = num_predictions(config)
    self.decoupled = bool(config.rtd.decoupled)
    if self.decoupled:
      gen_tx, self.gen_schedule = optimizer_lib.make_optimizer(config.train, config.train.get("generator_lr", -1))
      disc_tx, self.schedule = optimizer_lib.make_optimizer(config.train)
      self.txs = {"generator": gen_tx, "discriminator": disc_tx}
    else:
      self.tx, self.schedule = optimizer_lib.make_optimizer(config.train)

    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.abstract_boxed = jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0))
    self.param_shardings = sharding.logical_shardings(self.abstract_boxed.params, self.mesh)
    self.state_shardings = TrainState(
        step=sharding.replicated(self.mesh), params=self.param_shardings,
        opt_state=_opt_state_shardings(self.abstract_boxed.opt_state, self.abstract_boxed.params,
                                       self.param_shardings, self.mesh),
        rng=sharding.replicated(self.mesh))
    self.abstract_state = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(self.abstract_boxed),
        self.state_shardings)
    batch_shardings = {k: self.batch_sharding for k in BATCH_KEYS}
    self._init = jax.jit(lambda rng: nn.unbox(self._init_boxed(rng)), out_shardings=self.state_shardings)
    self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_shardings),
                         out_shardings=(self.state_shardings, sharding.replicated(self.mesh)), donate_argnums=0)
    self._eval = jax.jit(self._eval_step, in_shardings=(self.state_shardings, batch_shardings))

  # State ------------------------------------------------------------------------------------------
  def _init_boxed(self, rng):
    param_rng, state_rng = jax.random.split(rng)
    params = self.models.init(param_rng, boxed=True)
    if self.decoupled:
      opt_state = {part: self.txs[part].init(params[part]) for part in PARTS}
    else:
      opt_state = self.tx.init(params)
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=opt_state, rng=state_rng)

  def init(self, seed: int = 0) -> TrainState:
    with self._context():
      return self._init(jax.random.PRNGKey(seed))

  def state_from_params(self, params, seed: int = 0) -> TrainState:
    """A fresh state (step 0, new optimizer) around given parameters (continue-training from a release)."""
    state = self.init(seed)
    params = jax.device_put(params, self.param_shardings)
    with self._context():
      opt_state = jax.jit(
          lambda p: ({part: self.txs[part].init(p[part]) for part in PARTS} if self.decoupled else self.tx.init(p)),
          out_shardings=self.state_shardings.opt_state)(params)
    return state.replace(params=params, opt_state=opt_state)

  # Step -------------------------------------------------------------------------------------------
  def _context(self):
    return _MeshRules(self.mesh)

  def _loss(self, params, batch, rng, deterministic=False):
    return self.models.losses(params, batch, rng, num_predictions=self.num_predictions,
                              rtd_lambda=float(self.config.rtd.rtd_lambda),
                              temperature=float(self.config.rtd.temperature), deterministic=deterministic)

  def _train_step(self, state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = jax.value_and_grad(self._loss, has_aux=True)(state.params, batch, rng)
    if self.decoupled:
      new_params, new_opt = {}, {}
      for part in PARTS:
        updates, new_opt[part] = self.txs[part].update(grads[part], state.opt_state[part], state.params[part])
        new_params[part] = optax.apply_updates(state.params[part], updates)
    else:
      updates, new_opt = self.tx.update(grads, state.opt_state, state.params)
      new_params = optax.apply_updates(state.params, updates)
    metrics = {k: v for k, v in aux.items() if jnp.ndim(v) == 0}
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["learning_rate"] = self.schedule(state.step)
    return TrainState(step=state.step + 1, params=new_params, opt_state=new_opt, rng=state.rng), metrics

  def step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    with self._context():
      return self._step(state, self.global_batch(batch))

  def _eval_step(self, state: TrainState, batch):
    _, aux = self._loss(state.params, batch, jax.random.fold_in(state.rng, 2**31 - 1), deterministic=True)
    return aux

  def evaluate(self, state: TrainState, batch) -> dict:
    with self._context():
      return self._eval(state, self.global_batch(batch))

  def loss_and_grads(self, params, batch, seed: int = 0, deterministic: bool = True):
    """For tests and diagnostics: (aux, grads of the total loss) without an update."""
    fn = lambda p: self._loss(p, batch, jax.random.PRNGKey(seed), deterministic)
    return jax.value_and_grad(fn, has_aux=True)(params)

  # Data -------------------------------------------------------------------------------------------
  def global_batch(self, local_batch) -> dict:
    """This host's rows -> global arrays sharded over data x fsdp (each host passes only its rows)."""
    out = {}
    for key in BATCH_KEYS:
      value = local_batch[key]
      if isinstance(value, jax.Array) and value.sharding == self.batch_sharding:
        out[key] = value
        continue
      value = np.asarray(value)
      global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
      out[key] = jax.make_array_from_process_local_data(self.batch_sharding, value, global_shape)
    return out

  # Export -----------------------------------------------------------------------------------------
  def export_params(self, state: TrainState) -> tuple[dict, dict]:
    """Host copies of (generator, discriminator) parameters; the discriminator embedding is E_G + E_delta."""
    params = jax.device_get(state.params)
    return params["generator"], jax.device_get(self.models.discriminator_params(params, for_export=True))


class _MeshRules:
  """Mesh + logical-axis rules in scope, so the model's activation constraints resolve."""

  def __init__(self, mesh):
    self.mesh = mesh
    self._stack = []

  def __enter__(self):
    rules = nn.logical_axis_rules(sharding.LOGICAL_RULES)
    self._stack = [rules, jax.set_mesh(self.mesh)]
    for ctx in self._stack:
      ctx.__enter__()
    return self

  def __exit__(self, *exc):
    for ctx in reversed(self._stack):
      ctx.__exit__(*exc)


def _opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh):
  """Optimizer leaves that mirror a parameter (Adam's mu/nu) take its sharding; the rest is replicated.

  Matching is by the dict-key path that ends the leaf's tree path, plus the shape.
  """
  flat_params = traverse_util.flatten_dict(nn.unbox(abstract_params))
  flat_shardings = traverse_util.flatten_dict(param_shardings)
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    keys = tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))
    for start in range(len(keys)):
      candidate = keys[start:]
      if candidate in flat_params and flat_params[candidate].shape == leaf.shape:
        return flat_shardings[candidate]
    return replicated

  unboxed = nn.unbox(abstract_opt_state)
  return jax.tree_util.tree_map_with_path(pick, unboxed)
