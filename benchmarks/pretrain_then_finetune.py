"""Does pretraining help downstream? Pretrain configs/tiny.py on real English text, fine-tune on GLUE, compare.

    .venv/bin/python benchmarks/pretrain_then_finetune.py [--workdir=/tmp/pretrain_then_finetune]
        [--pretrain_steps=3000] [--finetune_epochs=3] [--tasks=rte,mrpc,stsb,cola,sst2]

    .venv/bin/python benchmarks/pretrain_then_finetune.py --study=sharing --modes=gdes,es,nes,mlm --seeds=0,1 \\
        [--parts=pretrain,finetune,baselines] [--report_only]

Part A (default). Stages, each an ordinary command line (printed before it runs, its log kept in the workdir):
  1. corpus     the English text of ../shared/data/text (Gutenberg en_*.txt between the START/END markers,
                Leipzig eng*.txt sentences, tinyshakespeare) -> <workdir>/corpus/corpus.txt with ONE DOCUMENT PER
                LINE, as debertax.data reads it: blank-line separated paragraphs of the hard-wrapped books become
                one line each, paragraphs / sentences shorter than --min_chars are dropped;
  2. vocab      `python -m debertax.train_vocab` on that corpus (--vocab_size pieces) -> <workdir>/vocab/spm.model,
                shared by every pretraining run and by the random-init baseline, so all of them read the same ids;
  3. pretrain   `python -m debertax.main --config=configs/tiny.py` on the corpus for --pretrain_steps steps
                (run <mode>_s<seed>: gdes, seed 0 in part A) -> <workdir>/pretrain/<run>/export/discriminator;
  4. finetune   `python -m debertax.main --config=configs/glue.py:<task>` on the GLUE dev sets of ../shared/data/glue,
                from the pretrained discriminator (<workdir>/finetune/<run>/<task>) and from random initialisation
                (<workdir>/finetune/random/<task>) with the same hyperparameters;
  5. baselines  the majority class: the most frequent training label, scored on the dev labels (STS-B: the mean
                training score, whose Pearson/Spearman is undefined and reported as 0; CoLA: MCC of a constant is 0).
The table (task, metric, majority, random init, pretrained, average) and the command lines go to
<workdir>/REPORT.md.

Part B (--study=sharing): the same pretraining with config.rtd.embedding_sharing in --modes and config.seed in
--seeds (mode `mlm`: the paper's baseline, `config.objective=mlm`, plain MLM pretraining of one model of the
discriminator's shape with the Enhanced Mask Decoder, fine-tuned from <run>/export/mlm), each fine-tuned as in
part A, reported per run (held-out RTD AUC, MLM accuracy and loss, the average
pairwise cosine similarity of E_G and of the discriminator's effective embedding E_D, downstream dev scores) and
as mean +- sample standard deviation over seeds, next to the paper's Table 1 cosines; the eval curves go to
<workdir>/sharing_curves.png and the report to <workdir>/REPORT_sharing.md. `--modes/--seeds` pick a subset of
the runs and `--parts` a subset of the stages, so a long study can be spread over sessions (the workdir must
persist between them; part A's workdir can be reused: its gdes_s0 run and baselines are then not redone);
`--report_only` rebuilds the report from every run found in the workdir (give it the same --tasks).

Vocabulary: --vocab_size=4000 rather than configs/tiny.py's 2000. Measured on this corpus, the GLUE dev texts take
2.07 tokens per word with 2000 pieces, 1.80 with 4000 and 1.59 with 8000; 4000 shortens sequences by 13% (a
quarter of the RTE pairs still exceed 128 tokens) while keeping the embedding table (0.5M of the ~2.3M parameters)
small enough to be trained by a 3000-step run.

Resuming: a stage that finished wrote <its directory>/ptf_stage.json and is skipped the next time; a killed stage
is rerun with the same command, and the pretraining and fine-tuning jobs resume from their own checkpoints. A
stage whose record holds other settings than the ones asked for stops the run (use another --workdir).
Every child process runs under GLIBC_TUNABLES=debertax.compile_options.CPU_MALLOC_TUNABLES unless the
environment sets it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TASKS = ("rte", "mrpc", "stsb", "cola", "sst2")
MODES = ("gdes", "es", "nes", "mlm")  # mlm: config.objective=mlm, the others config.rtd.embedding_sharing.


def exported_model(mode: str) -> str:
  """The export/<name> directory that a pretraining run of `mode` hands to fine-tuning."""
  return "mlm" if mode == "mlm" else "discriminator"


def fine_tuned_cosine(record: Mapping) -> float | None:
  """The average pairwise cosine of the fine-tuned model's word embedding: E_D (RTD), or the MLM model's E."""
  return record.get("cosine_E_D", record.get("cosine_E"))
# DeBERTaV3 paper, Table 1: average pairwise cosine similarity of the word embeddings (E_G, E_D).
PAPER_COSINE = {"es": (0.02, 0.02), "nes": (0.45, 0.02), "gdes": (0.45, 0.29)}
STAGE_FILE = "ptf_stage.json"
PARTIAL_FILE = "ptf_partial.json"  # Wall time of a stage's interrupted attempts.
DEFAULT_MAX_TRAIN = "sst2=8000"
METRIC_LABELS = {"accuracy": "acc", "f1": "F1", "mcc": "MCC", "pearson": "Pearson", "spearman": "Spearman"}


# Corpus -------------------------------------------------------------------------------------------------------
def english_sources(text_root: str) -> list[tuple[str, str]]:
  """(path, kind) of the English files under ../shared/data/text; kind: gutenberg | leipzig | paragraphs."""
  import glob
  sources = [(p, "gutenberg") for p in sorted(glob.glob(os.path.join(text_root, "gutenberg", "en_*.txt")))]
  sources += [(p, "leipzig") for p in sorted(glob.glob(os.path.join(text_root, "leipzig", "sentences", "eng*.txt")))]
  sources += [(p, "paragraphs") for p in sorted(glob.glob(os.path.join(text_root, "tinyshakespeare", "*.txt")))]
  if not sources:
    raise FileNotFoundError(f"{text_root}: no English text (gutenberg/en_*.txt, leipzig/sentences/eng*.txt, "
                            "tinyshakespeare/*.txt)")
  return sources


def gutenberg_body(lines: Iterable[str]) -> Iterator[str]:
  """The lines strictly between the `*** START OF` and `*** END OF` markers (all lines when there is no START)."""
  lines = list(lines)
  start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("*** START OF")), None)
  if start is None:
    yield from lines
    return
  for line in lines[start + 1:]:
    if line.lstrip().startswith("*** END OF"):
      return
    yield line


def paragraphs(lines: Iterable[str]) -> Iterator[str]:
  """Blank-line separated blocks of hard-wrapped lines -> one string each, runs of whitespace made one space."""
  block: list[str] = []
  for line in lines:
    words = line.split()
    if words:
      block.extend(words)
    elif block:
      yield " ".join(block)
      block = []
  if block:
    yield " ".join(block)


def leipzig_sentences(lines: Iterable[str]) -> Iterator[str]:
  """`id<TAB>sentence` lines -> the sentences, whitespace normalised."""
  for line in lines:
    text = line.split("\t", 1)[1] if "\t" in line else line
    text = " ".join(text.split())
    if text:
      yield text


def documents_of(path: str, kind: str) -> Iterator[str]:
  """The documents of one source file (UTF-8, a byte-order mark and CR line ends removed)."""
  with open(path, encoding="utf-8-sig", newline=None) as f:
    lines = f.read().split("\n")
  if kind == "gutenberg":
    return paragraphs(gutenberg_body(lines))
  if kind == "paragraphs":
    return paragraphs(lines)
  if kind == "leipzig":
    return leipzig_sentences(lines)
  raise ValueError(f"{path}: unknown source kind {kind!r}")


def prepare_corpus(sources: Sequence[tuple[str, str]], out_path: str, min_chars: int) -> dict:
  """Writes one document per line to out_path (atomically); returns counts per source and in total."""
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  stats = {"documents": 0, "bytes": 0, "skipped_short": 0, "min_chars": min_chars, "sources": []}
  tmp = out_path + ".tmp"
  with open(tmp, "w", encoding="utf-8", newline="\n") as out:
    for path, kind in sources:
      kept = skipped = size = 0
      for doc in documents_of(path, kind):
        if len(doc) < min_chars:
          skipped += 1
          continue
        line = doc + "\n"
        out.write(line)
        kept += 1
        size += len(line.encode("utf-8"))
      stats["sources"].append({"path": path, "kind": kind, "documents": kept, "bytes": size,
                               "skipped_short": skipped})
      stats["documents"] += kept
      stats["bytes"] += size
      stats["skipped_short"] += skipped
  os.replace(tmp, out_path)
  return stats


# Stages -------------------------------------------------------------------------------------------------------
class StageMismatch(RuntimeError):
  """A finished stage in the workdir was made with other settings than the ones asked for."""


def _plain_json(value):
  return json.loads(json.dumps(value))


def stage_record(directory: str) -> dict | None:
  path = os.path.join(directory, STAGE_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def stage_done(directory: str, params: Mapping) -> bool:
  """True when the stage in `directory` finished with these params; StageMismatch when it finished with others."""
  record = stage_record(directory)
  if record is None:
    return False
  if record.get("params") != _plain_json(dict(params)):
    old, new = record.get("params", {}), _plain_json(dict(params))
    absent = "(absent)"
    diff = {k: (old.get(k, absent), new.get(k, absent)) for k in sorted(set(old) | set(new))
            if old.get(k, absent) != new.get(k, absent)}
    raise StageMismatch(f"{directory}: finished with other settings (recorded, asked): {diff}; use another "
                        f"--workdir, or delete {directory} to redo the stage")
  return True


def mark_done(directory: str, params: Mapping, **info) -> dict:
  """Records a finished stage (atomically): its params and whatever info (wall time, command, results)."""
  os.makedirs(directory, exist_ok=True)
  record = _plain_json({"params": dict(params), **info})
  path = os.path.join(directory, STAGE_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=2)
  os.replace(path + ".tmp", path)
  return record


def run_stage(name: str, directory: str, params: Mapping, action: Callable[[], dict | None]) -> dict:
  """Runs `action` unless the stage is done; returns the stage record. action returns extra info to record.

  The record's wall_s adds up the attempts: an interrupted or failed one leaves its time in PARTIAL_FILE."""
  if stage_done(directory, params):
    print(f"[{name}] done earlier: skipped ({directory})", flush=True)
    return stage_record(directory)
  os.makedirs(directory, exist_ok=True)
  partial_path = os.path.join(directory, PARTIAL_FILE)
  earlier = {"wall_s": 0.0, "attempts": 0}
  if os.path.exists(partial_path):
    with open(partial_path) as f:
      earlier = json.load(f)
  print(f"[{name}] starting" + (f" (attempt {earlier['attempts'] + 1}, {format_seconds(earlier['wall_s'])} spent "
                                "before)" if earlier["attempts"] else ""), flush=True)
  started = time.time()

  def save_partial():
    with open(partial_path + ".tmp", "w") as f:
      json.dump({"wall_s": earlier["wall_s"] + time.time() - started, "attempts": earlier["attempts"] + 1}, f)
    os.replace(partial_path + ".tmp", partial_path)

  # Refreshed every minute, so an attempt killed outright (SIGKILL, a machine taken away) still counts.
  stop = threading.Event()

  def refresh():
    while not stop.wait(60.0):
      save_partial()

  refresher = threading.Thread(target=refresh, daemon=True)
  save_partial()
  refresher.start()
  try:
    info = action() or {}
  except BaseException:
    save_partial()
    raise
  finally:
    stop.set()
    refresher.join()
  record = mark_done(directory, params, wall_s=round(earlier["wall_s"] + time.time() - started, 1),
                     attempts=earlier["attempts"] + 1, **info)
  if os.path.exists(partial_path):
    os.remove(partial_path)
  print(f"[{name}] finished in {format_seconds(record['wall_s'])}", flush=True)
  return record


def format_seconds(seconds: float | None) -> str:
  if seconds is None or not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(name: str, done: int, total: int, unit: str, elapsed: float, rate_window: tuple | None) -> str:
  """'[name] 340/1500 steps (23%), 2.9 steps/s, elapsed 1m52s, ETA 6m40s'. rate_window: (first done seen,
  seconds since then): the rate excludes the start-up (imports, compilation, vocabulary)."""
  rate = None
  if rate_window is not None and rate_window[1] > 0 and done > rate_window[0]:
    rate = (done - rate_window[0]) / rate_window[1]
  eta = (total - done) / rate if rate else None
  share = f" ({100 * done / total:.0f}%)" if total else ""
  speed = f", {rate:.2f} {unit}/s" if rate else ""
  return f"[{name}] {done}/{total} {unit}{share}{speed}, elapsed {format_seconds(elapsed)}, ETA {format_seconds(eta)}"


def child_env() -> dict:
  from debertax.compile_options import CPU_MALLOC_TUNABLES
  return {**os.environ, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", CPU_MALLOC_TUNABLES)}


def quote(command: Sequence[str]) -> str:
  return " ".join(shlex.quote(c) for c in command)


def run_command(name: str, command: list[str], log_path: str, progress: Callable[[], tuple[int, int]] | None = None,
                unit: str = "steps", poll_s: float = 20.0) -> float:
  """Runs a command from the project root with its output appended to log_path; prints progress (done, total
  from `progress`) with an ETA every poll_s seconds. Ctrl-C / SIGTERM forwards SIGTERM (the jobs save and stop)."""
  print("$ " + quote(command), flush=True)
  started = time.time()
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  with open(log_path, "a") as log:
    log.write(f"\n# {datetime.datetime.now().isoformat(timespec='seconds')} $ {quote(command)}\n")
    log.flush()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=child_env())
    first_seen, last_printed = None, None
    try:
      while proc.poll() is None:
        time.sleep(min(poll_s, 2.0) if last_printed is None else poll_s)
        if progress is None:
          continue
        try:
          done, total = progress()
        except (OSError, ValueError, KeyError):
          continue
        now = time.time()
        if done > 0 and first_seen is None:
          first_seen = (done, now)
        if done and done != last_printed:
          window = (first_seen[0], now - first_seen[1]) if first_seen else None
          print(progress_line(name, done, total, unit, now - started, window), flush=True)
          last_printed = done
    except KeyboardInterrupt:
      print(f"[{name}] interrupted: stopping the job (pretraining saves at its next step, fine-tuning resumes from "
            "its last checkpoint)", flush=True)
      proc.terminate()
      proc.wait()
      raise
  elapsed = time.time() - started
  if proc.returncode:
    with open(log_path, errors="replace") as f:
      tail = f.readlines()[-15:]
    raise SystemExit(f"[{name}] failed with exit code {proc.returncode} after {format_seconds(elapsed)}; last lines "
                     f"of {log_path}:\n" + "".join(tail))
  return elapsed


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:  # A line being written.
        pass
  return records


def last_step(path: str, split: str = "train") -> int:
  return max((int(r["step"]) for r in read_jsonl(path) if r.get("split") == split), default=0)


def last_eval(path: str) -> dict | None:
  """The eval record with the largest step (the end of the pretraining run) of a metrics.jsonl."""
  evals = [r for r in read_jsonl(path) if r.get("split") == "eval"]
  return max(evals, key=lambda r: r["step"]) if evals else None


def eval_curve(path: str, key: str) -> list[tuple[int, float]]:
  """(step, value) of `key` over the eval records, one per step (the last written wins: a resumed run repeats)."""
  points = {int(r["step"]): float(r[key]) for r in read_jsonl(path) if r.get("split") == "eval" and key in r}
  return sorted(points.items())


# Majority baseline and tables ---------------------------------------------------------------------------------
def majority_metrics(task: str, train_labels: Sequence, dev_labels: Sequence) -> tuple[dict, str]:
  """Metrics of predicting the most frequent training label (ties: the lower id) on every dev row; for the
  regression task STS-B, the mean training score. Undefined metrics (the correlation of a constant) are 0.

  Returns (metrics, note)."""
  import numpy as np
  from debertax import eval_metrics, tasks
  spec = tasks.get_task(task)
  if spec.is_regression:
    constant = float(np.mean(np.asarray(train_labels, np.float64)))
    predictions = np.full(len(dev_labels), constant, np.float32)
    note = f"constant {constant:.3f} (mean training score)"
  else:
    counts = np.bincount(np.asarray(train_labels, np.int64), minlength=spec.num_labels)
    label = int(np.argmax(counts))
    predictions = np.full(len(dev_labels), label, np.int32)
    note = f"always {spec.label_names[label]!r} ({counts[label]} of {counts.sum()} training rows)"
  metrics = eval_metrics.compute_task_metrics(task, predictions, np.asarray(dev_labels))
  undefined = sorted(k for k, v in metrics.items() if not math.isfinite(v))
  if undefined:
    note += f"; {'/'.join(undefined)} of a constant is undefined: reported as 0"
  return {k: (v if math.isfinite(v) else 0.0) for k, v in metrics.items()}, note


def main_metric(task: str) -> str:
  from debertax import tasks
  return tasks.get_task(task).main_metric


def task_score(task: str, metrics: Mapping[str, float] | None) -> float | None:
  """The task's number in the GLUE average (CoLA MCC, STS-B Pearson, accuracy elsewhere) or None."""
  if not metrics:
    return None
  return float(metrics[main_metric(task)])


def _percent(value: float | None) -> str:
  return "-" if value is None else f"{100 * value:.1f}"


def comparison_table(task_names: Sequence[str], columns: Mapping[str, Mapping[str, Mapping | None]]) -> str:
  """Markdown: task | metric | one column per entry of `columns` ({column: {task: dev metrics or None}}),
  percentages with one decimal; the last row averages each column over the tasks ("-" when one is missing)."""
  from debertax import tasks
  header = ["task", "metric", *columns]
  rows = []
  for task in task_names:
    spec = tasks.get_task(task)
    rows.append([spec.display_name, METRIC_LABELS.get(spec.main_metric, spec.main_metric),
                 *(_percent(task_score(task, col.get(task))) for col in columns.values())])
  averages = []
  for col in columns.values():
    scores = [task_score(task, col.get(task)) for task in task_names]
    averages.append(_percent(sum(scores) / len(scores)) if scores and None not in scores else "-")
  rows.append(["Average", f"{len(task_names)} tasks", *averages])
  return markdown([header, *rows])


def markdown(rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows[1:]]
  return "\n".join(lines)


def mean_spread(values: Sequence[float | None], scale: float = 1.0, decimals: int = 3) -> str:
  """'m +- s (n=k)' with the sample standard deviation; '-' without values; 'm (n=1)' for one."""
  values = [v * scale for v in values if v is not None and math.isfinite(v)]
  if not values:
    return "-"
  mean = sum(values) / len(values)
  if len(values) == 1:
    return f"{mean:.{decimals}f} (n=1)"
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
  return f"{mean:.{decimals}f} +- {sd:.{decimals}f} (n={len(values)})"


def parse_max_train(text: str, task_names: Sequence[str]) -> dict[str, int]:
  """'sst2=8000,cola=4000', '200' (every task) or 'all=200,sst2=8000' -> {task: N} (0: no cap). A task's own
  entry wins over 'all'; entries for GLUE tasks that are not in task_names are ignored."""
  from debertax import tasks
  caps = dict.fromkeys(task_names, 0)
  entries = []
  for part in filter(None, (p.strip() for p in text.split(","))):
    key, _, value = part.rpartition("=")
    key = key.strip().lower() or "all"
    if key != "all" and key not in tasks.GLUE_TASK_NAMES:
      raise ValueError(f"--max_train_examples {part!r}: unknown task {key!r}")
    if int(value) < 0:
      raise ValueError(f"--max_train_examples {part!r}: a cap is >= 0")
    entries.append((key, int(value)))
  for key, value in sorted(entries, key=lambda e: e[0] != "all"):  # 'all' first, then the tasks' own.
    for task in (task_names if key == "all" else [key] if key in caps else []):
      caps[task] = value
  return caps


# The runs -----------------------------------------------------------------------------------------------------
def random_init_overrides() -> dict:
  """config.model.* that make a random-init fine-tuning run build configs/tiny.py's discriminator: the fields in
  which it differs from the released xsmall settings that a random initialisation starts from."""
  from configs import common, tiny
  model = tiny.get_config().model.to_dict()
  base = common.model_config("xsmall").to_dict()
  return {k: v for k, v in model.items() if k != "vocab_size" and base.get(k) != v}


def config_flag(key: str, value) -> str:
  return f"--config.{key}={value}"


class Benchmark:
  """Paths, stages and reports of one workdir."""

  def __init__(self, args):
    self.args = args
    self.workdir = os.path.abspath(args.workdir)
    self.data_root = os.path.abspath(args.data_root)
    self.glue_dir = os.path.join(self.data_root, "glue")
    self.python = sys.executable
    self.task_names = [t.strip().lower() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(self.task_names) - set(TASKS))
    if unknown:
      raise SystemExit(f"--tasks: {unknown} are not among {TASKS} (the GLUE tasks in ../shared/data/glue)")
    self.caps = parse_max_train(args.max_train_examples, self.task_names)
    self.corpus_dir = os.path.join(self.workdir, "corpus")
    self.corpus = os.path.join(self.corpus_dir, "corpus.txt")
    self.vocab_dir = os.path.join(self.workdir, "vocab")
    self.spm = os.path.join(self.vocab_dir, "spm.model")
    self._train_rows: dict[str, int] = {}
    self._random_init: dict | None = None

  # Paths.
  def pretrain_dir(self, run: str) -> str:
    return os.path.join(self.workdir, "pretrain", run)

  def finetune_dir(self, init: str, task: str) -> str:
    return os.path.join(self.workdir, "finetune", init, task)

  def baseline_dir(self, task: str) -> str:
    return os.path.join(self.workdir, "baselines", task)

  # Stages.
  def corpus_stage(self) -> dict:
    sources = english_sources(os.path.join(self.data_root, "text"))
    params = {"sources": [[p, k] for p, k in sources], "min_chars": self.args.min_chars}

    def action():
      stats = prepare_corpus(sources, self.corpus, self.args.min_chars)
      print(f"[corpus] {stats['documents']:,} documents, {stats['bytes'] / 1e6:.2f} MB -> {self.corpus}", flush=True)
      return {"stats": stats}
    return run_stage("corpus", self.corpus_dir, params, action)

  def vocab_stage(self) -> dict:
    params = {"corpus": self.corpus, "vocab_size": self.args.vocab_size}
    command = [self.python, "-m", "debertax.train_vocab", f"--source={self.corpus}",
               f"--vocab_size={self.args.vocab_size}", f"--output_dir={self.vocab_dir}"]

    def action():
      run_command("vocab", command, os.path.join(self.vocab_dir, "train_vocab.log"), poll_s=self.args.poll_s)
      return {"command": quote(command)}
    return run_stage("vocab", self.vocab_dir, params, action)

  def pretrain_command(self, mode: str, seed: int) -> list[str]:
    run = f"{mode}_s{seed}"
    command = [self.python, "-m", "debertax.main", "--config=configs/tiny.py", f"--workdir={self.pretrain_dir(run)}",
               config_flag("data.source", self.corpus), config_flag("data.vocab", self.spm),
               config_flag("train.steps", self.args.pretrain_steps),
               config_flag("objective", "mlm") if mode == "mlm" else config_flag("rtd.embedding_sharing", mode),
               config_flag("seed", seed)]
    return command + [config_flag(*s.split("=", 1)) for s in self.args.pretrain_set]

  def pretrain_stage(self, mode: str, seed: int) -> dict:
    run = f"{mode}_s{seed}"
    directory = self.pretrain_dir(run)
    params = {"corpus": self.corpus, "vocab": self.spm, "steps": self.args.pretrain_steps, "mode": mode, "seed": seed,
              "set": list(self.args.pretrain_set)}
    command = self.pretrain_command(mode, seed)
    self._check_pretrain_config(directory, mode, seed)
    metrics = os.path.join(directory, "metrics.jsonl")

    def action():
      resumed = os.path.isdir(os.path.join(directory, "checkpoints"))
      run_command(f"pretrain {run}", command, os.path.join(directory, "pretrain.log"),
                  progress=lambda: (last_step(metrics), self.args.pretrain_steps), poll_s=self.args.poll_s)
      export = os.path.join(directory, "export", exported_model(mode))
      if not os.path.isdir(export):
        raise SystemExit(f"[pretrain {run}] finished without {export}; see {directory}/pretrain.log")
      with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
      tokens_per_step = config["train"]["batch_size"] * config["data"]["seq_len"]
      rates = [r["tokens_per_sec"] / tokens_per_step for r in read_jsonl(metrics)
               if r.get("split") == "train" and "tokens_per_sec" in r]
      median = sorted(rates)[len(rates) // 2] if rates else None  # The median leaves out compilation windows.
      return {"command": quote(command), "resumed": resumed, "final_eval": last_eval(metrics),
              "train_steps_per_s": median, "tokens_per_step": tokens_per_step}
    return run_stage(f"pretrain {run}", directory, params, action)

  def _check_pretrain_config(self, directory: str, mode: str, seed: int):
    """A killed pretraining run must resume with the same schedule: refuse other steps / mode / seed / data."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path) or stage_record(directory):
      return
    with open(path) as f:
      config = json.load(f)
    asked = {"train.steps": self.args.pretrain_steps, "mode": mode, "seed": seed, "data.source": self.corpus}
    found_mode = "mlm" if config.get("objective") == "mlm" else config["rtd"]["embedding_sharing"]
    found = {"train.steps": config["train"]["steps"], "mode": found_mode, "seed": config["seed"],
             "data.source": config["data"]["source"]}
    if asked != found:
      raise StageMismatch(f"{directory}: a run with {found} was started here; this one asks {asked}: use another "
                          "--workdir")

  def train_rows(self, task: str) -> int:
    if task not in self._train_rows:
      from debertax import tasks
      rows = len(tasks.read_glue_split(task, self.glue_dir, "train").examples)
      self._train_rows[task] = min(rows, self.caps[task]) if self.caps[task] else rows
    return self._train_rows[task]

  def random_init(self) -> dict:
    if self._random_init is None:
      self._random_init = random_init_overrides()
    return self._random_init

  def finetune_params(self, init: str, task: str) -> dict:
    params = {"init": init, "task": task, "glue_dir": self.glue_dir, "epochs": self.args.finetune_epochs,
              "max_length": self.args.max_length, "max_train_examples": self.caps[task],
              "set": list(self.args.finetune_set)}
    if init == "random":
      params.update(vocab=self.spm, model=self.random_init())
    return params

  def finetune_command(self, init: str, task: str) -> list[str]:
    command = [self.python, "-m", "debertax.main", f"--config=configs/glue.py:{task}",
               f"--workdir={self.finetune_dir(init, task)}", config_flag("data_dir", self.glue_dir),
               config_flag("train.epochs", self.args.finetune_epochs),
               config_flag("train.max_length", self.args.max_length)]
    if self.caps[task]:
      command.append(config_flag("max_train_examples", self.caps[task]))
    if init == "random":  # model_size stays "auto": the hyperparameter row follows from the shape, as it does
      # for the pretrained checkpoint, so both runs resolve the same hyperparameters.
      command += [config_flag("allow_random_init", True), config_flag("vocab", self.spm)]
      command += [config_flag(f"model.{k}", v) for k, v in self.random_init().items()]
    else:
      model = exported_model(tuple_run(init)[0])
      command.append(config_flag("init_from", os.path.join(self.pretrain_dir(init), "export", model)))
    return command + [config_flag(*s.split("=", 1)) for s in self.args.finetune_set]

  def finetune_stage(self, init: str, task: str) -> dict:
    directory = self.finetune_dir(init, task)
    if init != "random" and not stage_record(self.pretrain_dir(init)):
      raise SystemExit(f"[finetune {init}/{task}] the pretraining run {self.pretrain_dir(init)} has not finished: "
                       "run its pretrain part first")
    if init == "random" and not stage_record(self.vocab_dir):
      raise SystemExit(f"[finetune random/{task}] needs the vocabulary {self.spm}: run the pretrain part first")
    command = self.finetune_command(init, task)
    metrics = os.path.join(directory, "metrics.jsonl")

    def progress():
      with open(os.path.join(directory, "config.json")) as f:
        resolved = json.load(f)["resolved"]
      total = resolved["epochs"] * math.ceil(self.train_rows(task) / resolved["batch_size"])
      return last_step(metrics), total

    def action():
      run_command(f"finetune {init}/{task}", command, os.path.join(directory, "finetune.log"), progress=progress,
                  poll_s=self.args.poll_s)
      with open(os.path.join(directory, "results.json")) as f:
        results = json.load(f)
      return {"command": quote(command), "metrics": results["metrics"]["dev"], "settings": results["settings"],
              "train_examples": results["train_examples"], "best_epoch": results["best_epoch"],
              "run_wall_s": results["wall_time_s"]}
    return run_stage(f"finetune {init}/{task}", directory, self.finetune_params(init, task), action)

  def majority_stage(self, task: str) -> dict:
    def action():
      from debertax import tasks
      train = tasks.read_glue_split(task, self.glue_dir, "train").examples
      dev = tasks.read_glue_split(task, self.glue_dir, "dev").examples
      metrics, note = majority_metrics(task, [e.label for e in train], [e.label for e in dev])
      return {"metrics": metrics, "note": note, "train_rows": len(train), "dev_rows": len(dev)}
    return run_stage(f"majority {task}", self.baseline_dir(task), {"task": task, "glue_dir": self.glue_dir}, action)

  def baselines(self):
    for task in self.task_names:
      self.majority_stage(task)
    for task in self.task_names:
      self.finetune_stage("random", task)

  # Results.
  def results(self, init: str) -> dict[str, dict | None]:
    """{task: dev metrics} of the finished fine-tuning runs from `init` (a pretraining run or "random")."""
    out = {}
    for task in self.task_names:
      record = stage_record(self.finetune_dir(init, task))
      out[task] = record["metrics"] if record else None
    return out

  def majority(self) -> dict[str, dict | None]:
    return {task: (stage_record(self.baseline_dir(task)) or {}).get("metrics") for task in self.task_names}

  def finished_runs(self) -> list[tuple[str, int]]:
    """(mode, seed) of every finished pretraining run in the workdir, in MODES then seed order."""
    runs = []
    root = os.path.join(self.workdir, "pretrain")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
      match = re.fullmatch(r"(\w+)_s(\d+)", name)
      if match and stage_record(os.path.join(root, name)):
        runs.append((match.group(1), int(match.group(2))))
    return sorted(runs, key=lambda r: (MODES.index(r[0]) if r[0] in MODES else len(MODES), r[1]))

  # Reports.
  def header(self, title: str, command_line: str) -> list[str]:
    from debertax.compile_options import CPU_MALLOC_TUNABLES
    tunables = os.environ.get("GLIBC_TUNABLES", CPU_MALLOC_TUNABLES)
    origin = ("from the environment" if "GLIBC_TUNABLES" in os.environ
              else "debertax.compile_options.CPU_MALLOC_TUNABLES")
    try:
      commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
      dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
      commit += " with uncommitted changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
      commit = "unknown"
    runs = []
    if os.path.exists(os.path.join(self.workdir, "ptf_commands.txt")):
      with open(os.path.join(self.workdir, "ptf_commands.txt")) as f:
        runs = [line.split(" ", 1)[1].strip() for line in f if " " in line and "--report_only" not in line]
    shown = (["Stages run by (the last such command in this workdir; all are in ptf_commands.txt):", "", "```",
              runs[-1], "```", "", "Report rebuilt with:", "", "```", command_line, "```", ""]
             if "--report_only" in command_line and runs else
             ["Command (from the project root):", "", "```", command_line, "```", ""])
    return [f"# {title}", "", *shown,
            f"- every child process ran with `GLIBC_TUNABLES={tunables}` ({origin})",
            f"- host: {platform.node()}, {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
            f"load average at report time {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
            f"- code: commit {commit}; report written {datetime.datetime.now().isoformat(timespec='minutes')}",
            f"- workdir: `{self.workdir}`; every stage's command, log and `{STAGE_FILE}` are under it", ""]

  def data_section(self) -> list[str]:
    out = ["## Pretraining text", ""]
    corpus = stage_record(self.corpus_dir)
    if corpus:
      stats = corpus["stats"]
      out += [f"`{self.corpus}`: {stats['documents']:,} documents (one per line), {stats['bytes']:,} bytes "
              f"({stats['bytes'] / 1e6:.2f} MB); {stats['skipped_short']:,} paragraphs/sentences shorter than "
              f"{stats['min_chars']} characters dropped. Gutenberg books: the text between the START/END markers, "
              "blank-line separated paragraphs joined into one line each; Leipzig: one sentence per line; "
              "tinyshakespeare: one speech (blank-line separated) per line.", "",
              markdown([["source", "kind", "documents", "bytes", "dropped (short)"],
                        *[[os.path.relpath(s["path"], self.data_root), s["kind"], f"{s['documents']:,}",
                           f"{s['bytes']:,}", f"{s['skipped_short']:,}"] for s in stats["sources"]]]), ""]
    vocab = stage_record(self.vocab_dir)
    if vocab:
      out += [f"Vocabulary: a {vocab['params']['vocab_size']}-piece SentencePiece unigram model trained on that "
              f"corpus (`{self.spm}`, {format_seconds(vocab['wall_s'])}), used by every pretraining run and by the "
              "random-init fine-tuning.", "", "```", vocab["command"], "```", ""]
    return out

  def pretrain_rows(self, runs: Sequence[tuple[str, int]]) -> list[list[str]]:
    rows = [["run", "steps", "wall time", "train steps/s", "RTD AUC", "MLM acc", "MLM loss", "cos E_G", "cos E_D"]]
    for mode, seed in runs:
      record = stage_record(self.pretrain_dir(f"{mode}_s{seed}"))
      if not record:
        rows.append([f"{mode}_s{seed}", "not run", *["-"] * 7])
        continue
      ev = record.get("final_eval") or {}
      fmt = lambda key, d=3: f"{ev[key]:.{d}f}" if key in ev else "-"
      rate = record.get("train_steps_per_s")
      attempts = record.get("attempts", 1)
      wall = format_seconds(record["wall_s"]) + (f" ({attempts} attempts)" if attempts > 1 else "")
      rows.append([f"{mode}_s{seed}", str(record["params"]["steps"]), wall,
                   f"{rate:.2f}" if rate else "-", fmt("rtd_auc"), fmt("mlm_accuracy"), fmt("mlm_loss"),
                   fmt("cosine_E_G"), fmt("cosine_E_D" if "cosine_E_D" in ev else "cosine_E")])
    return rows

  def settings_section(self, inits: Sequence[str]) -> list[str]:
    """The resolved fine-tuning hyperparameters per task, what differs from the defaults, and the timings."""
    from debertax import tasks
    sizes = [(stage_record(self.finetune_dir(i, t)) or {}).get("settings", {}).get("model_size")
             for i in inits for t in self.task_names]
    size = next((z for z in sizes if z), "tiny")
    out = ["## Fine-tuning settings", "",
           "Defaults of configs/glue.py with `model_size=auto` (configs/tiny.py's 4-layer, 128-wide discriminator "
           f"resolves to the {size!r} row of `tasks.default_hparams`: the large table's learning rate x"
           f"{tasks.LR_SCALE_BY_SIZE.get(size, float('nan')):g}), warmup capped to "
           f"{100 * tasks.MAX_WARMUP_FRACTION:.0f}% of the run, "
           "bias-corrected Adam, the best epoch on dev kept (scores are that epoch's dev scores, as in the paper). "
           "Not the defaults, for the CPU budget:", "",
           f"- `train.epochs={self.args.finetune_epochs}` (defaults: "
           + ", ".join(f"{t} {tasks.default_hparams(t, size).epochs}" for t in self.task_names) + ")",
           f"- `train.max_length={self.args.max_length}` (defaults: "
           + ", ".join(f"{t} {tasks.default_hparams(t, size).max_length}" for t in self.task_names) + ")"]
    capped = {t: n for t, n in self.caps.items() if n}
    if capped:
      out.append("- `max_train_examples`: " + ", ".join(f"{t} first {n} training rows" for t, n in capped.items())
                 + " (default: all)")
    for s in self.args.finetune_set:
      out.append(f"- `{s}`")
    out += ["- random init: `allow_random_init=True`, `vocab=` the shared spm.model and `model.*` set to "
            "configs/tiny.py's shape (" + ", ".join(f"{k}={v}" for k, v in self.random_init().items())
            + "); `model_size` stays auto, so it resolves the same row as the pretrained run (checked below); "
            "hidden/attention dropout 0.0 in both, as configs/tiny.py pretrains (the checkpoint carries it)", ""]
    rows = [["task", "init", "lr", "epochs", "batch", "warmup", "max len", "cls dropout", "train rows", "best epoch",
             "wall time", "rows/s (all in)", "train tokens/s", "eval s/epoch"]]
    mismatches = []
    for task in self.task_names:
      reference = None
      for init in inits:
        record = stage_record(self.finetune_dir(init, task))
        if not record:
          continue
        s = record["settings"]
        comparable = dict(s)
        if reference is None:
          reference = (init, comparable)
        elif comparable != reference[1]:
          mismatches.append(f"{task}: {init} trained with {comparable}, {reference[0]} with {reference[1]}")
        rate = record["train_examples"] * s["epochs"] / record["run_wall_s"] if record["run_wall_s"] else None
        tokens_per_s, eval_s = finetune_throughput(self.finetune_dir(init, task))
        rows.append([task, init, f"{s['lr']:.3g}", str(s["epochs"]), str(s["batch_size"]), str(s["warmup_steps"]),
                     str(s["max_length"]), f"{s['classifier_dropout']:g}", f"{record['train_examples']:,}",
                     str(record["best_epoch"]), format_seconds(record["run_wall_s"]),
                     f"{rate:.1f}" if rate else "-", f"{tokens_per_s:.0f}" if tokens_per_s else "-",
                     f"{eval_s:.1f}" if eval_s is not None else "-"])
    out += [markdown(rows), "",
            "`wall time`: the fine-tuning run (results.json), start-up, tokenisation, one compilation per batch "
            "length bucket, training and evaluation included; `rows/s (all in)`: training rows x epochs / wall time; "
            "`train tokens/s`: the median of the logged training throughput (non-pad tokens, compilation left out); "
            "`eval s/epoch`: the dev-set evaluation after each epoch.", ""]
    if mismatches:
      out += ["**Warning: the runs of a task did not train with the same hyperparameters:**", "",
              *[f"- {m}" for m in mismatches], ""]
    return out

  def details_table(self, columns: Mapping[str, Mapping[str, Mapping | None]]) -> str:
    """Every dev metric of every task and column."""
    rows = [["task", "metric", *columns]]
    for task in self.task_names:
      from debertax import tasks
      for metric in tasks.get_task(task).metric_names:
        rows.append([task, METRIC_LABELS.get(metric, metric),
                     *(_percent((col.get(task) or {}).get(metric)) for col in columns.values())])
    return markdown(rows)

  def majority_notes(self) -> list[str]:
    notes = []
    for task in self.task_names:
      record = stage_record(self.baseline_dir(task))
      if record:
        notes.append(f"- majority {task}: {record['note']} (dev {record['dev_rows']} rows)")
    return notes

  def commands_section(self, directories: Sequence[str]) -> list[str]:
    commands = [stage_record(d)["command"] for d in directories if stage_record(d) and "command" in stage_record(d)]
    return ["## Commands run by the stages", "", "```", *commands, "```", ""] if commands else []

  def report_a(self, run: str, command_line: str) -> str:
    columns = {"majority": self.majority(), "random init": self.results("random"), "pretrained": self.results(run)}
    out = self.header("Pretraining then fine-tuning: does pretraining help downstream?", command_line)
    steps = (stage_record(self.pretrain_dir(run)) or {}).get("params", {}).get("steps", self.args.pretrain_steps)
    out += ["## GLUE dev scores", "",
            f"configs/tiny.py's model pretrained for {steps} steps ({run}) vs the same model "
            "fine-tuned from random initialisation vs the majority class. Main metric of each task (the GLUE "
            "average's: CoLA MCC, STS-B Pearson, accuracy elsewhere), in percent.", "",
            comparison_table(self.task_names, columns), "", *self.majority_notes(), "",
            "All dev metrics:", "", self.details_table(columns), ""]
    out += self.data_section()
    out += ["## Pretraining", "", markdown(self.pretrain_rows([tuple_run(run)])), "",
            "Held-out evaluation at the last step (4 batches of held-out documents, see debertax/pretrain.py). "
            "`train steps/s`: the median of the logged training throughput (compilation and evaluation left out); "
            "the wall time includes start-up, vocabulary loading, evaluation, checkpoints and export.", ""]
    out += self.settings_section([run, "random"])
    dirs = [self.pretrain_dir(run)] + [self.finetune_dir(i, t) for i in (run, "random") for t in self.task_names]
    out += self.commands_section(dirs)
    return "\n".join(out)

  def report_sharing(self, command_line: str) -> tuple[str, str | None]:
    runs = self.finished_runs()
    out = self.header("Embedding sharing study: GDES vs ES vs NES (vs plain MLM)", command_line)
    if not runs:
      return "\n".join(out + ["No finished pretraining run in this workdir yet."]), None
    per_run = {f"{m}_s{s}": self.results(f"{m}_s{s}") for m, s in runs}
    # Per run.
    rows = [*self.pretrain_rows(runs)]
    rows[0] += [t for t in self.task_names] + ["avg"]
    for row, (name, results) in zip(rows[1:], per_run.items()):
      scores = [task_score(t, results[t]) for t in self.task_names]
      row += [_percent(v) for v in scores] + [_percent(sum(scores) / len(scores)) if None not in scores else "-"]
    out += ["## Per run", "",
            "Held-out RTD AUC, MLM accuracy/loss and the average pairwise cosine similarity of the generator's "
            "embedding E_G and of the discriminator's effective embedding E_D (E_G + E_delta for GDES) from the "
            "last eval record of each run's metrics.jsonl (mlm runs: no generator and no RTD; the E_D column holds "
            "the MLM model's own embedding, the one that is fine-tuned); downstream: GLUE dev main metric "
            "(percent) after fine-tuning that run's discriminator (mlm: its MLM model).", "", markdown(rows), ""]
    # Per mode.
    modes = [m for m in MODES if any(r[0] == m for r in runs)] + sorted({m for m, _ in runs} - set(MODES))
    agg = [["mode", "seeds", "RTD AUC", "MLM acc", "MLM loss", "cos E_G", "cos E_D", "paper cos E_G / E_D",
            "GLUE avg (dev)"]]
    downstream_columns: dict[str, dict] = {"majority": self.majority(), "random init": self.results("random")}
    for mode in modes:
      seeds = [s for m, s in runs if m == mode]
      evals = [(stage_record(self.pretrain_dir(f"{mode}_s{s}")) or {}).get("final_eval") or {} for s in seeds]
      values = lambda key: [e.get(key) for e in evals]
      averages = []
      for s in seeds:
        scores = [task_score(t, per_run[f"{mode}_s{s}"][t]) for t in self.task_names]
        averages.append(sum(scores) / len(scores) if None not in scores else None)
      paper = PAPER_COSINE.get(mode)
      agg.append([mode, ",".join(map(str, seeds)), mean_spread(values("rtd_auc")),
                  mean_spread(values("mlm_accuracy")), mean_spread(values("mlm_loss")),
                  mean_spread(values("cosine_E_G")), mean_spread([fine_tuned_cosine(e) for e in evals]),
                  f"{paper[0]} / {paper[1]}" if paper else "-", mean_spread(averages, scale=100, decimals=1)])
      # Averaged over the seeds whose fine-tuning finished every task, so that each task's mean is over the
      # same runs; while none has, the finished tasks of any seed show, labelled partial.
      complete = [s for s in seeds if all(task_score(t, per_run[f"{mode}_s{s}"][t]) is not None
                                          for t in self.task_names)]
      column = {}
      for t in self.task_names:
        scores = [task_score(t, per_run[f"{mode}_s{s}"][t]) for s in (complete or seeds)]
        scores = [v for v in scores if v is not None]
        column[t] = {main_metric(t): sum(scores) / len(scores)} if scores else None
      label = (f"{mode} (seed{'s' if len(complete) > 1 else ''} {','.join(map(str, complete))})" if complete
               else f"{mode} (partial)")
      downstream_columns[label] = column
    out += ["## Per mode (mean +- sample standard deviation over seeds)", "", markdown(agg), "",
            "Paper column: the DeBERTaV3 paper's Table 1 (as noted in shared/reference/deberta.md section 7, not "
            "checked against the PDF): ES 0.02/0.02, NES 0.45/0.02, GDES 0.45/0.29, from large-scale pretraining. "
            "A 4-layer model after a short CPU run need not reach those values; compare the ordering.", "",
            "## GLUE dev (main metric, percent; modes averaged over their seeds)", "",
            comparison_table(self.task_names, downstream_columns), "", *self.majority_notes(), ""]
    plot_path = os.path.join(self.workdir, "sharing_curves.png")
    try:
      plot_curves({f"{m}_s{s}": os.path.join(self.pretrain_dir(f"{m}_s{s}"), "metrics.jsonl") for m, s in runs},
                  plot_path)
      out += [f"Curves (held-out eval vs step): `{plot_path}`", ""]
    except ImportError as e:
      plot_path = None
      out += [f"No plot: {e}", ""]
    out += self.data_section()
    out += self.settings_section([f"{m}_s{s}" for m, s in runs] + ["random"])
    dirs = [self.pretrain_dir(f"{m}_s{s}") for m, s in runs]
    dirs += [self.finetune_dir(i, t) for i in [f"{m}_s{s}" for m, s in runs] + ["random"] for t in self.task_names]
    out += self.commands_section(dirs)
    return "\n".join(out), plot_path


def finetune_throughput(directory: str) -> tuple[float | None, float | None]:
  """(median logged training tokens/s, mean dev evaluation seconds per epoch) of a fine-tuning workdir."""
  rates = sorted(r["tokens_per_sec"] for r in read_jsonl(os.path.join(directory, "metrics.jsonl"))
                 if r.get("split") == "train" and r.get("tokens_per_sec"))
  try:
    with open(os.path.join(directory, "results.json")) as f:
      history = json.load(f)["history"]
    eval_s = sum(h["eval_seconds"] for h in history) / len(history) if history else None
  except (OSError, KeyError, ValueError):
    eval_s = None
  return (rates[len(rates) // 2] if rates else None), eval_s


def tuple_run(run: str) -> tuple[str, int]:
  mode, _, seed = run.rpartition("_s")
  return mode, int(seed)


def plot_curves(metrics_paths: Mapping[str, str], output: str,
                keys: Sequence[tuple[str, str]] = (("rtd_auc", "held-out RTD AUC"),
                                                   ("mlm_accuracy", "held-out MLM accuracy"),
                                                   ("cosine_E_D", "avg. pairwise cosine of E_D (mlm: E)"))) -> str:
  """One panel per eval key, one line per run (colour: sharing mode, line style: seed) -> PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  colours = {"gdes": "tab:blue", "es": "tab:orange", "nes": "tab:green", "mlm": "tab:red"}
  styles = ["-", "--", ":", "-."]
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
  for name, path in metrics_paths.items():
    mode, seed = tuple_run(name)
    for ax, (key, _) in zip(axes, keys):
      points = eval_curve(path, "cosine_E" if mode == "mlm" and key == "cosine_E_D" else key)
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, styles[seed % len(styles)], color=colours.get(mode), marker="o", markersize=3,
                label=name)
  for ax, (_, title) in zip(axes, keys):
    ax.set_title(title)
    ax.set_xlabel("pretraining step")
    if ax.lines:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(output, dpi=100)
  plt.close(fig)
  return output


# Command line -------------------------------------------------------------------------------------------------
def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="/tmp/pretrain_then_finetune")
  parser.add_argument("--data_root", default=os.path.join(os.path.dirname(ROOT), "shared", "data"),
                      help="holds text/ and glue/ (default: ../shared/data from the project root)")
  parser.add_argument("--study", choices=["none", "sharing"], default="none",
                      help="none: part A (pretrained vs random init vs majority); sharing: part B")
  parser.add_argument("--modes", default=None,
                      help="embedding sharing modes gdes/es/nes, or mlm (plain MLM pretraining) "
                      "(default: gdes; study: gdes,es,nes,mlm)")
  parser.add_argument("--seeds", default=None, help="config.seed values (default: 0; study: 0,1)")
  parser.add_argument("--parts", default="pretrain,finetune,baselines",
                      help="stages to run: pretrain (with corpus and vocabulary), finetune (of the pretrained runs "
                      "in --modes x --seeds), baselines (majority class and random-init fine-tuning)")
  parser.add_argument("--report_only", action="store_true", help="run nothing: rebuild the report from the workdir")
  parser.add_argument("--pretrain_steps", type=int, default=3000)
  parser.add_argument("--pretrain_set", action="append", default=[], metavar="KEY=VALUE",
                      help="extra configs/tiny.py override, e.g. train.eval_every=50 (repeatable)")
  parser.add_argument("--vocab_size", type=int, default=4000,
                      help="SentencePiece pieces (configs/tiny.py: 2000; see the docstring for the choice)")
  parser.add_argument("--min_chars", type=int, default=20, help="shorter paragraphs/sentences are dropped")
  parser.add_argument("--tasks", default=",".join(TASKS))
  parser.add_argument("--finetune_epochs", type=int, default=3)
  parser.add_argument("--max_length", type=int, default=128)
  parser.add_argument("--max_train_examples", default=DEFAULT_MAX_TRAIN,
                      help="training-row caps: 'sst2=8000,cola=4000', or N / all=N for every task (0: no cap)")
  parser.add_argument("--finetune_set", action="append", default=[], metavar="KEY=VALUE",
                      help="extra configs/glue.py override for every fine-tuning run (repeatable)")
  parser.add_argument("--poll_s", type=float, default=20.0, help="seconds between progress lines")
  args = parser.parse_args(argv)
  study = args.study == "sharing"
  args.modes = [m.strip() for m in (args.modes or ("gdes,es,nes,mlm" if study else "gdes")).split(",") if m.strip()]
  args.seeds = [int(s) for s in (args.seeds or ("0,1" if study else "0")).split(",") if s.strip()]
  args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
  bad = sorted(set(args.modes) - set(MODES)) + sorted(args.parts - {"pretrain", "finetune", "baselines"})
  if bad:
    parser.error(f"unknown mode(s) / part(s): {bad}")
  if not study and len(args.modes) * len(args.seeds) != 1:
    parser.error("part A pretrains one model: give one --modes and one --seeds value (or --study=sharing)")
  for s in args.pretrain_set + args.finetune_set:
    if "=" not in s:
      parser.error(f"{s!r}: expected KEY=VALUE")
  return args


def _interrupt(signum, frame):
  """SIGTERM -> KeyboardInterrupt, so that run_command stops the running job (which saves) before exiting."""
  raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
  args = parse_args(argv)
  signal.signal(signal.SIGTERM, _interrupt)
  bench = Benchmark(args)
  os.makedirs(bench.workdir, exist_ok=True)
  command_line = quote([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT) else sys.executable,
                        os.path.relpath(os.path.abspath(__file__), ROOT), *(sys.argv[1:] if argv is None else argv)])
  runs = [(m, s) for m in args.modes for s in args.seeds]
  plan: list[tuple[str, Callable]] = []
  if not args.report_only:
    if "pretrain" in args.parts:
      plan += [("corpus", bench.corpus_stage), ("vocab", bench.vocab_stage)]
    for mode, seed in runs:
      if "pretrain" in args.parts:
        plan.append((f"pretrain {mode}_s{seed}", lambda m=mode, s=seed: bench.pretrain_stage(m, s)))
      if "finetune" in args.parts:
        plan += [(f"finetune {mode}_s{seed}/{t}", lambda m=mode, s=seed, t=t: bench.finetune_stage(f"{m}_s{s}", t))
                 for t in bench.task_names]
    if "baselines" in args.parts:
      plan += [(f"majority {t}", lambda t=t: bench.majority_stage(t)) for t in bench.task_names]
      plan += [(f"finetune random/{t}", lambda t=t: bench.finetune_stage("random", t)) for t in bench.task_names]
  started = time.time()
  try:
    for i, (name, stage) in enumerate(plan):
      print(f"== stage {i + 1}/{len(plan)}: {name} (total elapsed {format_seconds(time.time() - started)})",
            flush=True)
      stage()
  except StageMismatch as e:
    raise SystemExit(f"error: {e}") from None
  except KeyboardInterrupt:
    raise SystemExit(f"interrupted after {format_seconds(time.time() - started)}: rerun the same command to "
                     "continue") from None
  with open(os.path.join(bench.workdir, "ptf_commands.txt"), "a") as f:  # The invocations that finished.
    f.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {command_line}\n")
  if args.study == "sharing":
    report, plot_path = bench.report_sharing(command_line)
    path = os.path.join(bench.workdir, "REPORT_sharing.md")
  else:
    report = bench.report_a(f"{runs[0][0]}_s{runs[0][1]}", command_line)
    path = os.path.join(bench.workdir, "REPORT.md")
  with open(path, "w") as f:
    f.write(report + "\n")
  print(report)
  print(f"\n(written to {path}; {len(plan)} stage(s) in {format_seconds(time.time() - started)})")


if __name__ == "__main__":
  main()
