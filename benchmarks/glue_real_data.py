"""Runs the fine-tuning pipeline end to end on the real GLUE and XNLI files of ../shared/data.

    .venv/bin/python benchmarks/glue_real_data.py [--init_from=/tmp/tiny_pretrain/export/discriminator]
        [--data_root=../shared/data] [--workdir=/tmp/glue_real] [--tasks=rte,mrpc,cola,stsb,sst2] [--skip_xnli]

Starts from the tiny model that `python -m debertax.main --config=configs/tiny.py --workdir=/tmp/tiny_pretrain`
pretrains (run with --pretrain to do that first). The runs are kept short for a CPU: one epoch, max length 128,
lr 1e-4 (the tiny model barely moves at the large-model learning rates), SST-2 capped at its first 8000 training
rows; everything else is the task default of tasks.default_hparams (xsmall row). Scores are those of a 1.8M-
parameter model pretrained for 3 minutes: the point is that the real pipeline runs and reports correctly.

GLUE: the real dev sets are scored every epoch (no test files are shipped, so no test submissions are written).
XNLI: MNLI is not in ../shared/data (TFDS serves it where there is network), so the English XNLI *test* file
stands in for the MNLI training set, written in MNLI format to a temporary folder; evaluation covers the 15 real
XNLI dev files (the test files are left out, as English test was trained on). This is NOT the paper's protocol.

Every step is an ordinary command line (printed before it runs); the tables, wall times and commands are written to
<workdir>/REPORT.md.

Whether pretraining helps downstream (a model pretrained on real English text vs the same model from random
initialisation vs the majority class, with the fine-tuning defaults) and the embedding-sharing comparison are the job
of benchmarks/pretrain_then_finetune.py; this script stays the quick end-to-end check of the fine-tuning pipeline on
the real files, XNLI included. Its --init_from also takes that script's
<workdir>/pretrain/gdes_s0/export/discriminator.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from debertax.compile_options import CPU_MALLOC_TUNABLES  # noqa: E402

SHORT_RUN = ["train.epochs=1", "train.max_length=128", "train.lr=1e-4", "sst2:max_train_examples=8000"]


def _run(command: list[str], log_path: str) -> float:
  """Runs a command from the project root, tees nothing (the log goes to a file), returns its wall time."""
  print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
  started = time.time()
  env = {**os.environ, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", CPU_MALLOC_TUNABLES)}
  with open(log_path, "w") as log:
    code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
  elapsed = time.time() - started
  if code:
    raise SystemExit(f"command failed with exit code {code}; see {log_path}")
  print(f"  done in {elapsed:.0f} s (log: {log_path})", flush=True)
  return elapsed


def write_mnli_stand_in(xnli_test_en: str, glue_root: str) -> int:
  """XNLI English test rows -> <glue_root>/MNLI/train.tsv in GLUE's MNLI format (labels as names)."""
  from debertax import tasks
  rows = tasks.read_tsv("xnli", xnli_test_en).examples
  os.makedirs(os.path.join(glue_root, "MNLI"), exist_ok=True)
  with open(os.path.join(glue_root, "MNLI", "train.tsv"), "w", encoding="utf-8") as f:
    f.write("index\tsentence1\tsentence2\tgold_label\n")
    for i, row in enumerate(rows):
      f.write(f"{i}\t{row.text_a}\t{row.text_b}\t{tasks.NLI_LABELS[row.label]}\n")
  return len(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--init_from", default="/tmp/tiny_pretrain/export/discriminator")
  parser.add_argument("--data_root", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
  parser.add_argument("--workdir", default="/tmp/glue_real")
  parser.add_argument("--tasks", default="rte,mrpc,cola,stsb,sst2")
  parser.add_argument("--model_size", default="xsmall", help="row of the default hyperparameters")
  parser.add_argument("--pretrain", action="store_true", help="pretrain configs/tiny.py into /tmp/tiny_pretrain")
  parser.add_argument("--skip_xnli", action="store_true")
  args = parser.parse_args()
  python = sys.executable
  os.makedirs(args.workdir, exist_ok=True)
  report = ["# Real-data fine-tuning runs", "", f"init_from: `{args.init_from}`", ""]

  if args.pretrain:
    seconds = _run([python, "-m", "debertax.main", "--config=configs/tiny.py", "--workdir=/tmp/tiny_pretrain"],
                   os.path.join(args.workdir, "pretrain.log"))
    report += [f"Tiny pretraining: {seconds:.0f} s", ""]
  if not os.path.isdir(args.init_from):
    raise SystemExit(f"--init_from={args.init_from}: not a directory (run with --pretrain first)")

  suite_dir = os.path.join(args.workdir, "glue")
  command = [python, "-m", "debertax.glue_suite", f"--tasks={args.tasks}", f"--init_from={args.init_from}",
             f"--data_dir={os.path.join(args.data_root, 'glue')}", f"--workdir={suite_dir}",
             f"--model_size={args.model_size}"] + [f"--set={s}" for s in SHORT_RUN]
  seconds = _run(command, os.path.join(args.workdir, "glue.log"))
  with open(os.path.join(suite_dir, "glue_results.json")) as f:
    summary = json.load(f)
  with open(os.path.join(suite_dir, "glue_table.md")) as f:
    table = f.read().strip()
  report += ["## GLUE dev (1 epoch, max length 128, lr 1e-4, SST-2: first 8000 training rows)", "",
             "```", " ".join(shlex.quote(c) for c in command), "```", "", table, "",
             "| task | dev metrics | wall time (s) |", "|---|---|---|"]
  for task in summary["tasks"]:
    with open(os.path.join(suite_dir, task, "results.json")) as f:
      result = json.load(f)
    metrics = "; ".join(f"{split}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in m.items())
                        for split, m in result["metrics"].items())
    report.append(f"| {task} | {metrics} | {result['wall_time_s']:.0f} |")
  report += ["", f"GLUE suite total: {seconds:.0f} s", ""]

  if not args.skip_xnli:
    stand_in = os.path.join(args.workdir, "mnli_stand_in")
    eval_root = os.path.join(args.workdir, "xnli_dev_only")
    rows = write_mnli_stand_in(os.path.join(args.data_root, "xnli", "test", "test-en.tsv"), stand_in)
    os.makedirs(eval_root, exist_ok=True)
    link = os.path.join(eval_root, "dev")
    if not os.path.islink(link):
      os.symlink(os.path.join(os.path.abspath(args.data_root), "xnli", "dev"), link)
    xnli_dir = os.path.join(args.workdir, "xnli")
    command = [python, "-m", "debertax.main", "--config=configs/xnli.py", f"--config.init_from={args.init_from}",
               f"--config.data_dir={stand_in}", f"--config.xnli.eval_dir={eval_root}",
               f"--config.model_size={args.model_size}", "--config.train.epochs=1", "--config.train.max_length=128",
               "--config.train.lr=1e-4", f"--workdir={xnli_dir}"]
    seconds = _run(command, os.path.join(args.workdir, "xnli.log"))
    from debertax import finetune
    with open(os.path.join(xnli_dir, "results.json")) as f:
      result = json.load(f)
    report += [f"## XNLI dev, 15 languages (trained on the {rows} English XNLI test rows as an MNLI stand-in)", "",
               "```", " ".join(shlex.quote(c) for c in command), "```", "", finetune.result_tables(result), "",
               f"XNLI wall time: {seconds:.0f} s (run {result['wall_time_s']:.0f} s)", ""]

  with open(os.path.join(args.workdir, "REPORT.md"), "w") as f:
    f.write("\n".join(report) + "\n")
  print("\n".join(report))


if __name__ == "__main__":
  main()
