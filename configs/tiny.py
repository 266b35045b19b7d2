"""A tiny RTD pretraining run on the embedded corpus: no download, a few minutes on 2 CPU cores.

The corpus is the docstrings of a fixed list of Python standard-library modules (debertax/corpus.py);
the run trains its own small SentencePiece vocabulary into the workdir first.
"""

from configs import common


def get_config():
  model = common.model_config(
      "xsmall", num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=512,
      vocab_size=-1,  # -1: the size of the vocabulary trained for this run.
      position_buckets=64, max_relative_positions=128, max_position_embeddings=128,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  config = common.pretrain_config(model, lr=1e-3, batch_size=16, steps=300, warmup_steps=30)
  config.data.source = "default"
  config.data.train_vocab_size = 2000
  config.data.seq_len = 128
  config.data.max_predictions = 20
  config.data.shuffle_buffer = 64
  config.rtd.generator_layers = 2
  config.rtd.rtd_lambda = 10.0
  config.train.log_every = 20
  config.train.eval_every = 100
  config.train.checkpoint_every = 100
  config.train.keep_checkpoints = 2
  return config
