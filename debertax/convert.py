"""Hugging Face / Microsoft PyTorch checkpoints <-> debertax parameters.

    python -m debertax.convert import HF_DIR OUT_DIR [--head auto|none|mlm|rtd|cls] [--emd]
    python -m debertax.convert export CKPT_DIR OUT_DIR

HF_DIR and CKPT_DIR may be local or gs:// directories, or Hugging Face Hub model ids (org/name[@revision],
fetched into huggingface_hub's cache: see debertax/hub.py).

A Hugging Face directory holds config.json, model.safetensors or pytorch_model.bin (torch is needed only
for .bin; also pytorch_model.generator.bin for released generators via --weights) and optionally
spm.model. Every tensor our model expects must be present with the right shape, and every tensor in the
file must be used or be on a short list of known-unused names; anything else is an error that lists the
names. Nothing is ever silently initialised at random.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from typing import Any

import numpy as np
from flax import traverse_util

from debertax import heads as heads_lib
from debertax import storage
from debertax.config import ModelConfig

SAFETENSORS = "model.safetensors"
TORCH_BIN = "pytorch_model.bin"
# Our own metadata inside an exported config.json; transformers keeps unknown keys and ignores them.
META_KEY = "debertax"
_HEAD_PREFIXES = {"mlm": ("lm_predictions.", "cls.predictions."), "rtd": ("mask_predictions.",),
                  "cls": ("pooler.", "classifier.")}


class CheckpointError(ValueError):
  """A checkpoint that does not match the model: missing, unexpected or wrongly shaped tensors."""


# ---------------------------------------------------------------------------------------------------
# Reading files


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors (no torch needed) or a torch .bin into float32/int NumPy arrays."""
  if not storage.exists(path):
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  try:
    if path.endswith(".safetensors"):
      from safetensors import numpy as safetensors_numpy
      # Local files are memory-mapped; an object is read whole.
      tensors = (safetensors_numpy.load(storage.read_bytes(path)) if storage.is_remote(path)
                 else safetensors_numpy.load_file(path))
    else:
      try:
        import torch
      except ImportError as e:
        raise ImportError(f"{path}: reading a .bin checkpoint needs torch (pip install torch==2.13.0); "
                          f"safetensors files need no torch") from e
      raw = torch.load(io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path,
                       map_location="cpu", weights_only=True)
      if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
      tensors = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in raw.items()}
  except (FileNotFoundError, ImportError):
    raise
  except Exception as e:  # Each library raises its own error type for a damaged file.
    raise CheckpointError(f"{path}: cannot read the checkpoint (truncated or corrupt?): "
                          f"{type(e).__name__}: {e}") from e
  return {k: np.asarray(v, dtype=np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating) else np.asarray(v)
          for k, v in tensors.items()}


def find_weights_file(directory: str) -> str:
  for name in (SAFETENSORS, TORCH_BIN):
    path = storage.join(directory, name)
    if storage.exists(path):
      return path
  raise FileNotFoundError(f"{directory}: no {SAFETENSORS} or {TORCH_BIN} found")


def read_hf_config(directory: str) -> tuple[ModelConfig, dict[str, Any]]:
  path = storage.join(directory, "config.json")
  if not storage.exists(path):
    raise FileNotFoundError(f"{path}: missing (a Hugging Face checkpoint directory needs config.json)")
  try:
    raw = json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
  meta = raw.pop(META_KEY, {}) or {}
  return ModelConfig.from_hf_dict(raw, source=path), meta


def detect_head(keys) -> str:
  keys = list(keys)
  for head, prefixes in _HEAD_PREFIXES.items():
    if any(k.startswith(prefixes) for k in keys):
      return head
  return "none"


# ---------------------------------------------------------------------------------------------------
# Name mapping


def _hf_name(path: tuple[str, ...]) -> str:
  """Our parameter path -> Hugging Face state-dict key."""
  parts = []
  for part in path:
    match = re.fullmatch(r"layer_(\d+)", part)
    parts.extend(["layer", match.group(1)] if match else [part])
  leaf = parts[-1]
  if leaf in ("kernel", "embedding", "scale"):
    parts[-1] = "weight"
  return ".".join(parts)


def _to_ours(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return value
  if value.ndim == 3:  # Conv1d weight [out, in/groups, k] -> Flax [k, in/groups, out].
    return np.transpose(value, (2, 1, 0))
  return value.T  # Linear weight [out, in] -> Flax kernel [in, out].


def _to_hf(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return value
  return np.transpose(value, (2, 1, 0)) if value.ndim == 3 else value.T


def _normalise_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Adds the `deberta.` prefix to bare backbone keys and renames the legacy HF MLM head."""
  has_prefix = any(k.startswith("deberta.") for k in state)
  out = {}
  for key, value in state.items():
    if not has_prefix and key.startswith(("embeddings.", "encoder.")):
      key = "deberta." + key
    if key.startswith("cls.predictions."):  # transformers' legacy=True head, same maths.
      key = (key.replace("cls.predictions.transform.", "lm_predictions.lm_head.")
             .replace("cls.predictions.bias", "lm_predictions.lm_head.bias"))
    out[key] = value
  return out


def _known_unused(key: str) -> bool:
  return (key.endswith("embeddings.word_embeddings._weight")  # mdeberta: GDES delta; .weight = E_G + delta.
          or key.endswith("embeddings.position_ids")
          or key.startswith("cls.predictions.decoder.")  # Tied to the word embeddings.
          or key.startswith("lm_predictions.lm_head.decoder."))


def hf_state_to_params(state: dict[str, np.ndarray], config: ModelConfig, head: str = "none",
                       use_emd: bool = False, source: str = "checkpoint",
                       allow_unused_heads: bool = False) -> dict:
  """Maps a Hugging Face state dict onto our parameter tree for `build_model(config, head, use_emd)`.

  The unused `position_embeddings` (v3 discriminators) are dropped. Head tensors of another head are
  dropped when `allow_unused_heads` (loading a backbone out of a task checkpoint); otherwise an error.
  """
  state = _normalise_keys(state)
  model = heads_lib.build_model(config, head, use_emd)
  expected = traverse_util.flatten_dict(_unbox(heads_lib.abstract_params(model)))
  params, missing, bad_shape, used = {}, [], [], set()
  for path, leaf in expected.items():
    key = _hf_name(path)
    if key not in state:
      missing.append(key)
      continue
    value = _to_ours(path, state[key])
    used.add(key)
    if tuple(value.shape) != tuple(leaf.shape):
      bad_shape.append(f"{key}: checkpoint {tuple(state[key].shape)} vs model "
                       f"{tuple(_to_hf(path, np.zeros(leaf.shape, np.int8)).shape)}")
      continue
    params[path] = value.astype(leaf.dtype)
  unexpected = []
  for key in sorted(set(state) - used):
    if _known_unused(key) or key == "deberta.embeddings.position_embeddings.weight":
      continue
    if allow_unused_heads and not key.startswith("deberta."):
      continue
    unexpected.append(key)
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected)}")
  if bad_shape:
    problems.append(f"wrongly shaped {len(bad_shape)} tensor(s): {'; '.join(bad_shape)}")
  if problems:
    raise CheckpointError(f"{source} does not match the model (head={head}, use_emd={use_emd}): "
                          + " | ".join(problems))
  return traverse_util.unflatten_dict(params)


def params_to_hf_state(params: dict) -> dict[str, np.ndarray]:
  """Our parameter tree -> Hugging Face state dict (float32 NumPy, contiguous)."""
  flat = traverse_util.flatten_dict(_unbox(params))
  return {_hf_name(path): np.ascontiguousarray(_to_hf(path, np.asarray(value, dtype=np.float32)))
          for path, value in flat.items()}


def _unbox(tree):
  from flax import linen as nn
  return nn.unbox(tree)


_ARCHITECTURES = {"none": "DebertaV2Model", "mlm": "DebertaV2ForMaskedLM", "rtd": "DebertaV2Model",
                  "cls": "DebertaV2ForSequenceClassification"}


def write_hf_directory(params: dict, config: ModelConfig, out_dir: str, head: str = "none",
                       use_emd: bool = False, spm_model: str | None = None,
                       extra_config: dict | None = None) -> str:
  """Writes config.json + model.safetensors (+ spm.model) that transformers loads."""
  from safetensors.numpy import save
  if head == "mlm" and config.embed_dim != config.hidden_size:
    raise ValueError("transformers' DebertaV2ForMaskedLM (legacy=False) requires embedding_size == "
                     "hidden_size; this MLM head cannot be exported to Hugging Face")
  storage.makedirs(out_dir)
  hf_config = config.to_hf_dict()
  hf_config["architectures"] = [_ARCHITECTURES[head]]
  hf_config[META_KEY] = {"head": head, "use_emd": bool(use_emd)}
  if extra_config:
    hf_config.update(extra_config)
  # Atomic writes: never a half-written weights file, and config.json (what loaders look for) comes last.
  storage.write_atomic(storage.join(out_dir, SAFETENSORS), save(params_to_hf_state(params), metadata={"format": "pt"}))
  storage.write_atomic(storage.join(out_dir, "config.json"), json.dumps(hf_config, indent=2, sort_keys=True))
  if spm_model:
    storage.copy_file(spm_model, storage.join(out_dir, "spm.model"))
  return out_dir


def load_hf_directory(directory: str, head: str | None = None, use_emd: bool | None = None,
                      weights_file: str | None = None):
  """-> (config, params, head, use_emd) from a Hugging Face directory. head=None detects it from the keys."""
  config, meta = read_hf_config(directory)
  path = storage.join(directory, weights_file) if weights_file else find_weights_file(directory)
  state = read_state_dict(path)
  detected = detect_head(state)
  if head in (None, "auto"):
    head = meta.get("head", detected)
  if use_emd is None:
    use_emd = bool(meta.get("use_emd", False))
  if head != "mlm":
    use_emd = False
  params = hf_state_to_params(state, config, head, use_emd, source=path,
                              allow_unused_heads=(head != detected))
  return config, params, head, use_emd


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m debertax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="Hugging Face directory -> debertax (Orbax) checkpoint directory")
  imp.add_argument("hf_dir", help="a Hugging Face directory (local or gs://), or a Hub model id such as "
                   "microsoft/deberta-v3-base[@revision]")
  imp.add_argument("out_dir")
  imp.add_argument("--head", default="auto", choices=["auto", *heads_lib.HEADS])
  imp.add_argument("--emd", action="store_true", help="MLM with the Enhanced Mask Decoder (RTD generators)")
  imp.add_argument("--weights", default=None, help="weights file name inside hf_dir, e.g. "
                   "pytorch_model.generator.bin (default: model.safetensors, then pytorch_model.bin)")
  exp = sub.add_parser("export", help="debertax checkpoint (or HF) directory -> Hugging Face directory")
  exp.add_argument("ckpt_dir")
  exp.add_argument("out_dir")
  args = parser.parse_args(argv)

  from debertax import api
  try:
    if args.command == "import":
      model = api.from_pretrained(args.hf_dir, head=None if args.head == "auto" else args.head,
                                  use_emd=True if args.emd else None, weights_file=args.weights)
      api.save_pretrained(model, args.out_dir, format="orbax")
    else:
      model = api.from_pretrained(args.ckpt_dir)
      api.save_pretrained(model, args.out_dir, format="hf")
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  n = sum(np.size(x) for x in traverse_util.flatten_dict(model.params).values())
  print(f"{args.command}: {args.out_dir} (head={model.head}, use_emd={model.use_emd}, {n:,} parameters)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
