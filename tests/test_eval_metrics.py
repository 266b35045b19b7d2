"""Metrics against sklearn/scipy and hand-computed cases; GLUE average and tables."""

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from debertax import eval_metrics as em

SEEDS = range(8)


def _quiet(function, *args):
    # scipy warns on constant input; sklearn on a single class. The values are what we compare.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_accuracy_and_mcc_match_sklearn(seed, num_classes):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 400))
    labels = rng.integers(0, num_classes, size)
    # Correlated predictions so MCC is not always near zero.
    predictions = np.where(rng.random(size) < 0.6, labels, rng.integers(0, num_classes, size))
    assert em.accuracy(predictions, labels) == pytest.approx(
        sklearn.metrics.accuracy_score(labels, predictions), abs=1e-12
    )
    assert em.matthews_corrcoef(predictions, labels) == pytest.approx(
        _quiet(sklearn.metrics.matthews_corrcoef, labels, predictions), abs=1e-12
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 300))
    labels = (rng.random(size) < rng.random()).astype(int)
    predictions = (rng.random(size) < rng.random()).astype(int)
    assert em.f1_binary(predictions, labels) == pytest.approx(
        _quiet(sklearn.metrics.f1_score, labels, predictions), abs=1e-12
    )


def test_mcc_hand_computed():
    # TP=3, TN=2, FP=1, FN=1: (3*2 - 1*1) / sqrt(4 * 4 * 3 * 3) = 5/12.
    labels = [1, 1, 1, 1, 0, 0, 0]
    predictions = [1, 1, 1, 0, 0, 0, 1]
    assert em.matthews_corrcoef(predictions, labels) == pytest.approx(5 / 12)


def test_mcc_of_constant_predictor_is_zero():
    labels = [0, 1, 1, 0, 1]
    assert em.matthews_corrcoef([1] * 5, labels) == 0.0
    assert em.matthews_corrcoef([0] * 5, labels) == 0.0
    # Constant labels, and even a perfect prediction of them: the denominator is zero (sklearn: 0).
    assert em.matthews_corrcoef([0, 1, 1], [1, 1, 1]) == 0.0
    assert em.matthews_corrcoef([1, 1, 1], [1, 1, 1]) == 0.0
    assert _quiet(sklearn.metrics.matthews_corrcoef, [1, 1, 1], [1, 1, 1]) == 0.0


def test_mcc_is_one_for_perfect_and_minus_one_for_inverted_binary():
    labels = np.array([0, 1, 1, 0, 1, 0])
    assert em.matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert em.matthews_corrcoef(1 - labels, labels) == pytest.approx(-1.0)


def test_f1_hand_computed_and_edge_cases():
    # TP=3, FP=1, FN=1 -> 2*3 / (2*3 + 1 + 1) = 0.75.
    assert em.f1_binary([1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0]) == pytest.approx(0.75)
    # No positive prediction: 0 (recall 0; precision undefined).
    assert em.f1_binary([0, 0, 0], [1, 0, 1]) == 0.0
    # No positives anywhere: sklearn's zero_division default gives 0.
    assert em.f1_binary([0, 0], [0, 0]) == 0.0
    assert _quiet(sklearn.metrics.f1_score, [0, 0], [0, 0]) == 0.0


def test_f1_rejects_non_binary_values():
    with pytest.raises(ValueError, match="0/1"):
        em.f1_binary([0, 2], [0, 1])


@pytest.mark.parametrize("seed", SEEDS)
def test_pearson_and_spearman_match_scipy_on_continuous_values(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 500))
    labels = rng.uniform(0, 5, size)
    predictions = labels + rng.normal(0, 1.5, size)
    assert em.pearson(predictions, labels) == pytest.approx(
        scipy.stats.pearsonr(predictions, labels).statistic, abs=1e-10
    )
    assert em.spearman(predictions, labels) == pytest.approx(
        scipy.stats.spearmanr(predictions, labels).statistic, abs=1e-10
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_spearman_matches_scipy_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(3, 300))
    labels = rng.integers(0, 6, size) / 5.0  # STS-B style: few distinct scores
    predictions = np.round(labels + rng.normal(0, 0.4, size), 1)
    assert em.spearman(predictions, labels) == pytest.approx(
        _quiet(scipy.stats.spearmanr, predictions, labels).statistic, abs=1e-10
    )
    np.testing.assert_allclose(em.average_ranks(predictions), scipy.stats.rankdata(predictions))


def test_spearman_ties_hand_computed():
    # Ranks of x with the tie averaged: [1, 2.5, 2.5, 4]; centred [-1.5, 0, 0, 1.5].
    # y centred ranks [-1.5, -0.5, 0.5, 1.5]. r = 4.5 / sqrt(4.5 * 5) = sqrt(0.9).
    x = [10.0, 20.0, 20.0, 30.0]
    y = [1.0, 2.0, 3.0, 4.0]
    np.testing.assert_array_equal(em.average_ranks(x), [1.0, 2.5, 2.5, 4.0])
    np.testing.assert_array_equal(em.average_ranks([3, 1, 3, 3, 2]), [4.0, 1.0, 4.0, 4.0, 2.0])
    assert em.spearman(x, y) == pytest.approx(math.sqrt(0.9))


def test_pearson_hand_computed():
    # x centred [-1, 0, 1], y centred [-2, 1, 1]: r = 3 / (sqrt(2) * sqrt(6)) = sqrt(3)/2.
    assert em.pearson([1.0, 2.0, 3.0], [0.0, 3.0, 3.0]) == pytest.approx(math.sqrt(3) / 2)


def test_correlations_of_constant_input_are_nan_like_scipy():
    constant = [2.0, 2.0, 2.0, 2.0]
    varying = [1.0, 2.0, 3.0, 5.0]
    assert math.isnan(_quiet(scipy.stats.pearsonr, constant, varying).statistic)
    assert math.isnan(_quiet(scipy.stats.spearmanr, constant, varying).statistic)
    assert math.isnan(em.pearson(constant, varying))
    assert math.isnan(em.pearson(varying, constant))
    assert math.isnan(em.spearman(constant, varying))
    assert math.isnan(em.spearman(varying, constant))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        em.accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        em.accuracy(np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="at least 1"):
        em.accuracy([], [])
    with pytest.raises(ValueError, match="at least 2"):
        em.pearson([1.0], [2.0])
    with pytest.raises(ValueError, match="nan or inf"):
        em.pearson([1.0, float("nan"), 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="class ids"):
        em.accuracy([0.5, 1.0], [0, 1])


def test_compute_task_metrics_uses_the_official_metric_set():
    labels = [0, 1, 1, 0, 1, 1]
    predictions = [0, 1, 0, 0, 1, 1]
    assert set(em.compute_task_metrics("cola", predictions, labels)) == {"mcc"}
    for task in ("mrpc", "qqp"):
        metrics = em.compute_task_metrics(task, predictions, labels)
        assert metrics == pytest.approx(
            {
                "accuracy": sklearn.metrics.accuracy_score(labels, predictions),
                "f1": sklearn.metrics.f1_score(labels, predictions),
            }
        )
    for task in ("sst2", "mnli", "qnli", "rte", "xnli"):
        assert set(em.compute_task_metrics(task, predictions, labels)) == {"accuracy"}
    scores = [0.0, 1.2, 3.4, 2.2, 5.0]
    gold = [0.4, 1.0, 3.0, 3.0, 4.6]
    stsb = em.compute_task_metrics("stsb", scores, gold)
    assert stsb["pearson"] == pytest.approx(scipy.stats.pearsonr(scores, gold).statistic)
    assert stsb["spearman"] == pytest.approx(scipy.stats.spearmanr(scores, gold).statistic)


# The DeBERTaV3-large dev results of the paper, as fractions.
PAPER_RESULTS = {
    "cola": {"mcc": 0.753},
    "qqp": {"accuracy": 0.930, "f1": 0.5},  # the F1 must not enter the average
    "mnli_m": {"accuracy": 0.918},
    "mnli_mm": {"accuracy": 0.919},
    "sst2": {"accuracy": 0.969},
    "stsb": {"pearson": 0.930, "spearman": 0.1},
    "qnli": {"accuracy": 0.960},
    "rte": {"accuracy": 0.927},
    "mrpc": {"accuracy": 0.922, "f1": 0.5},
}


def test_glue_score_hand_computed_against_the_paper_average():
    # (75.3 + 93.0 + (91.8 + 91.9)/2 + 96.9 + 93.0 + 96.0 + 92.7 + 92.2) / 8 = 730.95 / 8 = 91.36875,
    # which the paper rounds to 91.37.
    assert em.glue_score(PAPER_RESULTS) == pytest.approx(0.9136875)
    assert em.glue_task_score("mnli", PAPER_RESULTS) == pytest.approx(0.9185)
    assert em.glue_task_score("stsb", PAPER_RESULTS) == pytest.approx(0.930)


def test_glue_score_requires_all_tasks_and_known_keys():
    incomplete = {k: v for k, v in PAPER_RESULTS.items() if k != "mnli_mm"}
    with pytest.raises(ValueError, match="mnli_mm"):
        em.glue_score(incomplete)
    with pytest.raises(ValueError, match="unknown key"):
        em.glue_score({**PAPER_RESULTS, "mnli": {"accuracy": 0.9}})
    with pytest.raises(ValueError, match="'mcc'"):
        em.glue_score({**PAPER_RESULTS, "cola": {"accuracy": 0.9}})


def _table_cells(table):
    lines = table.splitlines()
    assert len(lines) == 3
    assert set(lines[1].replace("|", "")) == {"-"}
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in (lines[0], lines[2])]


def test_glue_table_layout_and_values():
    header, row = _table_cells(em.format_glue_table(PAPER_RESULTS, name="paper"))
    assert [h.split(" (")[0] for h in header] == [
        "Model",
        "CoLA",
        "QQP",
        "MNLI-m/mm",
        "SST-2",
        "STS-B",
        "QNLI",
        "RTE",
        "MRPC",
        "Avg",
    ]
    assert row == ["paper", "75.3", "93.0", "91.8/91.9", "96.9", "93.0", "96.0", "92.7", "92.2", "91.37"]


def test_glue_table_with_missing_task_has_no_average():
    partial = {k: v for k, v in PAPER_RESULTS.items() if k not in ("rte", "mnli_mm")}
    _, row = _table_cells(em.format_glue_table(partial))
    assert row[3] == "91.8/-"
    assert row[7] == "-"
    assert row[-1] == "-"


PAPER_XNLI = dict(
    zip(
        ("en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi", "sw", "ur"),
        (88.2, 82.6, 84.4, 82.7, 82.3, 82.4, 80.8, 79.5, 78.5, 78.1, 76.4, 79.5, 75.9, 73.9, 72.4),
        strict=True,
    )
)


def test_xnli_table_order_and_average():
    # Sum of the paper's 15 numbers is 1197.6; / 15 = 79.84 -> 79.8 as in the paper.
    accuracies = {language: value / 100 for language, value in PAPER_XNLI.items()}
    header, row = _table_cells(em.format_xnli_table(accuracies, name="mdeberta"))
    assert header == ["Model", *PAPER_XNLI, "avg"]
    assert row == ["mdeberta", *(f"{v:.1f}" for v in PAPER_XNLI.values()), "79.8"]
    with pytest.raises(ValueError, match="unknown key"):
        em.format_xnli_table({"xx": 0.5})
    _, partial_row = _table_cells(em.format_xnli_table({"en": 0.9}))
    assert partial_row[1] == "90.0" and partial_row[2] == "-" and partial_row[-1] == "-"
