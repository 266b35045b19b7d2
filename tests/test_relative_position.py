"""Log buckets against transformers' own function, and the Toeplitz index against the [L, L] definition."""

import numpy as np
import pytest

from debertax.relative_position import distance_to_table_index, log_bucket, table_index_matrix


@pytest.mark.parametrize("bucket_size,max_position", [(256, 512), (16, 512), (64, 256), (512, 512)])
def test_log_bucket_matches_transformers(bucket_size, max_position):
  torch = pytest.importorskip("torch")
  from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position
  r = np.arange(-9000, 9001)
  ref = make_log_bucket_position(torch.tensor(r), bucket_size, max_position).long().numpy()
  np.testing.assert_array_equal(log_bucket(r, bucket_size, max_position), ref)


def test_reference_examples():
  # Hand-computed for k = 256, max 512: bucket = ceil(log(r/128) / log(511/128) * 127) + 128 for r > 128,
  # e.g. r = 129 -> ceil(0.714) + 128 = 129. (deberta.md section 2 lists this same sequence for 129..135,
  # one position off: it is the sequence for 128..134, transformers agrees with the formula.)
  np.testing.assert_array_equal(log_bucket(np.arange(128, 135), 256, 512), [128, 129, 130, 131, 131, 132, 133])
  np.testing.assert_array_equal(log_bucket(-np.arange(128, 135), 256, 512), [-128, -129, -130, -131, -131, -132, -133])
  assert log_bucket(np.array([511]), 256, 512)[0] == 255
  assert log_bucket(np.array([128]), 256, 512)[0] == 128  # |r| <= mid is kept as is.


@pytest.mark.parametrize("length,buckets,span", [(40, 16, 512), (600, 256, 512), (50, -1, 24), (7, 256, 512)])
def test_toeplitz_index_equals_pairwise_definition(length, buckets, span):
  i = np.arange(length)[:, None]
  j = np.arange(length)[None, :]
  k = buckets if buckets > 0 else span
  bucket = log_bucket(i - j, buckets, span) if buckets > 0 else i - j
  expected = np.clip(bucket + k, 0, 2 * k - 1)
  np.testing.assert_array_equal(table_index_matrix(length, buckets, span), expected)
  assert distance_to_table_index(length, buckets, span).shape == (2 * length - 1,)


def test_beyond_512_collapses_to_outermost_buckets():
  index = distance_to_table_index(2048, 256, 512)
  r = np.arange(-2047, 2048)
  assert set(index[r >= 512]) == {511}
  assert set(index[r <= -512]) == {0}  # Hugging Face; the authors' code (clamping r first) gives 1.
