"""GLUE and XNLI task definitions, readers and fine-tuning defaults.

Every task is described by one frozen `TaskSpec` in `TASKS`. Two readers turn data into the same
`Example` records:

* `read_tsv` / `read_glue_split` / `read_xnli_split` read the original GLUE TSV files and the
  per-language XNLI TSVs;
* `read_tfds` reads `glue/<task>`, `multi_nli` or `xnli` through `tfds.data_source`, and
  `examples_from_tfds_records` does the record-to-example mapping (separate so it can be tested on
  hand-made records without the TFDS catalog).

Label ids. For every task the label id is the position of the label in `TaskSpec.label_names`.
GLUE's binary tasks use the TFDS/GLUE order (CoLA unacceptable/acceptable, SST-2 negative/positive,
MRPC not_equivalent/equivalent, QQP not_duplicate/duplicate, QNLI and RTE entailment/not_entailment),
so the TSV strings "0"/"1" are the ids themselves. MNLI and XNLI use the DeBERTa authors' order
(contradiction=0, neutral=1, entailment=2) so that the authors' fine-tuned MNLI heads load unchanged;
TFDS stores the same labels as (entailment=0, neutral=1, contradiction=2). Nothing is ever mapped by
position across those two orders: TSV labels are looked up by their string, TFDS labels by the
ClassLabel name, and `read_tfds` checks that the ClassLabel names of the prepared dataset are the ones
this module assumes. XNLI shares MNLI's label order, so an MNLI-trained head evaluates XNLI zero-shot.

TSV parsing rules (all tasks):

* Rows are split on tab characters only. No CSV quoting is applied: GLUE texts contain unbalanced
  quote characters, and a quoting parser would merge rows.
* A UTF-8 byte-order mark at the start of a file (MRPC has one) is removed, as are CR before LF.
* Columns are found by header name where a header exists. A first line is taken as a header exactly
  when it contains every text column name of the task. CoLA train/dev and the XNLI files have no
  header; for them the columns are `TaskSpec.implicit_columns`. A task that always has a header
  raises `ValueError` when the first line is not one.
* A file whose header lacks the label column is an unlabelled test file: every label is None.
* Surrounding whitespace of the text fields is stripped (SST-2 sentences end with a space).
* A malformed row (wrong column count, unknown label, empty text, non-integer index, undecodable
  bytes) raises `ValueError("<file>:<line>: <problem>")` when `on_bad_row="error"` (the default);
  with `on_bad_row="skip"` it is left out, counted in `ReadResult.num_bad_rows`, its message is kept
  in `ReadResult.bad_rows`, and one warning with the count is logged.
"""

from __future__ import annotations

import codecs
import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from debertax import storage

logger = logging.getLogger(__name__)

BadRowPolicy = Literal["error", "skip"]

GLUE_TASK_NAMES: tuple[str, ...] = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")

# The column order of the XNLI results table in the DeBERTaV3 paper.
XNLI_LANGUAGES: tuple[str, ...] = (
    "en",
    "fr",
    "es",
    "de",
    "el",
    "bg",
    "ru",
    "tr",
    "ar",
    "vi",
    "th",
    "zh",
    "hi",
    "sw",
    "ur",
)

# The DeBERTa authors' MNLI order; also used for XNLI (see the module docstring).
NLI_LABELS: tuple[str, ...] = ("contradiction", "neutral", "entailment")
# The ClassLabel order of TFDS `glue/mnli`, `multi_nli` and `xnli`.
TFDS_NLI_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")

# Spellings found in published XNLI copies, mapped after lower-casing. Numeric labels are not
# accepted on purpose: "0" means entailment in some copies and contradiction in others.
XNLI_LABEL_ALIASES: Mapping[str, str] = {
    "contradict": "contradiction",
    "contradictory": "contradiction",
    "entail": "entailment",
    "entails": "entailment",
}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything the pipeline needs to know about one task.

    Split names are ours: "train", "dev", "test" ("dev_matched", "dev_mismatched", "test_matched",
    "test_mismatched" for MNLI). `tfds_splits` maps them to the TFDS split names.
    """

    name: str
    display_name: str
    # None for the regression task STS-B.
    label_names: tuple[str, ...] | None
    # The label strings of the TSV files, aligned with label_names; also what the GLUE submission
    # server expects in the prediction column.
    tsv_labels: tuple[str, ...] | None
    # TSV column names holding text_a (and text_b for pair tasks).
    text_fields: tuple[str, ...]
    label_field: str
    # Column with the example index used in GLUE submissions (test files; absent in some train/dev).
    index_field: str
    # Column names for files without a header line; None when the task's files always have one.
    implicit_columns: tuple[str, ...] | None
    metric_names: tuple[str, ...]
    # Model selection / early stopping metric; also the task's number in the paper's GLUE table.
    main_metric: str
    tfds_name: str
    tfds_text_features: tuple[str, ...]
    # ClassLabel names of the TFDS dataset, in TFDS id order.
    tfds_label_names: tuple[str, ...] | None
    # Folder of the task under the GLUE root (GLUE's own folder names).
    data_dir_name: str
    split_files: tuple[tuple[str, str], ...]
    tfds_splits: tuple[tuple[str, str], ...]
    eval_splits: tuple[str, ...]
    # Test split -> GLUE submission file name (rows `index<TAB>prediction`).
    submission_files: tuple[tuple[str, str], ...]
    # "label_string": the prediction column holds tsv_labels[id]; "float": a score.
    submission_label_format: Literal["label_string", "float"]
    # Allowed range of regression targets.
    label_range: tuple[float, float] | None = None
    # Lower-case labels and apply these aliases before the lookup (XNLI only).
    label_aliases: Mapping[str, str] | None = None

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(split for split, _ in self.split_files)

    def file_name(self, split: str, language: str | None = None) -> str:
        """Local file of `split`, relative to the task folder (XNLI: the XNLI root, per language)."""
        name = _lookup(self.split_files, split, f"split of task {self.name!r}")
        if "{language}" in name:
            if language is None:
                raise ValueError(f"task {self.name!r} needs a language for split {split!r}")
            _check_language(language)
            return name.format(language=language)
        if language is not None:
            raise ValueError(f"task {self.name!r} has no per-language files, got language={language!r}")
        return name

    def tfds_split(self, split: str) -> str:
        return _lookup(self.tfds_splits, split, f"TFDS split of task {self.name!r}")

    def submission_file(self, split: str) -> str:
        return _lookup(self.submission_files, split, f"submission split of task {self.name!r}")

    def label_id(self, label_name: str) -> int:
        """Id of a label given by its name in `label_names` (not a TSV string)."""
        if self.label_names is None:
            raise ValueError(f"task {self.name!r} is a regression task and has no label ids")
        if label_name not in self.label_names:
            raise ValueError(
                f"unknown label {label_name!r} for task {self.name!r}; expected one of {self.label_names}"
            )
        return self.label_names.index(label_name)


def _lookup(pairs: tuple[tuple[str, str], ...], key: str, what: str) -> str:
    for candidate, value in pairs:
        if candidate == key:
            return value
    raise ValueError(f"unknown {what}: {key!r}; expected one of {tuple(k for k, _ in pairs)}")


def _check_language(language: str) -> None:
    if language not in XNLI_LANGUAGES:
        raise ValueError(f"unknown XNLI language {language!r}; expected one of {XNLI_LANGUAGES}")


_PLAIN_SPLITS = (("train", "train.tsv"), ("dev", "dev.tsv"), ("test", "test.tsv"))
_PLAIN_TFDS_SPLITS = (("train", "train"), ("dev", "validation"), ("test", "test"))
_BINARY_TSV_LABELS = ("0", "1")


def _glue_task(**fields: Any) -> TaskSpec:
    defaults: dict[str, Any] = dict(
        index_field="index",
        implicit_columns=None,
        split_files=_PLAIN_SPLITS,
        tfds_splits=_PLAIN_TFDS_SPLITS,
        eval_splits=("dev",),
        submission_files=(("test", fields["display_name"] + ".tsv"),),
        submission_label_format="label_string",
    )
    defaults.update(fields)
    return TaskSpec(**defaults)


TASKS: dict[str, TaskSpec] = {
    "cola": _glue_task(
        name="cola",
        display_name="CoLA",
        label_names=("unacceptable", "acceptable"),
        tsv_labels=_BINARY_TSV_LABELS,
        text_fields=("sentence",),
        label_field="label",
        # train/dev have no header; test.tsv has the header `index sentence`.
        implicit_columns=("source", "label", "original_label", "sentence"),
        metric_names=("mcc",),
        main_metric="mcc",
        tfds_name="glue/cola",
        tfds_text_features=("sentence",),
        tfds_label_names=("unacceptable", "acceptable"),
        data_dir_name="CoLA",
    ),
    "sst2": _glue_task(
        name="sst2",
        display_name="SST-2",
        label_names=("negative", "positive"),
        tsv_labels=_BINARY_TSV_LABELS,
        text_fields=("sentence",),
        label_field="label",
        metric_names=("accuracy",),
        main_metric="accuracy",
        tfds_name="glue/sst2",
        tfds_text_features=("sentence",),
        tfds_label_names=("negative", "positive"),
        data_dir_name="SST-2",
    ),
    "mrpc": _glue_task(
        name="mrpc",
        display_name="MRPC",
        label_names=("not_equivalent", "equivalent"),
        tsv_labels=_BINARY_TSV_LABELS,
        text_fields=("#1 String", "#2 String"),
        label_field="Quality",
        metric_names=("accuracy", "f1"),
        main_metric="accuracy",
        tfds_name="glue/mrpc",
        tfds_text_features=("sentence1", "sentence2"),
        tfds_label_names=("not_equivalent", "equivalent"),
        data_dir_name="MRPC",
    ),
    "stsb": _glue_task(
        name="stsb",
        display_name="STS-B",
        label_names=None,
        tsv_labels=None,
        text_fields=("sentence1", "sentence2"),
        label_field="score",
        metric_names=("pearson", "spearman"),
        main_metric="pearson",
        tfds_name="glue/stsb",
        tfds_text_features=("sentence1", "sentence2"),
        tfds_label_names=None,
        data_dir_name="STS-B",
        submission_label_format="float",
        label_range=(0.0, 5.0),
    ),
    "qqp": _glue_task(
        name="qqp",
        display_name="QQP",
        label_names=("not_duplicate", "duplicate"),
        tsv_labels=_BINARY_TSV_LABELS,
        text_fields=("question1", "question2"),
        label_field="is_duplicate",
        index_field="id",
        metric_names=("accuracy", "f1"),
        main_metric="accuracy",
        tfds_name="glue/qqp",
        tfds_text_features=("question1", "question2"),
        tfds_label_names=("not_duplicate", "duplicate"),
        data_dir_name="QQP",
    ),
    "mnli": _glue_task(
        name="mnli",
        display_name="MNLI",
        label_names=NLI_LABELS,
        tsv_labels=NLI_LABELS,
        text_fields=("sentence1", "sentence2"),
        label_field="gold_label",
        metric_names=("accuracy",),
        main_metric="accuracy",
        tfds_name="glue/mnli",
        tfds_text_features=("premise", "hypothesis"),
        tfds_label_names=TFDS_NLI_LABELS,
        data_dir_name="MNLI",
        split_files=(
            ("train", "train.tsv"),
            ("dev_matched", "dev_matched.tsv"),
            ("dev_mismatched", "dev_mismatched.tsv"),
            ("test_matched", "test_matched.tsv"),
            ("test_mismatched", "test_mismatched.tsv"),
        ),
        tfds_splits=(
            ("train", "train"),
            ("dev_matched", "validation_matched"),
            ("dev_mismatched", "validation_mismatched"),
            ("test_matched", "test_matched"),
            ("test_mismatched", "test_mismatched"),
        ),
        eval_splits=("dev_matched", "dev_mismatched"),
        submission_files=(("test_matched", "MNLI-m.tsv"), ("test_mismatched", "MNLI-mm.tsv")),
    ),
    "qnli": _glue_task(
        name="qnli",
        display_name="QNLI",
        label_names=("entailment", "not_entailment"),
        tsv_labels=("entailment", "not_entailment"),
        text_fields=("question", "sentence"),
        label_field="label",
        metric_names=("accuracy",),
        main_metric="accuracy",
        tfds_name="glue/qnli",
        tfds_text_features=("question", "sentence"),
        tfds_label_names=("entailment", "not_entailment"),
        data_dir_name="QNLI",
    ),
    "rte": _glue_task(
        name="rte",
        display_name="RTE",
        label_names=("entailment", "not_entailment"),
        tsv_labels=("entailment", "not_entailment"),
        text_fields=("sentence1", "sentence2"),
        label_field="label",
        metric_names=("accuracy",),
        main_metric="accuracy",
        tfds_name="glue/rte",
        tfds_text_features=("sentence1", "sentence2"),
        tfds_label_names=("entailment", "not_entailment"),
        data_dir_name="RTE",
    ),
    "xnli": TaskSpec(
        name="xnli",
        display_name="XNLI",
        label_names=NLI_LABELS,
        tsv_labels=NLI_LABELS,
        text_fields=("premise", "hypothesis"),
        label_field="label",
        index_field="index",
        implicit_columns=("premise", "hypothesis", "label"),
        metric_names=("accuracy",),
        main_metric="accuracy",
        tfds_name="xnli",
        tfds_text_features=("premise", "hypothesis"),
        tfds_label_names=TFDS_NLI_LABELS,
        data_dir_name="",
        split_files=(("dev", "dev/dev-{language}.tsv"), ("test", "test/test-{language}.tsv")),
        tfds_splits=(("dev", "validation"), ("test", "test")),
        eval_splits=("dev", "test"),
        submission_files=(),
        submission_label_format="label_string",
        label_aliases=XNLI_LABEL_ALIASES,
    ),
}


def get_task(task: str | TaskSpec) -> TaskSpec:
    if isinstance(task, TaskSpec):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(TASKS)}")
    return TASKS[task]


# --------------------------------------------------------------------------------------------
# Examples and bad-row handling


@dataclasses.dataclass(frozen=True)
class Example:
    """One input pair. `guid` is "<source>:<line or record number>"; `line` is the 1-based line of
    a TSV file (None for TFDS records); `index` is the file's index/id column (the TFDS `idx`), the
    key of a GLUE submission row, or None where the source has none."""

    guid: str
    text_a: str
    text_b: str | None
    label: int | float | None
    index: int | None = None
    line: int | None = None


@dataclasses.dataclass
class ReadResult:
    """Examples of one file or split, with the rows left out under `on_bad_row="skip"`."""

    examples: list[Example]
    num_bad_rows: int = 0
    bad_rows: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, position: int) -> Example:
        return self.examples[position]


class _BadRows:
    def __init__(self, policy: str, source: str):
        if policy not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {policy!r}")
        self.policy = policy
        self.source = source
        self.messages: list[str] = []

    def report(self, where: str, problem: str) -> None:
        message = f"{where}: {problem}"
        if self.policy == "error":
            raise ValueError(message) from None
        self.messages.append(message)

    def result(self, examples: list[Example]) -> ReadResult:
        if self.messages:
            logger.warning(
                "%s: skipped %d bad rows (first: %s)", self.source, len(self.messages), self.messages[0]
            )
        return ReadResult(examples=examples, num_bad_rows=len(self.messages), bad_rows=self.messages)


class _BadRow(Exception):
    """Internal: carries the problem of one row from the parsers to `_BadRows.report`."""


def _parse_label(spec: TaskSpec, raw: str) -> int | float:
    value = raw.strip()
    if spec.is_regression:
        try:
            score = float(value)
        except ValueError:
            raise _BadRow(f"label {raw!r} is not a number") from None
        low, high = spec.label_range
        if not (math.isfinite(score) and low <= score <= high):
            raise _BadRow(f"label {score} outside [{low}, {high}]")
        return score
    if spec.label_aliases is not None:
        value = value.lower()
        value = spec.label_aliases.get(value, value)
    if value not in spec.tsv_labels:
        raise _BadRow(f"unknown label {raw!r} (expected one of {', '.join(spec.tsv_labels)})")
    return spec.tsv_labels.index(value)


def _checked_text(value: str, field: str) -> str:
    text = value.strip()
    if not text:
        raise _BadRow(f"empty text in column {field!r}")
    return text


# --------------------------------------------------------------------------------------------
# TSV readers


def _decoded_lines(path: str) -> Iterator[tuple[int, str | None]]:
    """(line number, text) per line, text None when the bytes are not UTF-8. Binary reading so that
    only LF ends a line: U+2028 and friends inside a sentence must not split it."""
    with storage.open_file(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield line_number, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_number, None


def read_tsv(task: str | TaskSpec, path: str | Path, *, on_bad_row: BadRowPolicy = "error") -> ReadResult:
    """Read one TSV file of `task` in the original GLUE (or per-language XNLI) format."""
    spec = get_task(task)
    path = os.fspath(path)
    bad_rows = _BadRows(on_bad_row, path)
    lines = _decoded_lines(path)
    first = next(lines, None)
    if first is None:
        raise ValueError(f"{path}:1: empty file, expected {spec.display_name} rows")
    first_number, first_text = first
    if first_text is None:
        raise ValueError(f"{path}:1: first line is not valid UTF-8")
    first_fields = first_text.split("\t")
    has_header = all(field in first_fields for field in spec.text_fields)
    if has_header:
        columns = tuple(first_fields)
        duplicated = sorted({c for c in columns if columns.count(c) > 1})
        if duplicated:
            raise ValueError(f"{path}:1: header repeats column(s) {duplicated}")
        data_lines: Iterable[tuple[int, str | None]] = lines
    elif spec.implicit_columns is not None:
        columns = spec.implicit_columns
        data_lines = _chain_first((first_number, first_text), lines)
    else:
        raise ValueError(
            f"{path}:1: expected a {spec.display_name} header with columns "
            f"{list(spec.text_fields)}, got {first_text[:120]!r}"
        )
    text_positions = [columns.index(field) for field in spec.text_fields]
    label_position = columns.index(spec.label_field) if spec.label_field in columns else None
    index_position = columns.index(spec.index_field) if spec.index_field in columns else None

    examples: list[Example] = []
    for line_number, text in data_lines:
        where = f"{path}:{line_number}"
        try:
            if text is None:
                raise _BadRow("not valid UTF-8")
            fields = text.split("\t")
            if len(fields) != len(columns):
                raise _BadRow(f"expected {len(columns)} tab-separated columns, got {len(fields)}")
            texts = [_checked_text(fields[p], columns[p]) for p in text_positions]
            label = None if label_position is None else _parse_label(spec, fields[label_position])
            index = None
            if index_position is not None:
                raw_index = fields[index_position].strip()
                try:
                    index = int(raw_index)
                except ValueError:
                    raise _BadRow(f"{spec.index_field} {raw_index!r} is not an integer") from None
        except _BadRow as problem:
            bad_rows.report(where, str(problem))
            continue
        examples.append(
            Example(
                guid=f"{os.path.basename(path)}:{line_number}",
                text_a=texts[0],
                text_b=texts[1] if len(texts) == 2 else None,
                label=label,
                index=index,
                line=line_number,
            )
        )
    return bad_rows.result(examples)


def _chain_first(first: tuple[int, str | None], rest: Iterator[tuple[int, str | None]]):
    yield first
    yield from rest


def read_glue_split(
    task: str | TaskSpec, glue_dir: str | Path, split: str, *, on_bad_row: BadRowPolicy = "error"
) -> ReadResult:
    """Read `<glue_dir>/<task folder>/<split file>`, e.g. glue_dir/MNLI/dev_matched.tsv."""
    spec = get_task(task)
    if spec.name not in GLUE_TASK_NAMES:
        raise ValueError(f"read_glue_split reads GLUE tasks only, got {spec.name!r}")
    path = storage.join(glue_dir, spec.data_dir_name, spec.file_name(split))
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path}: no {spec.display_name} {split} file")
    return read_tsv(spec, path, on_bad_row=on_bad_row)


def read_xnli_split(
    xnli_dir: str | Path,
    split: str,
    languages: Sequence[str] = XNLI_LANGUAGES,
    *,
    on_bad_row: BadRowPolicy = "error",
) -> dict[str, ReadResult]:
    """Read `<xnli_dir>/<split>/<split>-<lang>.tsv` for each language, in the given order."""
    spec = TASKS["xnli"]
    results = {}
    for language in languages:
        path = storage.join(xnli_dir, spec.file_name(split, language))
        if not storage.isfile(path):
            raise FileNotFoundError(f"{path}: no XNLI {split} file for language {language!r}")
        results[language] = read_tsv(spec, path, on_bad_row=on_bad_row)
    return results


# --------------------------------------------------------------------------------------------
# TFDS


def _as_text(value: Any) -> str:
    # Data sources return Text features as bytes (sometimes numpy scalars or 0-d arrays).
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise _BadRow("text is not valid UTF-8") from None
    if isinstance(value, str):
        return value
    raise _BadRow(f"expected a text feature, got {type(value).__name__}")


def _xnli_texts(record: Mapping[str, Any], language: str) -> tuple[str, str]:
    premise = record["premise"]
    if language not in premise:
        raise _BadRow(f"premise has no {language!r} text")
    hypothesis = record["hypothesis"]
    hypothesis_languages = [_as_text(code) for code in hypothesis["language"]]
    matches = [i for i, code in enumerate(hypothesis_languages) if code == language]
    if len(matches) != 1:
        raise _BadRow(f"hypothesis has {len(matches)} {language!r} translations, expected 1")
    return _as_text(premise[language]), _as_text(hypothesis["translation"][matches[0]])


def examples_from_tfds_records(
    task: str | TaskSpec,
    records: Iterable[Mapping[str, Any]],
    *,
    source: str,
    language: str | None = None,
    tfds_label_names: Sequence[str] | None = None,
    on_bad_row: BadRowPolicy = "error",
) -> ReadResult:
    """Map decoded TFDS records of `task` to examples.

    `source` names the records in guids and messages (e.g. "glue/mnli:validation_matched").
    `language` picks the XNLI translation (required for xnli, refused otherwise).
    `tfds_label_names` is the dataset's ClassLabel names; default `spec.tfds_label_names`.
    TFDS marks unlabelled test rows with label -1; they get label None.
    """
    spec = get_task(task)
    if spec.name == "xnli":
        if language is None:
            raise ValueError("xnli records need a language (one of XNLI_LANGUAGES)")
        _check_language(language)
    elif language is not None:
        raise ValueError(f"task {spec.name!r} has no languages, got language={language!r}")
    tfds_to_ours: list[int] = []
    if not spec.is_regression:
        names = tuple(spec.tfds_label_names if tfds_label_names is None else tfds_label_names)
        if sorted(names) != sorted(spec.label_names):
            raise ValueError(
                f"TFDS label names {names} of {source} do not match "
                f"task {spec.name!r} labels {spec.label_names}"
            )
        # TFDS id -> our id, by name (MNLI/XNLI orders differ).
        tfds_to_ours = [spec.label_id(name) for name in names]

    bad_rows = _BadRows(on_bad_row, source)
    examples: list[Example] = []
    for position, record in enumerate(records):
        where = f"{source}:{position}"
        try:
            if spec.name == "xnli":
                texts = list(_xnli_texts(record, language))
            else:
                texts = [_as_text(record[feature]) for feature in spec.tfds_text_features]
            features = spec.tfds_text_features
            texts = [_checked_text(text, feature) for text, feature in zip(texts, features, strict=True)]
            label = _tfds_label(spec, record["label"], tfds_to_ours)
            index = int(record["idx"]) if "idx" in record else position
        except _BadRow as problem:
            bad_rows.report(where, str(problem))
            continue
        examples.append(
            Example(
                guid=where,
                text_a=texts[0],
                text_b=texts[1] if len(texts) == 2 else None,
                label=label,
                index=index,
            )
        )
    return bad_rows.result(examples)


def _tfds_label(spec: TaskSpec, raw: Any, tfds_to_ours: list[int]) -> int | float | None:
    if spec.is_regression:
        score = float(raw)
        if score == -1.0:
            return None
        low, high = spec.label_range
        if not (math.isfinite(score) and low <= score <= high):
            raise _BadRow(f"label {score} outside [{low}, {high}]")
        return score
    label = int(raw)
    if label == -1:
        return None
    if not 0 <= label < len(tfds_to_ours):
        raise _BadRow(f"label id {label} outside [0, {len(tfds_to_ours) - 1}]")
    return tfds_to_ours[label]


def read_tfds(
    task: str | TaskSpec,
    split: str,
    *,
    language: str | None = None,
    tfds_name: str | None = None,
    data_dir: str | Path | None = None,
    download: bool = False,
    on_bad_row: BadRowPolicy = "error",
    chunk_size: int = 1024,
) -> ReadResult:
    """Read `task`'s `split` (our split name) through `tfds.data_source` (ArrayRecord files).

    `tfds_name` overrides `spec.tfds_name`, e.g. "multi_nli" for MNLI (same features as
    glue/mnli but no idx and no test splits). With `download=True` TFDS downloads and prepares the
    dataset as ArrayRecord first; by default the dataset must already be prepared under `data_dir`.
    """
    import tensorflow_datasets as tfds  # heavy import, only needed on this path

    spec = get_task(task)
    name = tfds_name or spec.tfds_name
    tfds_split = spec.tfds_split(split)
    source = tfds.data_source(
        name,
        split=tfds_split,
        data_dir=None if data_dir is None else str(data_dir),
        download=download,
        builder_kwargs={"file_format": "array_record"} if download else None,
    )
    label_names = None
    if not spec.is_regression:
        label_names = tuple(source.dataset_info.features["label"].names)
        if label_names != spec.tfds_label_names:
            raise ValueError(
                f"{name}: ClassLabel names {label_names} differ from the assumed {spec.tfds_label_names}"
            )

    def records() -> Iterator[Mapping[str, Any]]:
        for start in range(0, len(source), chunk_size):
            yield from source.__getitems__(range(start, min(start + chunk_size, len(source))))

    return examples_from_tfds_records(
        spec,
        records(),
        source=f"{name}:{tfds_split}" + (f":{language}" if language else ""),
        language=language,
        tfds_label_names=label_names,
        on_bad_row=on_bad_row,
    )


# --------------------------------------------------------------------------------------------
# GLUE submission files


def write_glue_submission(
    task: str | TaskSpec,
    split: str,
    indices: Sequence[int],
    predictions: Sequence[int] | Sequence[float],
    output_dir: str | Path,
) -> str:
    """Write `<output_dir>/<GLUE file>` with a header and rows `index<TAB>prediction`.

    Classification predictions are label ids, written as the task's TSV label strings ("0"/"1",
    "entailment", ...). STS-B scores are written with 3 decimals and are not clipped to [0, 5].
    """
    spec = get_task(task)
    file_name = spec.submission_file(split)
    if len(indices) != len(predictions):
        raise ValueError(f"{len(indices)} indices but {len(predictions)} predictions for {file_name}")
    rows = ["index\tprediction"]
    for index, prediction in zip(indices, predictions, strict=True):
        if spec.submission_label_format == "float":
            value = float(prediction)
            if not math.isfinite(value):
                raise ValueError(f"{file_name}: prediction for index {index} is {value}")
            rows.append(f"{int(index)}\t{value:.3f}")
        else:
            label_id = int(prediction)
            if label_id != prediction or not 0 <= label_id < spec.num_labels:
                raise ValueError(
                    f"{file_name}: prediction {prediction!r} for index {index} "
                    f"is not a label id of {spec.name!r}"
                )
            rows.append(f"{int(index)}\t{spec.tsv_labels[label_id]}")
    output_path = storage.join(output_dir, file_name)
    storage.write_atomic(output_path, "\n".join(rows) + "\n")
    return output_path


# --------------------------------------------------------------------------------------------
# Fine-tuning defaults


@dataclasses.dataclass(frozen=True)
class FinetuneHParams:
    learning_rate: float
    epochs: int
    warmup_steps: int
    batch_size: int
    classifier_dropout: float
    max_length: int


MODEL_SIZES: tuple[str, ...] = ("tiny", "xsmall", "small", "base", "large")

# Learning rate of a size relative to the large table. Smaller encoders take larger steps: the only
# published cross-size point is MNLI, base 1.5e-5 against large 7e-6 (about 2x); small and xsmall continue
# that trend, and "tiny" (any encoder narrower than xsmall's 384, e.g. configs/tiny.py's 128) is set where a
# 128-wide, 4-layer model learns SST-2 from random weights (lr ~5e-4; tested in tests/test_finetune.py).
LR_SCALE_BY_SIZE: dict[str, float] = {"large": 1.0, "base": 2.0, "small": 3.0, "xsmall": 4.0, "tiny": 50.0}
# A default warmup never takes more than this share of a run's optimizer steps.
MAX_WARMUP_FRACTION = 0.1

# DeBERTaV3-large dev-set recipes (reference notes, section 8).
_LARGE_HPARAMS: dict[str, FinetuneHParams] = {
    "mnli": FinetuneHParams(7e-6, 2, 500, 64, 0.3, 256),
    "cola": FinetuneHParams(5.5e-6, 10, 50, 32, 0.1, 64),
    "sst2": FinetuneHParams(6e-6, 8, 500, 32, 0.1, 128),
    "stsb": FinetuneHParams(7e-6, 4, 50, 32, 0.1, 128),
    "rte": FinetuneHParams(1e-5, 6, 50, 32, 0.3, 320),
    "qqp": FinetuneHParams(1e-5, 6, 1000, 64, 0.2, 320),
    "qnli": FinetuneHParams(7e-6, 6, 200, 64, 0.2, 512),
    "mrpc": FinetuneHParams(6e-6, 6, 50, 32, 0.2, 128),
}


def default_hparams(task: str, model_size: str) -> FinetuneHParams:
    """Default fine-tuning hyperparameters of `task` for a DeBERTaV3 `model_size`.

    The reference gives the full table for v3-large only. Other sizes use the large row, except:
    base MNLI uses lr 1.5e-5, 3 epochs, warmup 1000 (batch, dropout and max length stay as large).
    XNLI is zero-shot transfer: the model is fine-tuned on English MNLI with the MNLI row of the
    same size, with max length 256 and warmup 3000 (the mDeBERTa recipe).
    No recipe is published for the other sizes: they use the large row with the learning rate scaled by
    `LR_SCALE_BY_SIZE`. The warmup here is the table's; `warmup_for_run` caps it to a share of the run.
    """
    spec = get_task(task)
    if model_size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {model_size!r}; expected one of {MODEL_SIZES}")
    base_task = "mnli" if spec.name == "xnli" else spec.name
    hparams = _LARGE_HPARAMS[base_task]
    if base_task == "mnli" and model_size == "base":
        hparams = dataclasses.replace(hparams, learning_rate=1.5e-5, epochs=3, warmup_steps=1000)
    elif model_size != "large":
        hparams = dataclasses.replace(hparams, learning_rate=hparams.learning_rate * LR_SCALE_BY_SIZE[model_size])
    if spec.name == "xnli":
        hparams = dataclasses.replace(hparams, warmup_steps=3000, max_length=256)
    return hparams


def warmup_for_run(default_warmup: int, total_steps: int) -> int:
    """The table's warmup, capped at MAX_WARMUP_FRACTION of the run (a 2-epoch run on 8k rows has 500
    steps: the table's 500-3000 warmup steps would never reach the peak learning rate)."""
    return max(0, min(int(default_warmup), math.ceil(MAX_WARMUP_FRACTION * int(total_steps))))
