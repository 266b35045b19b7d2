"""debertax.tokenizer against transformers.DebertaV2Tokenizer built from the same spm.model."""

import itertools
import os
import random

import numpy as np
import pytest
import sentencepiece

from debertax.corpus import default_corpus_lines
from debertax.tokenizer import Tokenizer, train_sentencepiece

transformers = pytest.importorskip("transformers")

# Lines in other scripts so the vocabulary holds some of their characters (others stay [UNK]).
MULTILINGUAL_LINES = [
    "Café naïve résumé, déjà vu à la façade; Ärger über Öl und Übermaß, señor.",
    "日本語のテキストです。東京は日本の首都です。中文文本很好。",
    "مرحبا بالعالم، هذه جملة عربية قصيرة.",
    "Ελληνικά κείμενα και λέξεις. Русский текст и слова.",
    "Emoji 😀 and 🎉 appear in chats 😀.",
]

VARIED_TEXTS = [
    "Return the value of the function.",
    "hello world",
    "",
    " ",
    "   \t\n  ",
    "  leading spaces",
    "trailing spaces   ",
    "multiple    inner     spaces",
    "tabs\tand\nnewlines\r\nand\rcarriage returns",
    "Café naïve résumé déjà vu",
    "e\u0301 composed by NFC vs \u00e9 precomposed",
    "日本語のテキスト and 中文",
    "مرحبا بالعالم",
    "emoji 😀🎉 and ☃ snowman (not in the vocabulary)",
    "Ελληνικά και Русский",
    "non-breaking\u00a0space and ideographic\u3000space and  \u00a0 mixed runs",
    "U+001C\x1cis not whitespace for transformers",
    "\u2581already a word boundary\u2581\u2581twice",
    "Numbers 1234567890 and symbols !@#$%^&*()_+-=[]{};':\",./<>?",
    "x" * 300,
    "A literal [MASK] token, [CLS]and[SEP] glued, [UNK] and [PAD] too.",
    "[MASK][MASK]",
    "[MAS K] is not a token",
]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spm")
    lines = itertools.chain(itertools.islice(default_corpus_lines(), 4000), MULTILINGUAL_LINES * 30)
    train_sentencepiece(lines, directory, vocab_size=700)
    return str(directory)


@pytest.fixture(scope="module")
def ours(spm_dir):
    return Tokenizer.load(spm_dir)


@pytest.fixture(scope="module")
def hf(spm_dir):
    reference = transformers.DebertaV2Tokenizer.from_pretrained(spm_dir)
    # transformers 5 silently maps everything to [UNK] when the vocabulary was not read.
    ids = reference("the function returns a value", add_special_tokens=False)["input_ids"]
    assert reference.unk_token_id not in ids and len(reference) > 600
    return reference


def random_texts(count, seed=0):
    alphabet = (
        list("abcdefghijklmnopqrstuvwxyz ABCXYZ.,;:'\"()[]{}0123456789-_")
        + list("  \t\n\r\u00a0\u3000\u2003\x0b\x0c\x1c\u2581\u0301")
        + list("éèàçüöäßñ日本語中文😀🎉مرحبαβγ☃")
        + ["the ", "function ", "return ", "[MASK]", "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MAS"]
    )
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]


def test_trained_model_layout(spm_dir):
    processor = sentencepiece.SentencePieceProcessor(model_file=os.path.join(spm_dir, "spm.model"))
    assert [processor.id_to_piece(i) for i in range(4)] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    assert processor.get_piece_size() == 700
    assert processor.piece_to_id("[MASK]") == processor.unk_id()  # [MASK] is not a piece


def test_special_ids_match_transformers(ours, hf, spm_dir):
    processor = sentencepiece.SentencePieceProcessor(model_file=os.path.join(spm_dir, "spm.model"))
    assert (ours.pad_id, ours.cls_id, ours.sep_id, ours.unk_id) == (0, 1, 2, 3)
    assert (ours.pad_id, ours.cls_id, ours.sep_id, ours.unk_id, ours.mask_id) == (
        hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.unk_token_id, hf.mask_token_id)
    assert ours.mask_id == processor.get_piece_size()
    assert ours.vocab_size == len(hf) == processor.get_piece_size() + 1
    assert ours.id_to_piece(ours.mask_id) == "[MASK]"
    assert [ours.id_to_piece(i) for i in range(ours.vocab_size)] == hf.convert_ids_to_tokens(
        list(range(len(hf))))


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_encode_matches_transformers(ours, hf, text):
    expected = hf(text, add_special_tokens=False)["input_ids"]
    assert ours.encode_ids(text) == expected


def test_encode_random_strings_match_transformers(ours, hf):
    texts = random_texts(600)
    expected = hf(texts, add_special_tokens=False)["input_ids"]
    assert ours.encode_batch(texts) == expected
    # The strings do exercise unknown characters and special-token splitting.
    flat = [token for ids in expected for token in ids]
    assert ours.unk_id in flat and ours.mask_id in flat and ours.cls_id in flat


def test_batch_with_pairs_and_padding_matches_transformers(ours, hf):
    first = VARIED_TEXTS[:12]
    second = VARIED_TEXTS[11:23]
    expected = hf(first, second, padding="longest", return_tensors="np")
    got = ours(first, second, padding="longest")
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
        assert got[key].dtype == np.int32
    expected = hf(VARIED_TEXTS, padding="max_length", max_length=40, truncation=True,
                  return_tensors="np")
    got = ours(VARIED_TEXTS, padding="max_length", max_length=40)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_unpadded_output_matches_transformers(ours, hf):
    expected = hf(VARIED_TEXTS[:6], VARIED_TEXTS[6:12])
    got = ours(VARIED_TEXTS[:6], VARIED_TEXTS[6:12], padding=False)
    assert [row.tolist() for row in got["input_ids"]] == expected["input_ids"]
    assert [row.tolist() for row in got["token_type_ids"]] == expected["token_type_ids"]


def test_truncation_matches_transformers(ours, hf):
    # Texts of 0..12 tokens, so that every longest_first branch is reached.
    candidates = "the function returns a value of the object and the module for each is to in".split()
    words = [w for w in candidates if len(hf(w, add_special_tokens=False)["input_ids"]) == 1]
    words = (words * 13)[:12]
    texts = [" ".join(words[:n]) for n in range(13)]
    assert [len(ids) for ids in hf(texts, add_special_tokens=False)["input_ids"]] == list(range(13))
    for max_length in range(3, 18):
        for first, second in itertools.product(texts, repeat=2):
            expected = hf([first], [second], truncation=True, max_length=max_length)["input_ids"][0]
            got = ours([first], [second], max_length=max_length)["input_ids"][0].tolist()
            assert got == expected, (first, second, max_length)
        expected = hf(texts, truncation=True, max_length=max_length, padding="longest",
                      return_tensors="np")["input_ids"]
        np.testing.assert_array_equal(ours(texts, max_length=max_length)["input_ids"], expected)


def test_no_truncation_when_disabled(ours, hf):
    text = VARIED_TEXTS[0]
    got = ours([text], max_length=4, truncation=False)["input_ids"][0].tolist()
    assert got == hf(text)["input_ids"]
    with pytest.raises(ValueError, match="max_length=4"):
        ours([text], max_length=4, truncation=False, padding="max_length")


def test_max_length_too_small_for_special_tokens(ours):
    with pytest.raises(ValueError, match="max_length=2"):
        ours(["a b"], ["c d"], max_length=2)


def test_decode_matches_transformers(ours, hf):
    texts = VARIED_TEXTS + random_texts(200, seed=1)
    for text in texts:
        ids = hf(text)["input_ids"]
        # Also a [MASK] in the middle, as in MLM inputs.
        masked = ids[:2] + [ours.mask_id] + ids[3:] if len(ids) > 3 else ids
        for token_ids in (ids, masked, ids[1:-1]):
            for skip in (False, True):
                assert ours.decode(token_ids, skip_special_tokens=skip) == hf.decode(
                    token_ids, skip_special_tokens=skip), (text, token_ids, skip)


def test_decode_round_trips_plain_text(ours):
    text = "Return the value of the function."
    assert ours.decode(ours.encode_ids(text)) == text


def test_missing_spm_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"spm\.model.*text input needs spm\.model"):
        Tokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        Tokenizer.load(tmp_path / "nothing.model")


def test_corrupt_spm_model(tmp_path):
    path = tmp_path / "spm.model"
    path.write_bytes(b"\x00\x01 this is not a sentencepiece model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.load(path)


def test_train_rejects_empty_input(tmp_path):
    with pytest.raises(ValueError, match="no text"):
        train_sentencepiece(iter(["", "   "]), tmp_path, vocab_size=100)


def train_raw_sentencepiece(directory, **options):
    """A model trained by sentencepiece directly, with the DeBERTa special pieces."""
    os.makedirs(directory, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=itertools.chain(itertools.islice(default_corpus_lines(), 1500), MULTILINGUAL_LINES),
        model_prefix=os.path.join(directory, "spm"), pad_id=0, pad_piece="[PAD]", bos_id=1,
        bos_piece="[CLS]", eos_id=2, eos_piece="[SEP]", unk_id=3, unk_piece="[UNK]", minloglevel=2,
        **options,
    )
    return str(directory)


def test_byte_fallback_model_matches_transformers(tmp_path):
    # Released-style model options: nmt_nfkc normaliser and byte pieces, both unused by transformers.
    # A user-defined piece is split out of the raw text like the special tokens.
    directory = train_raw_sentencepiece(tmp_path / "bytes", vocab_size=600, byte_fallback=True,
                                        user_defined_symbols=["<url>"])
    reference = transformers.DebertaV2Tokenizer.from_pretrained(directory)
    ours = Tokenizer.load(directory)
    texts = random_texts(300, seed=2) + [
        "ｆｕｌｌｗｉｄｔｈ ﬁ ligature ①", "literal <0x41> byte piece text", "see <url>now or x<url>",
        *VARIED_TEXTS,
    ]
    assert ours.encode_batch(texts) == reference(texts, add_special_tokens=False)["input_ids"]


def test_non_unigram_model_is_refused(tmp_path):
    directory = train_raw_sentencepiece(tmp_path / "bpe", vocab_size=300, model_type="bpe")
    with pytest.raises(ValueError, match="model type is BPE"):
        Tokenizer.load(directory)


def test_train_vocab_cli(tmp_path, hf):
    import subprocess
    import sys

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(itertools.islice(default_corpus_lines(), 800)) + "\n", encoding="utf-8")
    output_dir = tmp_path / "vocab"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-m", "debertax.train_vocab", f"--source={corpus}", "--vocab_size=300",
         f"--output_dir={output_dir}", "--progress_every=500"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "500 documents" in result.stdout and "read 800 documents" in result.stdout
    tokenizer = Tokenizer.load(output_dir)
    reference = transformers.DebertaV2Tokenizer.from_pretrained(str(output_dir))
    assert tokenizer.mask_id == 300 == reference.mask_token_id
    texts = VARIED_TEXTS[:10]
    assert tokenizer.encode_batch(texts) == reference(texts, add_special_tokens=False)["input_ids"]
