"""mdeberta-v3-base (the headline): 250k multilingual vocabulary, base shape, CC100-style data."""

from configs import common


def get_config():
  config = common.pretrain_config(common.model_config("base", vocab_size=251000), lr=1e-4, batch_size=256)
  config.data.source = "tfds:c4/multilingual"
  return config
