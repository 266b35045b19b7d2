"""The public Python API: `from_pretrained`, `save_pretrained` and the `PretrainedDeberta` object.

    model = debertax.from_pretrained("path/to/hf_or_debertax_dir")
    hidden = model.encode(input_ids, attention_mask)          # np.ndarray [B, L, D]
    hidden = model.encode(["some text", "more text"])        # tokenises with spm.model
    logits = model.mlm_logits(...) / model.rtd_logits(...) / model.classify(...)
    predictor = model.predictor()   # bucketed batch inference on texts: classify, fill_mask, rtd_scores, embed
    debertax.save_pretrained(model, "out_dir", format="hf" | "orbax")
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from debertax import checkpoint, compile_options, convert, hub, storage
from debertax import heads as heads_lib
from debertax.config import ModelConfig


@dataclasses.dataclass
class PretrainedDeberta:
  config: ModelConfig
  params: Any
  head: str = "none"
  use_emd: bool = False
  tokenizer: Any = None
  spm_path: str | None = None

  # Inputs -------------------------------------------------------------------------------------------
  def tokenize(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, max_length: int | None = None):
    if self.tokenizer is None:
      raise ValueError("text input needs a tokenizer, but this checkpoint has no spm.model; "
                       "pass input_ids instead or add spm.model to the directory")
    return self.tokenizer(list(texts), list(text_pairs) if text_pairs is not None else None,
                          max_length=max_length, truncation=max_length is not None, padding="longest")

  def _inputs(self, input_ids, attention_mask, token_type_ids):
    if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids
                                      and isinstance(input_ids[0], str)):
      batch = self.tokenize([input_ids] if isinstance(input_ids, str) else input_ids)
      input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    input_ids = np.asarray(input_ids, dtype=np.int32)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length]; got shape {input_ids.shape}")
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
      raise ValueError(f"input_ids out of range [0, {self.config.vocab_size}): "
                       f"min {input_ids.min()}, max {input_ids.max()}")
    attention_mask = (np.ones_like(input_ids) if attention_mask is None
                      else np.asarray(attention_mask, dtype=np.int32))
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    if token_type_ids is not None:
      token_type_ids = np.asarray(token_type_ids, dtype=np.int32)
    return input_ids, attention_mask, token_type_ids

  def _require(self, head: str, method: str):
    if self.head != head:
      raise ValueError(f"{method} needs a checkpoint with the {head!r} head; this one has head={self.head!r}")

  # Outputs ------------------------------------------------------------------------------------------
  def encode(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
    """Last hidden states [B, L, D] (of the encoder; for an EMD generator, before the decoder)."""
    ids, mask, types = self._inputs(input_ids, attention_mask, token_type_ids)
    return np.asarray(_apply(self.config, "none", False)({"deberta": self.params["deberta"]}, ids, mask, types))

  def mlm_logits(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
    """[B, L, V] float32."""
    self._require("mlm", "mlm_logits")
    ids, mask, types = self._inputs(input_ids, attention_mask, token_type_ids)
    return np.asarray(_apply(self.config, "mlm", self.use_emd)(self.params, ids, mask, types))

  def rtd_logits(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
    """[B, L] float32: > 0 means 'replaced'."""
    self._require("rtd", "rtd_logits")
    ids, mask, types = self._inputs(input_ids, attention_mask, token_type_ids)
    return np.asarray(_apply(self.config, "rtd", False)(self.params, ids, mask, types))

  def classify(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
    """[B, num_labels] float32 logits (num_labels == 1: a regression score)."""
    self._require("cls", "classify")
    ids, mask, types = self._inputs(input_ids, attention_mask, token_type_ids)
    return np.asarray(_apply(self.config, "cls", False)(self.params, ids, mask, types))

  def predictor(self, max_length: int = 512, batch_size: int = 32, min_length: int = 16):
    """A `debertax.inference.Predictor`: texts in, padded to a few bucket lengths so nothing recompiles per batch."""
    from debertax.inference import Predictor
    return Predictor(self, max_length=max_length, batch_size=batch_size, min_length=min_length)


@functools.lru_cache(maxsize=32)
def _apply(config: ModelConfig, head: str, use_emd: bool):
  model = heads_lib.build_model(config, head, use_emd)

  @compile_options.jit
  def run(params, ids, mask, types):
    return model.apply({"params": params}, ids, mask, types, deterministic=True)

  return run


def from_pretrained(path: str, head: str | None = None, use_emd: bool | None = None,
                    weights_file: str | None = None, dtype: str | None = None) -> PretrainedDeberta:
  """Loads a Hugging Face / Microsoft directory or a debertax (Orbax) model directory.

  path: a local or bucket (gs://...) directory, or a Hugging Face Hub model id ("microsoft/deberta-v3-base",
  "org/name@revision"), downloaded into huggingface_hub's cache on first use (`debertax.hub`).
  head: None keeps the checkpoint's head; 'none' loads just the backbone from any checkpoint.
  dtype: optional compute dtype ('bfloat16'); parameters stay float32.
  """
  path = hub.resolve_model_dir(path)
  if not storage.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory (expected a Hugging Face or debertax model directory)")
  if checkpoint.is_model_dir(path):
    config, params, stored_head, stored_emd = checkpoint.load_model_dir(path)
    if head not in (None, "auto", stored_head):
      if head != "none":
        raise ValueError(f"{path} holds head={stored_head!r}; cannot load it as head={head!r}")
      params = {"deberta": params["deberta"]}
    else:
      head = stored_head
    use_emd = stored_emd if use_emd is None else use_emd
  else:
    config, params, head, use_emd = convert.load_hf_directory(path, head, use_emd, weights_file)
  if dtype:
    config = config.replace(dtype=dtype)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  spm = storage.join(path, "spm.model")
  tokenizer = None
  if storage.exists(spm):
    from debertax.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(spm)
  return PretrainedDeberta(config, params, head, bool(use_emd and head == "mlm"), tokenizer,
                           spm if tokenizer is not None else None)


def save_pretrained(model: PretrainedDeberta, path: str, format: str = "orbax") -> str:
  """format='hf' writes config.json + model.safetensors (+ spm.model); 'orbax' a debertax directory."""
  params = jax.device_get(model.params)
  if format == "hf":
    return convert.write_hf_directory(params, model.config, path, model.head, model.use_emd, model.spm_path)
  if format == "orbax":
    return checkpoint.save_model_dir(path, params, model.config, model.head, model.use_emd, model.spm_path)
  raise ValueError(f"format must be 'hf' or 'orbax', got {format!r}")
