"""deberta-v3-base: model shape of the released checkpoint and its RTD pretraining recipe."""

from configs import common


def get_config():
  return common.pretrain_config(common.model_config("base"), lr=1e-4, batch_size=256)
