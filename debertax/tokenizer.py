"""SentencePiece tokenizer that reproduces `transformers.DebertaV2Tokenizer` (transformers 5.x).

The Hugging Face tokenizer (a `tokenizers` Unigram backend built from `spm.model`) does not run the
normaliser stored in the SentencePiece model. For every text it

1. splits out the special tokens ([PAD], [CLS], [SEP], [UNK], [MASK] and the model's control and
   user-defined pieces) wherever they occur literally in the raw text;
2. normalises each remaining segment: runs of two or more whitespace characters, and every single
   \\n, \\r or \\t, become one space; then Unicode NFC; then trailing whitespace is stripped;
3. replaces spaces with "▁", prepends "▁" unless the segment already starts with one, and splits
   into words before each "▁";
4. segments each word with the Unigram model (Viterbi over the piece scores; a run of characters
   missing from the vocabulary becomes one [UNK]).

`Tokenizer` does steps 1-3 in Python and step 4 with the sentencepiece library, on a copy of the
model whose own normaliser is switched off ("identity", no dummy prefix, no whitespace removal).
Words cannot interact in step 4 because no piece holds a "▁" after its first character, so
segmenting the whole "▁"-joined text at once gives the same pieces as word by word.

Transformers 4.x (and the authors' code) applied the model's nmt_nfkc rules instead of step 2, so
texts with compatibility characters (full-width letters, ligatures, ...) map to other ids there.
`train_sentencepiece` trains vocabularies on text normalised as in step 2, so the vocabulary sees
exactly what encoding produces.

Special ids follow released DeBERTa-v3: [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3 are pieces of the
SentencePiece model, and [MASK] is appended after the last piece (id = number of pieces, 128000
for the released 128k vocabulary).
"""

from __future__ import annotations

import io
import itertools
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2

from debertax import storage

SPM_MODEL_FILENAME = "spm.model"

PAD_TOKEN = "[PAD]"
CLS_TOKEN = "[CLS]"
SEP_TOKEN = "[SEP]"
UNK_TOKEN = "[UNK]"
MASK_TOKEN = "[MASK]"

WORD_BOUNDARY = "\u2581"  # "▁", SentencePiece's visible space

# Unicode White_Space, which is what both `\s` in the tokenizers library's regex engine and Rust's
# char::is_whitespace (used by its Strip normaliser) match. Python's `\s` and str.isspace() also
# accept U+001C..U+001F, which DebertaV2Tokenizer keeps as ordinary characters.
_WHITESPACE_CLASS = "[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_WHITESPACE_TO_SPACE = re.compile(_WHITESPACE_CLASS + "{2,}|[\n\r\t]")
_TRAILING_WHITESPACE = re.compile(_WHITESPACE_CLASS + "+$")

# SentencePiece ModelProto.SentencePiece.Type values.
_PIECE_TYPE_NORMAL = 1
_PIECE_TYPE_CONTROL = 3
_PIECE_TYPE_USER_DEFINED = 4
_PIECE_TYPE_UNUSED = 5
_PIECE_TYPE_BYTE = 6

# sentencepiece skips training sentences longer than this many bytes (its max_sentence_length).
_TRAINER_MAX_SENTENCE_BYTES = 4192


def normalize_text(text: str) -> str:
    """DebertaV2Tokenizer's normaliser: collapse whitespace runs, NFC, strip trailing whitespace."""
    text = _WHITESPACE_TO_SPACE.sub(" ", text)
    text = unicodedata.normalize("NFC", text)
    return _TRAILING_WHITESPACE.sub("", text)


def resolve_spm_path(path: str | os.PathLike) -> str:
    """Return the spm.model file for `path` (the file itself, or a directory holding spm.model)."""
    path = os.fspath(path)
    model_path = storage.join(path, SPM_MODEL_FILENAME) if storage.isdir(path) else path
    if not storage.isfile(model_path):
        raise FileNotFoundError(
            f"SentencePiece model not found: {model_path} (text input needs {SPM_MODEL_FILENAME}; "
            f"train one with `python -m debertax.train_vocab`)"
        )
    return model_path


class Tokenizer:
    """DeBERTa-v3 tokenizer over a SentencePiece Unigram model; ids match DebertaV2Tokenizer."""

    def __init__(self, model_proto: bytes, source: str = "<in-memory spm model>"):
        """`model_proto`: the bytes of an spm.model file; `source` names it in error messages."""
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(model_proto)
        except DecodeError as error:
            raise ValueError(f"{source}: not a SentencePiece model ({error})") from None
        if not proto.pieces:
            raise ValueError(f"{source}: not a SentencePiece model (no pieces)")
        self._source = source
        if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
            raise ValueError(
                f"{source}: SentencePiece model type is "
                f"{sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)}; "
                f"DeBERTa tokenizers are UNIGRAM"
            )
        self._pieces = [piece.piece for piece in proto.pieces]
        piece_ids = {piece: index for index, piece in enumerate(self._pieces)}

        def special_id(token: str) -> int:
            if token not in piece_ids:
                raise ValueError(
                    f"{source}: SentencePiece model has no {token} piece; train it with "
                    f"debertax.tokenizer.train_sentencepiece so [PAD], [CLS], [SEP], [UNK] are pieces"
                )
            return piece_ids[token]

        self._pad_id = special_id(PAD_TOKEN)
        self._cls_id = special_id(CLS_TOKEN)
        self._sep_id = special_id(SEP_TOKEN)
        self._unk_id = special_id(UNK_TOKEN)
        if proto.trainer_spec.unk_id != self._unk_id:
            raise ValueError(
                f"{source}: the unknown piece has id {proto.trainer_spec.unk_id}, expected the "
                f"{UNK_TOKEN} piece at id {self._unk_id}"
            )
        # Like transformers, [MASK] is an added token after the pieces unless the model has one.
        self._mask_id = piece_ids.get(MASK_TOKEN, len(self._pieces))
        self._vocab_size = max(len(self._pieces), self._mask_id + 1)

        # Transformers matches these on the raw text before normalising. Longest first, so that
        # a regex alternation picks the longest of several tokens starting at the same place.
        split_tokens = {PAD_TOKEN, CLS_TOKEN, SEP_TOKEN, UNK_TOKEN, MASK_TOKEN}
        split_tokens.update(
            piece.piece
            for piece in proto.pieces
            if piece.type in (_PIECE_TYPE_CONTROL, _PIECE_TYPE_USER_DEFINED) and piece.piece
        )
        self._split_token_ids = {token: piece_ids.get(token, self._mask_id) for token in split_tokens}
        self._split_pattern = re.compile(
            "|".join(re.escape(token) for token in sorted(split_tokens, key=lambda t: (-len(t), t)))
        )
        self._special_ids = frozenset(
            [self._pad_id, self._cls_id, self._sep_id, self._unk_id, self._mask_id]
            + [piece_ids[p.piece] for p in proto.pieces if p.type == _PIECE_TYPE_CONTROL]
        )

        # Step 2 of the module docstring happens in Python; the model must not normalise again.
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.precompiled_charsmap = b""
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        proto.normalizer_spec.escape_whitespaces = True
        proto.ClearField("denormalizer_spec")
        # transformers' Unigram sees every piece as (text, score): characters outside the
        # vocabulary become [UNK], never byte pieces, and byte or unused pieces such as "<0x41>"
        # match their literal text.
        proto.trainer_spec.byte_fallback = False
        for piece in proto.pieces:
            if piece.type in (_PIECE_TYPE_UNUSED, _PIECE_TYPE_BYTE):
                piece.type = _PIECE_TYPE_NORMAL
        self._processor = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def __repr__(self) -> str:
        return f"Tokenizer({self._source!r}, vocab_size={self._vocab_size}, mask_id={self._mask_id})"

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load `path` (an spm.model file or a directory containing spm.model)."""
        model_path = resolve_spm_path(path)
        return cls(storage.read_bytes(model_path), source=model_path)

    # ----------------------------------------------------------------------------- special ids
    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def cls_id(self) -> int:
        return self._cls_id

    @property
    def sep_id(self) -> int:
        return self._sep_id

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def mask_id(self) -> int:
        return self._mask_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, [MASK] included (SentencePiece pieces + 1 for released models)."""
        return self._vocab_size

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that are never text: [PAD], [CLS], [SEP], [UNK], [MASK] and control pieces."""
        return self._special_ids

    # -------------------------------------------------------------------------------- encoding
    def _segments(self, text: str) -> Iterator[tuple[str, int | None]]:
        """(segment, None) for text between special tokens, ("", id) for each special token."""
        position = 0
        for match in self._split_pattern.finditer(text):
            if match.start() > position:
                yield text[position : match.start()], None
            yield "", self._split_token_ids[match.group()]
            position = match.end()
        if position < len(text):
            yield text[position:], None

    @staticmethod
    def _prepare_segment(segment: str) -> str:
        """Steps 2-3 of the module docstring, with " " left for sentencepiece to escape."""
        segment = normalize_text(segment)
        if segment and not segment.startswith((" ", WORD_BOUNDARY)):
            segment = " " + segment
        return segment

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without [CLS]/[SEP]; one list per text."""
        # Flatten every segment of every text into one sentencepiece call (it is multi-threaded).
        plain_segments: list[str] = []
        layouts: list[list[int | None]] = []
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"Tokenizer expects str texts, got {type(text).__name__}: {text!r:.80}")
            layout: list[int | None] = []
            for segment, token_id in self._segments(text):
                if token_id is None:
                    prepared = self._prepare_segment(segment)
                    if not prepared:
                        continue
                    plain_segments.append(prepared)
                layout.append(token_id)
            layouts.append(layout)
        segment_ids = iter(self._processor.encode(plain_segments) if plain_segments else [])
        encoded: list[list[int]] = []
        for layout in layouts:
            ids: list[int] = []
            for token_id in layout:
                if token_id is None:
                    ids.extend(next(segment_ids))
                else:
                    ids.append(token_id)
            encoded.append(ids)
        return encoded

    def encode_ids(self, text: str) -> list[int]:
        """Token ids of `text`, without [CLS]/[SEP]."""
        return self.encode_batch([text])[0]

    def encode_pieces(self, text: str) -> list[str]:
        """The pieces (token strings) of `text`, without [CLS]/[SEP]."""
        return [self.id_to_piece(token_id) for token_id in self.encode_ids(text)]

    def id_to_piece(self, token_id: int) -> str:
        if token_id == self._mask_id:
            return MASK_TOKEN
        if not 0 <= token_id < len(self._pieces):
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self._vocab_size})")
        return self._pieces[token_id]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, as DebertaV2Tokenizer.decode: "▁" becomes a space, and the first token's
        leading "▁" is dropped. Special tokens are kept verbatim unless skipped."""
        pieces = [
            self.id_to_piece(int(token_id))
            for token_id in ids
            if not (skip_special_tokens and int(token_id) in self._special_ids)
        ]
        if pieces and pieces[0].startswith(WORD_BOUNDARY):
            pieces[0] = pieces[0][1:]
        return "".join(pieces).replace(WORD_BOUNDARY, " ")

    # --------------------------------------------------------------------- model inputs (batch)
    def _truncate_pair(self, first: list[int], second: list[int], budget: int) -> tuple[list[int], list[int]]:
        """transformers' "longest_first" for the fast tokenizer: keep the shorter input whole when
        the longer can absorb the cut, else split the budget in half (odd token to the longer;
        to the second input on a tie)."""
        shorter, longer = sorted((len(first), len(second)))
        if shorter + longer <= budget:
            return first, second
        keep_longer = max(shorter, budget - shorter)
        keep_shorter = shorter
        if keep_shorter + keep_longer > budget:
            keep_shorter = budget // 2
            keep_longer = keep_shorter + budget % 2
        if len(first) > len(second):
            return first[:keep_longer], second[:keep_shorter]
        return first[:keep_shorter], second[:keep_longer]

    def __call__(
        self,
        texts: str | Sequence[str],
        text_pairs: str | Sequence[str] | None = None,
        max_length: int | None = None,
        truncation: bool = True,
        padding: str | bool = "longest",
    ) -> dict[str, np.ndarray | list[np.ndarray]]:
        """Model inputs `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]`, as DebertaV2Tokenizer.__call__.

        A single str is treated as a batch of one. With `truncation` and `max_length`, inputs are
        cut "longest_first" to fit `max_length` including the special tokens. `padding`:
        "longest" pads (with [PAD], on the right) to the longest sequence of the batch,
        "max_length" to `max_length`, False returns unpadded rows.

        Returns {"input_ids", "token_type_ids", "attention_mask"}: int32 arrays [B, L] when padded,
        else lists of B int32 arrays [L_b]. token_type_ids is 0 for [CLS] A [SEP] and 1 for B [SEP].
        """
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(text_pairs, str):
            text_pairs = [text_pairs]
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(text_pairs)} text_pairs")
        if padding not in ("longest", "max_length", False):
            raise ValueError(f"padding must be 'longest', 'max_length' or False, got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        num_special = 2 if text_pairs is None else 3
        if max_length is not None and truncation and max_length < num_special:
            # transformers only warns here and returns sequences longer than max_length.
            raise ValueError(
                f"max_length={max_length} leaves no room for the {num_special} special tokens"
            )

        first_ids = self.encode_batch(texts)
        second_ids = self.encode_batch(text_pairs) if text_pairs is not None else None
        rows: list[tuple[list[int], list[int]]] = []
        for index, first in enumerate(first_ids):
            if second_ids is None:
                if truncation and max_length is not None:
                    first = first[: max_length - num_special]
                input_ids = [self._cls_id, *first, self._sep_id]
                type_ids = [0] * len(input_ids)
            else:
                second = second_ids[index]
                if truncation and max_length is not None:
                    first, second = self._truncate_pair(first, second, max_length - num_special)
                input_ids = [self._cls_id, *first, self._sep_id, *second, self._sep_id]
                type_ids = [0] * (len(first) + 2) + [1] * (len(second) + 1)
            rows.append((input_ids, type_ids))

        if padding is False:
            return {
                "input_ids": [np.asarray(ids, np.int32) for ids, _ in rows],
                "token_type_ids": [np.asarray(types, np.int32) for _, types in rows],
                "attention_mask": [np.ones(len(ids), np.int32) for ids, _ in rows],
            }
        longest = max((len(ids) for ids, _ in rows), default=0)
        if padding == "max_length":
            if longest > max_length:
                raise ValueError(
                    f"a sequence has {longest} tokens, more than max_length={max_length}, and "
                    f"truncation is off, so padding='max_length' cannot give equal lengths"
                )
            longest = max_length
        batch = {
            "input_ids": np.full((len(rows), longest), self._pad_id, np.int32),
            "token_type_ids": np.zeros((len(rows), longest), np.int32),
            "attention_mask": np.zeros((len(rows), longest), np.int32),
        }
        for row, (ids, types) in enumerate(rows):
            batch["input_ids"][row, : len(ids)] = ids
            batch["token_type_ids"][row, : len(ids)] = types
            batch["attention_mask"][row, : len(ids)] = 1
        return batch


# ---------------------------------------------------------------------------------- training
def _training_sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Normalised sentences for the trainer: one per line, long lines cut at spaces.

    The trainer silently drops sentences over its max_sentence_length, which would lose most
    multi-paragraph documents, so lines are cut into pieces of at most `max_bytes` UTF-8 bytes.
    """
    for text in texts:
        for line in text.splitlines():
            line = normalize_text(line).strip(" ")
            while len(line.encode("utf-8")) > max_bytes:
                # Characters are at most 4 bytes, so the first max_bytes // 4 always fit.
                head = line[: max_bytes // 4]
                cut = head.rfind(" ")
                cut = cut if cut > 0 else len(head)
                yield line[:cut]
                line = line[cut:].lstrip(" ")
            if line:
                yield line


def train_sentencepiece(
    text_iterator: Iterable[str],
    output_dir: str | os.PathLike,
    vocab_size: int,
    *,
    input_sentence_size: int = 2_000_000,
    character_coverage: float = 0.9995,
    num_threads: int | None = None,
    seed_sentencepiece_size: int = 1_000_000,
    verbose: bool = False,
) -> str:
    """Train a DeBERTa-style Unigram vocabulary and write `output_dir/spm.model`; return its path.

    `vocab_size` counts the SentencePiece pieces, [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3 included;
    the tokenizer adds [MASK] as id `vocab_size`. Text is normalised as at encoding time.
    At most `input_sentence_size` sentences (reservoir-sampled from the whole stream) are held
    in memory, so the stream may be arbitrarily long.
    """
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be at least 8 (4 special pieces + text), got {vocab_size}")
    output_dir = os.fspath(output_dir)
    storage.makedirs(output_dir)
    sentences = _training_sentences(text_iterator, _TRAINER_MAX_SENTENCE_BYTES)
    try:
        first = next(sentences)
    except StopIteration:
        raise ValueError("train_sentencepiece: the text iterator yielded no text") from None
    model = io.BytesIO()  # Trained in memory, then written once: the output_dir may be a bucket.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=itertools.chain([first], sentences),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        pad_id=0,
        pad_piece=PAD_TOKEN,
        bos_id=1,
        bos_piece=CLS_TOKEN,
        eos_id=2,
        eos_piece=SEP_TOKEN,
        unk_id=3,
        unk_piece=UNK_TOKEN,
        # Text arrives already normalised like DebertaV2Tokenizer does it at encoding time.
        normalization_rule_name="identity",
        character_coverage=character_coverage,
        byte_fallback=False,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size,
        max_sentence_length=_TRAINER_MAX_SENTENCE_BYTES,
        num_threads=num_threads or min(os.cpu_count() or 1, 16),
        minloglevel=0 if verbose else 2,
    )
    model_path = storage.join(output_dir, SPM_MODEL_FILENAME)
    storage.write_atomic(model_path, model.getvalue())
    return model_path
