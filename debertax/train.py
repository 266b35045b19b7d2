"""The sharded pretraining step (RTD, or plain MLM): state initialisation, the jitted step and evaluation.

    trainer = Trainer(config)                 # config: an ml-collections pretraining config
    state = trainer.init(seed)                # parameters + optimizer state, sharded over the mesh
    state, metrics = trainer.step(state, batch)

Parameters and optimizer state are placed by the logical-axis rules of `debertax.sharding`; the batch is
split over data x fsdp; the step donates the old state. With `config.rtd.decoupled` the generator and the
discriminator have separate optimizers (separate clipping and learning rates), as in the authors' code.
`config.objective="mlm"` trains one masked language model of the discriminator's shape instead
(`debertax.mlm`); the step, checkpoints and export are the same code.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.experimental import multihost_utils

from debertax import optimizer as optimizer_lib
from debertax import compile_options, mlm, rtd, sharding
from debertax.config import ModelConfig

BATCH_KEYS = ("input_ids", "original_ids", "attention_mask", "mlm_mask")
# What `PretrainingIterator` yields for each key ([B, L] arrays).
BATCH_DTYPES = {"input_ids": jnp.int32, "original_ids": jnp.int32, "attention_mask": jnp.int32,
                "mlm_mask": jnp.bool_}
# How a scalar metric of `rtd.RTDModels.losses` (or `mlm.MLMModel.losses`) combines over microbatches: a
# mean over masked slots, a mean over real tokens, or a count.
_PER_MASKED_METRICS = ("mlm_loss", "mlm_accuracy", "replaced_of_masked")
_PER_TOKEN_METRICS = ("rtd_loss", "rtd_accuracy", "replaced_ratio")
_COUNT_METRICS = ("masked_tokens", "tokens")


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


def objective(config) -> str:
  """config.objective: "rtd" (the default; configs written before it existed are RTD) or "mlm"."""
  name = config.get("objective", "rtd")
  if name not in mlm.OBJECTIVES:
    raise ValueError(f"config.objective={name!r}; choose one of {mlm.OBJECTIVES}")
  return name


def model_configs(config) -> tuple[ModelConfig, ModelConfig | None]:
  """(the discriminator's config, the generator's); under the MLM objective, (the model's, None)."""
  disc = ModelConfig.from_dict(config.model)
  if objective(config) == "mlm":
    return disc, None
  return disc, rtd.generator_config(disc, config.rtd)


class Trainer:

  def __init__(self, config, mesh=None):
    self.config = config
    self.objective = objective(config)
    self.disc_config, self.gen_config = model_configs(config)
    if self.objective == "mlm":
      self.models = mlm.MLMModel(self.disc_config)
    else:
      self.models = rtd.RTDModels(self.disc_config, self.gen_config, config.rtd.embedding_sharing)
    self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    self.num_predictions = num_predictions(config)
    self.decoupled = self.objective == "rtd" and bool(config.rtd.decoupled)
    if self.decoupled:
      gen_tx, self.gen_schedule = optimizer_lib.make_optimizer(config.train, config.train.get("generator_lr", -1))
      disc_tx, self.schedule = optimizer_lib.make_optimizer(config.train)
      self.txs = {"generator": gen_tx, "discriminator": disc_tx}
    else:
      self.tx, self.schedule = optimizer_lib.make_optimizer(config.train)

    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.microbatches = _check_microbatches(config, self.mesh)
    self.abstract_boxed = jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0))
    self.param_shardings = sharding.logical_shardings(self.abstract_boxed.params, self.mesh)
    self.state_shardings = TrainState(
        step=sharding.replicated(self.mesh), params=self.param_shardings,
        opt_state=sharding.opt_state_shardings(self.abstract_boxed.opt_state, self.abstract_boxed.params,
                                               self.param_shardings, self.mesh),
        rng=sharding.replicated(self.mesh))
    self.abstract_state = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(self.abstract_boxed),
        self.state_shardings)
    batch_shardings = {k: self.batch_sharding for k in BATCH_KEYS}
    self._init = jax.jit(lambda rng: nn.unbox(self._init_boxed(rng)), out_shardings=self.state_shardings)
    self._step = compile_options.jit(
        self._train_step, in_shardings=(self.state_shardings, batch_shardings),
        out_shardings=(self.state_shardings, sharding.replicated(self.mesh)), donate_argnums=0)
    # Replicated outputs: every process can read the per-token arrays of a batch spread over all hosts.
    self._eval = compile_options.jit(
        self._eval_step, in_shardings=(self.state_shardings, batch_shardings),
        out_shardings=sharding.replicated(self.mesh))

  # State ------------------------------------------------------------------------------------------
  def _init_boxed(self, rng):
    param_rng, state_rng = jax.random.split(rng)
    params = self.models.init(param_rng, boxed=True)
    if self.decoupled:
      opt_state = {part: self.txs[part].init(params[part]) for part in self.models.parts}
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
          lambda p: ({part: self.txs[part].init(p[part]) for part in self.models.parts} if self.decoupled
                     else self.tx.init(p)),
          out_shardings=self.state_shardings.opt_state)(params)
    return state.replace(params=params, opt_state=opt_state)

  # Step -------------------------------------------------------------------------------------------
  def _context(self):
    return sharding.MeshRules(self.mesh)

  def _rtd_lambda(self) -> float:
    return float(self.config.rtd.rtd_lambda) if self.objective == "rtd" else 0.0

  def _loss(self, params, batch, rng, deterministic=False):
    return self.models.losses(params, batch, rng, num_predictions=self.num_predictions,
                              rtd_lambda=self._rtd_lambda(),
                              temperature=float(self.config.rtd.temperature), deterministic=deterministic)

  def _train_step(self, state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    grads, metrics = self._gradients(state.params, batch, rng)
    if self.decoupled:
      new_params, new_opt = {}, {}
      for part in self.models.parts:
        updates, new_opt[part] = self.txs[part].update(grads[part], state.opt_state[part], state.params[part])
        new_params[part] = optax.apply_updates(state.params[part], updates)
    else:
      updates, new_opt = self.tx.update(grads, state.opt_state, state.params)
      new_params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["learning_rate"] = self.schedule(state.step)
    if self.decoupled:
      metrics["generator_learning_rate"] = self.gen_schedule(state.step)
    return TrainState(step=state.step + 1, params=new_params, opt_state=new_opt, rng=state.rng), metrics

  def step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    with self._context():
      return self._step(state, self.global_batch(batch))

  def _gradients(self, params, batch, rng):
    """(gradients of the total loss over the whole batch, its scalar metrics).

    With config.train.microbatches = M > 1 a lax.scan runs the batch in M slices and sums their
    gradients, so activations are held for B/M sequences at a time. Each slice's loss is weighted by
    its share of the batch's masked slots (MLM) and real tokens (RTD), which makes the sum exactly the
    full batch's gradient; only the random draws (dropout, generator samples) differ, per slice.
    """
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    if self.microbatches == 1:
      (_, aux), grads = grad_fn(params, batch, rng)
      return grads, {k: v for k, v in aux.items() if jnp.ndim(v) == 0}

    rtd_lambda = self._rtd_lambda()
    # The normalisers of rtd.RTDModels.losses for the whole batch: masked slots (at most
    # num_predictions per sequence) and real tokens.
    masked_total = jnp.maximum(jnp.minimum(batch["mlm_mask"].sum(axis=1), self.num_predictions).sum(), 1)
    tokens_total = jnp.maximum(batch["attention_mask"].sum(), 1)

    def slice_objective(p, micro, micro_rng):
      _, aux = self._loss(p, micro, micro_rng)
      weighted = aux["mlm_loss"] * aux["masked_tokens"] / masked_total
      if "rtd_loss" in aux:
        weighted += rtd_lambda * aux["rtd_loss"] * aux["tokens"] / tokens_total
      return weighted, {k: v for k, v in aux.items() if jnp.ndim(v) == 0}

    def body(grad_sum, inputs):
      index, micro = inputs
      grads, aux = jax.grad(slice_objective, has_aux=True)(params, micro, jax.random.fold_in(rng, index))
      grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, grads)
      return jax.lax.with_sharding_constraint(grad_sum, self.param_shardings), aux

    zeros = jax.lax.with_sharding_constraint(jax.tree_util.tree_map(jnp.zeros_like, params), self.param_shardings)
    grads, per_slice = jax.lax.scan(body, zeros, (jnp.arange(self.microbatches), self._split_batch(batch)))
    return grads, _combine_slice_metrics(per_slice, rtd_lambda)

  def _split_batch(self, batch) -> dict:
    """[B, ...] -> [M, B/M, ...]: slice m takes rows m, m+M, ..., so each device keeps its own rows and
    every slice is spread over the same devices as the batch."""
    slice_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))

    def split(x):
      x = jnp.swapaxes(x.reshape((x.shape[0] // self.microbatches, self.microbatches) + x.shape[1:]), 0, 1)
      return jax.lax.with_sharding_constraint(x, slice_sharding)

    return {key: split(batch[key]) for key in BATCH_KEYS}

  def abstract_batch(self) -> dict:
    """ShapeDtypeStructs (with the batch sharding) of one global batch: what the step is compiled for."""
    shape = (int(self.config.train.batch_size), int(self.config.data.seq_len))
    return {k: jax.ShapeDtypeStruct(shape, BATCH_DTYPES[k], sharding=self.batch_sharding) for k in BATCH_KEYS}

  def lower_step(self):
    """The jitted train step lowered for the abstract state and batch; allocates no parameters."""
    with self._context():
      return self._step.lower(self.abstract_state, self.abstract_batch())

  def export_step(self, platforms):
    """The train step exported (jax.export) for `platforms`, e.g. ["tpu"], from any machine: what a pod would
    run, lowered without its devices (the device compiler does not run)."""
    with self._context():
      return jax.export.export(self._step, platforms=platforms)(self.abstract_state, self.abstract_batch())

  def _eval_step(self, state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, 2**31 - 1)
    if self.microbatches == 1:
      _, aux = self._loss(state.params, batch, rng, deterministic=True)
      return aux

    def body(_, inputs):  # Forward only, in the same slices as the train step (it would not fit otherwise).
      index, micro = inputs
      return None, self._loss(state.params, micro, jax.random.fold_in(rng, index), deterministic=True)[1]

    _, per_slice = jax.lax.scan(body, None, (jnp.arange(self.microbatches), self._split_batch(batch)))
    scalars = {k: v for k, v in per_slice.items() if v.ndim == 1}
    out = _combine_slice_metrics(scalars, self._rtd_lambda())
    for key, value in per_slice.items():
      if key not in scalars:  # [M, B/M, ...] -> [B, ...] in the batch's row order (see _split_batch).
        out[key] = jnp.swapaxes(value, 0, 1).reshape((-1,) + value.shape[2:])
    return out

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
    return sharding.global_batch(local_batch, self.batch_sharding, BATCH_KEYS)

  # Export -----------------------------------------------------------------------------------------
  def export_params(self, state: TrainState) -> dict:
    """Host copies of the parameters of each exported model: {"generator", "discriminator"} (the
    discriminator's embedding is E_G + E_delta) under RTD, {"mlm"} under the MLM objective.

    Every process gets whole arrays: process_allgather assembles each leaf over the mesh (on one process
    it is a plain copy), one leaf at a time, so no device ever holds more than one whole parameter extra.
    """
    params = multihost_utils.process_allgather(state.params, tiled=True)
    return jax.device_get(self.models.exported(params))


def _check_microbatches(config, mesh) -> int:
  """config.train.microbatches (default 1), checked against the batch size and the batch sharding."""
  microbatches = int(config.train.get("microbatches", 1))
  batch_size = int(config.train.batch_size)
  if microbatches < 1 or batch_size % microbatches:
    raise ValueError(f"config.train.microbatches={microbatches} must be >= 1 and divide "
                     f"config.train.batch_size={batch_size}")
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if (batch_size // microbatches) % shards:
    raise ValueError(f"config.train.batch_size={batch_size} / config.train.microbatches={microbatches} = "
                     f"{batch_size // microbatches} sequences per microbatch, not divisible by the "
                     f"{shards}-way batch sharding (config.mesh data x fsdp)")
  return microbatches


def _combine_slice_metrics(per_slice: dict, rtd_lambda: float) -> dict:
  """[M]-stacked scalar metrics of the microbatches -> the whole batch's values."""
  masked, tokens = per_slice["masked_tokens"], per_slice["tokens"]
  out = {}
  for key, values in per_slice.items():
    if key in _PER_MASKED_METRICS:
      out[key] = jnp.sum(values * masked) / jnp.maximum(masked.sum(), 1)
    elif key in _PER_TOKEN_METRICS:
      out[key] = jnp.sum(values * tokens) / jnp.maximum(tokens.sum(), 1)
    elif key in _COUNT_METRICS:
      out[key] = values.sum()
    elif key != "loss":
      raise ValueError(f"config.train.microbatches: no rule to combine the metric {key!r} over microbatches")
  out["loss"] = out["mlm_loss"] + (rtd_lambda * out["rtd_loss"] if "rtd_loss" in out else 0.0)
  return out
