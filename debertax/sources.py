"""Where pretraining text comes from: a corpus seen as documents, each host reading its own shard from a
resumable position (`TextSource`). `debertax.data.open_source` picks one for `config.data.source`.

  IndexedTextSource   random-access records: the embedded corpus, a TFDS split (`tfds.data_source`);
  TextFileSource      UTF-8 text files, one document per line, in per-host byte ranges with bounded reads;
  HFDatasetSource     Hugging Face `datasets` streams: hub datasets, local Parquet / JSON Lines / CSV
                      (debertax/hf_source.py).

Positions are small JSON-serialisable dicts saved with the checkpoint; reading from a yielded position
yields that document first, which makes resume exact.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import io
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from debertax import storage

if TYPE_CHECKING:
    from debertax.data import DataConfig

TFDS_PREFIX = "tfds:"
_FILE_ORDER_STREAM = 0x4649  # Domain separator of the file-order stream (see debertax.data's streams).
_GLOB_CHARACTERS = frozenset("*?[")
_NEWLINE_COUNT_BLOCK = 1 << 20


Position = dict[str, Any]  # JSON-serialisable place of a document in a source


class BadInputError(ValueError):
    """A line or record of the corpus cannot be used as text."""


def line_number_at(path: str, byte_offset: int) -> int:
    """1-based number of the line of `path` holding byte `byte_offset` (read in bounded blocks)."""
    newlines = 0
    with storage.open_file(path, "rb") as stream:
        remaining = byte_offset
        while remaining > 0:
            block = stream.read(min(_NEWLINE_COUNT_BLOCK, remaining))
            if not block:
                break
            newlines += block.count(b"\n")
            remaining -= len(block)
    return newlines + 1


@dataclasses.dataclass(frozen=True)
class BadLine:
    """A line (file) or record (TFDS) that is not text, yielded in place of it when skipping."""

    where: str  # a file path, or "tfds:NAME:SPLIT record N"
    reason: str
    byte_offset: int | None = None  # in the file at `where`

    def describe(self) -> str:
        """"where:line: reason"; the line number is counted only here, so skipping stays cheap."""
        if self.byte_offset is None:
            return f"{self.where}: {self.reason}"
        return f"{self.where}:{line_number_at(self.where, self.byte_offset)}: {self.reason}"


def shard_range(total: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, end) of the `process_index`-th of `process_count` near-equal contiguous shards."""
    return total * process_index // process_count, total * (process_index + 1) // process_count


class TextSource(abc.ABC):
    """A corpus seen as documents, of which this host reads its shard from a resumable position."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Human-readable name for messages (spec and shard)."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Short digest of what positions refer to (file names and sizes, record counts)."""

    @abc.abstractmethod
    def read(self, position: Position | None, epoch: int) -> Iterator[tuple[Position, str | BadLine]]:
        """Yield (position, text) of this shard's documents from `position` (None: the first) to the
        end of the shard in epoch `epoch`. Reading from a yielded position yields that document
        first. A bad line raises BadInputError, or is yielded as a BadLine when skipping."""


class IndexedTextSource(TextSource):
    """Random-access records (the embedded corpus, a TFDS split); position {"record": i}."""

    def __init__(
        self,
        name: str,
        num_records: int,
        get_records: Callable[[Sequence[int]], list[str | bytes]],
        process_index: int,
        process_count: int,
        skip_bad_records: bool,
        read_batch: int = 64,
    ):
        self._name = name
        self._num_records = num_records
        self._get_records = get_records
        self._start, self._end = shard_range(num_records, process_index, process_count)
        self._shard = f"shard {process_index}/{process_count}"
        self._skip_bad_records = skip_bad_records
        self._read_batch = read_batch

    @property
    def description(self) -> str:
        return f"{self._name} (records {self._start}..{self._end} of {self._num_records}, {self._shard})"

    def fingerprint(self) -> str:
        return f"{self._name}:{self._num_records}"

    def read(self, position, epoch):
        first = self._start if position is None else int(position["record"])
        for batch_start in range(first, self._end, self._read_batch):
            indices = range(batch_start, min(batch_start + self._read_batch, self._end))
            for index, record in zip(indices, self._get_records(list(indices))):
                if isinstance(record, bytes):
                    try:
                        record = record.decode("utf-8")
                    except UnicodeDecodeError as error:
                        record = BadLine(f"{self._name} record {index}",
                                         f"not valid UTF-8 ({error.reason} at byte {error.start})")
                        if not self._skip_bad_records:
                            raise BadInputError(record.describe()) from None
                yield {"record": index}, record


class TextFileSource(TextSource):
    """UTF-8 text files, one document per line, read in per-host byte ranges.

    Position {"file": k, "offset": byte, "in_line": bool}: `k` indexes the epoch's file order,
    `offset` is where the document starts, `in_line` says it continues a line cut at
    `max_line_bytes`. {"file": k, "offset": None} is the start of file k's byte range.
    """

    def __init__(
        self,
        spec: str,
        paths: list[str],
        process_index: int,
        process_count: int,
        seed: int,
        max_line_bytes: int,
        skip_bad_lines: bool,
    ):
        self._spec = spec
        self._paths = paths
        self._sizes = [storage.getsize(path) for path in paths]
        self._process_index = process_index
        self._process_count = process_count
        self._seed = seed
        self._max_line_bytes = max_line_bytes
        self._skip_bad_lines = skip_bad_lines

    @property
    def description(self) -> str:
        return (f"{self._spec} ({len(self._paths)} file(s), "
                f"shard {self._process_index}/{self._process_count})")

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path, size in zip(self._paths, self._sizes):
            digest.update(f"{path}\0{size}\0".encode())
        return f"files:{len(self._paths)}:{digest.hexdigest()[:16]}"

    def file_order(self, epoch: int) -> list[int]:
        """Indices into the sorted file list, in the order epoch `epoch` reads them."""
        rng = np.random.default_rng([self._seed, _FILE_ORDER_STREAM, epoch])
        return [int(i) for i in rng.permutation(len(self._paths))]

    def read(self, position, epoch):
        order = self.file_order(epoch)
        position = position or {"file": 0, "offset": None}
        for order_index in range(int(position["file"]), len(order)):
            resume = position if order_index == int(position["file"]) else {"offset": None}
            yield from self._read_file(order_index, order[order_index], resume)

    def _read_file(self, order_index: int, file_index: int, resume: Position):
        path = self._paths[file_index]
        range_start, range_end = shard_range(self._sizes[file_index], self._process_index,
                                             self._process_count)
        with storage.open_file(path, "rb") as stream:
            if resume.get("offset") is None:
                offset, in_line = self._first_line_start(stream, range_start), False
            else:
                offset, in_line = int(resume["offset"]), bool(resume.get("in_line", False))
            stream.seek(offset)
            while True:
                # A line belongs to the host whose byte range holds its first byte; the chunks
                # of a cut line follow it wherever they lie.
                if not in_line and offset >= range_end:
                    return
                chunk = stream.readline(self._max_line_bytes)
                if not chunk:
                    return
                chunk_offset = offset
                ends_line = chunk.endswith(b"\n")
                if not ends_line and len(chunk) == self._max_line_bytes:
                    chunk = chunk[: self._chunk_cut(chunk)]
                    stream.seek(chunk_offset + len(chunk))
                offset = chunk_offset + len(chunk)
                position = {"file": order_index, "offset": chunk_offset, "in_line": in_line}
                # Without a newline this chunk was cut (or ended the file, and reading stops).
                in_line = not ends_line
                text = self._decode(path, chunk, chunk_offset)
                if isinstance(text, BadLine) or text.strip():
                    yield position, text

    @staticmethod
    def _chunk_cut(chunk: bytes) -> int:
        """Where to cut a full read buffer inside a line: after its last space, else before the
        last UTF-8 character that may be incomplete."""
        space = chunk.rfind(b" ")
        if space > 0:
            return space + 1
        cut = len(chunk) - 1
        # Continuation bytes are 0b10xxxxxx; a character is at most 4 bytes long.
        while cut > len(chunk) - 4 and chunk[cut] & 0xC0 == 0x80:
            cut -= 1
        return cut

    @staticmethod
    def _first_line_start(stream: io.BufferedReader, range_start: int) -> int:
        """Offset of the first line whose first byte is at or after `range_start`."""
        if range_start == 0:
            return 0
        stream.seek(range_start - 1)
        while True:  # bounded reads: the line in progress may be huge
            piece = stream.readline(_NEWLINE_COUNT_BLOCK)
            if not piece or piece.endswith(b"\n"):
                return stream.tell()

    def _decode(self, path: str, chunk: bytes, chunk_offset: int) -> str | BadLine:
        if b"\0" in chunk:
            bad = BadLine(path, "contains NUL bytes (binary file?)", chunk_offset)
        else:
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError as error:
                bad = BadLine(path, f"not valid UTF-8 ({error.reason} at byte "
                                    f"{chunk_offset + error.start})", chunk_offset)
            else:
                if chunk_offset == 0 and text.startswith("\ufeff"):
                    text = text[1:]
                return text.rstrip("\r\n")
        if not self._skip_bad_lines:
            raise BadInputError(bad.describe())
        return bad


@functools.lru_cache(maxsize=1)
def default_corpus() -> tuple[str, ...]:
    from debertax.corpus import default_corpus_lines

    return tuple(default_corpus_lines())


def expand_paths(spec: str) -> list[str]:
    if _GLOB_CHARACTERS & set(spec):
        files = storage.glob(spec)
        if not files:
            raise FileNotFoundError(f"data source glob {spec!r} matched no files")
        return files
    if storage.isdir(spec):
        raise IsADirectoryError(
            f"data source {spec!r} is a directory; give a file or a glob such as {spec.rstrip('/')}/*.txt"
        )
    if not storage.isfile(spec):
        raise FileNotFoundError(
            f"data source {spec!r} is not a file (expected 'default', a text, Parquet, JSON Lines or CSV "
            f"file, a glob, 'tfds:NAME[:SPLIT]' or 'hf:PATH[:CONFIG][:SPLIT]')"
        )
    return [spec]


def open_tfds(spec: str, config: DataConfig, process_index: int, process_count: int) -> TextSource:
    name, _, split = spec[len(TFDS_PREFIX):].partition(":")
    split = split or "train"
    if not name:
        raise ValueError(f"data source {spec!r}: expected 'tfds:NAME[:SPLIT]', e.g. 'tfds:c4/en'")
    import tensorflow_datasets as tfds

    try:
        records = tfds.data_source(name, split=split, data_dir=config.tfds_data_dir, download=False)
    except Exception as error:
        raise FileNotFoundError(
            f"data source {spec!r}: cannot open TFDS dataset {name!r} split {split!r} in data_dir "
            f"{config.tfds_data_dir or '(TFDS default)'}; prepare it in array_record format first "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error
    feature = config.text_feature
    if len(records):
        first = records[0]
        if feature not in first:
            raise KeyError(
                f"data source {spec!r}: records have no feature {feature!r} (features: "
                f"{sorted(first)}); set text_feature"
            )

    def get_records(indices: Sequence[int]) -> list[str | bytes]:
        return [record[feature] for record in records.__getitems__(indices)]

    return IndexedTextSource(
        f"tfds:{name}:{split}", len(records), get_records, process_index, process_count,
        skip_bad_records=config.on_bad_line == "skip",
    )
