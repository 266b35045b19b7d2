"""A tiny RTD pretraining run on the embedded corpus: no download, about 5 minutes on 2 CPU cores.

The corpus is the docstrings of a fixed list of Python standard-library modules (debertax/corpus.py);
the run trains its own small SentencePiece vocabulary into the workdir first, and holds 1 document in 20
out of training for its evaluation.

The recipe is the paper's (configs/common.py) at a scale that learns in 800 CPU steps:
  * lr 1e-3 with a 10% warmup (the paper's 10k-step warmup is longer than this whole run);
  * sampling temperature 2 instead of 1. A generator this small reaches the unigram distribution of the
    masked tokens within ~60 steps and stays near it for hundreds; samples at T = 1 are then draws of the
    most frequent tokens, which a 4-layer discriminator cannot tell from the originals within this budget
    (held-out RTD AUC 0.53-0.60 through step 400 at T = 1; 0.64-0.74 at T = 1.5; 0.72-0.78 at T = 2). The
    temperature only changes what the discriminator sees: under GDES the generator's curve is the same at
    every temperature. The README's "Training that learns" has the measurements.
"""

from configs import common


def get_config():
  model = common.model_config(
      "tiny", vocab_size=-1,  # -1: the size of the vocabulary trained for this run.
      position_buckets=64, max_relative_positions=128, max_position_embeddings=128,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  config = common.pretrain_config(model, lr=1e-3, batch_size=16, steps=800, warmup_steps=80)
  config.data.source = "default"
  config.data.train_vocab_size = 2000
  config.data.seq_len = 128
  config.data.max_predictions = 20
  config.data.shuffle_buffer = 64
  config.data.holdout_every = 20  # ~5% of the embedded corpus's documents: enough for 4 eval batches.
  config.rtd.generator_layers = 2
  config.rtd.rtd_lambda = 10.0
  config.rtd.temperature = 2.0
  config.train.log_every = 20
  config.train.eval_every = 100
  config.train.checkpoint_every = 200
  config.train.keep_checkpoints = 2
  return config
