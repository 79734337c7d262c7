"""Caption tokenisation and vocabulary, equal to the original GaLR code (torch-free).

The original (``R:data.py``) does::

    tokens = nltk.tokenize.word_tokenize(caption.lower())
    tokens = [t for t in tokens if t not in PUNCTUATION]
    ids = [vocab(t) for t in tokens]            # unknown -> '<unk>'

``word_tokenize`` first splits sentences with NLTK's pre-trained Punkt model (a data download) and
then runs ``NLTKWordTokenizer`` on each sentence. Here the Punkt splitter is NLTK's
``PunktSentenceTokenizer`` without trained parameters (no download); the only difference is that
it knows no English abbreviations, so a caption such as "st. mary" is split after "st." where the
trained model would not. Stopwords are *not* removed: the vocabularies were built without them,
so they become ``<unk>`` exactly as in the original.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from galr.atomic import write_text_atomically
from galr.errors import InputError, NotFoundError

# The original's punctuation filter (R:data.py:101), in its order.
PUNCTUATION: tuple[str, ...] = (",", ".", ":", ";", "?", "(", ")", "[", "]", "&", "!", "*", "@", "#", "$", "%")
UNK_TOKEN = "<unk>"
PAD_ID = 0
#: Longest caption kept, in tokens, unless a model's preprocessing says otherwise (the original has no
#: explicit cap; its evaluation buffer holds 47 tokens).
DEFAULT_MAX_TEXT_LENGTH = 64
#: Characters of one caption handed to NLTK; the rest is cut, with a warning. NLTK's sentence
#: splitter slows down badly on pathological lines (a long run of "a. a. a."), and 2,048 characters
#: hold many times the tokens a model keeps.
DEFAULT_MAX_CHARS = 2048


@contextlib.contextmanager
def _kept_out(module: str) -> Iterator[None]:
    """Make ``import module`` fail inside the block, unless it is imported already (then nothing changes)."""
    if module in sys.modules:
        yield
        return
    sys.modules[module] = None  # type: ignore[assignment]  # Python's own marker: "this import fails"
    try:
        yield
    finally:
        if sys.modules.get(module, ...) is None:
            del sys.modules[module]


@lru_cache(maxsize=1)
def _nltk_tokenizers():
    # Imported lazily: importing nltk is slow and most processes never tokenise. nltk's package import
    # also loads scipy.stats when scipy is installed (about 1 s of a 1.2 s start-up) for collocation
    # statistics galr never uses; nltk falls back without it, and scipy.stats stays importable after.
    with _kept_out("scipy.stats"):
        from nltk.tokenize import NLTKWordTokenizer
        from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer(), _untimed(NLTKWordTokenizer())


#: NLTKWordTokenizer's pattern lists: ``(pattern, substitution)`` pairs, or bare patterns.
_WORD_TOKENIZER_PATTERNS = ("STARTING_QUOTES", "PUNCTUATION", "PARENS_BRACKETS", "DOUBLE_DASHES", "ENDING_QUOTES",
                            "CONTRACTIONS2", "CONTRACTIONS3")


def _untimed(word_tokenizer: Any) -> Any:
    """``word_tokenizer`` with its own patterns run without NLTK's per-call time limit.

    NLTK 3.10 runs every regular expression under a wall-clock timeout (a ReDoS backstop for
    patterns callers supply), which about doubles tokenisation time (0.16 -> 0.09 ms a 16-word
    caption). These are NLTK's fixed patterns over captions of at most ``max_chars`` characters:
    the same compiled expressions run with ``timeout=None``, so the tokens are the same. Older
    NLTK (plain ``re`` patterns) is left as it is.
    """
    try:
        from nltk import redos
    except ImportError:
        return word_tokenizer

    def untimed(pattern: Any) -> Any:
        if isinstance(pattern, redos.TimedPattern):
            return redos.compile(pattern.pattern, pattern.flags, timeout=None)
        return pattern

    def untimed_entry(entry: Any) -> Any:
        return (untimed(entry[0]), *entry[1:]) if isinstance(entry, tuple) else untimed(entry)

    for name in _WORD_TOKENIZER_PATTERNS:
        value = getattr(word_tokenizer, name, None)
        if isinstance(value, list):
            setattr(word_tokenizer, name, [untimed_entry(entry) for entry in value])
        elif value is not None:
            setattr(word_tokenizer, name, untimed_entry(value))
    return word_tokenizer


def tokenize(caption: str) -> list[str]:
    """Split a caption into the original's tokens (lower-cased, punctuation removed)."""
    sentence_splitter, word_tokenizer = _nltk_tokenizers()
    tokens: list[str] = []
    for sentence in sentence_splitter.tokenize(caption.lower()):
        tokens.extend(word_tokenizer.tokenize(sentence))
    return [t for t in tokens if t not in PUNCTUATION]


class VocabularyError(InputError):
    """A vocabulary file is missing, malformed or does not match a model."""


@dataclass
class Vocabulary:
    """Word <-> id mapping in the original JSON format (``word2idx``, ``idx2word``, ``idx``).

    Id 0 is padding and never a word; ``<unk>`` must be present (the original puts it last).
    """

    word2idx: dict[str, int]
    idx2word: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if UNK_TOKEN not in self.word2idx:
            raise VocabularyError(f"vocabulary has no '{UNK_TOKEN}' entry; it cannot map unknown words")
        if PAD_ID in self.word2idx.values():
            raise VocabularyError("vocabulary assigns id 0 to a word; id 0 is reserved for padding")
        if not self.idx2word:
            self.idx2word = {i: w for w, i in self.word2idx.items()}

    @property
    def unk_id(self) -> int:
        return self.word2idx[UNK_TOKEN]

    @property
    def max_id(self) -> int:
        return max(self.word2idx.values())

    def __len__(self) -> int:
        """Number of words; an embedding for this vocabulary needs ``max_id + 1`` rows."""
        return len(self.word2idx)

    def __contains__(self, word: str) -> bool:
        return word in self.word2idx

    def encode_tokens(self, tokens: Iterable[str]) -> list[int]:
        unk = self.unk_id
        return [self.word2idx.get(t, unk) for t in tokens]

    def words(self) -> list[str]:
        """Words sorted by id (the order of the original embedding rows 1..n)."""
        return [w for w, _ in sorted(self.word2idx.items(), key=lambda kv: kv[1])]

    @classmethod
    def from_words(cls, words: Sequence[str]) -> "Vocabulary":
        """Ids 1..n in the given order, ``<unk>`` appended last if absent (the original layout)."""
        ordered = [w for w in dict.fromkeys(words) if w != UNK_TOKEN] + [UNK_TOKEN]
        return cls({w: i + 1 for i, w in enumerate(ordered)})

    def to_json_dict(self) -> dict:
        return {
            "word2idx": dict(self.word2idx),
            "idx2word": {str(i): w for i, w in sorted(self.idx2word.items())},
            "idx": self.max_id + 1,
        }

    @classmethod
    def from_json_dict(cls, data: dict, source: str = "vocabulary") -> "Vocabulary":
        if not isinstance(data, dict) or not isinstance(data.get("word2idx"), dict):
            raise VocabularyError(f"{source}: expected the original format with a 'word2idx' object")
        try:
            word2idx = {str(w): int(i) for w, i in data["word2idx"].items()}
        except (TypeError, ValueError) as exc:
            raise VocabularyError(f"{source}: 'word2idx' values must be integers ({exc})") from None
        idx2word = {int(i): str(w) for i, w in data.get("idx2word", {}).items()}
        try:
            return cls(word2idx, idx2word)
        except VocabularyError as exc:
            raise VocabularyError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        """Read an original-format vocabulary JSON (e.g. ``rsitmd_splits_vocab.json``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VocabularyError(f"vocabulary file not found: {path}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise VocabularyError(f"{path}: not a JSON vocabulary ({exc})") from None
        return cls.from_json_dict(data, source=str(path))

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomically(path, json.dumps(self.to_json_dict()))


@dataclass(frozen=True)
class EncodedCaptions:
    """A right-padded batch of token ids (``tokens``: int64 [n, T], 0 = padding).

    ``truncated`` lists the captions that had more than ``max_length`` tokens, ``cut`` those that had
    more than ``max_chars`` characters (both kept their beginning).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    truncated: tuple[int, ...] = ()
    cut: tuple[int, ...] = ()


class Tokenizer:
    """Captions -> padded id matrices, the original preprocessing plus an explicit length cap.

    Args:
        vocab: the model's vocabulary.
        max_length: longest token sequence kept. The original has no cap (its evaluation buffer
            is 47 tokens and longer captions crash); here longer captions keep their first
            ``max_length`` tokens and a warning names them.
    """

    def __init__(self, vocab: Vocabulary, max_length: int = DEFAULT_MAX_TEXT_LENGTH,
                 max_chars: int = DEFAULT_MAX_CHARS) -> None:
        if max_length < 1 or max_chars < 1:
            raise InputError(f"max_length and max_chars must be at least 1, got {max_length} and {max_chars}")
        self.vocab = vocab
        self.max_length = max_length
        self.max_chars = max_chars
        # A service checks each query when it arrives and encodes it again in its batch: the second
        # tokenisation (NLTK's regular expressions, the costly part) comes from here.
        self._recent: dict[str, tuple[int, ...]] = {}

    #: Captions whose token ids :meth:`encode` remembers (the memory is emptied when full).
    RECENT_CAPTIONS = 4096

    def warm_up(self) -> None:
        """Load NLTK now rather than inside the first caption's encoding, e.g. when a server
        starts, so that the first query's latency is the steady one."""
        _nltk_tokenizers()

    def encode(self, caption: str) -> list[int]:
        """Token ids of one caption's first ``max_chars`` characters, without padding or truncation."""
        ids = self._recent.get(caption)
        if ids is None:
            ids = tuple(self.vocab.encode_tokens(tokenize(caption[: self.max_chars])))
            if len(self._recent) >= self.RECENT_CAPTIONS:
                self._recent.clear()
            self._recent[caption] = ids
        return list(ids)

    def encode_batch(self, captions: Sequence[str], warn: bool = True) -> EncodedCaptions:
        """Encode and right-pad with 0 to the longest caption (at most ``max_length``).

        With ``warn``, one warning counts the captions cut at ``max_chars`` characters and at
        ``max_length`` tokens (callers that name each caption pass ``warn=False`` and use
        :attr:`EncodedCaptions.cut` and :attr:`EncodedCaptions.truncated`).
        """
        ids = [self.encode(c) for c in captions]
        truncated = tuple(i for i, row in enumerate(ids) if len(row) > self.max_length)
        cut = tuple(i for i, caption in enumerate(captions) if len(caption) > self.max_chars)
        if (truncated or cut) and warn:
            first = (cut or truncated)[0]
            warnings.warn(
                f"{len(cut)} caption(s) longer than {self.max_chars} characters and {len(truncated)} longer than "
                f"{self.max_length} tokens kept their beginning (first: #{first}: {captions[first][:60]!r})",
                stacklevel=2,
            )
        width = max([1] + [min(len(r), self.max_length) for r in ids])
        tokens = np.zeros((len(ids), width), dtype=np.int64)
        lengths = np.zeros(len(ids), dtype=np.int64)
        for i, row in enumerate(ids):
            row = row[: self.max_length]
            tokens[i, : len(row)] = row
            lengths[i] = len(row)
        return EncodedCaptions(tokens, lengths, truncated, cut)


@dataclass(frozen=True)
class TextLine:
    """One line of a text file: its 1-based number in the file, and its text without surrounding blanks."""

    number: int
    text: str


def read_text_lines(path: str | os.PathLike, what: str = "lines") -> list[TextLine]:
    """The non-blank lines of a UTF-8 text file that are not ``#`` comments, with their line numbers.

    One caption or query per line; a byte-order mark left by editors is dropped.

    Args:
        path: the file.
        what: what the lines are (``"queries"``, ``"captions"``), for messages.

    Raises:
        NotFoundError: no such file.
        InputError: a folder, a file that is not UTF-8 (the message gives the line), or no lines.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a text file with one of the {what} per line")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file ({what}, one per line)") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(f"{path} is not UTF-8 text (bad byte at line {line}); save it as UTF-8") from None
    lines = [TextLine(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)]
    lines = [line for line in lines if line.text and not line.text.startswith("#")]
    if not lines:
        raise InputError(f"{path} has no {what} (one per line; blank lines and # comments are ignored)")
    return lines
