"""Tokenisation and vocabulary against the original preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from galr.preprocess.text import (
    PUNCTUATION,
    Tokenizer,
    Vocabulary,
    VocabularyError,
    tokenize,
)


def test_documented_example_tokenises_like_the_original(shared_data):
    vocab = Vocabulary.load(shared_data / "rsitmd" / "vocab.json")
    ids = Tokenizer(vocab).encode("Two large ships loaded with cargo were moored on both sides of the gray port.")
    # galr-reference.md §3: stopwords are <unk> (1349) because the vocabulary was built without them.
    assert ids == [17, 169, 83, 1326, 1349, 112, 1349, 75, 1349, 1349, 67, 1349, 1349, 34, 96]


@pytest.mark.parametrize("dataset, n_captions, unk_id, longest", [("rsitmd", 2260, 1349, 27), ("rsicd", 5465, 1225, 32)])
def test_every_shared_test_caption_encodes(shared_data, dataset, n_captions, unk_id, longest):
    vocab = Vocabulary.load(shared_data / dataset / "vocab.json")
    captions = (shared_data / dataset / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    assert len(captions) == n_captions and vocab.unk_id == unk_id
    batch = Tokenizer(vocab).encode_batch(captions)
    assert batch.tokens.shape == (n_captions, longest) and not batch.truncated
    assert np.all(batch.lengths > 0)
    unk_share = (batch.tokens == unk_id).sum() / batch.lengths.sum()
    assert 0.35 < unk_share < 0.5  # stopwords become <unk>, as measured on the original (≈42-46 %)


def test_clitics_hyphens_digits_and_punctuation():
    assert tokenize("It's side-by-side, (2 planes)!") == ["it", "'s", "side-by-side", "2", "planes"]
    assert tokenize("A port. Two ships.") == ["a", "port", "two", "ships"]  # sentences split first
    assert not set(tokenize(" ".join(PUNCTUATION))) & set(PUNCTUATION)


TRICKY_CAPTIONS = [
    "It's a \"big\" plane -- isn't it?", "(two) [ships] {near} 3.5km, e.g. ports...", "don't cannot gonna 'tis wanna",
    "«quotes» “curly” ‘single’ — dash…", "a.b.c. mr. smith's boat; ok! end.",
    "``so'' he said: x&y @ 10% $5 #3 a/b",
]


def _stock_tokens(caption: str) -> list[str]:
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    stock = NLTKWordTokenizer()  # its class patterns, with NLTK's own time limit
    tokens = [t for sentence in PunktSentenceTokenizer().tokenize(caption.lower()) for t in stock.tokenize(sentence)]
    return [t for t in tokens if t not in PUNCTUATION]


def test_the_untimed_word_tokenizer_gives_stock_nltk_tokens():
    from nltk.tokenize import NLTKWordTokenizer

    from galr.preprocess.text import _nltk_tokenizers

    ours = _nltk_tokenizers()[1]
    assert ours.STARTING_QUOTES is not NLTKWordTokenizer.STARTING_QUOTES  # the class itself is untouched
    for caption in TRICKY_CAPTIONS:
        assert tokenize(caption) == _stock_tokens(caption), caption


@pytest.mark.parametrize("dataset", ["rsitmd", "rsicd"])
def test_the_untimed_word_tokenizer_gives_stock_nltk_tokens_on_the_shared_captions(shared_data, dataset):
    captions = (shared_data / dataset / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    assert [tokenize(c) for c in captions] == [_stock_tokens(c) for c in captions]


def test_padding_truncation_and_warning():
    vocab = Vocabulary.from_words(["a", "b", "c"])
    tok = Tokenizer(vocab, max_length=2)
    with pytest.warns(UserWarning, match="1 longer than 2 tokens kept their beginning"):
        batch = tok.encode_batch(["a b c", "b", "zzz"])
    assert batch.tokens.tolist() == [[1, 2], [2, 0], [4, 0]] and batch.truncated == (0,) and batch.cut == ()
    assert batch.lengths.tolist() == [2, 1, 1]


def test_characters_beyond_the_cap_never_reach_nltk(monkeypatch):
    """A megabyte line of "a. a. a." made NLTK's sentence regex run for seconds and give up."""
    from galr.preprocess import text

    seen = []
    real = text.tokenize
    monkeypatch.setattr(text, "tokenize", lambda caption: seen.append(len(caption)) or real(caption))
    tok = Tokenizer(Vocabulary.from_words(["a", "b"]), max_chars=40)
    with pytest.warns(UserWarning, match="1 caption.s. longer than 40 characters"):
        batch = tok.encode_batch(["a. " * 300_000, "b"])
    assert seen == [40, 1] and batch.cut == (0,) and batch.lengths.tolist() == [14, 1]


def test_vocabulary_round_trip_and_errors(tmp_path):
    vocab = Vocabulary.from_words(["x", "y"])
    assert vocab.word2idx == {"x": 1, "y": 2, "<unk>": 3} and len(vocab) == 3
    path = tmp_path / "vocab.json"
    vocab.save(path)
    data = json.loads(path.read_text())
    assert data["idx"] == 4 and data["idx2word"]["1"] == "x"
    assert Vocabulary.load(path).word2idx == vocab.word2idx
    with pytest.raises(VocabularyError, match="not found"):
        Vocabulary.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VocabularyError, match="bad.json"):
        Vocabulary.load(tmp_path / "bad.json")
    with pytest.raises(VocabularyError, match="<unk>"):
        Vocabulary({"a": 1})
    with pytest.raises(VocabularyError, match="id 0"):
        Vocabulary({"a": 0, "<unk>": 1})


def test_the_tokenizer_does_not_pull_scipy_stats_in_but_leaves_it_importable():
    import subprocess
    import sys

    code = ("import sys\nfrom galr.preprocess.text import tokenize\nprint(tokenize('Two planes.'))\n"
            "print('scipy.stats' in sys.modules)\n"
            "try:\n    import scipy.stats\n    print('importable')\nexcept ImportError:\n    print('no scipy')\n")
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert lines[:3] == ["['two',", "'planes']", "False"] and lines[3] in ("importable", "no")


def test_recent_captions_are_tokenised_once_and_the_memory_stays_bounded(monkeypatch):
    from galr.preprocess import text

    calls = []
    real = text.tokenize
    monkeypatch.setattr(text, "tokenize", lambda caption: calls.append(caption) or real(caption))
    tok = Tokenizer(Vocabulary.from_words(["two", "planes", "ships"]))
    first = tok.encode("Two planes.")
    first.append(99)  # the caller's list is its own
    assert tok.encode("Two planes.") == [1, 2] and calls == ["Two planes."]
    monkeypatch.setattr(Tokenizer, "RECENT_CAPTIONS", 3)
    for caption in ("ships", "two", "planes", "two ships"):
        tok.encode(caption)
    assert len(tok._recent) <= 3
    assert tok.encode_batch(["two ships", "ships"]).tokens.tolist() == [[1, 3], [3, 0]]
