"""debertax.data: sources, sharding, packing, masking, resumable state and bad input."""

import itertools
import json
import random
import tracemalloc

import numpy as np
import pytest

from debertax.corpus import default_corpus_lines
from debertax.data import (
    BadInputError,
    BadLine,
    DataConfig,
    PretrainingIterator,
    open_source,
    pack_documents,
    source_lines,
)
from debertax.tokenizer import Tokenizer, train_sentencepiece

CLS, SEP, PAD = 1, 2, 0


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vocab")
    train_sentencepiece(itertools.islice(default_corpus_lines(), 3000), directory, vocab_size=500)
    return str(directory)


@pytest.fixture(scope="module")
def tokenizer(vocab_dir):
    return Tokenizer.load(vocab_dir)


@pytest.fixture(scope="module")
def corpus_lines():
    return list(itertools.islice(default_corpus_lines(), 600))


def write_lines(path, lines, newline_at_end=True):
    text = "\n".join(lines) + ("\n" if newline_at_end else "")
    path.write_text(text, encoding="utf-8")
    return str(path)


def make_iterator(vocab_dir, tokenizer, process_index=0, process_count=1, **overrides):
    settings = dict(vocab_path=vocab_dir, seq_len=64, batch_size=4, shuffle_window=8)
    settings.update(overrides)
    return PretrainingIterator(DataConfig(**settings), tokenizer, process_index, process_count)


def read_all(source, skipped=None):
    """The (position, text) documents of one epoch; bad lines go to `skipped`."""
    documents = []
    for position, text in source.read(None, 0):
        if isinstance(text, BadLine):
            skipped.append(text.describe())
        else:
            documents.append((position, text))
    return documents


def non_special_stream(rows, lengths):
    """All tokens of the rows except [CLS]/[SEP]/[PAD], in order."""
    return [int(t) for row, n in zip(rows, lengths) for t in row[:n] if t not in (CLS, SEP, PAD)]


# ------------------------------------------------------------------------------------- packing
def check_layout(sequences, seq_len):
    """Layout invariants of the module docstring; returns the rows' [SEP]-separated segments."""
    segments = []
    for index, sequence in enumerate(sequences):
        ids, length = sequence.token_ids, sequence.length
        assert ids.shape == (seq_len,) and ids.dtype == np.int32
        assert ids[0] == CLS and ids[length - 1] == SEP and np.all(ids[length:] == PAD)
        assert CLS not in ids[1:length] and PAD not in ids[:length]
        assert ids[1] != SEP, "[CLS] [SEP]"
        assert not np.any((ids[1:length] == SEP) & (ids[: length - 1] == SEP)), "[SEP] [SEP]"
        if index < len(sequences) - 1:
            assert length in (seq_len, seq_len - 1)
        content = ids[1 : length - 1].tolist()
        row_segments = [list(group) for is_sep, group in itertools.groupby(content, lambda t: t == SEP)
                        if not is_sep]
        segments.append(row_segments)
    return segments


def test_pack_documents_layout_and_resume():
    rng = random.Random(0)
    # Document k is made of the token 10 + k, so segments show which document they came from.
    lengths = [rng.choice([0, 1, 2, 5, 13, 14, 15, 16, 40, 100]) for _ in range(120)]
    documents = [({"record": k}, [10 + k] * n) for k, n in enumerate(lengths)]
    seq_len = 16
    packed = list(pack_documents(iter(documents), seq_len, CLS, SEP, PAD))
    sequences = [sequence for sequence, _ in packed]
    segments = check_layout(sequences, seq_len)
    # Nothing lost or repeated, and the order is kept.
    expected_stream = [t for _, ids in documents for t in ids]
    assert non_special_stream([s.token_ids for s in sequences], [s.length for s in sequences]) == expected_stream
    # A [SEP] separates documents: each segment holds one document, and two segments of one row
    # are consecutive non-empty documents.
    for row in segments:
        for segment in row:
            assert len(set(segment)) == 1
        docs = [segment[0] - 10 for segment in row]
        for previous, following in zip(docs, docs[1:]):
            assert following > previous and all(lengths[k] == 0 for k in range(previous + 1, following))
    assert packed[-1][1] is None
    # Restarting from every resume point reproduces the rest exactly.
    for index, (_, resume) in enumerate(packed[:-1]):
        start = resume["document"]["record"]
        again = list(pack_documents(iter(documents[start:]), seq_len, CLS, SEP, PAD,
                                    first_token_offset=resume["token_offset"]))
        assert len(again) == len(packed) - index - 1
        for (got, _), (want, _) in zip(again, packed[index + 1 :]):
            np.testing.assert_array_equal(got.token_ids, want.token_ids)


def test_iterator_packs_file_in_order(tmp_path, vocab_dir, tokenizer, corpus_lines):
    path = write_lines(tmp_path / "corpus.txt", corpus_lines[:80])
    iterator = make_iterator(vocab_dir, tokenizer, source=path, shuffle_window=1, batch_size=5)
    rows, lengths = [], []
    while iterator.epoch == 0:
        batch = next(iterator)
        rows.extend(batch["original_ids"])
        lengths.extend(batch["attention_mask"].sum(1))
    expected = [t for ids in tokenizer.encode_batch(corpus_lines[:80]) for t in ids]
    got = non_special_stream(rows, lengths)
    # The epoch's stream, then the next epoch's start (the last batch may cross into it).
    assert got[: len(expected)] == expected
    assert got[len(expected):] == expected[: len(got) - len(expected)]


# ------------------------------------------------------------------------------------- masking
def collect(iterator, batches):
    return [next(iterator) for _ in range(batches)]


def test_masking_rate_cap_and_special_tokens(vocab_dir, tokenizer):
    batches = collect(make_iterator(vocab_dir, tokenizer, seq_len=128, batch_size=8), 25)
    special = np.zeros(tokenizer.vocab_size, bool)
    special[[tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.unk_id, tokenizer.mask_id]] = True
    candidates = masked = 0
    for batch in batches:
        original, inputs, mlm = batch["original_ids"], batch["input_ids"], batch["mlm_mask"]
        assert inputs.dtype == original.dtype == batch["attention_mask"].dtype == np.int32
        assert mlm.dtype == bool and inputs.shape == (8, 128)
        maskable = ~special[original] & (batch["attention_mask"] == 1)
        assert not np.any(mlm & ~maskable), "a special token or padding was selected"
        np.testing.assert_array_equal(inputs[mlm], tokenizer.mask_id)  # default: all [MASK]
        np.testing.assert_array_equal(inputs[~mlm], original[~mlm])
        per_row = mlm.sum(1)
        assert np.all(per_row >= 1) and np.all(per_row <= 20)  # 80 per 512 -> 20 per 128
        candidates += maskable.sum()
        masked += per_row.sum()
    assert 0.14 < masked / candidates < 0.16


def test_prediction_cap_scales_and_binds(vocab_dir, tokenizer):
    for overrides, cap in (({"seq_len": 128}, 20), ({"seq_len": 64}, 10), ({"seq_len": 128, "max_predictions": 7}, 7)):
        batch = next(make_iterator(vocab_dir, tokenizer, mask_prob=0.5, batch_size=8, **overrides))
        assert np.all(batch["mlm_mask"].sum(1)[batch["attention_mask"].sum(1) > 3 * cap] == cap)


def test_replacement_probabilities(vocab_dir, tokenizer):
    iterator = make_iterator(vocab_dir, tokenizer, seq_len=128, batch_size=16,
                             mask_token_prob=0.8, random_token_prob=0.1)
    outcomes = np.zeros(3)
    for batch in collect(iterator, 12):
        mlm = batch["mlm_mask"]
        inputs, original = batch["input_ids"][mlm], batch["original_ids"][mlm]
        outcomes += [np.sum(inputs == tokenizer.mask_id), np.sum((inputs != tokenizer.mask_id) & (inputs != original)),
                     np.sum(inputs == original)]
        replaced = inputs[(inputs != tokenizer.mask_id) & (inputs != original)]
        assert np.all(replaced > tokenizer.unk_id) and np.all(replaced < tokenizer.mask_id)
    fractions = outcomes / outcomes.sum()
    assert outcomes.sum() > 3000
    assert abs(fractions[0] - 0.8) < 0.03 and abs(fractions[1] - 0.1) < 0.03 and abs(fractions[2] - 0.1) < 0.03


def test_deterministic_for_a_seed(vocab_dir, tokenizer):
    first = collect(make_iterator(vocab_dir, tokenizer), 6)
    second = collect(make_iterator(vocab_dir, tokenizer), 6)
    other_seed = collect(make_iterator(vocab_dir, tokenizer, seed=1), 6)
    for a, b in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a["input_ids"], c["input_ids"]) for a, c in zip(first, other_seed))


# -------------------------------------------------------------------------------------- resume
def assert_resumes_exactly(make, cut_points, follow=4):
    uninterrupted = make()
    reference, skip_counts = [], []
    for _ in range(max(cut_points) + follow):
        reference.append(next(uninterrupted))
        skip_counts.append(uninterrupted.bad_lines_skipped)
    for cut in cut_points:
        interrupted = make()
        collect(interrupted, cut)
        state = json.loads(json.dumps(interrupted.get_state()))
        assert len(json.dumps(state)) < 2000
        resumed = make()
        resumed.set_state(state)
        for offset in range(follow):
            batch = next(resumed)
            for key, value in batch.items():
                np.testing.assert_array_equal(value, reference[cut + offset][key], err_msg=f"{cut}+{offset} {key}")
            assert resumed.bad_lines_skipped == skip_counts[cut + offset]


def test_resume_files_across_windows_chunks_and_epochs(tmp_path, vocab_dir, tokenizer, corpus_lines):
    long_line = " ".join(corpus_lines[100:140])  # several chunks of max_line_bytes
    write_lines(tmp_path / "a.txt", corpus_lines[:30] + [long_line] + corpus_lines[30:40])
    write_lines(tmp_path / "b.txt", corpus_lines[40:70], newline_at_end=False)
    write_lines(tmp_path / "c.txt", ["", "  ", *corpus_lines[70:90], ""])

    def make():
        return make_iterator(vocab_dir, tokenizer, source=str(tmp_path / "*.txt"), max_line_bytes=300,
                             process_index=1, process_count=2, batch_size=3, shuffle_window=5)

    probe = make()
    collect(probe, 40)
    assert probe.epoch >= 2, "the test should cross epoch boundaries"
    assert_resumes_exactly(make, [0, 1, 2, 5, 11, 17, 29])


def test_resume_keeps_the_bad_line_count(tmp_path, vocab_dir, tokenizer, corpus_lines):
    path = tmp_path / "mixed.txt"
    with open(path, "wb") as corpus:
        for index, line in enumerate(corpus_lines[:150]):
            corpus.write(line.encode() + b"\n")
            if index % 9 == 4:
                corpus.write(b"caf\xe9 latin-1\n")

    def make():
        return make_iterator(vocab_dir, tokenizer, source=str(path), on_bad_line="skip", batch_size=2,
                             shuffle_window=3, tokenize_batch_size=16)

    probe = make()
    collect(probe, 30)
    assert 0 < probe.bad_lines_skipped < 17 and probe.epoch == 0
    assert_resumes_exactly(make, [1, 4, 9, 13, 22])


def test_resume_default_corpus(vocab_dir, tokenizer):
    assert_resumes_exactly(lambda: make_iterator(vocab_dir, tokenizer, shuffle_window=16), [0, 3, 9])


def test_state_from_another_configuration_is_refused(vocab_dir, tokenizer):
    iterator = make_iterator(vocab_dir, tokenizer)
    next(iterator)
    with pytest.raises(ValueError, match="'seed'"):
        make_iterator(vocab_dir, tokenizer, seed=3).set_state(iterator.get_state())
    with pytest.raises(ValueError, match="'process_index'"):
        make_iterator(vocab_dir, tokenizer, process_index=1, process_count=2).set_state(iterator.get_state())


# ------------------------------------------------------------------------------------ sharding
def test_file_shards_are_disjoint_and_cover_the_corpus(tmp_path, corpus_lines):
    long_line = " ".join(corpus_lines[200:260])
    files = {
        "a.txt": corpus_lines[:50] + [long_line] + corpus_lines[50:60],
        "b.txt": ["", *corpus_lines[60:61], "", ""],
        "c.txt": corpus_lines[61:150],
        "d.txt": [],
    }
    for name, lines in files.items():
        write_lines(tmp_path / name, lines, newline_at_end=name != "c.txt")
    expected = sorted(line for lines in files.values() for line in lines if line.strip())
    for process_count in (1, 2, 3, 7):
        lines_read = []
        for process_index in range(process_count):
            config = DataConfig(source=str(tmp_path / "*.txt"), max_line_bytes=256)
            documents = read_all(open_source(config, process_index, process_count))
            # Chunks of a cut line follow each other; join them back into the line.
            for position, text in documents:
                if position["in_line"]:
                    lines_read[-1] += text
                else:
                    lines_read.append(text)
        assert sorted(lines_read) == expected, process_count


def test_indexed_shards_are_disjoint_and_cover_the_corpus():
    everything = read_all(open_source(DataConfig(), 0, 1))
    shards = [read_all(open_source(DataConfig(), p, 3)) for p in range(3)]
    assert [text for shard in shards for _, text in shard] == [text for _, text in everything]
    assert len(everything) == len(list(default_corpus_lines()))


# ---------------------------------------------------------------------------------------- TFDS
@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, corpus_lines):
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    texts = corpus_lines[300:360]

    class DebertaxTinyTextCorpus(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"body": tfds.features.Text(), "id": tfds.features.Scalar(dtype=np.int64)}
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(texts), "validation": self._generate_examples(texts[:5])}

        def _generate_examples(self, split_texts):
            for index, text in enumerate(split_texts):
                yield index, {"body": text, "id": index}

    DebertaxTinyTextCorpus(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir, texts


def test_tfds_source(tfds_dir, vocab_dir, tokenizer):
    import tensorflow_datasets as tfds

    data_dir, texts = tfds_dir
    spec = "tfds:debertax_tiny_text_corpus:train"
    config = DataConfig(source=spec, tfds_data_dir=data_dir, text_feature="body")
    documents = read_all(open_source(config))
    # Same records, in the data source's (hash-shuffled) order.
    records = tfds.data_source("debertax_tiny_text_corpus", split="train", data_dir=data_dir)
    assert [text for _, text in documents] == [records[i]["body"].decode() for i in range(len(records))]
    assert sorted(text for _, text in documents) == sorted(texts)
    shards = [read_all(open_source(config, p, 2)) for p in range(2)]
    assert shards[0] + shards[1] == documents and shards[0] and shards[1]

    def make():
        return make_iterator(vocab_dir, tokenizer, source=spec, tfds_data_dir=data_dir, text_feature="body")

    batch = next(make())
    assert batch["original_ids"].shape == (4, 64)
    assert_resumes_exactly(make, [2, 7])


def test_tfds_errors(tfds_dir):
    data_dir, _ = tfds_dir
    with pytest.raises(KeyError, match="no feature 'text'.*'body'"):
        open_source(DataConfig(source="tfds:debertax_tiny_text_corpus", tfds_data_dir=data_dir))
    with pytest.raises(FileNotFoundError, match="no_such_dataset"):
        open_source(DataConfig(source="tfds:no_such_dataset:train", tfds_data_dir=data_dir))


# ----------------------------------------------------------------------------------- bad input
def test_empty_corpus(tmp_path, vocab_dir, tokenizer):
    path = tmp_path / "blank.txt"
    path.write_text("\n   \n\t\n")
    (tmp_path / "empty.txt").write_text("")
    for source in (str(path), str(tmp_path / "*.txt")):
        with pytest.raises(ValueError, match=r"has no text") as error:
            next(make_iterator(vocab_dir, tokenizer, source=source))
        assert source in str(error.value)


def test_binary_file(tmp_path, vocab_dir, tokenizer):
    path = tmp_path / "program"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\n\x00\x03\x00>\x00")
    with pytest.raises(BadInputError, match=rf"{path}:1: contains NUL bytes"):
        next(make_iterator(vocab_dir, tokenizer, source=str(path)))


def test_non_utf8_line(tmp_path, vocab_dir, tokenizer, corpus_lines):
    path = tmp_path / "latin1.txt"
    good = corpus_lines[:40]
    before = ("\n".join(good[:37]) + "\n").encode()
    path.write_bytes(before + b"na\xefve caf\xe9\n" + ("\n".join(good[37:]) + "\n").encode())
    assert len(before) > path.stat().st_size / 2, "line 38 should lie in the second host's half"
    with pytest.raises(BadInputError, match=rf"{path}:38: not valid UTF-8"):
        collect(make_iterator(vocab_dir, tokenizer, source=str(path)), 3)
    # The line number is right for the host whose byte range holds the line.
    with pytest.raises(BadInputError, match=rf"{path}:38: not valid UTF-8"):
        collect(make_iterator(vocab_dir, tokenizer, source=str(path), process_index=1, process_count=2), 3)
    skipped = []
    documents = read_all(open_source(DataConfig(source=str(path), on_bad_line="skip")), skipped)
    assert [text for _, text in documents] == good
    assert len(skipped) == 1 and f"{path}:38: not valid UTF-8" in skipped[0]
    # A window larger than the epoch: the first batch reads the whole file once.
    iterator = make_iterator(vocab_dir, tokenizer, source=str(path), on_bad_line="skip", shuffle_window=1000)
    next(iterator)
    assert iterator.bad_lines_skipped == 1


def test_over_long_line_is_read_in_bounded_chunks(tmp_path):
    line = "word " * 1_000_000 + "end"  # 5 MB on one line
    path = write_lines(tmp_path / "long.txt", ["first", line, "last"])
    tracemalloc.start()
    try:
        documents = read_all(open_source(DataConfig(source=path, max_line_bytes=1 << 16)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    texts = [text for _, text in documents]
    assert texts[0] == "first" and texts[-1] == "last" and "".join(texts[1:-1]) == line
    assert all(len(text.encode()) <= 1 << 16 for text in texts) and len(texts) > 70
    # Only the texts themselves (kept in `documents`) and a few chunks in flight.
    assert peak < sum(len(text) + 100 for text in texts) + 4 * (1 << 16) + (1 << 20)


def test_chunks_cut_at_character_boundaries(tmp_path):
    line = "é日😀" * 5000  # 2-, 3- and 4-byte characters, no spaces
    path = write_lines(tmp_path / "wide.txt", [line])
    for max_line_bytes in (16, 17, 1001, 4099):
        texts = [text for _, text in read_all(open_source(DataConfig(source=path, max_line_bytes=max_line_bytes)))]
        assert "".join(texts) == line and all(len(t.encode()) <= max_line_bytes for t in texts)


def test_missing_inputs(tmp_path, vocab_dir, tokenizer):
    with pytest.raises(FileNotFoundError, match=r"spm\.model"):
        PretrainingIterator(DataConfig(vocab_path=str(tmp_path)), None, 0, 1)
    with pytest.raises(FileNotFoundError, match=r"glob '.*\*\.txt' matched no files"):
        make_iterator(vocab_dir, tokenizer, source=str(tmp_path / "*.txt"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        make_iterator(vocab_dir, tokenizer, source=str(tmp_path / "missing.txt"))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        make_iterator(vocab_dir, tokenizer, source=str(tmp_path))
    with pytest.raises(ValueError, match="on_bad_line"):
        DataConfig(on_bad_line="ignore")


# -------------------------------------------------------------------------------------- memory
def test_memory_is_flat_in_corpus_size(tmp_path, vocab_dir, tokenizer, corpus_lines):
    peaks = {}
    for scale in (1, 10):
        path = write_lines(tmp_path / f"corpus{scale}.txt", corpus_lines[:100] * scale)
        iterator = make_iterator(vocab_dir, tokenizer, source=path, seq_len=128, batch_size=8, shuffle_window=16)
        tracemalloc.start()
        try:
            batches = 0
            while iterator.epoch == 0:
                next(iterator)
                batches += 1
            _, peaks[scale] = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert batches > 5 * scale
    assert peaks[10] < 1.3 * peaks[1] + 100_000, peaks


def test_source_lines_reads_the_whole_corpus(tmp_path, corpus_lines):
    path = tmp_path / "mixed.txt"
    path.write_bytes(("\n".join(corpus_lines[:20]) + "\n").encode() + b"caf\xe9\n\n")
    assert list(source_lines(str(path), on_bad_line="skip")) == corpus_lines[:20]
    assert list(source_lines(str(path), on_bad_line="skip", max_documents=5)) == corpus_lines[:5]
    progress = []
    assert len(list(source_lines("default", progress=progress.append, progress_every=5000))) > 5000
    assert progress[0].startswith("  5,000 documents") and progress[-1].startswith("read ")
    with pytest.raises(BadInputError, match=rf"{path}:21: not valid UTF-8"):
        list(source_lines(str(path)))


# ------------------------------------------------------------------------------------- held-out split
def _documents_of_one_epoch(iterator):
    """Token-id tuples of every document one epoch of the iterator packs (read through the packer's input)."""
    return [tuple(ids) for _, ids in iterator._tokenized_documents(None)]


def test_held_out_documents_never_reach_training(tmp_path, vocab_dir, tokenizer, corpus_lines):
    lines = list(dict.fromkeys(line for line in corpus_lines if line.strip()))  # distinct documents
    path = write_lines(tmp_path / "corpus.txt", lines)
    everything = _documents_of_one_epoch(make_iterator(vocab_dir, tokenizer, source=path))
    train_it = make_iterator(vocab_dir, tokenizer, source=path, split="train", holdout_every=10)
    eval_it = make_iterator(vocab_dir, tokenizer, source=path, split="eval", holdout_every=10)
    train, held_out = _documents_of_one_epoch(train_it), _documents_of_one_epoch(eval_it)
    assert not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(everything)
    # About 1 in 10, chosen by text: the same choice on every host's shard.
    assert 0.05 * len(lines) < len(held_out) < 0.15 * len(lines)
    assert eval_it.documents_read == len(held_out)
    shards = [_documents_of_one_epoch(make_iterator(vocab_dir, tokenizer, p, 3, source=path, split="eval",
                                                    holdout_every=10)) for p in range(3)]
    assert sorted(sum(shards, [])) == sorted(held_out)
    # Batches of the eval split hold only held-out text.
    batch = next(make_iterator(vocab_dir, tokenizer, source=path, split="eval", holdout_every=10))
    held_tokens = {t for doc in held_out for t in doc}
    assert set(batch["original_ids"][batch["attention_mask"] == 1].tolist()) - {CLS, SEP} <= held_tokens


def test_split_settings_are_checked_and_part_of_the_fingerprint(tmp_path, vocab_dir, tokenizer, corpus_lines):
    path = write_lines(tmp_path / "corpus.txt", corpus_lines[:50])
    with pytest.raises(ValueError, match="holdout_every >= 2"):
        DataConfig(split="eval", holdout_every=1)
    with pytest.raises(ValueError, match="split must be"):
        DataConfig(split="test", holdout_every=5)
    train = make_iterator(vocab_dir, tokenizer, source=path, split="train", holdout_every=5)
    next(train)
    other = make_iterator(vocab_dir, tokenizer, source=path, split="train", holdout_every=7)
    with pytest.raises(ValueError, match="fingerprint key 'split'"):
        other.set_state(train.get_state())
    empty = make_iterator(vocab_dir, tokenizer, source=write_lines(tmp_path / "one.txt", ["only one document"]),
                          split="eval", holdout_every=1000003)
    with pytest.raises(ValueError, match="has no text in its eval split"):
        next(empty)
