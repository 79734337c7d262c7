"""Tests of galr.train and galr.torch_encoder on a tiny generated synthetic benchmark."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from galr.config import GaLRConfig
from galr.model import GaLR, load_checkpoint
from galr.preprocess.text import Tokenizer, Vocabulary
from galr.synthetic.benchmark import BenchmarkConfig, generate_benchmark
from galr.torch_encoder import TorchEncoder, evaluate_checkpoint, resolve_device
from galr.train import (
    EpochRecord,
    TrainConfig,
    TrainError,
    augment_pixels,
    best_path,
    contrastive_loss,
    epoch_batches,
    learning_rate,
    model_config_preset,
    state_path,
    train,
    train_config_preset,
)

TINY_TRAIN_IMAGES = 16


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory) -> Path:
    """16 train, 8 val and 8 test images at 64 px (the small model's input size)."""
    root = tmp_path_factory.mktemp("benchmark")
    generate_benchmark(root, BenchmarkConfig(seed=1, n_train=TINY_TRAIN_IMAGES, n_val=8, n_test=8, image_size=64),
                       progress=False)
    return root


def tiny_config(dataset: Path, **overrides) -> TrainConfig:
    vocab = Vocabulary.load(dataset / "vocab.json")
    # One thread: the small model gains nothing from more, and results do not depend on the machine.
    values = dict(epochs=2, batch_size=8, device="cpu", eval_every=1, lr=2e-3, num_threads=1)
    return train_config_preset("small", dataset, vocab.max_id, **{**values, **overrides})


@pytest.fixture(scope="module")
def trained(tiny_benchmark, tmp_path_factory):
    """A 4-epoch run of the small model, validated after epochs 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "model.pt"
    return train(tiny_config(tiny_benchmark, epochs=4, eval_every=2), out, progress=False)


# ------------------------------------------------------------------------------------------------
# Loss and schedule

# Hand-worked example, margin 0.2 (true pairs on the diagonal: 0.5, 0.4, 0.7).
# image->caption violations (rows):  [0,1] .2+.6-.5=.30  [0,2] .2+.45-.5=.15  [1,2] .2+.3-.4=.10
# caption->image violations (cols):  [2,0] .2+.45-.5=.15  [0,1] .2+.6-.4=.40
# every other off-diagonal term is <= 0. sum = .55 + .55; hardest = (.30+.10+0) + (.15+.40+0).
HAND_SCORES = [[0.5, 0.6, 0.45], [0.2, 0.4, 0.3], [0.45, 0.0, 0.7]]


def test_sum_loss_matches_the_hand_computed_matrix():
    loss = contrastive_loss(torch.tensor(HAND_SCORES, dtype=torch.float64), margin=0.2)
    assert loss.item() == pytest.approx(1.10)


def test_hardest_loss_keeps_the_largest_violation_per_row_and_column():
    loss = contrastive_loss(torch.tensor(HAND_SCORES, dtype=torch.float64), margin=0.2, hardest=True)
    assert loss.item() == pytest.approx(0.95)


def test_loss_ignores_the_diagonal_and_rejects_non_square_matrices():
    # A perfectly separated batch has no violation even though each diagonal term alone would give m.
    assert contrastive_loss(torch.eye(4) * 0.9, margin=0.2).item() == 0.0
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(torch.zeros(2, 3))


def test_lr_decays_by_0_7_at_epoch_19_like_the_original(tiny_benchmark):
    config = tiny_config(tiny_benchmark, lr=1e-3, lr_decay=0.7, lr_decay_every=20)
    lrs = [learning_rate(config, e) for e in range(60)]
    assert lrs[:19] == [1e-3] * 19
    assert lrs[19] == pytest.approx(7e-4) and lrs[38] == pytest.approx(7e-4)
    assert lrs[39] == pytest.approx(4.9e-4) and lrs[59] == pytest.approx(3.43e-4)
    every_5 = dataclasses.replace(config, lr_decay_every=5)
    assert learning_rate(every_5, 3) == 1e-3 and learning_rate(every_5, 4) == pytest.approx(7e-4)


# ------------------------------------------------------------------------------------------------
# Config, batches, augmentation


def test_train_config_round_trips_and_rejects_bad_values(tiny_benchmark):
    config = tiny_config(tiny_benchmark, fold=1, num_folds=3, loss="hardest", captions_per_epoch=2)
    assert TrainConfig.from_dict(config.to_dict()) == config
    for bad in (dict(loss="mean"), dict(batch_size=1), dict(fold=3), dict(captions_per_epoch=0), dict(epochs=0)):
        with pytest.raises(TrainError):
            dataclasses.replace(config, **bad)
    with pytest.raises(TrainError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({**config.to_dict(), "warmup": 3})
    with pytest.raises(TrainError, match="object"):
        dataclasses.replace(config, model=dataclasses.replace(config.model, object_dim=12))


def test_model_presets_fit_the_vocabulary():
    for name in ("small", "demo", "original"):
        assert model_config_preset(name, 77).vocab_size == 77
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config_preset("huge", 77)


def test_an_epoch_visits_every_caption_once_and_never_repeats_an_image_in_a_batch():
    batches = epoch_batches(num_images=10, captions_per_image=5, captions_per_epoch=None, batch_size=4,
                            rng=np.random.default_rng(0))
    captions = np.concatenate(batches)
    assert sorted(captions.tolist()) == list(range(50))
    for batch in batches:
        assert len(set((batch // 5).tolist())) == len(batch) > 1
    one = np.concatenate(epoch_batches(10, 5, 1, 4, np.random.default_rng(0)))
    assert sorted((one // 5).tolist()) == list(range(10))
    again = epoch_batches(10, 5, None, 4, np.random.default_rng(0))
    assert len(batches) == len(again) and all(np.array_equal(a, b) for a, b in zip(batches, again))


def test_a_single_leftover_pair_is_dropped():
    batches = epoch_batches(num_images=9, captions_per_image=1, captions_per_epoch=None, batch_size=4,
                            rng=np.random.default_rng(0))
    assert [len(b) for b in batches] == [4, 4]


def test_augmentation_is_a_seeded_rotation_and_crop():
    pixels = np.random.default_rng(0).integers(0, 256, (70, 70, 3), dtype=np.uint8)
    first = augment_pixels(pixels, 64, np.random.default_rng(5))
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, augment_pixels(pixels, 64, np.random.default_rng(5)))
    assert not np.array_equal(first, augment_pixels(pixels, 64, np.random.default_rng(6)))


# ------------------------------------------------------------------------------------------------
# Training runs


def test_training_lowers_the_loss_and_beats_chance(trained, tiny_benchmark):
    losses = [r.loss for r in trained.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    # On its own 16 training images (5 captions each) chance mR is about 31; a model that learned
    # nothing stays near it.
    report = evaluate_checkpoint(trained.checkpoint, tiny_benchmark, "train", rerank=None, device="cpu")
    assert report["metrics"]["mean_recall"] > 50


def test_checkpoints_carry_config_metadata_and_best_by_validation(trained):
    loaded = load_checkpoint(trained.checkpoint)
    assert loaded.metadata["epoch"] == 4
    assert TrainConfig.from_dict(loaded.metadata["train_config"]).epochs == 4
    assert loaded.spec.image.size == loaded.model.config.image_size
    assert [r.val is not None for r in trained.history] == [False, True, False, True]
    best = max((r for r in trained.history if r.val), key=lambda r: r.val["mean_recall"])
    assert trained.best_epoch == best.epoch and trained.best_checkpoint == best_path(trained.checkpoint)
    assert load_checkpoint(trained.best_checkpoint).metadata["epoch"] == best.epoch + 1


def test_resume_continues_from_the_saved_epoch_and_matches_an_uninterrupted_run(tiny_benchmark, tmp_path):
    fast = dict(val_split=None, captions_per_epoch=1)
    straight = train(tiny_config(tiny_benchmark, epochs=3, **fast), tmp_path / "a.pt", progress=False)
    train(tiny_config(tiny_benchmark, epochs=2, **fast), tmp_path / "b.pt", progress=False)
    resumed = train(tiny_config(tiny_benchmark, epochs=3, **fast), tmp_path / "b.pt", progress=False)
    assert resumed.start_epoch == 2 and [r.epoch for r in resumed.history] == [0, 1, 2]
    assert straight.best_checkpoint is None and state_path(tmp_path / "b.pt").is_file()
    a = load_checkpoint(straight.checkpoint).model.state_dict()
    b = load_checkpoint(resumed.checkpoint).model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_finished_run_returns_without_reading_the_dataset(trained, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the dataset was read again")

    monkeypatch.setattr("galr.train._Trainer", refuse)
    config = TrainConfig.from_dict(load_checkpoint(trained.checkpoint).metadata["train_config"])
    again = train(config, trained.checkpoint, progress=False)
    assert again.start_epoch == 4 and again.epochs == 4 and isinstance(again.history[0], EpochRecord)


def test_resume_refuses_a_state_from_another_config(trained):
    config = TrainConfig.from_dict(load_checkpoint(trained.checkpoint).metadata["train_config"])
    with pytest.raises(TrainError, match="margin"):
        train(dataclasses.replace(config, margin=0.3, epochs=5), trained.checkpoint, progress=False)


def test_bad_inputs_raise_clear_errors(tiny_benchmark, tmp_path):
    with pytest.raises(TrainError, match="vocab_size"):
        train(dataclasses.replace(tiny_config(tiny_benchmark), model=GaLRConfig.small(vocab_size=5)),
              tmp_path / "m.pt", progress=False)
    with pytest.raises(TrainError, match="validation split 'dev'"):
        train(tiny_config(tiny_benchmark, val_split="dev"), tmp_path / "m.pt", progress=False)
    with pytest.raises(TrainError, match="backbone weights not found"):
        train(tiny_config(tiny_benchmark, backbone_weights=str(tmp_path / "r18.pth")), tmp_path / "m.pt",
              progress=False)


def test_kfold_backbone_weights_and_a_no_grad_caller(tiny_benchmark, tmp_path):
    backbone = GaLR(GaLRConfig.small(vocab_size=10)).extract_feature.resnet.state_dict()
    torch.save(backbone, tmp_path / "r18.pth")
    config = tiny_config(tiny_benchmark, epochs=1, fold=0, num_folds=4, val_fraction=0.25, captions_per_epoch=1,
                         backbone_weights=str(tmp_path / "r18.pth"))
    with torch.no_grad():  # train() must switch gradients back on for itself
        result = train(config, tmp_path / "fold.pt", progress=False)
    meta = load_checkpoint(result.checkpoint).metadata
    assert meta["train_images"] == TINY_TRAIN_IMAGES - 4 and result.history[0].val is not None


# ------------------------------------------------------------------------------------------------
# TorchEncoder


@pytest.fixture(scope="module")
def encoder_and_model():
    vocab = Vocabulary.from_words(["plane", "ship", "harbor", "white", "many"])
    model = GaLR(GaLRConfig.small(vocab_size=vocab.max_id))
    return TorchEncoder(model, Tokenizer(vocab), device="cpu", batch_size=3), model


def test_torch_encoder_returns_unit_rows_equal_to_the_model(encoder_and_model):
    encoder, model = encoder_and_model
    rng = np.random.default_rng(0)
    config = model.config
    images = rng.standard_normal((5, 3, config.image_size, config.image_size)).astype(np.float32)
    rep = rng.random((5, config.num_objects, config.object_dim), dtype=np.float32)
    adj = rng.random((5, config.num_objects, config.num_objects), dtype=np.float32)
    captions = ["Many white planes.", "A ship in the harbor.", "ship", "Nothing known here at all", "planes"]
    image_out = encoder.encode_images(images, local=(rep, adj))
    text_out = encoder.encode_text(captions)
    assert image_out.shape == text_out.shape == (5, config.embed_dim)
    assert image_out.dtype == text_out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image_out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_out, axis=1), 1.0, atol=1e-5)
    model.eval()
    with torch.no_grad():
        expected_images = model.encode_image(*(torch.from_numpy(a) for a in (images, rep, adj))).numpy()
        expected_text = model.encode_text(torch.from_numpy(encoder.tokenizer.encode_batch(captions).tokens)).numpy()
    np.testing.assert_allclose(image_out, expected_images, atol=1e-5)
    np.testing.assert_allclose(text_out, expected_text, atol=1e-5)
    assert encoder.encode_text([]).shape == (0, config.embed_dim)


def test_torch_encoder_restores_training_mode_and_checks_shapes(encoder_and_model):
    encoder, model = encoder_and_model
    model.train()
    encoder.encode_text(["ship"])
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="images must be"):
        zeros = np.zeros((1, 20, 20))
        encoder.encode_images(np.zeros((1, 3, 32, 32), np.float32), local=(zeros, zeros))
    with pytest.raises(ValueError, match="vocabulary"):
        TorchEncoder(model, Tokenizer(Vocabulary.from_words(["a"])))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_the_detection_sources_table_scores_each_source_and_differs_without_detections(trained, tiny_benchmark):
    from galr.bench.accuracy import DREA_SOURCES, drea_input_rows

    rows = drea_input_rows(trained.checkpoint, tiny_benchmark, log=lambda _: None)
    assert [row["model"] for row in rows] == [label for label, _ in DREA_SOURCES]
    assert all(row["status"] == "ok" and 0 <= row["metrics"]["mean_recall"] <= 100 for row in rows)
    with_boxes, without = rows[0]["metrics"], rows[2]["metrics"]
    assert with_boxes != without  # the local branch sees the detections
