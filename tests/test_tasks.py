"""GLUE/XNLI readers on fixture files written in each task's real format, TFDS record mapping,
submission files and fine-tuning defaults."""

import codecs
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

from debertax import tasks

# ---------------------------------------------------------------------------------------------
# Fixture helpers


def write_tsv(path, rows, *, bom=False, newline="\n"):
    """rows: lists of column strings (or a raw str for a deliberately broken line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else "\t".join(row) for row in rows]
    data = (newline.join(lines) + newline).encode("utf-8")
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + data)
    return path


def fields(examples):
    return [(e.text_a, e.text_b, e.label, e.index) for e in examples]


MNLI_TRAIN_HEADER = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "gold_label",
]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]
MNLI_TEST_HEADER = MNLI_TRAIN_HEADER[:10]


def mnli_row(header, index, premise, hypothesis, gold=None):
    values = {
        "index": str(index),
        "promptID": "31193",
        "pairID": f"{index}n",
        "genre": "government",
        "sentence1_binary_parse": "( ( x ) )",
        "sentence2_binary_parse": "( y )",
        "sentence1_parse": "(ROOT (S x))",
        "sentence2_parse": "(ROOT (S y))",
        "sentence1": premise,
        "sentence2": hypothesis,
    }
    for column in header:
        if column.startswith("label") or column == "gold_label":
            values[column] = gold
    return [values[column] for column in header]


# ---------------------------------------------------------------------------------------------
# One test per GLUE task, in the real formats


def test_cola_without_header_and_test_file_with_header(tmp_path):
    train = write_tsv(
        tmp_path / "CoLA/train.tsv",
        [
            ["gj04", "1", "", "Our friends won't buy this analysis."],
            ["gj04", "0", "*", 'He said "the book.'],  # an unbalanced quote must not swallow rows
            ["w_80", "0", "?*", "John talked to Bill about himself himself."],
            ["w_80", "1", "", "The weights made the rope stretch."],
        ],
    )
    result = tasks.read_tsv("cola", train)
    assert fields(result) == [
        ("Our friends won't buy this analysis.", None, 1, None),
        ('He said "the book.', None, 0, None),
        ("John talked to Bill about himself himself.", None, 0, None),
        ("The weights made the rope stretch.", None, 1, None),
    ]
    assert [e.line for e in result] == [1, 2, 3, 4]
    assert result[0].guid == "train.tsv:1"
    assert tasks.TASKS["cola"].label_names[result[1].label] == "unacceptable"

    write_tsv(
        tmp_path / "CoLA/test.tsv", [["index", "sentence"], ["0", "Bill whistled."], ["1", "Who left?"]]
    )
    test = tasks.read_glue_split("cola", tmp_path, "test")
    assert fields(test) == [("Bill whistled.", None, None, 0), ("Who left?", None, None, 1)]


def test_sst2_header_strips_trailing_space(tmp_path):
    write_tsv(
        tmp_path / "SST-2/dev.tsv",
        [
            ["sentence", "label"],
            ["it 's a charming and often affecting journey . ", "1"],
            ["unflinchingly bleak and desperate ", "0"],
        ],
    )
    write_tsv(tmp_path / "SST-2/test.tsv", [["index", "sentence"], ["0", "uneasy mishmash of styles"]])
    dev = tasks.read_glue_split("sst2", tmp_path, "dev")
    assert fields(dev) == [
        ("it 's a charming and often affecting journey .", None, 1, None),
        ("unflinchingly bleak and desperate", None, 0, None),
    ]
    assert [e.line for e in dev] == [2, 3]
    assert fields(tasks.read_glue_split("sst2", tmp_path, "test")) == [
        ("uneasy mishmash of styles", None, None, 0)
    ]


def test_mrpc_with_byte_order_mark_and_quotes(tmp_path):
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    write_tsv(
        tmp_path / "MRPC/dev.tsv",
        [
            header,
            [
                "1",
                "1355540",
                "1355592",
                "He said the pie business doesn't fit.",
                '"The pie business does not fit.',
            ],
            ["0", "2029631", "2029565", 'His wife said he was "100 percent behind', "Magnarelli said so."],
        ],
        bom=True,
    )
    write_tsv(
        tmp_path / "MRPC/test.tsv",
        [
            ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            ["0", "1089874", "1089925", "PCCW 's chief operating officer", "Current Chief Operating Officer"],
        ],
        bom=True,
    )
    dev = tasks.read_glue_split("mrpc", tmp_path, "dev")
    assert fields(dev) == [
        ("He said the pie business doesn't fit.", '"The pie business does not fit.', 1, None),
        ('His wife said he was "100 percent behind', "Magnarelli said so.", 0, None),
    ]
    test = tasks.read_glue_split("mrpc", tmp_path, "test")
    assert fields(test) == [("PCCW 's chief operating officer", "Current Chief Operating Officer", None, 0)]


STSB_HEADER = [
    "index",
    "genre",
    "filename",
    "year",
    "old_index",
    "source1",
    "source2",
    "sentence1",
    "sentence2",
    "score",
]


def test_stsb_float_scores_and_unlabelled_test(tmp_path):
    write_tsv(
        tmp_path / "STS-B/train.tsv",
        [
            STSB_HEADER,
            [
                "0",
                "main-captions",
                "MSRvid",
                "2012test",
                "0001",
                "none",
                "none",
                "A plane is taking off.",
                "An air plane is taking off.",
                "5.000",
            ],
            [
                "1",
                "main-captions",
                "MSRvid",
                "2012test",
                "0004",
                "none",
                "none",
                "A man plays a flute.",
                "A man plays.",
                "3.800",
            ],
            [
                "2",
                "main-news",
                "headlines",
                "2013",
                "0007",
                "none",
                "none",
                "Oil rises.",
                "Stocks fall.",
                "0.000",
            ],
        ],
    )
    write_tsv(
        tmp_path / "STS-B/test.tsv",
        [
            STSB_HEADER[:-1],
            [
                "0",
                "main-captions",
                "MSRvid",
                "2012test",
                "0024",
                "none",
                "none",
                "A girl styles her hair.",
                "A girl brushes.",
            ],
        ],
    )
    train = tasks.read_glue_split("stsb", tmp_path, "train")
    assert fields(train) == [
        ("A plane is taking off.", "An air plane is taking off.", 5.0, 0),
        ("A man plays a flute.", "A man plays.", 3.8, 1),
        ("Oil rises.", "Stocks fall.", 0.0, 2),
    ]
    assert all(isinstance(e.label, float) for e in train)
    assert fields(tasks.read_glue_split("stsb", tmp_path, "test")) == [
        ("A girl styles her hair.", "A girl brushes.", None, 0)
    ]
    spec = tasks.TASKS["stsb"]
    assert spec.is_regression and spec.num_labels == 1 and spec.label_names is None


def test_qqp_id_column(tmp_path):
    write_tsv(
        tmp_path / "QQP/train.tsv",
        [
            ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            ["133273", "213221", "213222", "How is the life of a math student?", "Which level of math?", "0"],
            [
                "402555",
                "536040",
                "536041",
                "How do I control my horny emotions?",
                "How do you control your horniness?",
                "1",
            ],
        ],
    )
    write_tsv(
        tmp_path / "QQP/test.tsv",
        [
            ["id", "question1", "question2"],
            ["0", "Why do rockets look white?", "Why are rockets white?"],
        ],
    )
    assert fields(tasks.read_glue_split("qqp", tmp_path, "train")) == [
        ("How is the life of a math student?", "Which level of math?", 0, 133273),
        ("How do I control my horny emotions?", "How do you control your horniness?", 1, 402555),
    ]
    assert fields(tasks.read_glue_split("qqp", tmp_path, "test")) == [
        ("Why do rockets look white?", "Why are rockets white?", None, 0)
    ]


def test_mnli_matched_mismatched_and_label_strings(tmp_path):
    write_tsv(
        tmp_path / "MNLI/train.tsv",
        [
            MNLI_TRAIN_HEADER,
            mnli_row(
                MNLI_TRAIN_HEADER,
                0,
                "Conceptually cream skimming has two dimensions.",
                "Product and geography.",
                "neutral",
            ),
            mnli_row(
                MNLI_TRAIN_HEADER, 1, "you know during the season", "You lose the things.", "entailment"
            ),
            mnli_row(
                MNLI_TRAIN_HEADER,
                2,
                "One of our number will carry out.",
                "A member will do nothing.",
                "contradiction",
            ),
        ],
    )
    write_tsv(
        tmp_path / "MNLI/dev_matched.tsv",
        [
            MNLI_DEV_HEADER,
            mnli_row(
                MNLI_DEV_HEADER, 0, "The new rights are nice enough", "Everyone really likes them.", "neutral"
            ),
        ],
    )
    write_tsv(
        tmp_path / "MNLI/dev_mismatched.tsv",
        [
            MNLI_DEV_HEADER,
            mnli_row(
                MNLI_DEV_HEADER,
                0,
                "Your contribution helped.",
                "Your contribution did not help.",
                "contradiction",
            ),
        ],
    )
    write_tsv(
        tmp_path / "MNLI/test_matched.tsv",
        [
            MNLI_TEST_HEADER,
            mnli_row(MNLI_TEST_HEADER, 0, "Hierbas, ans seco.", "Hierbas is a name."),
        ],
    )
    write_tsv(
        tmp_path / "MNLI/test_mismatched.tsv",
        [
            MNLI_TEST_HEADER,
            mnli_row(MNLI_TEST_HEADER, 7, "What a day.", "It was a day."),
        ],
    )
    spec = tasks.TASKS["mnli"]
    train = tasks.read_glue_split("mnli", tmp_path, "train")
    # Ids follow the authors' order, looked up by the TSV string, never by TFDS position.
    assert [spec.label_names[e.label] for e in train] == ["neutral", "entailment", "contradiction"]
    assert [e.label for e in train] == [1, 2, 0]
    assert train[0].text_a == "Conceptually cream skimming has two dimensions."
    assert train[0].text_b == "Product and geography."
    matched = tasks.read_glue_split("mnli", tmp_path, "dev_matched")
    mismatched = tasks.read_glue_split("mnli", tmp_path, "dev_mismatched")
    assert fields(matched) == [("The new rights are nice enough", "Everyone really likes them.", 1, 0)]
    assert fields(mismatched) == [("Your contribution helped.", "Your contribution did not help.", 0, 0)]
    assert fields(tasks.read_glue_split("mnli", tmp_path, "test_mismatched")) == [
        ("What a day.", "It was a day.", None, 7)
    ]
    assert spec.eval_splits == ("dev_matched", "dev_mismatched")
    with pytest.raises(ValueError, match="unknown split"):
        tasks.read_glue_split("mnli", tmp_path, "dev")


def test_qnli_and_rte_entailment_labels(tmp_path):
    write_tsv(
        tmp_path / "QNLI/dev.tsv",
        [
            ["index", "question", "sentence", "label"],
            [
                "0",
                "What came into force after the new constitution?",
                "As of that day, the new constitution...",
                "entailment",
            ],
            ["1", "What is the first major city?", "The stream flows south.", "not_entailment"],
        ],
    )
    write_tsv(
        tmp_path / "RTE/dev.tsv",
        [
            ["index", "sentence1", "sentence2", "label"],
            ["0", "Dana Reeve has died.", "Christopher Reeve had an accident.", "not_entailment"],
            ["1", "Bacteria mutate faster.", "Bacteria are mutating.", "entailment"],
        ],
    )
    write_tsv(
        tmp_path / "RTE/test.tsv",
        [["index", "sentence1", "sentence2"], ["0", "Mangla was built.", "Mangla is a dam."]],
    )
    assert fields(tasks.read_glue_split("qnli", tmp_path, "dev")) == [
        ("What came into force after the new constitution?", "As of that day, the new constitution...", 0, 0),
        ("What is the first major city?", "The stream flows south.", 1, 1),
    ]
    assert fields(tasks.read_glue_split("rte", tmp_path, "dev")) == [
        ("Dana Reeve has died.", "Christopher Reeve had an accident.", 1, 0),
        ("Bacteria mutate faster.", "Bacteria are mutating.", 0, 1),
    ]
    assert fields(tasks.read_glue_split("rte", tmp_path, "test")) == [
        ("Mangla was built.", "Mangla is a dam.", None, 0)
    ]


def test_columns_are_found_by_header_name_not_position(tmp_path):
    path = write_tsv(
        tmp_path / "dev.tsv",
        [
            ["label", "sentence2", "extra", "index", "sentence1"],
            ["entailment", "hypothesis", "x", "5", "premise"],
        ],
    )
    assert fields(tasks.read_tsv("rte", path)) == [("premise", "hypothesis", 0, 5)]


def test_crlf_line_endings(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", [["sentence", "label"], ["good film", "1"]], newline="\r\n")
    assert fields(tasks.read_tsv("sst2", path)) == [("good film", None, 1, None)]


def test_missing_header_is_an_error_for_headed_tasks(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", [["0", "premise", "hypothesis", "entailment"]])
    with pytest.raises(ValueError, match=r"dev\.tsv:1: expected a RTE header"):
        tasks.read_tsv("rte", path)
    (tmp_path / "empty.tsv").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.tsv:1: empty file"):
        tasks.read_tsv("cola", tmp_path / "empty.tsv")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="RTE/dev.tsv"):
        tasks.read_glue_split("rte", tmp_path, "dev")


# ---------------------------------------------------------------------------------------------
# Malformed rows, each in both modes

GOOD_RTE = ["0", "A man sleeps.", "A man rests.", "entailment"]
BAD_RTE_ROWS = {
    "too few columns": (["1", "only premise", "entailment"], "expected 4 tab-separated columns, got 3"),
    "too many columns": (["1", "p", "h", "entailment", "extra"], "expected 4 tab-separated columns, got 5"),
    "unknown label": (["1", "p", "h", "neutral"], "unknown label 'neutral'"),
    "empty text": (["1", "p", "  ", "entailment"], "empty text in column 'sentence2'"),
    "bad index": (["x1", "p", "h", "entailment"], "index 'x1' is not an integer"),
    "blank line": ("", "expected 4 tab-separated columns, got 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_RTE_ROWS))
def test_bad_row_error_mode_names_file_and_line(tmp_path, case):
    bad_row, problem = BAD_RTE_ROWS[case]
    path = write_tsv(
        tmp_path / "dev.tsv", [["index", "sentence1", "sentence2", "label"], GOOD_RTE, bad_row, GOOD_RTE]
    )
    with pytest.raises(ValueError) as error:
        tasks.read_tsv("rte", path)
    message = str(error.value)
    assert message.startswith(f"{path}:3: ")
    assert problem in message
    assert "\n" not in message


@pytest.mark.parametrize("case", sorted(BAD_RTE_ROWS))
def test_bad_row_skip_mode_counts_and_keeps_the_rest(tmp_path, case, caplog):
    bad_row, problem = BAD_RTE_ROWS[case]
    path = write_tsv(
        tmp_path / "dev.tsv", [["index", "sentence1", "sentence2", "label"], GOOD_RTE, bad_row, GOOD_RTE]
    )
    with caplog.at_level(logging.WARNING, logger="debertax.tasks"):
        result = tasks.read_tsv("rte", path, on_bad_row="skip")
    assert [e.line for e in result] == [2, 4]
    assert result.num_bad_rows == 1
    assert result.bad_rows[0].startswith(f"{path}:3: ") and problem in result.bad_rows[0]
    assert "skipped 1 bad rows" in caplog.text


def test_invalid_utf8_and_out_of_range_score_are_bad_rows(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff bytes\t0\n")
    with pytest.raises(ValueError, match=r"dev\.tsv:3: not valid UTF-8"):
        tasks.read_tsv("sst2", path)
    assert tasks.read_tsv("sst2", path, on_bad_row="skip").num_bad_rows == 1

    row = ["0", "g", "f", "2012", "0", "none", "none", "a", "b"]
    stsb = write_tsv(tmp_path / "stsb.tsv", [STSB_HEADER, row + ["5.5"], row + ["high"], row + ["2.5"]])
    with pytest.raises(ValueError, match=r"stsb\.tsv:2: label 5.5 outside \[0.0, 5.0\]"):
        tasks.read_tsv("stsb", stsb)
    skipped = tasks.read_tsv("stsb", stsb, on_bad_row="skip")
    assert [e.label for e in skipped] == [2.5] and skipped.num_bad_rows == 2


def test_cola_bad_label_and_on_bad_row_validation(tmp_path):
    path = write_tsv(tmp_path / "train.tsv", [["gj04", "1", "", "Fine."], ["gj04", "2", "", "Odd label."]])
    with pytest.raises(ValueError, match=r"train\.tsv:2: unknown label '2'"):
        tasks.read_tsv("cola", path)
    with pytest.raises(ValueError, match="on_bad_row"):
        tasks.read_tsv("cola", path, on_bad_row="ignore")


# ---------------------------------------------------------------------------------------------
# XNLI


def test_xnli_folder_order_and_label_normalisation(tmp_path):
    write_tsv(
        tmp_path / "test/test-fr.tsv",
        [
            ["Et il a dit, maman, je suis à la maison.", "Il n'a pas dit un mot.", "contradict"],
            ["Et il a dit.", "Il a appelé sa mère.", "Neutral"],
            ["Bonjour.", "Salut.", "ENTAILMENT"],
        ],
    )
    # An exported copy with a header line is recognised by its column names.
    write_tsv(
        tmp_path / "test/test-de.tsv",
        [["premise", "hypothesis", "label"], ["Und er sagte.", "Er sagte nichts.", "contradiction"]],
    )
    results = tasks.read_xnli_split(tmp_path, "test", languages=("fr", "de"))
    assert list(results) == ["fr", "de"]
    names = tasks.TASKS["xnli"].label_names
    assert [names[e.label] for e in results["fr"]] == ["contradiction", "neutral", "entailment"]
    assert results["fr"][0].text_a == "Et il a dit, maman, je suis à la maison."
    assert results["fr"][0].guid == "test-fr.tsv:1"
    assert fields(results["de"]) == [("Und er sagte.", "Er sagte nichts.", 0, None)]
    assert results["de"][0].line == 2
    # Same ids as MNLI, so an MNLI-trained head transfers.
    assert names == tasks.TASKS["mnli"].label_names


def test_xnli_numeric_label_is_rejected_and_missing_language_reported(tmp_path):
    write_tsv(tmp_path / "dev/dev-en.tsv", [["p", "h", "neutral"], ["p", "h", "0"]])
    with pytest.raises(ValueError, match=r"dev-en\.tsv:2: unknown label '0'"):
        tasks.read_xnli_split(tmp_path, "dev", languages=("en",))
    assert tasks.read_xnli_split(tmp_path, "dev", ("en",), on_bad_row="skip")["en"].num_bad_rows == 1
    with pytest.raises(FileNotFoundError, match="dev-sw.tsv"):
        tasks.read_xnli_split(tmp_path, "dev", languages=("en", "sw"), on_bad_row="skip")
    with pytest.raises(ValueError, match="unknown XNLI language"):
        tasks.read_xnli_split(tmp_path, "dev", languages=("xx",))


def test_xnli_languages_in_paper_order():
    assert tasks.XNLI_LANGUAGES == (
        "en",
        "fr",
        "es",
        "de",
        "el",
        "bg",
        "ru",
        "tr",
        "ar",
        "vi",
        "th",
        "zh",
        "hi",
        "sw",
        "ur",
    )


# ---------------------------------------------------------------------------------------------
# TFDS records (no download: records are built by hand in TFDS's decoded form)


def test_tfds_mnli_records_are_mapped_by_label_name():
    records = [
        {
            "premise": b"A man eats.",
            "hypothesis": b"Someone eats.",
            "label": np.int64(0),
            "idx": np.int32(10),
        },
        {"premise": b"A man eats.", "hypothesis": b"Nobody eats.", "label": np.int64(2), "idx": np.int32(11)},
        {
            "premise": b"A man eats.",
            "hypothesis": b"He is hungry.",
            "label": np.int64(1),
            "idx": np.int32(12),
        },
        {"premise": b"Test row.", "hypothesis": b"No label.", "label": np.int64(-1), "idx": np.int32(13)},
    ]
    result = tasks.examples_from_tfds_records("mnli", records, source="glue/mnli:validation_matched")
    names = tasks.TASKS["mnli"].label_names
    # TFDS 0 = entailment, 2 = contradiction; our ids are the authors' (contradiction=0).
    assert [None if e.label is None else names[e.label] for e in result] == [
        "entailment",
        "contradiction",
        "neutral",
        None,
    ]
    assert [e.label for e in result] == [2, 0, 1, None]
    assert [e.index for e in result] == [10, 11, 12, 13]
    assert result[0].text_a == "A man eats." and result[0].text_b == "Someone eats."
    assert result[0].guid == "glue/mnli:validation_matched:0"


@pytest.mark.parametrize(
    "task, record, expected",
    [
        ("cola", {"sentence": b"Bill left.", "label": 1, "idx": 3}, ("Bill left.", None, 1, 3)),
        ("sst2", {"sentence": "a gem ", "label": 0, "idx": 0}, ("a gem", None, 0, 0)),
        ("mrpc", {"sentence1": b"a", "sentence2": b"b", "label": 1, "idx": 2}, ("a", "b", 1, 2)),
        ("qqp", {"question1": b"q1?", "question2": b"q2?", "label": 0, "idx": 4}, ("q1?", "q2?", 0, 4)),
        (
            "stsb",
            {"sentence1": b"a", "sentence2": b"b", "label": np.float32(3.8), "idx": 1},
            ("a", "b", pytest.approx(3.8), 1),
        ),
        (
            "stsb",
            {"sentence1": b"a", "sentence2": b"b", "label": np.float32(-1.0), "idx": 1},
            ("a", "b", None, 1),
        ),
        (
            "qnli",
            {"question": b"Why?", "sentence": b"Because.", "label": 1, "idx": 0},
            ("Why?", "Because.", 1, 0),
        ),
        ("rte", {"sentence1": b"p", "sentence2": b"h", "label": 0, "idx": 9}, ("p", "h", 0, 9)),
    ],
)
def test_tfds_glue_feature_names(task, record, expected):
    (example,) = tasks.examples_from_tfds_records(task, [record], source=f"glue/{task}:validation")
    assert (example.text_a, example.text_b, example.label, example.index) == expected


def test_tfds_multi_nli_records_without_idx_use_position():
    records = [{"premise": b"p", "hypothesis": b"h", "label": 2}] * 2
    result = tasks.examples_from_tfds_records("mnli", records, source="multi_nli:train")
    assert [e.index for e in result] == [0, 1] and [e.label for e in result] == [0, 0]


def xnli_record(label, hypothesis_languages=("ar", "de", "en", "fr")):
    return {
        "premise": {
            "en": b"The cat sat.",
            "fr": "Le chat.".encode(),
            "de": b"Die Katze.",
            "ar": "القط".encode(),
        },
        "hypothesis": {
            "language": np.array([code.encode() for code in hypothesis_languages], dtype=object),
            "translation": np.array([f"hyp-{code}".encode() for code in hypothesis_languages], dtype=object),
        },
        "label": label,
    }


def test_tfds_xnli_multilingual_records():
    records = [xnli_record(0), xnli_record(2)]
    french = tasks.examples_from_tfds_records("xnli", records, source="xnli:test", language="fr")
    assert fields(french) == [("Le chat.", "hyp-fr", 2, 0), ("Le chat.", "hyp-fr", 0, 1)]
    arabic = tasks.examples_from_tfds_records("xnli", records, source="xnli:test", language="ar")
    assert arabic[0].text_a == "القط" and arabic[0].text_b == "hyp-ar"
    with pytest.raises(ValueError, match="need a language"):
        tasks.examples_from_tfds_records("xnli", records, source="xnli:test")


def test_tfds_bad_records_in_both_modes():
    records = [
        xnli_record(1),
        xnli_record(1, hypothesis_languages=("de", "en")),  # no French hypothesis
        xnli_record(7),  # label id out of range
    ]
    with pytest.raises(ValueError, match=r"xnli:test:1: hypothesis has 0 'fr' translations"):
        tasks.examples_from_tfds_records("xnli", records, source="xnli:test", language="fr")
    result = tasks.examples_from_tfds_records(
        "xnli", records, source="xnli:test", language="fr", on_bad_row="skip"
    )
    assert len(result) == 1 and result.num_bad_rows == 2
    assert "label id 7 outside" in result.bad_rows[1]
    empty = [{"sentence": b"  ", "label": 1, "idx": 0}]
    with pytest.raises(ValueError, match=r"glue/cola:train:0: empty text in column 'sentence'"):
        tasks.examples_from_tfds_records("cola", empty, source="glue/cola:train")


def test_tfds_label_names_must_match_the_task():
    with pytest.raises(ValueError, match="do not match"):
        tasks.examples_from_tfds_records(
            "rte", [], source="glue/rte:train", tfds_label_names=("entailment", "neutral")
        )


class FakeDataSource:
    """The parts of an ArrayRecordDataSource that read_tfds uses."""

    def __init__(self, records, label_names):
        self.records = records
        label_feature = type("ClassLabel", (), {"names": list(label_names)})()
        self.dataset_info = type("Info", (), {"features": {"label": label_feature}})()
        self.requested = []

    def __len__(self):
        return len(self.records)

    def __getitems__(self, keys):
        keys = list(keys)
        self.requested.append(keys)
        return [self.records[k] for k in keys]


def test_read_tfds_uses_data_source_with_mapped_split(monkeypatch):
    import tensorflow_datasets as tfds

    records = [{"premise": b"p", "hypothesis": f"h{i}".encode(), "label": i % 3, "idx": i} for i in range(5)]
    source = FakeDataSource(records, tasks.TFDS_NLI_LABELS)
    calls = []

    def fake_data_source(name, **kwargs):
        calls.append((name, kwargs))
        return source

    monkeypatch.setattr(tfds, "data_source", fake_data_source)
    result = tasks.read_tfds("mnli", "dev_mismatched", chunk_size=2)
    assert calls[0][0] == "glue/mnli" and calls[0][1]["split"] == "validation_mismatched"
    assert source.requested == [[0, 1], [2, 3], [4]]
    assert [e.label for e in result] == [2, 1, 0, 2, 1]

    # A dataset whose ClassLabel order differs from the assumed one is refused.
    monkeypatch.setattr(tfds, "data_source", lambda name, **kwargs: FakeDataSource(records, tasks.NLI_LABELS))
    with pytest.raises(ValueError, match="ClassLabel names"):
        tasks.read_tfds("mnli", "train")


# ---------------------------------------------------------------------------------------------
# Specs, submissions, hyperparameters


def test_task_specs():
    assert tasks.GLUE_TASK_NAMES == ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
    assert {name: spec.num_labels for name, spec in tasks.TASKS.items()} == {
        "cola": 2,
        "sst2": 2,
        "mrpc": 2,
        "stsb": 1,
        "qqp": 2,
        "mnli": 3,
        "qnli": 2,
        "rte": 2,
        "xnli": 3,
    }
    assert {name: spec.main_metric for name, spec in tasks.TASKS.items()} == {
        "cola": "mcc",
        "sst2": "accuracy",
        "mrpc": "accuracy",
        "stsb": "pearson",
        "qqp": "accuracy",
        "mnli": "accuracy",
        "qnli": "accuracy",
        "rte": "accuracy",
        "xnli": "accuracy",
    }
    assert tasks.TASKS["mnli"].label_names == ("contradiction", "neutral", "entailment")
    assert tasks.TASKS["mnli"].tfds_label_names == ("entailment", "neutral", "contradiction")
    assert tasks.TASKS["qqp"].tfds_name == "glue/qqp" and tasks.TASKS["xnli"].tfds_name == "xnli"
    assert tasks.TASKS["xnli"].file_name("dev", "sw") == "dev/dev-sw.tsv"
    assert tasks.TASKS["mnli"].tfds_split("test_matched") == "test_matched"
    assert tasks.TASKS["rte"].tfds_split("dev") == "validation"
    submission_names = {
        name: dict(spec.submission_files) for name, spec in tasks.TASKS.items() if name != "xnli"
    }
    assert submission_names == {
        "cola": {"test": "CoLA.tsv"},
        "sst2": {"test": "SST-2.tsv"},
        "mrpc": {"test": "MRPC.tsv"},
        "stsb": {"test": "STS-B.tsv"},
        "qqp": {"test": "QQP.tsv"},
        "mnli": {"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"},
        "qnli": {"test": "QNLI.tsv"},
        "rte": {"test": "RTE.tsv"},
    }
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get_task("wnli")


def test_write_glue_submission(tmp_path):
    path = tasks.write_glue_submission("mnli", "test_mismatched", [0, 1, 2], [0, 2, 1], tmp_path)
    assert path == str(tmp_path / "MNLI-mm.tsv")
    assert Path(path).read_text() == "index\tprediction\n0\tcontradiction\n1\tentailment\n2\tneutral\n"
    cola = tasks.write_glue_submission("cola", "test", [0, 1], np.array([1, 0]), tmp_path)
    assert Path(cola).read_text() == "index\tprediction\n0\t1\n1\t0\n"
    stsb = tasks.write_glue_submission("stsb", "test", [0, 1], [4.12345, 0.5], tmp_path)
    assert Path(stsb).read_text() == "index\tprediction\n0\t4.123\n1\t0.500\n"
    with pytest.raises(ValueError, match="not a label id"):
        tasks.write_glue_submission("rte", "test", [0], [2], tmp_path)
    with pytest.raises(ValueError, match="2 indices but 1 predictions"):
        tasks.write_glue_submission("rte", "test", [0, 1], [0], tmp_path)


def test_default_hparams_follow_the_reference_table():
    # Rows of the v3-large table: (lr, epochs, warmup, batch, dropout, max len).
    reference = {
        "mnli": (7e-6, 2, 500, 64, 0.3, 256),
        "cola": (5.5e-6, 10, 50, 32, 0.1, 64),
        "sst2": (6e-6, 8, 500, 32, 0.1, 128),
        "stsb": (7e-6, 4, 50, 32, 0.1, 128),
        "rte": (1e-5, 6, 50, 32, 0.3, 320),
        "qqp": (1e-5, 6, 1000, 64, 0.2, 320),
        "qnli": (7e-6, 6, 200, 64, 0.2, 512),
        "mrpc": (6e-6, 6, 50, 32, 0.2, 128),
    }
    for task, row in reference.items():
        hp = tasks.default_hparams(task, "large")
        assert (
            hp.learning_rate,
            hp.epochs,
            hp.warmup_steps,
            hp.batch_size,
            hp.classifier_dropout,
            hp.max_length,
        ) == row
        if task != "mnli":
            # Other sizes: the large row with the learning rate scaled for the width.
            for size, scale in (("base", 2.0), ("small", 3.0), ("xsmall", 4.0), ("tiny", 50.0)):
                other = tasks.default_hparams(task, size)
                assert other.learning_rate == pytest.approx(row[0] * scale, rel=1e-12)
                assert dataclasses.replace(other, learning_rate=hp.learning_rate) == hp
    base_mnli = tasks.default_hparams("mnli", "base")
    assert (base_mnli.learning_rate, base_mnli.epochs, base_mnli.warmup_steps) == (1.5e-5, 3, 1000)
    xnli = tasks.default_hparams("xnli", "base")
    assert (xnli.learning_rate, xnli.warmup_steps, xnli.max_length) == (1.5e-5, 3000, 256)
    with pytest.raises(ValueError, match="unknown model size"):
        tasks.default_hparams("rte", "huge")


def test_default_warmup_is_capped_to_a_share_of_the_run():
    assert tasks.warmup_for_run(500, 10_000) == 500  # the table's value where the run is long
    assert tasks.warmup_for_run(500, 500) == 50  # 10% of a short run
    assert tasks.warmup_for_run(3000, 7) == 1  # rounded up: at least one warmup step
    assert tasks.warmup_for_run(50, 0) == 0
