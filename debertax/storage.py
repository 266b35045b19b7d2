"""The one path abstraction: every file the project reads or writes goes through these functions.

A path is a string: a local path, or a URL of an object store that fsspec knows (`gs://bucket/dir/...` on
TPU VMs, through gcsfs; `memory://` in tests). Local paths behave exactly as with `open`/`os`; URLs are
served by fsspec (gcsfs for gs://), the filesystem layer under etils.epath, which Orbax and TFDS use for the
same URLs, so a workdir, a corpus or an export can live in a bucket.

Object stores differ from a disk in three ways that callers should not have to care about:
  * an object becomes visible only once its upload completes, so a plain write is already atomic there,
    while a rename is a copy and a delete: `write_atomic` writes a temporary file and renames it on disk,
    and uploads directly to a URL;
  * an object cannot be appended to: `AppendingFile` keeps what it wrote and re-uploads the whole object
    when it flushes (at most every `flush_secs`, and on close);
  * there are no directories: `makedirs` is a no-op there and a "directory" exists once something is in it.

A test or a user who runs against a GCS emulator sets STORAGE_EMULATOR_HOST (gcsfs and tensorstore both
read it); see tests/gcs_emulator.py.
"""

from __future__ import annotations

import contextlib
import functools
import glob as glob_lib
import io
import os
import shutil
import time
from typing import IO

# gcsfs (2026.x) first probes every bucket over gRPC to detect zonal/HNS buckets; against an emulator or a
# plain regional bucket that only costs time, so it is off unless the user turned it on.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

_READ_BUFFER_BYTES = 1 << 20


def is_remote(path: str) -> bool:
  """True for a URL with a scheme other than file:// (gs://, s3://, memory://, ...)."""
  scheme, sep, _ = str(path).partition("://")
  return bool(sep) and scheme != "file" and "/" not in scheme


def join(*parts: str) -> str:
  return os.path.join(*[str(p) for p in parts])


def absolute(path: str) -> str:
  """An absolute local path; URLs are returned unchanged (os.path.abspath would turn gs:// into gs:/)."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def dirname(path: str) -> str:
  return os.path.dirname(str(path).rstrip("/"))


def _fs(path: str):
  import fsspec  # Only URLs need it; local paths never import it.
  return fsspec.core.url_to_fs(str(path))


@contextlib.contextmanager
def _named(url: str):
  """A refused request becomes a one-line PermissionError naming the URL (gcsfs raises a two-line
  OSError("Forbidden: <object>\n<message>") for HTTP 403); a missing object, a FileNotFoundError naming it."""
  try:
    yield
  except PermissionError as error:
    if str(error).startswith(url):  # Already named by a nested call.
      raise
    raise PermissionError(f"{url}: permission denied ({_first_line(error)}); check that the credentials in use "
                          "may read and write it") from None
  except FileNotFoundError as error:
    if url in str(error):
      raise
    raise FileNotFoundError(f"{url}: no such object") from None
  except OSError as error:
    if not str(error).startswith("Forbidden"):
      raise
    raise PermissionError(f"{url}: permission denied by the object store ({_first_line(error)}); check that "
                          "the credentials in use may read and write it") from None


def _first_line(error: BaseException) -> str:
  return (str(error).splitlines() or [type(error).__name__])[0]


def _remote_errors(function):
  """Applies `_named` to the remote calls of a function whose first argument is the path."""
  @functools.wraps(function)
  def wrapper(path, *args, **kwargs):
    if not is_remote(path):
      return function(path, *args, **kwargs)
    with _named(str(path)):
      return function(path, *args, **kwargs)
  return wrapper


def _info(path: str) -> dict | None:
  """fsspec's info() of a URL, None when nothing is there. Not fs.exists/isdir/isfile: those answer False
  for any error, a refused request included, which would make an unreadable workdir look empty."""
  fs, key = _fs(path)
  try:
    return fs.info(key)
  except FileNotFoundError:
    return None


@_remote_errors
def exists(path: str) -> bool:
  if not is_remote(path):
    return os.path.exists(path)
  return _info(path) is not None


@_remote_errors
def isdir(path: str) -> bool:
  if not is_remote(path):
    return os.path.isdir(path)
  info = _info(path)
  return info is not None and info.get("type") == "directory"


@_remote_errors
def isfile(path: str) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)
  info = _info(path)
  return info is not None and info.get("type") == "file"


@_remote_errors
def getsize(path: str) -> int:
  if not is_remote(path):
    return os.path.getsize(path)
  fs, key = _fs(path)
  return int(fs.size(key))


def makedirs(path: str) -> None:
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


@_remote_errors
def open_file(path: str, mode: str = "r", encoding: str | None = None) -> IO:
  """`open` for local paths and URLs. Text is UTF-8 unless `encoding` says otherwise (local only)."""
  if not is_remote(path):
    return open(path, mode, encoding=encoding if "b" not in mode else None)
  if encoding not in (None, "utf-8", "utf8", "utf-8-sig"):
    raise ValueError(f"{path}: only UTF-8 text is supported on object stores, not {encoding}")
  if "a" in mode:
    raise ValueError(f"{path}: objects cannot be appended to; use storage.AppendingFile")
  fs, key = _fs(path)
  binary_mode = mode if "b" in mode else mode + "b"
  handle = fs.open(key, binary_mode)
  if "r" in binary_mode:
    # The standard buffered reader gives fsspec's files what readers expect of open(): readline(size).
    handle = io.BufferedReader(handle, buffer_size=_READ_BUFFER_BYTES)
  if "b" in mode:
    return handle
  return io.TextIOWrapper(handle, encoding=encoding or "utf-8", newline=None if "r" in mode else "")


@_remote_errors
def read_bytes(path: str) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


@_remote_errors
def read_text(path: str) -> str:
  with open_file(path, "r", encoding="utf-8") as f:
    return f.read()


@_remote_errors
def write_atomic(path: str, data: str | bytes) -> None:
  """Writes the whole file so that a reader never sees half of it, even if the writer is killed; creates the
  missing parent directories."""
  mode = "wb" if isinstance(data, bytes) else "w"
  if is_remote(path):
    with open_file(path, mode) as f:
      f.write(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # As an object store needs no folders.
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, mode, encoding=None if isinstance(data, bytes) else "utf-8") as f:
    f.write(data)
  os.replace(tmp, path)


def copy_file(src: str, dst: str) -> None:
  if not is_remote(src) and not is_remote(dst):
    shutil.copyfile(src, dst)
  else:
    write_atomic(dst, read_bytes(src))


@_remote_errors
def remove(path: str, missing_ok: bool = True) -> None:
  if not is_remote(path):
    try:
      os.remove(path)
    except FileNotFoundError:
      if not missing_ok:
        raise
    return
  fs, key = _fs(path)
  if _info(path) is not None or not missing_ok:
    fs.rm(key)


@_remote_errors
def rmtree(path: str) -> None:
  """Deletes a directory and everything under it; nothing happens if it does not exist."""
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  fs, key = _fs(path)
  if _info(path) is not None:
    fs.rm(key, recursive=True)


def rename(src: str, dst: str) -> None:
  """Moves a file or directory; `dst` must not exist. Atomic on disk, a copy and a delete on object stores."""
  if not is_remote(src) and not is_remote(dst):
    os.rename(src, dst)
    return
  fs, src_key = _fs(src)
  _, dst_key = _fs(dst)
  fs.mv(src_key, dst_key, recursive=isdir(src))


@_remote_errors
def listdir(path: str) -> list[str]:
  """Names (not paths) in a directory, sorted."""
  if not is_remote(path):
    return sorted(os.listdir(path))
  fs, key = _fs(path)
  return sorted(os.path.basename(name.rstrip("/")) for name in fs.ls(key, detail=False))


@_remote_errors
def glob(pattern: str) -> list[str]:
  """Sorted files matching a shell pattern (`**` crosses directories); directories are left out."""
  if not is_remote(pattern):
    return sorted(p for p in glob_lib.glob(pattern, recursive=True) if os.path.isfile(p))
  fs, key = _fs(pattern)
  found = fs.glob(key, detail=True)
  return sorted(fs.unstrip_protocol(name) for name, info in found.items() if info.get("type") == "file")


class AppendingFile:
  """A text or binary file opened for appending, on disk or in an object store.

  On disk it is a plain `open(path, "a")`. An object cannot be appended to, so for a URL everything
  written (after what the object already held) is kept in memory and the whole object is re-uploaded by
  `flush()` when `flush_secs` have passed since the last upload, and always by `close()`: a killed
  process loses at most the last `flush_secs` of records there.
  """

  def __init__(self, path: str, binary: bool = False, flush_secs: float = 10.0):
    self.path, self.binary, self.flush_secs = path, binary, flush_secs
    self._local = None
    self._buffer = None
    if not is_remote(path):
      self._local = open(path, "ab" if binary else "a", buffering=0 if binary else 1,
                         encoding=None if binary else "utf-8")
      return
    self._buffer = io.BytesIO()
    if exists(path):
      self._buffer.write(read_bytes(path))
    self._uploaded_at = time.monotonic()
    self._dirty = False

  def write(self, data) -> None:
    if self._local is not None:
      self._local.write(data)
      return
    self._buffer.write(data if self.binary else data.encode("utf-8"))
    self._dirty = True
    self.flush()

  def flush(self) -> None:
    if self._local is not None:
      self._local.flush()
    elif self._dirty and time.monotonic() - self._uploaded_at >= self.flush_secs:
      self._upload()

  def _upload(self) -> None:
    write_atomic(self.path, self._buffer.getvalue())
    self._uploaded_at = time.monotonic()
    self._dirty = False

  def close(self) -> None:
    if self._local is not None:
      self._local.close()
      self._local = None
    elif self._buffer is not None:
      if self._dirty:
        self._upload()
      self._buffer = None
