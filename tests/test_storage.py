"""debertax.storage: local paths and object-store URLs behave the same for everything the project does.

fsspec's in-memory filesystem (memory://) stands in for a bucket here: it has the object-store semantics
that matter (no append, directories implied by keys); tests/test_gcs.py runs the real GCS protocol.
"""

import os
import uuid

import pytest

from debertax import storage
from debertax.metric_writer import MetricWriter, read_jsonl


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "root")
  return f"memory://bucket-{uuid.uuid4().hex[:8]}/root"


def test_is_remote_and_absolute():
  assert storage.is_remote("gs://b/x") and storage.is_remote("memory://b") and storage.is_remote("s3://b/k")
  assert not storage.is_remote("/tmp/x") and not storage.is_remote("runs/x") and not storage.is_remote("file:///x")
  assert not storage.is_remote("a/b://c")  # A "://" inside a relative path is not a scheme.
  assert storage.absolute("gs://b/run") == "gs://b/run"  # os.path.abspath would make it "<cwd>/gs:/b/run".
  assert storage.absolute("runs/x") == os.path.join(os.getcwd(), "runs/x")


def test_files_directories_and_globs(root):
  storage.makedirs(root)
  storage.write_atomic(storage.join(root, "a.txt"), "alpha\n")
  storage.write_atomic(storage.join(root, "sub", "b.txt"), b"beta\n")
  storage.write_atomic(storage.join(root, "sub", "deeper", "c.txt"), "gamma\n")
  storage.write_atomic(storage.join(root, "sub", "d.bin"), b"\x00\x01")
  assert storage.read_text(storage.join(root, "a.txt")) == "alpha\n"
  assert storage.read_bytes(storage.join(root, "sub", "d.bin")) == b"\x00\x01"
  assert storage.getsize(storage.join(root, "sub", "b.txt")) == 5
  assert storage.isdir(storage.join(root, "sub")) and not storage.isfile(storage.join(root, "sub"))
  assert storage.isfile(storage.join(root, "a.txt")) and not storage.isdir(storage.join(root, "a.txt"))
  assert not storage.exists(storage.join(root, "missing.txt"))
  assert storage.listdir(root) == ["a.txt", "sub"]
  names = lambda matches: [m.rsplit("/root/", 1)[1] for m in matches]
  assert names(storage.glob(storage.join(root, "*"))) == ["a.txt"]  # The directory `sub` is not a file.
  assert names(storage.glob(storage.join(root, "**", "*.txt"))) == ["a.txt", "sub/b.txt", "sub/deeper/c.txt"]
  assert storage.glob(storage.join(root, "*.parquet")) == []
  for match in storage.glob(storage.join(root, "**", "*.txt")):
    assert storage.exists(match)  # Matches are usable paths (with their scheme), not bare keys.


def test_rename_copy_remove_rmtree(root):
  storage.write_atomic(storage.join(root, "dir", "x.txt"), "x")
  storage.write_atomic(storage.join(root, "dir", "inner", "y.txt"), "y")
  storage.rename(storage.join(root, "dir"), storage.join(root, "moved"))
  assert not storage.exists(storage.join(root, "dir", "x.txt"))
  assert storage.read_text(storage.join(root, "moved", "inner", "y.txt")) == "y"
  storage.copy_file(storage.join(root, "moved", "x.txt"), storage.join(root, "copy.txt"))
  assert storage.read_text(storage.join(root, "copy.txt")) == "x"
  storage.remove(storage.join(root, "copy.txt"))
  storage.remove(storage.join(root, "copy.txt"))  # Already gone: fine by default...
  with pytest.raises(FileNotFoundError):
    storage.remove(storage.join(root, "copy.txt"), missing_ok=False)  # ...an error when asked.
  storage.rmtree(storage.join(root, "moved"))
  storage.rmtree(storage.join(root, "moved"))
  assert not storage.exists(storage.join(root, "moved", "x.txt"))


def test_write_atomic_replaces_whole_files_and_leaves_no_temporaries(root):
  path = storage.join(root, "config.json")
  storage.makedirs(root)
  storage.write_atomic(path, "first version, longer")
  storage.write_atomic(path, "second")
  assert storage.read_text(path) == "second"
  assert storage.listdir(root) == ["config.json"]


def test_text_reading_handles_a_byte_order_mark(root):
  path = storage.join(root, "inputs.tsv")
  storage.write_atomic(path, "\ufeffindex\tsentence\n0\thello\n".encode("utf-8"))
  with storage.open_file(path, encoding="utf-8-sig") as handle:
    assert handle.read() == "index\tsentence\n0\thello\n"
  with storage.open_file(path, "rb") as handle:
    handle.seek(3 + len("index\t"))
    assert handle.read(8) == b"sentence"  # Byte ranges, as the corpus reader's host shards need.


def test_appending_file_on_an_object_store_uploads_what_it_kept():
  path = f"memory://bucket-{uuid.uuid4().hex[:8]}/metrics.jsonl"
  writer = storage.AppendingFile(path, flush_secs=3600)
  writer.write("one\n")
  writer.flush()  # Within flush_secs of the start: nothing uploaded yet.
  assert not storage.exists(path)
  writer.close()
  assert storage.read_text(path) == "one\n"
  eager = storage.AppendingFile(path, flush_secs=0)  # Reopening appends after what the object holds.
  eager.write("two\n")
  assert storage.read_text(path) == "one\ntwo\n"  # flush_secs=0: every write is uploaded.
  eager.close()
  with pytest.raises(ValueError, match="cannot be appended"):
    storage.open_file(path, "a")


def test_appending_file_on_disk_is_flushed_line_by_line(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  storage.write_atomic(path, "zero\n")
  writer = storage.AppendingFile(path)
  writer.write("one\n")
  assert storage.read_text(path) == "zero\none\n"  # Visible before close: a crash loses nothing.
  writer.close()


def test_metric_writer_in_a_bucket_writes_jsonl_and_tensorboard_events():
  workdir = f"memory://bucket-{uuid.uuid4().hex[:8]}/run"
  writer = MetricWriter(workdir)
  writer.write(10, {"loss": 2.5, "note": "warmup"}, console=False)
  writer.write(20, {"loss": 1.5}, prefix="eval", console=False)
  writer.close()
  records = read_jsonl(storage.join(workdir, "metrics.jsonl"))
  assert [(r["step"], r["split"], r["loss"]) for r in records] == [(10, "train", 2.5), (20, "eval", 1.5)]
  events = storage.glob(storage.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert len(events) == 1
  scalars = {}
  for event in _events(storage.read_bytes(events[0])):
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  assert scalars == {"train/loss": [(10, 2.5)], "eval/loss": [(20, 1.5)]}


def _events(data: bytes):
  """TFRecord framing: uint64 length, uint32 CRC, payload, uint32 CRC."""
  import struct

  from tensorboardX.proto import event_pb2
  offset = 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    event = event_pb2.Event()
    event.ParseFromString(data[offset + 12:offset + 12 + length])
    yield event
    offset += 12 + length + 4


class _RefusingFileSystem:
  """What gcsfs does on HTTP 403 (gcsfs/retry.py): every request raises OSError("Forbidden: <object>\\n<msg>").
  fsspec's own exists()/isdir() turn that into False; storage must not (an unreadable workdir is not empty)."""

  @staticmethod
  def install():
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class Refusing(MemoryFileSystem):
      protocol = "refusing"

      def _refuse(self, path, *args, **kwargs):
        raise OSError(f"Forbidden: {self._strip_protocol(path)}\nsa@project.iam.gserviceaccount.com does not have "
                      "storage.objects.get access to the Google Cloud Storage object.")

      info = ls = _open = rm = _refuse

    fsspec.register_implementation("refusing", Refusing, clobber=True)


def test_refused_requests_are_one_line_permission_errors_naming_the_url():
  _RefusingFileSystem.install()
  url = "refusing://bucket/run/config.json"
  for call in (storage.exists, storage.isdir, storage.isfile, storage.getsize, storage.read_text, storage.listdir,
               lambda p: storage.write_atomic(p, "{}"), storage.rmtree):
    with pytest.raises(PermissionError) as error:
      call(url)
    message = str(error.value)
    assert message.startswith(f"{url}: permission denied by the object store (Forbidden: ")
    assert "\n" not in message
  from debertax import pretrain
  from configs import tiny
  with pytest.raises(PermissionError, match=r"refusing://bucket/run/.*: permission denied"):
    pretrain.run(tiny.get_config(), "refusing://bucket/run")


def test_missing_objects_are_named_by_their_url(root):
  missing = storage.join(root, "nothing", "here.txt")
  for call in (storage.getsize, storage.read_text, storage.read_bytes):
    with pytest.raises(FileNotFoundError, match=f"{missing}"):
      call(missing)
  assert not storage.exists(missing) and not storage.isdir(missing) and not storage.isfile(missing)
