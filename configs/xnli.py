"""Zero-shot cross-lingual XNLI: fine-tune on English MNLI, evaluate on the 15 XNLI languages.

    python -m debertax.main --config=configs/xnli.py --config.init_from=DIR --workdir=W \
        --config.data_dir=GLUE_ROOT --config.xnli.eval_dir=/path/to/xnli

Training data: GLUE_ROOT/MNLI/train.tsv when data_dir is set, else TFDS multi_nli. With
`xnli.translate_train_all=True` the training set is every language's file xnli.translate_train_dir/
train-<lang>.tsv (premise, hypothesis, label; XNLI format) instead. Evaluation: xnli.eval_dir/dev/dev-<lang>.tsv
and test/test-<lang>.tsv (the test folder is optional), else TFDS xnli. The best epoch is chosen on
xnli.select_on ("en": English dev, the zero-shot protocol; "avg": the mean over the evaluated languages).
Evaluation only: `--config.eval_only=True` (or train.epochs=0) with init_from = a fine-tuned checkpoint.
"""

import ml_collections

from configs import glue
from debertax.tasks import XNLI_LANGUAGES


def get_config():
  c = glue.finetune_config("xnli")
  c.task = "xnli"
  c.xnli = ml_collections.ConfigDict()
  c.xnli.languages = ",".join(XNLI_LANGUAGES)  # Comma-separated; the table shows the paper's order.
  c.xnli.eval_dir = ""  # Local XNLI root with dev/ and test/; empty: TFDS xnli.
  c.xnli.select_on = "en"  # en | avg
  c.xnli.translate_train_all = False
  c.xnli.translate_train_dir = ""  # <dir>/train-<lang>.tsv for translate-train-all.
  return c
