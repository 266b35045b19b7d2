"""deberta-v3-xsmall: model shape of the released checkpoint and its RTD pretraining recipe."""

from configs import common


def get_config():
  return common.pretrain_config(common.model_config("xsmall"), lr=3e-4, batch_size=64)
