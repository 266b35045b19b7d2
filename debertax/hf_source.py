"""Hugging Face `datasets` streams as pretraining sources: Hub datasets and Parquet / JSON Lines / CSV files.

    config.data.source = "hf:allenai/c4:en"                     # hf:<path>[:<config>][:<split>], split "train"
    config.data.source = "hf:wikimedia/wikipedia:20231101.de:train"
    config.data.source = "hf:HuggingFaceFW/fineweb-2@v2.0.1::train"  # a pinned revision, no config, a split
    config.data.source = "/data/shards/*.parquet"               # .parquet, .jsonl/.json/.ndjson, .csv (also .gz,
    config.data.source = "gs://bucket/corpus/*.jsonl.gz"        # .zst, .bz2, .xz), one document per row

Everything is streamed (`load_dataset(..., streaming=True)`): nothing is downloaded or converted ahead of
the run. The text is the column `config.data.text_feature` ("text"); empty texts are skipped and a value that
is not a string is bad input (an error, or skipped and counted with `on_bad_line=skip`).

Sharding: host p of n reads `datasets.distributed.split_dataset_by_node(dataset, p, n)`: whole files when
the number of files divides by n, otherwise every n-th example of every file (each host then reads all the
bytes; give the corpus a multiple of the host count of files).

Resume: a document's position is the stream's `state_dict()` taken just before it, so reading from a saved
position yields that document first. Pin a Hub dataset's revision (`path@revision`) for runs that resume
across days: a new revision of the dataset changes what a position means.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

from debertax import storage
from debertax.sources import BadInputError, BadLine, Position, TextSource

if TYPE_CHECKING:
    from debertax.data import DataConfig

HF_PREFIX = "hf:"
_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv"}
_COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
_SPEC_FORMAT = "'hf:<path>[@<revision>][:<config>][:<split>]', e.g. 'hf:allenai/c4:en'"


def builder_for(path: str) -> str | None:
    """The `datasets` builder that reads files named like `path` (a file or a glob), or None (plain text)."""
    name = path.lower()
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return next((builder for ext, builder in _BUILDERS.items() if name.endswith(ext)), None)


def parse_hf_spec(spec: str) -> tuple[str, str | None, str | None, str]:
    """'hf:path[@revision][:config][:split]' -> (path, revision, config or None, split)."""
    parts = spec[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"data source {spec!r}: expected {_SPEC_FORMAT}")
    path, _, revision = parts[0].partition("@")
    name = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return path, revision or None, name, split


def open_hub_dataset(spec: str, config: DataConfig, process_index: int, process_count: int) -> HFDatasetSource:
    """`hf:` sources: a dataset on the Hugging Face Hub (or a local dataset directory), streamed."""
    import datasets

    path, revision, name, split = parse_hf_spec(spec)
    pinned = f", revision {revision}" if revision else ""
    what = f"the dataset {path!r} (config {name or '(default)'}, split {split!r}{pinned})"
    try:
        dataset = datasets.load_dataset(path, name, split=split, revision=revision, streaming=True)
    except (PermissionError, ConnectionError, ImportError):
        raise  # Credentials, network and missing packages say what they are.
    except Exception as error:  # noqa: BLE001 (datasets raises many types; all end the run the same way)
        message = str(error).splitlines()[0] if str(error) else ""
        raise FileNotFoundError(f"data source {spec!r}: cannot stream {what} ({type(error).__name__}: "
                                f"{message})") from error
    fingerprint = f"hf:{path}@{revision or 'default'}:{name}:{split}:{dataset.n_shards} shards"
    return HFDatasetSource(spec, dataset, config, process_index, process_count, fingerprint)


def open_data_files(spec: str, paths: list[str], builder: str, config: DataConfig, process_index: int,
                    process_count: int) -> HFDatasetSource:
    """Parquet / JSON Lines / CSV files (local or in a bucket) through `datasets`' own readers."""
    import datasets

    try:
        dataset = datasets.load_dataset(builder, data_files=paths, split="train", streaming=True)
    except (PermissionError, ConnectionError, ImportError):
        raise
    except Exception as error:  # noqa: BLE001
        message = str(error).splitlines()[0] if str(error) else ""
        raise BadInputError(f"data source {spec!r}: datasets' {builder} reader cannot open it "
                            f"({type(error).__name__}: {message})") from error
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path}\0{storage.getsize(path)}\0".encode())
    fingerprint = f"{builder}:{len(paths)}:{digest.hexdigest()[:16]}"
    return HFDatasetSource(spec, dataset, config, process_index, process_count, fingerprint)


class HFDatasetSource(TextSource):
    """A `datasets.IterableDataset` (not shuffled) as documents; position {"hf_state": its state_dict()}."""

    def __init__(self, name: str, dataset, config: DataConfig, process_index: int, process_count: int,
                 fingerprint: str):
        self._name = name
        self._n_shards = dataset.n_shards
        if process_count > 1:
            from datasets.distributed import split_dataset_by_node
            dataset = split_dataset_by_node(dataset, rank=process_index, world_size=process_count)
        self._dataset = dataset
        self._start = dataset.state_dict()
        self._feature = config.text_feature
        self._skip_bad = config.on_bad_line == "skip"
        self._process_index, self._process_count = process_index, process_count
        self._fingerprint = fingerprint

    @property
    def description(self) -> str:
        split = ("its own files" if self._n_shards % self._process_count == 0
                 else f"every {self._process_count}th example of every file")
        return (f"{self._name} ({self._n_shards} file(s); host {self._process_index} of {self._process_count} "
                f"reads {split})")

    def fingerprint(self) -> str:
        return self._fingerprint

    def read(self, position: Position | None, epoch: int) -> Iterator[tuple[Position, str | BadLine]]:
        dataset = copy.deepcopy(self._dataset)  # Each read has its own stream; the source keeps its start.
        start = position["hf_state"] if position else self._start
        dataset.load_state_dict(start)
        examples = iter(dataset)
        for count in range(1 << 62):
            # Before the first next() the stream has not applied the loaded state yet, and state_dict() would
            # answer with the state it was built with (the start of the stream): the first position is `start`.
            state = copy.deepcopy(start) if count == 0 else dataset.state_dict()
            try:
                example = next(examples)
            except StopIteration:
                return
            if self._feature not in example:
                raise KeyError(f"data source {self._name!r}: examples have no column {self._feature!r} (columns: "
                               f"{sorted(example)}); set config.data.text_feature")
            text = example[self._feature]
            here = {"hf_state": state}
            if isinstance(text, str):
                if text.strip():
                    yield here, text
                continue
            where = f"{self._name} example {count}"
            if self._process_count > 1:
                where += f" of host {self._process_index}'s shard"
            if position:
                where += " after the resume point"
            bad = BadLine(where, f"column {self._feature!r} holds {type(text).__name__}, not text "
                                 f"({json.dumps(text, default=str)[:80]})")
            if not self._skip_bad:
                raise BadInputError(bad.describe())
            yield here, bad
