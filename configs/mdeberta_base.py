"""mdeberta-v3-base (the headline): 250k multilingual vocabulary, base shape, CC100-style data.

Data (`--config.data.source=...`; debertax/data.py and debertax/hf_source.py):
  hf:allenai/c4:multilingual   the default: mC4 (AllenAI's copy, 100+ languages, JSON Lines on the Hub),
                               streamed; nothing to prepare. One language: hf:allenai/c4:de. Pin a revision
                               (hf:allenai/c4@<commit>:multilingual) for runs that resume over weeks.
  gs://bucket/corpus/*.jsonl.gz, gs://bucket/corpus/*.parquet, gs://bucket/corpus/**/*.txt
                               your own corpus in a bucket (text: one document per line; JSONL/Parquet/CSV:
                               one per row, column config.data.text_feature).
  tfds:c4/multilingual         TFDS, once built in array_record format (Beam; see the TFDS catalog).
The paper pretrained mDeBERTa on CC100, which the Hub offers only through a loading script (not supported
by datasets >= 4); mC4 covers the same languages from the same kind of source (Common Crawl).
"""

from configs import common


def get_config():
  config = common.pretrain_config(common.model_config("base", vocab_size=251000), lr=1e-4, batch_size=256)
  config.data.source = "hf:allenai/c4:multilingual"
  return config
