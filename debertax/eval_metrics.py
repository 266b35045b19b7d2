"""GLUE / XNLI metrics in plain numpy, the GLUE average, and the markdown result tables.

Metric values are fractions (accuracy 0.913, not 91.3); only the tables print percentages.

Edge cases follow scikit-learn / SciPy so our numbers match theirs:

* `matthews_corrcoef` is 0.0 when either the labels or the predictions hold a single class (the
  denominator is zero), as sklearn.metrics.matthews_corrcoef returns; this includes a perfect
  prediction of single-class labels.
* `f1_binary` is 2TP / (2TP + FP + FN), and 0.0 when there is no positive label and no positive
  prediction (sklearn's default zero_division result).
* `pearson` / `spearman` are nan when either input is constant, the value scipy.stats.pearsonr and
  spearmanr return (with a ConstantInputWarning, which we do not emit). An STS-B model that predicts
  a constant therefore gets nan rather than a number that could win model selection.
* Empty inputs, inputs of different lengths, non-1-D inputs and non-finite values raise ValueError.
  Pearson/Spearman need at least two values (scipy.stats.pearsonr raises too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from debertax.tasks import GLUE_TASK_NAMES, XNLI_LANGUAGES, get_task


def _pair(predictions, labels, metric: str, *, minimum_length: int = 1) -> tuple[np.ndarray, np.ndarray]:
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.ndim != 1 or labels.ndim != 1:
        raise ValueError(
            f"{metric}: expected 1-D predictions and labels, got shapes {predictions.shape} and "
            f"{labels.shape} (take the argmax of logits first)"
        )
    if predictions.shape != labels.shape:
        raise ValueError(f"{metric}: {len(predictions)} predictions but {len(labels)} labels")
    if len(labels) < minimum_length:
        raise ValueError(f"{metric}: needs at least {minimum_length} value(s), got {len(labels)}")
    for name, values in (("predictions", predictions), ("labels", labels)):
        if values.dtype.kind not in "biuf":
            raise ValueError(f"{metric}: {name} must be numeric, got dtype {values.dtype}")
        if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
            raise ValueError(f"{metric}: {name} contain nan or inf")
    return predictions, labels


def _class_ids(predictions: np.ndarray, labels: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    for name, values in (("predictions", predictions), ("labels", labels)):
        if values.dtype.kind == "f" and not np.all(values == np.round(values)):
            raise ValueError(f"{metric}: {name} must be class ids, got non-integer values")
    return predictions.astype(np.int64), labels.astype(np.int64)


def accuracy(predictions, labels) -> float:
    predictions, labels = _class_ids(*_pair(predictions, labels, "accuracy"), "accuracy")
    return float(np.mean(predictions == labels))


def f1_binary(predictions, labels) -> float:
    """F1 of the positive class 1; inputs must be 0/1."""
    predictions, labels = _class_ids(*_pair(predictions, labels, "f1"), "f1")
    for name, values in (("predictions", predictions), ("labels", labels)):
        if not np.all((values == 0) | (values == 1)):
            raise ValueError(f"f1: binary F1 needs 0/1 {name}, got values {np.unique(values)[:10]}")
    true_positives = int(np.sum((predictions == 1) & (labels == 1)))
    false_positives = int(np.sum((predictions == 1) & (labels == 0)))
    false_negatives = int(np.sum((predictions == 0) & (labels == 1)))
    denominator = 2 * true_positives + false_positives + false_negatives
    return 0.0 if denominator == 0 else 2 * true_positives / denominator


def matthews_corrcoef(predictions, labels) -> float:
    """Multi-class MCC (Gorodkin's R_K), which reduces to the binary formula for two classes."""
    predictions, labels = _class_ids(*_pair(predictions, labels, "mcc"), "mcc")
    classes, encoded = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    label_ids, prediction_ids = encoded[: len(labels)], encoded[len(labels) :]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (label_ids, prediction_ids), 1.0)
    # Floats: the products below exceed int64 for a few hundred thousand examples.
    total = confusion.sum()
    correct = np.trace(confusion)
    true_counts = confusion.sum(axis=1)
    predicted_counts = confusion.sum(axis=0)
    covariance = correct * total - true_counts @ predicted_counts
    true_variance = total**2 - true_counts @ true_counts
    predicted_variance = total**2 - predicted_counts @ predicted_counts
    if true_variance * predicted_variance == 0:
        return 0.0
    return float(covariance / math.sqrt(true_variance * predicted_variance))


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    # Exact comparison with the first value, as scipy does, so that values differing only by
    # rounding after centring are not mistaken for a constant.
    if np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    x_centred = x - x.mean()
    y_centred = y - y.mean()
    # Normalising before the dot product keeps large inputs from overflowing.
    x_unit = x_centred / np.linalg.norm(x_centred)
    y_unit = y_centred / np.linalg.norm(y_centred)
    return float(np.clip(x_unit @ y_unit, -1.0, 1.0))


def pearson(predictions, labels) -> float:
    predictions, labels = _pair(predictions, labels, "pearson", minimum_length=2)
    return _correlation(predictions, labels)


def average_ranks(values) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span (scipy's 'average')."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Start position of each run of equal values in the sorted order.
    run_starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    run_ends = np.r_[run_starts[1:], len(values)]
    # Positions start..end-1 have ranks start+1..end; their mean is (start + 1 + end) / 2.
    run_ranks = (run_starts + 1 + run_ends) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(run_ranks, run_ends - run_starts)
    return ranks


def spearman(predictions, labels) -> float:
    """Pearson correlation of the average ranks."""
    predictions, labels = _pair(predictions, labels, "spearman", minimum_length=2)
    return _correlation(average_ranks(predictions), average_ranks(labels))


def binary_auc(scores, labels) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney U) formula, ties averaged; nan when only one class is present."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"binary_auc: {scores.size} scores but {labels.size} labels")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = average_ranks(scores)[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


_METRICS = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "mcc": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_task_metrics(task: str, predictions, labels) -> dict[str, float]:
    """The official metrics of `task` (`TaskSpec.metric_names`): CoLA mcc; STS-B pearson and
    spearman; MRPC and QQP accuracy and f1; accuracy for the others. Predictions are class ids
    (scores for STS-B). MNLI is two evaluations (matched, mismatched): call once for each."""
    spec = get_task(task)
    return {name: _METRICS[name](predictions, labels) for name in spec.metric_names}


# --------------------------------------------------------------------------------------------
# GLUE average and tables

# Column order of the DeBERTaV3 paper's GLUE table. MNLI enters as two result keys.
GLUE_TABLE_TASKS: tuple[str, ...] = ("cola", "qqp", "mnli", "sst2", "stsb", "qnli", "rte", "mrpc")
MNLI_RESULT_KEYS: tuple[str, str] = ("mnli_m", "mnli_mm")
GLUE_RESULT_KEYS: tuple[str, ...] = tuple(
    key for task in GLUE_TABLE_TASKS for key in (MNLI_RESULT_KEYS if task == "mnli" else (task,))
)

_TABLE_METRIC_LABEL = {"accuracy": "Acc", "mcc": "MCC", "pearson": "Corr"}


def _check_result_keys(results: Mapping[str, object], allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(results) - set(allowed))
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {unknown}; expected keys from {allowed}")


def _main_metric_value(key: str, metrics: Mapping[str, float]) -> float:
    task = "mnli" if key in MNLI_RESULT_KEYS else key
    main_metric = get_task(task).main_metric
    if main_metric not in metrics:
        raise ValueError(f"results[{key!r}] has no {main_metric!r} (has {sorted(metrics)})")
    return float(metrics[main_metric])


def glue_task_score(task: str, results: Mapping[str, Mapping[str, float]]) -> float:
    """The number `task` contributes to the GLUE average, as in the DeBERTaV3 paper: the task's
    main metric (CoLA MCC, STS-B Pearson, accuracy elsewhere, including MRPC and QQP whose F1 the
    paper does not average) and, for MNLI, the mean of the matched and mismatched accuracies."""
    spec = get_task(task)
    if spec.name not in GLUE_TASK_NAMES:
        raise ValueError(f"{task!r} is not a GLUE task")
    keys = MNLI_RESULT_KEYS if spec.name == "mnli" else (spec.name,)
    missing = [key for key in keys if key not in results]
    if missing:
        raise ValueError(f"GLUE score of {spec.name!r} needs results for {missing}")
    return float(np.mean([_main_metric_value(key, results[key]) for key in keys]))


def glue_score(task_results: Mapping[str, Mapping[str, float]]) -> float:
    """Average of `glue_task_score` over the 8 tasks (MNLI counted once), as a fraction.

    `task_results` maps the keys of `GLUE_RESULT_KEYS` ("cola", ..., "mnli_m", "mnli_mm") to the
    metric dicts of `compute_task_metrics`. All nine are required.
    """
    _check_result_keys(task_results, GLUE_RESULT_KEYS, "glue_score")
    return float(np.mean([glue_task_score(task, task_results) for task in GLUE_TABLE_TASKS]))


def _percent(value: float, decimals: int) -> str:
    return "nan" if math.isnan(value) else f"{100 * value:.{decimals}f}"


def format_glue_table(results: Mapping[str, Mapping[str, float]], *, name: str = "debertax") -> str:
    """Markdown table in the paper's layout: one row `name`, percentages with one decimal, MNLI as
    "m/mm", Avg with two decimals. Missing tasks print "-", and then Avg is "-" too (the average
    is only defined over all eight tasks)."""
    _check_result_keys(results, GLUE_RESULT_KEYS, "format_glue_table")
    header = ["Model"]
    row = [name]
    complete = True
    for task in GLUE_TABLE_TASKS:
        spec = get_task(task)
        metric_label = _TABLE_METRIC_LABEL[spec.main_metric]
        if task == "mnli":
            header.append(f"MNLI-m/mm ({metric_label})")
            cells = [
                _percent(_main_metric_value(key, results[key]), 1) if key in results else "-"
                for key in MNLI_RESULT_KEYS
            ]
            complete &= all(key in results for key in MNLI_RESULT_KEYS)
            row.append("/".join(cells))
        else:
            header.append(f"{spec.display_name} ({metric_label})")
            complete &= task in results
            row.append(_percent(_main_metric_value(task, results[task]), 1) if task in results else "-")
    header.append("Avg")
    row.append(_percent(glue_score(results), 2) if complete else "-")
    return _markdown([header, row])


def format_xnli_table(per_language_acc: Mapping[str, float], *, name: str = "debertax") -> str:
    """Markdown table with the paper's language order and the average over the 15 languages, all
    in percent with one decimal. Missing languages print "-", and then avg is "-"."""
    _check_result_keys(per_language_acc, XNLI_LANGUAGES, "format_xnli_table")
    header = ["Model", *XNLI_LANGUAGES, "avg"]
    row = [name]
    for language in XNLI_LANGUAGES:
        row.append(_percent(float(per_language_acc[language]), 1) if language in per_language_acc else "-")
    complete = all(language in per_language_acc for language in XNLI_LANGUAGES)
    average = float(np.mean([float(per_language_acc[lang]) for lang in XNLI_LANGUAGES])) if complete else None
    row.append(_percent(average, 1) if average is not None else "-")
    return _markdown([header, row])


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)
