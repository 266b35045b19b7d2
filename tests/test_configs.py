"""Released shapes: exact parameter counts (counted with jax.eval_shape, nothing allocated)."""

import importlib

import jax
import numpy as np
import pytest
from flax import linen as nn

from debertax import heads
from debertax.config import ModelConfig

# deberta.md section 6: backbone + embeddings, no heads, no absolute positions.
EXPECTED = {"deberta_v3_xsmall": 70_682_112, "deberta_v3_small": 141_304_320, "deberta_v3_base": 183_831_552,
            "deberta_v3_large": 434_012_160, "mdeberta_base": 278_218_752}
GENERATOR_LAYERS = {"deberta_v3_xsmall": 6, "deberta_v3_small": 3, "deberta_v3_base": 6, "deberta_v3_large": 12,
                    "mdeberta_base": 6}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_count(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  model = heads.build_model(ModelConfig.from_dict(config.model), "none")
  shapes = heads.abstract_params(model)
  leaves = jax.tree_util.tree_leaves(nn.unbox(shapes))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert sum(int(np.prod(x.shape)) for x in leaves) == EXPECTED[name]
  assert config.rtd.generator_layers == GENERATOR_LAYERS[name]


def test_unknown_model_key_is_named():
  with pytest.raises(ValueError, match="unknown model config key.*hiden_size"):
    ModelConfig.from_dict({"hiden_size": 3})


def test_bad_values_are_named():
  with pytest.raises(ValueError, match="pos_att_type"):
    ModelConfig(pos_att_type="c2p|x2y")
  with pytest.raises(ValueError, match="hidden_size=100 is not a multiple"):
    ModelConfig(hidden_size=100, num_attention_heads=12)
