"""Fine-tune a list of GLUE tasks and print the GLUE table with the paper's average.

    python -m debertax.glue_suite --tasks=rte,mrpc,stsb --init_from=DIR --data_dir=GLUE_ROOT --workdir=W \
        [--model_size=auto] [--set=train.epochs=1 --set=train.max_length=128] \
        [--set=sst2:max_train_examples=8000]

Each task runs `debertax.finetune.run` with `configs/glue.py:<task>` in W/<task> (so an interrupted suite resumes
task by task); `--set key=value` overrides a config field of every task, `--set task:key=value` of one task.
The table (markdown, paper column order, MNLI as m/mm, Avg only when all eight tasks ran, with MNLI the mean of
m and mm) is printed and written to W/glue_table.md; the per-task metrics to W/glue_results.json.
"""

from __future__ import annotations

import ast
import json
import time

from absl import app, flags, logging

from debertax import eval_metrics, finetune, storage

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Command-line flags, defined only when this module runs as the command (importing it defines none), next to
  the entry point's own (--workdir and the multi-host flags), which serve this command too."""
  import debertax.main  # noqa: F401  (defines --workdir, --coordinator_address, ...)
  flags.DEFINE_list("tasks", None, "GLUE tasks, e.g. rte,mrpc,stsb (cola sst2 mrpc stsb qqp mnli qnli rte).")
  flags.DEFINE_string("init_from", "", "Pretrained model directory (Hugging Face or debertax).")
  flags.DEFINE_string("data_dir", "", "Local GLUE root (CoLA/, MRPC/, ...); empty: TFDS.")
  flags.DEFINE_string("model_size", "auto", "Default-hyperparameter row: xsmall|small|base|large|auto.")
  flags.DEFINE_multi_string("set", [], "key=value config override for every task (e.g. train.epochs=1), or "
                            "task:key=value for one task (e.g. sst2:max_train_examples=8000).")
  flags.DEFINE_string("name", "debertax", "Row label of the table.")


def parse_override(text: str) -> tuple[str, str, object]:
  """'train.epochs=1' -> ('', 'train.epochs', 1); 'sst2:max_train_examples=8' -> ('sst2', ...). Values are
  Python literals (true/false allowed), else strings."""
  if "=" not in text:
    raise ValueError(f"--set {text!r}: expected key=value or task:key=value")
  key, raw = (part.strip() for part in text.split("=", 1))
  task, _, key = key.rpartition(":")
  lowered = {"true": "True", "false": "False", "none": "None"}.get(raw.lower(), raw)
  try:
    value = ast.literal_eval(lowered)
  except (ValueError, SyntaxError):
    value = raw
  return task.strip().lower(), key, value


def apply_overrides(config, overrides: dict):
  """Sets dotted keys of a ConfigDict; an unknown key is an error naming it."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if part not in node:
        raise ValueError(f"--set {key}: config has no field {part!r}")
      node = node[part]
    if leaf not in node:
      raise ValueError(f"--set {key}: config has no field {leaf!r} (fields here: {sorted(node.keys())})")
    node[leaf] = value
  return config


def run_suite(task_names, workdir: str, overrides: dict | None = None, mesh=None, name: str = "debertax",
              task_overrides: dict | None = None):
  """-> (results per task as finetune.run returns them, the markdown GLUE table).

  overrides: {dotted key: value} for every task; task_overrides: {task: {dotted key: value}} for one task."""
  from configs import glue
  unknown = sorted(set(task_overrides or {}) - set(task_names))
  if unknown:
    raise ValueError(f"overrides for task(s) {unknown} that are not in --tasks={','.join(task_names)}")
  configs = {task: apply_overrides(glue.get_config(task), {**(overrides or {}), **(task_overrides or {}).get(task, {})})
             for task in task_names}  # Every config is built (and checked) before the first task runs.
  results, table_input, started = {}, {}, time.time()
  for task, config in configs.items():
    logging.info("GLUE suite: %s (%d of %d)", task, len(results) + 1, len(configs))
    results[task] = finetune.run(config, storage.join(workdir, task), mesh=mesh)
    table_input.update(results[task]["glue_results"])
  table = eval_metrics.format_glue_table(table_input, name=name)
  summary = {"tasks": list(task_names), "glue_results": table_input,
             "wall_time_s": {task: r["wall_time_s"] for task, r in results.items()},
             "total_wall_time_s": round(time.time() - started, 1)}
  if len(table_input) == len(eval_metrics.GLUE_RESULT_KEYS):
    summary["glue_score"] = eval_metrics.glue_score(table_input)
  storage.makedirs(workdir)
  storage.write_atomic(storage.join(workdir, "glue_results.json"), json.dumps(summary, indent=2))
  storage.write_atomic(storage.join(workdir, "glue_table.md"), table + "\n")
  return results, table


def main(argv):
  from debertax import main as entry
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  entry._quiet_library_logs()
  if not FLAGS.tasks or not FLAGS.workdir:
    raise app.UsageError("--tasks and --workdir are required")
  entry.initialize_distributed()
  overrides = {"init_from": FLAGS.init_from, "data_dir": FLAGS.data_dir, "model_size": FLAGS.model_size}
  task_overrides: dict = {}
  for task, key, value in map(parse_override, FLAGS.set):
    (task_overrides.setdefault(task, {}) if task else overrides)[key] = value
  _, table = run_suite([t.strip().lower() for t in FLAGS.tasks], FLAGS.workdir, overrides, name=FLAGS.name,
                       task_overrides=task_overrides)
  print(table)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
