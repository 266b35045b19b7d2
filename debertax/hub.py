"""Hugging Face Hub model ids wherever a model directory is expected.

    resolve_model_dir("microsoft/deberta-v3-base")       # a local snapshot directory, downloaded once
    resolve_model_dir("microsoft/deberta-v3-base@main")  # at a revision: a branch, a tag or a commit hash
    resolve_model_dir("/data/model"), ("gs://b/model")   # an existing directory or a bucket path: unchanged

`api.from_pretrained` (and through it `--config.init_from`, `python -m debertax.convert import` and the
inference CLI) resolves its argument here; `resolve_vocab` serves `config.data.vocab`, fetching only the
model's spm.model. The cache, the token and offline mode are huggingface_hub's own:
HF_HOME / HF_HUB_CACHE, HF_TOKEN (or `huggingface-cli login`), HF_HUB_OFFLINE=1. Only the files a model
directory needs are fetched (config, weights, SentencePiece model, tokenizer configs); when a repository has
safetensors weights, the pickled `pytorch_model.bin` is not downloaded.
"""

from __future__ import annotations

import contextlib
import os
import re

from debertax import storage

# org/name, or a bare name (old canonical models); an optional @revision.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<revision>[\w./-]+))?$")
_MODEL_FILES = ["*.json", "*.model", "*.safetensors", "*.bin"]


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
  """(repo id, revision or None) when `spec` is spelled like a Hub model id, else None."""
  match = _HUB_ID.match(spec)
  if not match or spec.startswith(".") or spec.endswith((".json", ".bin", ".safetensors", ".model")):
    return None
  return match["repo"], match["revision"]


def resolve_model_dir(spec: str) -> str:
  """A directory that holds the model `spec` names: `spec` itself when it is a bucket path or an existing
  local path (a directory, or a file the caller will reject with its own message), else the local snapshot
  of the Hub model `spec` (org/name[@revision]).

  Raises FileNotFoundError in one line when `spec` is neither: no such directory, no such Hub model or
  revision, a gated/private model without a token, or offline without a cached copy.
  """
  parsed = _hub_id_unless_local(spec, "no such directory (nor a Hugging Face Hub model id such as "
                                      "microsoft/deberta-v3-base)")
  if parsed is None:
    return spec
  import huggingface_hub
  repo_id, revision = parsed
  with _one_line_errors(spec, repo_id, revision):
    return huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=_MODEL_FILES,
                                             ignore_patterns=_ignored_weights(repo_id, revision))


def resolve_vocab(spec: str) -> str:
  """`spec` itself when it is a bucket path or an existing local path (an spm.model or a directory holding
  one), else the `spm.model` of the Hub model `spec` (org/name[@revision]), fetched alone (not the weights)."""
  parsed = _hub_id_unless_local(spec, "no such file or directory (nor a Hugging Face Hub model id such as "
                                      "microsoft/mdeberta-v3-base, whose spm.model would be used)")
  if parsed is None:
    return spec
  import huggingface_hub
  repo_id, revision = parsed
  with _one_line_errors(spec, repo_id, revision):
    return huggingface_hub.hf_hub_download(repo_id, "spm.model", revision=revision)


def _hub_id_unless_local(spec: str, missing: str) -> tuple[str, str | None] | None:
  """None for a bucket path or an existing local path (used as it is), else (repo id, revision); a spec
  that is neither raises FileNotFoundError("<spec>: <missing>")."""
  if storage.is_remote(spec) or os.path.exists(spec):
    return None
  parsed = parse_hub_id(spec)
  if parsed is None:
    raise FileNotFoundError(f"{spec}: {missing}")
  return parsed


@contextlib.contextmanager
def _one_line_errors(spec: str, repo_id: str, revision: str | None):
  """huggingface_hub's exceptions (multi-line, with request ids) -> one-line FileNotFoundErrors naming `spec`."""
  from huggingface_hub import constants, errors

  prefix = f"{spec}: no such local directory, and"
  where = f"revision {revision!r}" if revision else "its default branch"
  try:
    yield
  except errors.GatedRepoError:
    raise FileNotFoundError(f"{prefix} the Hugging Face Hub model {repo_id!r} is gated: accept its terms on the "
                            "Hub and set HF_TOKEN") from None
  except errors.RepositoryNotFoundError:
    raise FileNotFoundError(f"{prefix} the Hugging Face Hub has no model {repo_id!r} (a private one needs "
                            "HF_TOKEN)") from None
  except errors.RevisionNotFoundError:
    raise FileNotFoundError(f"{prefix} the Hugging Face Hub model {repo_id!r} has no {where}") from None
  except errors.LocalEntryNotFoundError:
    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
    raise FileNotFoundError(f"{prefix} {offline} and the cache ({constants.HF_HUB_CACHE}) has no copy of "
                            f"the Hub model {repo_id!r} at {where}") from None
  except errors.EntryNotFoundError:
    raise FileNotFoundError(f"{prefix} the Hugging Face Hub model {repo_id!r} at {where} lacks a file this "
                            "needs (spm.model?)") from None
  except errors.HfHubHTTPError as error:
    raise FileNotFoundError(f"{prefix} the Hugging Face Hub answered for {repo_id!r}: "
                            f"{str(error).splitlines()[0]}") from None


def _ignored_weights(repo_id: str, revision: str | None) -> list[str]:
  """["pytorch_model.bin"] when the repository also has safetensors weights (one copy of the weights is
  enough), else nothing. Online, the Hub's file list decides; offline (or when the list cannot be had), the
  cached snapshot does, so that an offline run asks for exactly the files an online one downloaded."""
  import huggingface_hub
  from huggingface_hub import constants
  files = None
  if not constants.HF_HUB_OFFLINE:
    try:
      files = huggingface_hub.list_repo_files(repo_id, revision=revision)
    except Exception:  # noqa: BLE001 (snapshot_download meets the same condition and says what it is)
      files = None
  if files is None:
    files = _cached_files(repo_id, revision)
  return ["pytorch_model.bin"] if "model.safetensors" in files else []


def _cached_files(repo_id: str, revision: str | None) -> list[str]:
  """The file names of the cached snapshot of `repo_id` at `revision` (a branch, tag or commit), if any."""
  from huggingface_hub import constants
  from huggingface_hub.file_download import repo_folder_name
  folder = os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type="model"))
  ref = os.path.join(folder, "refs", revision or "main")
  commit = open(ref).read().strip() if os.path.isfile(ref) else revision or ""
  snapshot = os.path.join(folder, "snapshots", commit)
  return os.listdir(snapshot) if commit and os.path.isdir(snapshot) else []
