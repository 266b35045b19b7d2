"""Shared pieces of the ml-collections configs: model shapes and the RTD pretraining recipe.

Numbers come from the DeBERTaV3 paper and the authors' released configs/scripts
(shared/reference/deberta.md sections 6 and 7).
"""

import ml_collections

# Released DeBERTa-v3 settings shared by every size.
V3_MODEL = dict(
    vocab_size=128100, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    max_position_embeddings=512, type_vocab_size=0, layer_norm_eps=1e-7, relative_attention=True,
    max_relative_positions=-1, position_buckets=256, pos_att_type="p2c|c2p", share_att_key=True,
    norm_rel_ebd="layer_norm", position_biased_input=False, initializer_range=0.02, pooler_dropout=0.0,
    pooler_hidden_act="gelu", dtype="float32", attention_impl="xla", query_block_size=0, remat=False,
    flash_backend="auto", flash_block_q=0, flash_block_k=0, flash_backward="fused")

SIZES = {
    "xsmall": dict(num_hidden_layers=12, hidden_size=384, num_attention_heads=6, intermediate_size=1536),
    "small": dict(num_hidden_layers=6, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
    # Not released: the shape of configs/tiny.py (the README's main job).
    "tiny": dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=512),
}


def model_config(size: str, **overrides) -> ml_collections.ConfigDict:
  values = dict(V3_MODEL)
  values.update(SIZES[size])
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def pretrain_config(model: ml_collections.ConfigDict, *, lr: float, batch_size: int,
                    steps: int = 1_000_000, warmup_steps: int = 10_000) -> ml_collections.ConfigDict:
  """The RTD recipe around a discriminator `model` block (the generator is derived from it)."""
  c = ml_collections.ConfigDict()
  c.task = "pretrain"
  c.seed = 0
  c.model = model
  c.init_from = ""  # A converted Hugging Face / debertax directory holding the discriminator ...
  c.init_generator_from = ""  # ... and the generator (released as a separate checkpoint).

  # rtd: ELECTRA-style replaced token detection (the rtd block below). mlm: plain masked-LM pretraining of
  # one model of config.model's shape with the Enhanced Mask Decoder (DeBERTa's objective, the paper's
  # baseline for RTD); the rtd block then has no effect, and the export is export/mlm/.
  c.objective = "rtd"
  c.rtd = ml_collections.ConfigDict()
  c.rtd.embedding_sharing = "gdes"  # gdes | es | nes
  c.rtd.generator_layers = model.num_hidden_layers // 2  # Same width, half depth.
  c.rtd.generator_hidden_size = -1  # -1: same width as the discriminator.
  c.rtd.rtd_lambda = 50.0  # Paper (following ELECTRA); the authors' code defaults to 10.
  c.rtd.temperature = 1.0
  c.rtd.decoupled = True  # Separate optimizers for generator and discriminator, as in the authors' code.

  c.data = ml_collections.ConfigDict()
  # "default" (embedded corpus); text / Parquet / JSONL / CSV files or globs (local or gs://);
  # hf:<path>[@<revision>][:<config>][:<split>] (a Hugging Face dataset, streamed); tfds:<name>[:<split>].
  c.data.source = "hf:allenai/c4:en"
  c.data.vocab = ""  # Directory or path of spm.model; empty: train one (see data.train_vocab_size).
  c.data.train_vocab_size = 0  # >0: train a SentencePiece vocabulary of this size into the workdir.
  c.data.seq_len = 512
  c.data.mask_prob = 0.15
  c.data.max_predictions = 80
  c.data.shuffle_buffer = 10_000
  c.data.on_bad_line = "error"  # error | skip
  c.data.text_feature = "text"
  c.data.holdout_every = 1000  # 1 document in N (by text hash) is held out for evaluation; 0: none.

  c.train = ml_collections.ConfigDict()
  c.train.steps = steps
  c.train.batch_size = batch_size  # Global batch (sequences per step).
  c.train.lr = lr
  c.train.generator_lr = -1.0  # -1: same as lr.
  # Linear warmup to lr, then linear decay to 0 at train.steps: lr * (T - s) / (T - w), as Hugging Face's
  # linear schedule. The authors' code decays as lr * (1 - s / T), which differs by less than w / T (1% for
  # the paper's 10k of 1M steps) and jumps at the end of warmup; ours is continuous.
  c.train.warmup_steps = warmup_steps
  c.train.weight_decay = 0.01
  c.train.adam_b1 = 0.9
  c.train.adam_b2 = 0.999
  c.train.adam_eps = 1e-6
  # Bias-corrected Adam. The authors' Adam has none (False reproduces it): its step is c1 / sqrt(c2) times
  # Adam's, with c_i = 1 - b_i^t, i.e. 3.2x at step 1, 5.5x at step 30, 3.2x at 100, 1.3x at 1000. Under the
  # paper's 10k-step warmup that excess falls where the learning rate is still near zero and is gone (< 1e-4)
  # when warmup ends, so both rules train the paper recipe alike; in a short run (configs/tiny.py) the
  # uncorrected steps are large at full learning rate and the generator stays on the unigram plateau.
  c.train.bias_correction = True
  c.train.grad_clip = 1.0
  c.train.log_every = 100
  c.train.eval_every = 1000
  c.train.checkpoint_every = 2000
  c.train.keep_checkpoints = 3
  c.train.export_at_end = True
  c.train.max_steps_per_run = 0  # >0: stop (after saving) once this many steps ran in this invocation.
  c.train.microbatches = 1  # >1: accumulate gradients over this many slices of the batch inside the step.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all remaining devices.
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c
