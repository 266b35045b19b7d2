"""Model configuration: every knob of the released DeBERTa-v2/v3 `config.json` files.

`ModelConfig` is a frozen dataclass so that Flax modules can hold it as a static attribute. It is built
from an ml-collections `config.model` block (`ModelConfig.from_dict`) or from a Hugging Face
`config.json` (`ModelConfig.from_hf_dict`), and written back with `to_hf_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Mapping

# Keys of a Hugging Face DeBERTa-v2 config.json that have no effect on the numbers we compute.
_HF_KEYS_WITHOUT_EFFECT = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "output_hidden_states",
    "output_attentions", "return_dict", "bos_token_id", "eos_token_id", "legacy", "tie_word_embeddings",
    "id2label", "label2id", "problem_type", "initializer_range", "finetuning_task", "_name_or_path",
    "pooler_hidden_size", "z_steps", "use_cache", "chunk_size_feed_forward", "is_encoder_decoder",
    "tokenizer_class", "attention_head_size", "summary_type", "summary_use_proj", "summary_activation",
    "summary_last_dropout", "summary_proj_to_labels", "max_length", "task_specific_params",
})

# Our runtime fields that are not part of a checkpoint's architecture (HF's "dtype" means something else).
RUNTIME_FIELDS = frozenset({"dtype", "param_dtype", "attention_impl", "query_block_size", "remat",
                            "flash_backend", "flash_block_q", "flash_block_k", "flash_backward"})

ACTIVATIONS = ("gelu", "gelu_new", "gelu_python", "gelu_fast", "relu", "tanh", "silu", "swish", "sigmoid")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """DeBERTa-v2/v3 architecture. Defaults are deberta-v3-base; field names follow Hugging Face."""

  vocab_size: int = 128100
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 0
  layer_norm_eps: float = 1e-7
  relative_attention: bool = True
  max_relative_positions: int = -1
  position_buckets: int = 256
  pos_att_type: tuple[str, ...] = ("p2c", "c2p")
  share_att_key: bool = True
  norm_rel_ebd: str = "layer_norm"
  position_biased_input: bool = False
  embedding_size: int | None = None  # None means hidden_size.
  conv_kernel_size: int = 0
  conv_groups: int = 1
  conv_act: str = "tanh"
  pooler_hidden_act: str = "gelu"
  pooler_dropout: float = 0.0
  cls_dropout: float | None = None  # None means hidden_dropout_prob, as in Hugging Face.
  num_labels: int = 2
  pad_token_id: int = 0
  initializer_range: float = 0.02
  # Runtime choices that do not change the parameters.
  dtype: str = "float32"  # Compute dtype; parameters stay float32. Scores and softmax are always float32.
  param_dtype: str = "float32"
  attention_impl: str = "xla"  # "xla" or "flash" (the Pallas kernel).
  query_block_size: int = 0  # >0: the XLA path processes queries in blocks of this size (long sequences).
  remat: bool = False  # Rematerialise each encoder layer in the backward pass.
  flash_backend: str = "auto"  # auto | tpu | gpu | interpret | tpu_interpret (the Pallas kernel's target).
  flash_block_q: int = 0  # Flash kernel tile sizes; 0 = the backend's default (TPU 128, GPU 64).
  flash_block_k: int = 0
  flash_backward: str = "fused"  # fused (Pallas kernels) | blocked (XLA recompute): the flash path's backward.

  def __post_init__(self):
    if isinstance(self.pos_att_type, str):
      object.__setattr__(self, "pos_att_type", parse_pos_att_type(self.pos_att_type))
    else:
      object.__setattr__(self, "pos_att_type", tuple(self.pos_att_type or ()))
    bad = [t for t in self.pos_att_type if t not in ("c2p", "p2c")]
    if bad:
      raise ValueError(f"model.pos_att_type: unknown position term(s) {bad}; allowed: c2p, p2c")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"model.hidden_size={self.hidden_size} is not a multiple of "
                       f"model.num_attention_heads={self.num_attention_heads}")
    for key in ("hidden_act", "conv_act", "pooler_hidden_act"):
      if getattr(self, key) not in ACTIVATIONS:
        raise ValueError(f"model.{key}={getattr(self, key)!r} is not one of {ACTIVATIONS}")
    if self.attention_impl not in ("xla", "flash"):
      raise ValueError(f"model.attention_impl={self.attention_impl!r}: use 'xla' or 'flash'")
    if self.flash_backward not in ("fused", "blocked"):
      raise ValueError(f"model.flash_backward={self.flash_backward!r}: use fused or blocked")
    if self.flash_backend not in ("auto", "tpu", "gpu", "interpret", "tpu_interpret"):
      raise ValueError(f"model.flash_backend={self.flash_backend!r}: use auto, tpu, gpu, interpret or tpu_interpret")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"model.dtype={self.dtype!r}: use float32, bfloat16 or float16")
    if self.norm_rel_ebd not in ("none", "layer_norm"):
      raise ValueError(f"model.norm_rel_ebd={self.norm_rel_ebd!r}: use 'none' or 'layer_norm'")

  # Derived sizes ---------------------------------------------------------------------------------
  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def embed_dim(self) -> int:
    return self.embedding_size or self.hidden_size

  @property
  def max_relative_span(self) -> int:
    """Relative distance at which log bucketing saturates (max_relative_positions, -1 -> 512)."""
    return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

  @property
  def position_table_half(self) -> int:
    """k: the relative table has 2k rows (position_buckets if bucketing, else the span)."""
    return self.position_buckets if self.position_buckets > 0 else self.max_relative_span

  @property
  def classifier_dropout(self) -> float:
    return self.hidden_dropout_prob if self.cls_dropout is None else self.cls_dropout

  # Conversions -----------------------------------------------------------------------------------
  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
    """Builds from a plain dict / ConfigDict; unknown keys are an error naming the key."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"unknown model config key(s) {unknown}; known keys: {sorted(names)}")
    return cls(**dict(values))

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
    """Reads a Hugging Face DeBERTa-v2 config.json dict (defaults as in DebertaV2Config)."""
    model_type = hf.get("model_type", "deberta-v2")
    if model_type not in ("deberta-v2", "deberta_v2"):
      raise ValueError(f"{source}: model_type {model_type!r} is not deberta-v2")
    names = {f.name for f in dataclasses.fields(cls)} - RUNTIME_FIELDS
    unknown = sorted(k for k in hf if k not in names and k not in _HF_KEYS_WITHOUT_EFFECT)
    if unknown:  # transformers keeps such keys too; say so rather than fail on a fine-tuned config.json.
      logging.warning("%s: ignoring key(s) that do not describe the DeBERTa architecture: %s", source, unknown)
    # DebertaV2Config's own defaults (the v2-xlarge shape) apply to keys the file leaves out.
    values = dict(vocab_size=128100, hidden_size=1536, num_hidden_layers=24, num_attention_heads=24,
                  intermediate_size=6144, relative_attention=False, position_buckets=-1,
                  pos_att_type=(), share_att_key=False, norm_rel_ebd="none", position_biased_input=True,
                  pooler_dropout=0.0)
    values.update({k: v for k, v in hf.items() if k in names})
    if hf.get("id2label") and "num_labels" not in hf:
      values["num_labels"] = len(hf["id2label"])
    if values.get("embedding_size") == values["hidden_size"]:
      values["embedding_size"] = None
    if values.get("pos_att_type") is None:
      values["pos_att_type"] = ()
    if values.get("norm_rel_ebd") is not None:
      parts = [p.strip() for p in str(values["norm_rel_ebd"]).lower().split("|")]
      values["norm_rel_ebd"] = "layer_norm" if "layer_norm" in parts else "none"
    return cls(**values)

  def to_hf_dict(self) -> dict[str, Any]:
    """A config.json dict that transformers' DebertaV2Config reads back to this architecture."""
    out = {
        "model_type": "deberta-v2",
        "architectures": ["DebertaV2Model"],
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "intermediate_size": self.intermediate_size,
        "hidden_act": self.hidden_act,
        "hidden_dropout_prob": self.hidden_dropout_prob,
        "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
        "max_position_embeddings": self.max_position_embeddings,
        "type_vocab_size": self.type_vocab_size,
        "layer_norm_eps": self.layer_norm_eps,
        "relative_attention": self.relative_attention,
        "max_relative_positions": self.max_relative_positions,
        "position_buckets": self.position_buckets,
        "pos_att_type": "|".join(self.pos_att_type),
        "share_att_key": self.share_att_key,
        "norm_rel_ebd": self.norm_rel_ebd,
        "position_biased_input": self.position_biased_input,
        "pooler_hidden_act": self.pooler_hidden_act,
        "pooler_dropout": self.pooler_dropout,
        "pooler_hidden_size": self.hidden_size,
        "num_labels": self.num_labels,
        "pad_token_id": self.pad_token_id,
        "initializer_range": self.initializer_range,
        "legacy": False,
    }
    if self.embedding_size is not None:
      out["embedding_size"] = self.embedding_size
    if self.conv_kernel_size > 0:
      out.update(conv_kernel_size=self.conv_kernel_size, conv_groups=self.conv_groups, conv_act=self.conv_act)
    if self.cls_dropout is not None:
      out["cls_dropout"] = self.cls_dropout
    return out

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def parse_pos_att_type(value: str) -> tuple[str, ...]:
  """'p2c|c2p' -> ('p2c', 'c2p'); also accepts comma separators and 'none'."""
  parts = [p.strip().lower() for p in value.replace(",", "|").split("|")]
  return tuple(p for p in parts if p and p != "none")
