"""debertax: DeBERTa-v2/v3 in JAX/Flax, from RTD pretraining to GLUE/XNLI."""

from debertax.api import PretrainedDeberta, from_pretrained, save_pretrained
from debertax.config import ModelConfig

__all__ = ["ModelConfig", "PretrainedDeberta", "from_pretrained", "save_pretrained"]
