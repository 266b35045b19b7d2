"""Training parity with transformers + torch (the oracle): the same tiny models trained from the same weights on the
same batches with the same optimizer, 20 steps, in both frameworks (harness: benchmarks/training_parity.py, torch
side: benchmarks/torch_reference.py).

Cases: the generator as a plain MLM (DebertaV2ForMaskedLM, legacy=False) and with the Enhanced Mask Decoder (a
hand-written torch EMD on DebertaV2Model), the discriminator (a hand-written RTD head), sequence classification
and regression through debertax.finetune.Finetuner (DebertaV2ForSequenceClassification), and the discriminator
again with Adam without bias correction (torch: torch_reference.AuthorsAdamW). Bias-corrected cases run against
torch.optim.AdamW + torch.nn.utils.clip_grad_norm_, with torch's learning rate set every step from the schedule
that make_optimizer returns.

Tolerances. Losses: 1e-4 relative per step. Measured: 2.3e-5 for the regressor (its MSE falls from 3.8 to 1.2,
and a squared residual that is a small difference of two larger numbers magnifies rounding), 4.6e-6 for the
discriminator, <= 4.2e-7 for the rest. Parameters after 20 steps: 1e-5 absolute on every element (measured:
<= 1.5e-6), where 20 steps moved the largest element by 0.03-0.04 (0.2 with the authors' Adam). Nothing much
tighter holds: both sides compute in float32 with differently ordered sums (a gradient differs by ~1e-7
relative), and Adam divides each gradient by its own running RMS, so those rounding differences reach the
update at their relative size, not scaled down by the gradient.

The optimizers: torch.optim.AdamW's decay (p *= 1 - lr * wd before its Adam step) and optax's (update += wd * p,
then * lr) are the same rule exactly, not only to first order (the Adam direction does not depend on p); torch's
bias correction (lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)) is ours rearranged; torch's
clip_grad_norm_ scales by max_norm / (norm + 1e-6) where optax scales by max_norm / norm, a 1e-6 / norm relative
change of a clipped gradient that Adam's normalisation removes. So torch's own optimizer and clipping are used as
they are, with no custom optimizer and no wider tolerance (test_optimizer_alone_matches_torch: 1e-6).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import optax  # noqa: E402

from benchmarks import torch_reference  # noqa: E402
from benchmarks import training_parity as parity  # noqa: E402
from debertax import convert, heads  # noqa: E402
from debertax import optimizer as optimizer_lib  # noqa: E402
from debertax.config import ModelConfig  # noqa: E402

STEPS = 20
LOSS_RTOL = 1e-4
PARAM_ATOL = 1e-5
FORWARD_TOL = 1e-5
BATCH, LENGTH, VOCAB = 4, 24, 128

# v3 settings with buckets shrunk so that L = 24 reaches the log buckets (mid = 4); dropout 0 everywhere.
CONFIG = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, position_buckets=8, max_relative_positions=-1,
                     relative_attention=True, pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm",
                     position_biased_input=False, type_vocab_size=0, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pooler_dropout=0.0, cls_dropout=0.0)

# lr rises over 6 steps, then decays linearly towards 0 at step 30. With clip 1.0 the MLMs and the regressor are
# clipped at every step, the discriminator and the classifier at none (test_optimizer_alone_matches_torch
# alternates). Weight decay 0.1 (ten times the recipe's) so that decaying a parameter that should not be decayed
# shows within 20 steps.
OPTIMIZER = dict(lr=3e-3, warmup_steps=6, steps=30, grad_clip=1.0, weight_decay=0.1)

CASES = {  # name: (model kind, bias_correction)
    "mlm": ("mlm", True),
    "emd": ("emd", True),
    "rtd": ("rtd", True),
    "cls": ("cls", True),
    "reg": ("reg", True),
    "rtd_authors_adam": ("rtd", False),
}


@pytest.fixture(scope="module", autouse=True)
def fast_and_quiet():
  """One torch thread (tiny matrices: threads only wait on each other, and on a shared machine much longer) and
  XLA's quick compilation mode (these models spend far longer compiling than running; float32 results do not
  change beyond rounding)."""
  threads = torch.get_num_threads()
  optimizations = jax.config.values["jax_disable_most_optimizations"]
  torch.set_num_threads(1)
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  torch.set_num_threads(threads)
  jax.config.update("jax_disable_most_optimizations", optimizations)


def _setup(kind, seed=0):
  config = parity.for_kind(CONFIG, kind)
  batches = parity.synthetic_batches(kind, STEPS, BATCH, LENGTH, VOCAB, seed=seed)
  return config, batches, parity.initial_params(kind, config, seed, perturb=0.1)


def test_batches_cover_padding_and_unused_prediction_slots():
  """The synthetic stream has padded rows, invalid prediction slots and both RTD labels on real tokens."""
  mlm = parity.synthetic_batches("mlm", 3, BATCH, LENGTH, VOCAB)
  disc = parity.synthetic_batches("rtd", 3, BATCH, LENGTH, VOCAB)
  assert all((b["attention_mask"][-1] == 0).any() and b["attention_mask"][0].all() for b in mlm)
  assert any((~b["valid"]).any() for b in mlm) and all(b["valid"].any(axis=1).all() for b in mlm)
  for b in mlm:  # Valid slots are masked positions holding [MASK]; their targets are real tokens.
    ids = np.take_along_axis(b["input_ids"], b["positions"], axis=1)
    assert (ids[b["valid"]] == VOCAB - 1).all() and (b["targets"][b["valid"]] >= 4).all()
  real = np.concatenate([b["replaced"][b["attention_mask"] > 0] for b in disc])
  assert 0.05 < real.mean() < 0.3
  labels = np.concatenate([b["labels"] for b in parity.synthetic_batches("cls", 5, BATCH, LENGTH, VOCAB)])
  assert len(set(labels.tolist())) >= 2


@pytest.mark.parametrize("kind", ["emd", "rtd"])
def test_hand_written_torch_heads_match_our_forward(kind):
  """The torch EMD and RTD references give our logits at every real position before any training (so the
  training comparison starts from the same function), and the EMD is not the plain MLM in disguise."""
  config, batches, params = _setup(kind)
  batch = batches[0]
  model = torch_reference.load_params(torch_reference.build(kind, config), params).eval()
  ids, mask = (torch.from_numpy(batch[k].astype(np.int64)) for k in ("input_ids", "attention_mask"))
  with torch.no_grad():
    theirs = model(ids, mask).numpy()
  forward = jax.jit(parity.build_model(kind, config).apply)
  ours = np.asarray(forward({"params": params}, batch["input_ids"], batch["attention_mask"]))
  real = batch["attention_mask"].astype(bool)
  assert ours.shape == theirs.shape
  err = float(np.abs(ours - theirs)[real].max())
  print(f"{kind}: max abs logit error {err:.2e}")
  assert err <= FORWARD_TOL
  if kind == "emd":
    plain = torch_reference.build("mlm", config)
    state = {k: v for k, v in model.state_dict().items() if "position_embeddings" not in k}
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
      plain_logits = plain.eval()(input_ids=ids, attention_mask=mask).logits.numpy()
    assert np.abs(plain_logits - theirs)[real].max() > 1e-2


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_losses_and_parameters_match(case):
  kind, bias_correction = CASES[case]
  config, batches, params = _setup(kind)
  opt = parity.train_config(bias_correction=bias_correction, **OPTIMIZER)
  result = parity.run_pair(kind, config, opt, batches, params)
  ours, theirs = result["losses_jax"], result["losses_torch"]
  rel = np.abs(ours - theirs) / np.abs(theirs)
  print(f"{case}: max rel. loss difference {rel.max():.2e}; losses {ours[0]:.4f} -> {ours[-1]:.4f}")
  assert len(ours) == len(theirs) == STEPS
  assert rel.max() <= LOSS_RTOL, f"{case}: per-step relative loss differences {rel}"
  diffs = parity.parameter_differences(result["params_jax"], result["params_torch"])
  worst = max(diffs, key=diffs.get)
  moved = parity.parameter_differences(result["params_jax"], params)
  clipped = int(np.sum(result["grad_norms"] > OPTIMIZER["grad_clip"]))
  print(f"{case}: max abs parameter difference {diffs[worst]:.2e} ({worst}); largest move {max(moved.values()):.3f}; "
        f"{clipped} of {STEPS} steps clipped")
  assert diffs[worst] <= PARAM_ATOL, {k: v for k, v in diffs.items() if v > PARAM_ATOL}
  # Every leaf was trained, and far enough for agreeing to mean something.
  assert all(v > 0 for v in moved.values()) and max(moved.values()) > 0.01, moved


@pytest.mark.parametrize("bias_correction", [True, False])
def test_optimizer_alone_matches_torch(bias_correction):
  """make_optimizer against torch.optim.AdamW (or AuthorsAdamW) + clip_grad_norm_ on one gradient sequence, no
  model: only the update rule, the decay groups, clipping and the learning rate are compared."""
  params = {"dense": {"kernel": np.full((8, 6), 0.5, np.float32), "bias": np.full(6, 0.5, np.float32)},
            "LayerNorm": {"scale": np.ones(6, np.float32), "bias": np.full(6, 0.5, np.float32)}}
  module = torch.nn.Module()
  module.dense, module.LayerNorm = torch.nn.Linear(8, 6), torch.nn.LayerNorm(6)
  torch_reference.load_params(module, params)
  named = dict(module.named_parameters())
  opt_config = parity.train_config(bias_correction=bias_correction, **OPTIMIZER)
  tx, schedule = optimizer_lib.make_optimizer(opt_config)
  update = jax.jit(tx.update)
  torch_opt = torch_reference.make_optimizer(module, params, opt_config)
  rng = np.random.default_rng(0)
  ours, state = params, tx.init(params)
  for step in range(STEPS):
    scale = 5.0 if step % 3 == 0 else 0.05  # Clipped (global norm ~ 5) and unclipped (~ 0.05) steps.
    grads = jax.tree_util.tree_map(lambda p: (scale * rng.standard_normal(p.shape) / 8).astype(np.float32), params)
    updates, state = update(grads, state, ours)
    ours = optax.apply_updates(ours, updates)
    for name, grad in convert.params_to_hf_state(grads).items():
      named[name].grad = torch.from_numpy(np.array(grad))
    torch_reference.set_lr(torch_opt, float(schedule(step)))
    torch.nn.utils.clip_grad_norm_(module.parameters(), opt_config.grad_clip)
    torch_opt.step()
  expected = convert.params_to_hf_state(jax.device_get(ours))
  diffs = {name: float(np.abs(p.detach().numpy() - expected[name]).max()) for name, p in named.items()}
  moved = {name: float(np.abs(value - convert.params_to_hf_state(params)[name]).max())
           for name, value in expected.items()}
  assert max(diffs.values()) <= 1e-6, diffs
  assert min(moved.values()) > 1e-3, moved


def test_decay_groups_follow_our_mask():
  """torch's decayed group is exactly decay_mask's True leaves: not biases, not LayerNorms (any of them)."""
  config = parity.for_kind(CONFIG, "emd")
  params = jax.device_get(heads.init_params(parity.build_model("emd", config), jax.random.PRNGKey(0)))
  model = torch_reference.load_params(torch_reference.build("emd", config), params)
  opt = torch_reference.make_optimizer(model, params, parity.train_config(weight_decay=0.01))
  decayed = {name for name, p in model.named_parameters()
             if any(p is q for q in opt.param_groups[0]["params"])}
  assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[1]["weight_decay"] == 0.0
  assert decayed and all("LayerNorm" not in n and not n.endswith("bias") for n in decayed)
  assert "deberta.embeddings.word_embeddings.weight" in decayed
  assert "deberta.embeddings.position_embeddings.weight" in decayed
  assert "deberta.encoder.rel_embeddings.weight" in decayed
  assert len(decayed) + len(opt.param_groups[1]["params"]) == len(list(model.parameters()))
