"""Hugging Face `datasets` sources (debertax/hf_source.py): Parquet / JSON Lines / CSV files and `hf:` datasets,
read through `datasets`' own streaming readers, sharded per host and resumed exactly. Local files only."""

import json

import pytest

from debertax import hf_source
from debertax.data import BadInputError, DataConfig, open_source, source_lines
from test_data import (assert_resumes_exactly, collect, corpus_lines, make_iterator, read_all,  # noqa: F401
                       tokenizer, vocab_dir)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("datasets")


def write_parquet(path, texts, row_group_size=7, **columns):
  table = pa.table({"text": texts, "id": list(range(len(texts))), **columns})
  pq.write_table(table, str(path), row_group_size=row_group_size)
  return str(path)


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
  return str(path)


@pytest.fixture
def parquet_corpus(tmp_path, corpus_lines):  # noqa: F811
  """Four Parquet files of 25 documents (several row groups each, one empty text): 99 documents."""
  texts = list(corpus_lines[:100])
  texts[30] = ""
  for index in range(4):
    write_parquet(tmp_path / f"part-{index}.parquet", texts[25 * index: 25 * (index + 1)])
  return str(tmp_path / "*.parquet"), [t for t in texts if t.strip()]


def test_parquet_jsonl_and_csv_read_every_row_in_file_order(parquet_corpus, tmp_path, corpus_lines):  # noqa: F811
  spec, expected = parquet_corpus
  assert [text for _, text in read_all(open_source(DataConfig(source=spec)))] == expected
  assert list(source_lines(spec)) == expected  # What vocabulary training reads.
  jsonl = write_jsonl(tmp_path / "docs.jsonl", [{"body": t, "n": i} for i, t in enumerate(corpus_lines[:20])])
  assert [t for _, t in read_all(open_source(DataConfig(source=jsonl, text_feature="body")))] == corpus_lines[:20]
  csv_path = tmp_path / "docs.csv"
  import pyarrow.csv as pacsv
  pacsv.write_csv(pa.table({"text": corpus_lines[20:35]}), str(csv_path))
  assert [t for _, t in read_all(open_source(DataConfig(source=str(csv_path))))] == corpus_lines[20:35]


@pytest.mark.parametrize("files,process_count", [(4, 2), (4, 4), (3, 2)])
def test_host_shards_are_disjoint_and_cover_the_rows(tmp_path, corpus_lines, files, process_count):  # noqa: F811
  texts = [f"{i}: {line}" for i, line in enumerate(corpus_lines[:12 * files])]  # unique texts
  for index in range(files):
    write_parquet(tmp_path / f"p{index}.parquet", texts[12 * index: 12 * (index + 1)], row_group_size=5)
  shards = [[t for _, t in read_all(open_source(DataConfig(source=str(tmp_path / "*.parquet")), p, process_count))]
            for p in range(process_count)]
  assert sorted(t for shard in shards for t in shard) == sorted(texts)
  assert all(len(shard) >= len(texts) // process_count - 12 for shard in shards), [len(s) for s in shards]
  description = open_source(DataConfig(source=str(tmp_path / "*.parquet")), 0, process_count).description
  assert ("its own files" if files % process_count == 0 else f"every {process_count}th example") in description


def test_resume_is_exact_across_windows_files_and_epochs(parquet_corpus, vocab_dir, tokenizer):  # noqa: F811
  spec, _ = parquet_corpus

  def make():
    return make_iterator(vocab_dir, tokenizer, source=spec, batch_size=3, shuffle_window=5, seq_len=64)

  probe = make()
  collect(probe, 40)
  assert probe.epoch >= 1, "the test should cross an epoch boundary"
  assert_resumes_exactly(make, [0, 1, 4, 9, 17, 29])


def test_resume_on_one_of_two_hosts(parquet_corpus, vocab_dir, tokenizer):  # noqa: F811
  spec, _ = parquet_corpus
  assert_resumes_exactly(lambda: make_iterator(vocab_dir, tokenizer, source=spec, process_index=1, process_count=2,
                                               batch_size=2, shuffle_window=3), [0, 3, 11])


def test_hf_dataset_directory_with_config_and_split(tmp_path, corpus_lines, vocab_dir, tokenizer):  # noqa: F811
  """`hf:` goes through load_dataset(path, config, split=...) as for a Hub id; here the path is a dataset laid
  out as on the Hub (data/<split>-*.parquet), so no network is involved."""
  (tmp_path / "ds" / "data").mkdir(parents=True)
  write_parquet(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet", corpus_lines[:30])
  write_parquet(tmp_path / "ds" / "data" / "validation-00000-of-00001.parquet", corpus_lines[30:40])
  root = tmp_path / "ds"
  assert [t for _, t in read_all(open_source(DataConfig(source=f"hf:{root}")))] == corpus_lines[:30]
  assert [t for _, t in read_all(open_source(DataConfig(source=f"hf:{root}::validation")))] == corpus_lines[30:40]
  assert_resumes_exactly(lambda: make_iterator(vocab_dir, tokenizer, source=f"hf:{root}", batch_size=2,
                                               shuffle_window=3), [0, 2, 7])
  with pytest.raises(FileNotFoundError, match=r"data source 'hf:.*::nosuch': cannot stream the dataset .*split "
                                              r"'nosuch'"):
    open_source(DataConfig(source=f"hf:{root}::nosuch"))


def test_spec_parsing():
  assert hf_source.parse_hf_spec("hf:allenai/c4:en") == ("allenai/c4", None, "en", "train")
  assert hf_source.parse_hf_spec("hf:org/ds@v2::validation") == ("org/ds", "v2", None, "validation")
  assert hf_source.parse_hf_spec("hf:wikimedia/wikipedia:20231101.de:train") == (
      "wikimedia/wikipedia", None, "20231101.de", "train")
  for bad in ("hf:", "hf::en", "hf:a:b:c:d"):
    with pytest.raises(ValueError, match="expected 'hf:<path>"):
      hf_source.parse_hf_spec(bad)
  assert hf_source.builder_for("gs://b/x/*.jsonl.gz") == "json"
  assert hf_source.builder_for("/d/part-1.PARQUET") == "parquet"
  assert hf_source.builder_for("/d/a.csv.zst") == "csv"
  assert hf_source.builder_for("/d/*.txt") is None and hf_source.builder_for("/d/a.gz") is None


def test_bad_rows_and_columns_are_named(tmp_path, corpus_lines):  # noqa: F811
  path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": corpus_lines[0]}, {"text": 17}, {"text": corpus_lines[1]},
                                                {"text": None}, {"text": corpus_lines[2]}])
  with pytest.raises(BadInputError, match=r"mixed.jsonl example 1: column 'text' holds int, not text \(17\)"):
    read_all(open_source(DataConfig(source=path)))
  skipped = []
  documents = read_all(open_source(DataConfig(source=path, on_bad_line="skip")), skipped)
  assert [t for _, t in documents] == corpus_lines[:3] and len(skipped) == 2
  with pytest.raises(KeyError, match=r"examples have no column 'body' \(columns: \['text'\]\)"):
    read_all(open_source(DataConfig(source=path, text_feature="body")))
  with pytest.raises(FileNotFoundError, match="matched no files"):
    open_source(DataConfig(source=str(tmp_path / "none-*.parquet")))
  (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
  with pytest.raises(BadInputError, match=r"broken.parquet"):
    read_all(open_source(DataConfig(source=str(tmp_path / "broken.parquet"))))


HUB_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[2])
from debertax.data import DataConfig, open_source
from test_data import read_all
spec = sys.argv[1]
documents = read_all(open_source(DataConfig(source=spec)))
shards = [[t for _, t in read_all(open_source(DataConfig(source=spec), p, 2))] for p in range(2)]
source = open_source(DataConfig(source=spec))
resumed = [t for _, t in source.read(json.loads(json.dumps(documents[13][0])), 0)]
print(json.dumps({"texts": [t for _, t in documents], "shards": shards, "resumed_at_13": resumed}))
"""


def test_hub_dataset_streams_through_the_hub_api(tmp_path, corpus_lines):  # noqa: F811
  """`hf:<org>/<name>` against a Hub on 127.0.0.1 (tests/hub_emulator.py): the dataset's files are found by
  datasets' own Hub resolution and streamed over HTTP range requests, nothing downloaded ahead."""
  import os
  import subprocess
  import sys

  from hub_emulator import FakeHub
  repo = tmp_path / "hub" / "datasets" / "acme" / "corpus" / "data"
  repo.mkdir(parents=True)
  for index in range(2):
    write_parquet(repo / f"train-0000{index}-of-00002.parquet", corpus_lines[20 * index: 20 * (index + 1)],
                  row_group_size=6)
  write_parquet(repo / "validation-00000-of-00001.parquet", corpus_lines[40:45])
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  with FakeHub(tmp_path / "hub", tmp_path / "cache") as fake:
    env = {**os.environ, **fake.env}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT, "hf:acme/corpus", tests_dir],
                            cwd=os.path.dirname(tests_dir), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    ranged = [p for method, p in fake.requests if method == "GET" and p.endswith(".parquet")]
  assert out["texts"] == corpus_lines[:40]
  assert out["shards"] == [corpus_lines[:20], corpus_lines[20:40]]  # 2 files, 2 hosts: a file each.
  assert out["resumed_at_13"] == corpus_lines[13:40]
  assert ranged and not any("validation" in p for p in ranged)
  assert not os.path.exists(tmp_path / "cache" / "hub" / "datasets--acme--corpus" / "blobs"), "streamed, not downloaded"


def test_positions_read_after_a_resume_resume_too(parquet_corpus, vocab_dir, tokenizer):  # noqa: F811
  """A saved position may come from a stream that was itself resumed (resume, train on, save, resume): the
  first document after a resume must carry its own position, not the start of the stream."""
  spec, texts = parquet_corpus
  source = open_source(DataConfig(source=spec))
  positions = [json.loads(json.dumps(p)) for p, _ in read_all(source)]
  for first, then in ((3, 0), (3, 4), (40, 0), (40, 30)):
    resumed = list(source.read(positions[first], 0))
    again = [t for _, t in source.read(json.loads(json.dumps(resumed[then][0])), 0)]
    assert again == texts[first + then:], (first, then)
  # The same through the iterator: resume, read on, save, resume again (window 1: every batch saves a start).
  make = lambda: make_iterator(vocab_dir, tokenizer, source=spec, batch_size=2, shuffle_window=1)  # noqa: E731
  reference = collect(make(), 16)
  for cuts in ((8, 1), (3, 5), (1, 1)):
    iterator, done = make(), 0
    for cut in cuts:
      collect(iterator, cut)
      done += cut
      state = json.loads(json.dumps(iterator.get_state()))
      iterator = make()
      iterator.set_state(state)
    for offset, batch in enumerate(collect(iterator, 4)):
      for key, value in batch.items():
        assert (value == reference[done + offset][key]).all(), (cuts, offset, key)
