"""Loading the authors' checkpoints and galr's own format."""

from __future__ import annotations

import pytest
import torch

from galr.config import GaLRConfig
from galr.model import CheckpointError, GaLR, load_checkpoint, save_checkpoint
from galr.preprocess.drea import DREAConfig
from galr.preprocess.image import ImagePreprocessConfig
from galr.preprocess.spec import PreprocessSpec
from galr.preprocess.text import DEFAULT_MAX_TEXT_LENGTH, Vocabulary
from tests.original_reference import (
    original_layout_state,
    reference_image,
    reference_text,
)

torch.set_grad_enabled(False)


def _vocab(n: int) -> Vocabulary:
    return Vocabulary.from_words([f"w{i}" for i in range(n - 1)])  # + '<unk>' = n words


def _authors_file(tmp_path, config, prefix="", **extra):
    state = original_layout_state(config, seed=5)
    payload = {"epoch": 12, "arch": "baseline", "model": {prefix + k: v for k, v in state.items()},
               "best_rsum": 31.4, "options": {"fusion": {"mca_MULTI_HEAD": config.fusion_heads}}, "Eiters": 0}
    payload.update(extra)
    path = tmp_path / "GaLR_best.pth.tar"
    torch.save(payload, path)
    return path, state


@pytest.mark.parametrize("prefix", ["", "module."])
def test_authors_checkpoint_gives_reference_embeddings(tmp_path, prefix):
    config = GaLRConfig.small(vocab_size=30)
    path, state = _authors_file(tmp_path, config, prefix)
    loaded = load_checkpoint(path, vocab=_vocab(30))
    assert loaded.source_format == "original" and loaded.metadata["epoch"] == 12
    assert loaded.model.config == config  # every dimension recovered from the weights
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 64, 64, generator=g)
    rep, adj = torch.rand(2, 20, 20, generator=g), torch.rand(2, 20, 20, generator=g) / 20
    tokens = torch.tensor([[3, 8, 30, 2], [5, 1, 0, 0]])
    torch.testing.assert_close(loaded.model.encode_image(image, rep, adj), reference_image(image, rep, adj, state, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded.model.encode_text(tokens), reference_text(tokens, state), atol=1e-5, rtol=0)


def test_authors_checkpoint_with_a_vocab_path_gets_the_original_preprocessing(tmp_path):
    config = GaLRConfig.small(vocab_size=12)
    path, _ = _authors_file(tmp_path, config)
    vocab_path = tmp_path / "vocab.json"
    _vocab(12).save(vocab_path)
    loaded = load_checkpoint(path, vocab=vocab_path)
    assert isinstance(loaded.model, GaLR) and not loaded.model.training
    # Resolved once, from the model: the original transform at its input size, its DREA node count.
    assert loaded.spec == PreprocessSpec.for_model(config)
    assert (loaded.spec.image.size, loaded.spec.drea.num_objects) == (config.image_size, config.num_objects)
    assert loaded.spec.max_text_length == DEFAULT_MAX_TEXT_LENGTH


def test_cuda_saved_tensors_load_on_cpu(tmp_path, monkeypatch):
    # Simulate a CUDA-saved file: torch.load must be called with map_location='cpu'.
    config = GaLRConfig.small(vocab_size=12)
    path, _ = _authors_file(tmp_path, config)
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(path, vocab=_vocab(12))
    assert seen["map_location"] == "cpu" and seen["weights_only"] is True


def test_vocabulary_size_mismatch_is_a_clear_error(tmp_path):
    path, _ = _authors_file(tmp_path, GaLRConfig.small(vocab_size=30))
    with pytest.raises(CheckpointError, match=r"31 rows \(30 words \+ padding\).*vocabulary it was trained with"):
        load_checkpoint(path, vocab=_vocab(25))


def test_authors_checkpoint_needs_a_vocabulary(tmp_path):
    path, _ = _authors_file(tmp_path, GaLRConfig.small(vocab_size=12))
    with pytest.raises(CheckpointError, match="pass vocab="):
        load_checkpoint(path)


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    missing = tmp_path / "nope.pth.tar"
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(missing)
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(junk)
    evil = tmp_path / "evil.pth.tar"
    torch.save({"model": {"x": torch.zeros(1)}, "hook": GaLRConfig()}, evil)  # an arbitrary object
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(evil, vocab=_vocab(3))
    other = tmp_path / "other.pth.tar"
    torch.save({"model": {"some.weight": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(other, vocab=_vocab(3))


def test_own_format_round_trip_is_self_describing(tmp_path):
    config = GaLRConfig.small(vocab_size=12)
    model = GaLR(config).eval()
    vocab = _vocab(12)
    spec = PreprocessSpec(ImagePreprocessConfig(size=64, interpolation="bicubic"), DREAConfig(min_score=0.5), 40)
    path = save_checkpoint(tmp_path / "m.galr.pt", model, vocab, spec=spec, metadata={"epoch": 3})
    loaded = load_checkpoint(path)
    assert loaded.source_format == "galr" and loaded.vocab.word2idx == vocab.word2idx
    assert loaded.spec == spec and loaded.metadata == {"epoch": 3}
    tokens = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded.model.encode_text(tokens), model.encode_text(tokens))
    assert not list(tmp_path.glob("*.tmp"))


def test_own_format_refuses_a_newer_version(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", GaLR(GaLRConfig.small(vocab_size=3)), _vocab(3))
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="format 99 is not supported"):
        load_checkpoint(path)


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "m.pt"
    save_checkpoint(target, GaLR(GaLRConfig.small(vocab_size=3)), _vocab(3), metadata={"v": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(target, GaLR(GaLRConfig.small(vocab_size=3)), _vocab(3), metadata={"v": 2})
    monkeypatch.undo()
    assert load_checkpoint(target).metadata == {"v": 1}
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_full_size_authors_checkpoint_with_real_vocab(tmp_path, shared_data):
    vocab = Vocabulary.load(shared_data / "rsitmd" / "vocab.json")
    config = GaLRConfig(vocab_size=vocab.max_id)
    path, state = _authors_file(tmp_path, config)
    loaded = load_checkpoint(path, vocab=vocab)
    assert sum(p.numel() for n, p in loaded.model.named_parameters() if "bias_hh" not in n) == 46_892_998
