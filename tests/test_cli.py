"""Tests of the galr-synth, galr-train, galr-eval and galr-demo commands (click's CliRunner)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from galr import paths
from galr.cli import demo_main, demo_stamp_path, eval_main, synth_main, train_main
from galr.config import GaLRConfig
from galr.model import GaLR, save_checkpoint
from galr.preprocess.local_file import LocalFeatureTable, save_local_file
from galr.preprocess.spec import PreprocessSpec
from galr.preprocess.text import Vocabulary
from galr.synthetic.benchmark import BenchmarkConfig, BenchmarkInfo
from galr.train import train_config_preset
from tests.original_reference import original_layout_state
from tests.test_train import tiny_benchmark  # noqa: F401 - a shared module-scoped fixture


@pytest.fixture(scope="module")
def untrained_checkpoint(tiny_benchmark, tmp_path_factory) -> Path:  # noqa: F811
    """A galr checkpoint of an untrained small model for the tiny benchmark's vocabulary."""
    vocab = Vocabulary.load(tiny_benchmark / "vocab.json")
    model = GaLR(GaLRConfig.small(vocab_size=vocab.max_id))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    return save_checkpoint(path, model, vocab, spec=PreprocessSpec.for_model(model.config))


def invoke(command, args):
    return CliRunner().invoke(command, [str(a) for a in args])


# ------------------------------------------------------------------------------------------------
# galr-eval


def test_eval_prints_both_tables_and_writes_json(untrained_checkpoint, tiny_benchmark, tmp_path):  # noqa: F811
    out = tmp_path / "eval.json"
    result = invoke(eval_main, [untrained_checkpoint, "--dataset", tiny_benchmark, "--split", "test", "--json", out,
                                "--quiet", "--device", "cpu", "--k", 10])
    assert result.exit_code == 0, result.output
    assert "without MR" in result.output and "with MR (k=10" in result.output and "mR" in result.output
    report = json.loads(out.read_text())
    assert report["images"] == 8 and report["captions"] == 40 and report["rerank"]["k"] == 10
    assert set(report["metrics"]) == set(report["metrics_rerank"]) and "mean_recall" in report["metrics"]
    assert report["local_features"].startswith("detections")


def test_eval_without_rerank(untrained_checkpoint, tiny_benchmark):  # noqa: F811
    result = invoke(eval_main, [untrained_checkpoint, "--dataset", tiny_benchmark, "--no-rerank", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "without MR" in result.output and "with MR" not in result.output


@pytest.mark.parametrize("args, message", [
    (["missing.pt"], "checkpoint not found"),
    (["--dataset", "nowhere"], "dataset folder not found"),
    (["--split", "dev"], "dev_caps.txt"),
    (["--vocab", "VOCAB"], "vocabulary"),
    (["--detections", "nowhere"], "detections folder not found"),
])
def test_eval_bad_input_exits_2_with_a_message(untrained_checkpoint, tiny_benchmark, tmp_path, args, message):  # noqa: F811
    other_vocab = tmp_path / "vocab.json"
    Vocabulary.from_words(["one", "two"]).save(other_vocab)
    args = [other_vocab if a == "VOCAB" else a for a in args]
    checkpoint = [] if args and str(args[0]).endswith(".pt") else [untrained_checkpoint]
    dataset = [] if "--dataset" in args else ["--dataset", tiny_benchmark]
    result = invoke(eval_main, checkpoint + list(args) + dataset + ["--quiet"])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_eval_reads_an_authors_checkpoint_with_a_local_file(tiny_benchmark, tmp_path):  # noqa: F811
    vocab_file = tiny_benchmark / "vocab.json"
    config = GaLRConfig.small(vocab_size=Vocabulary.load(vocab_file).max_id)
    authors = tmp_path / "GaLR_best.pth.tar"
    torch.save({"model": original_layout_state(config, seed=3), "epoch": 7}, authors)
    names = [f"test_{i:05d}.txt" for i in range(1, 9)]
    rng = np.random.default_rng(0)
    table = LocalFeatureTable.from_mapping({n: rng.random((20, 20)) for n in names},
                                           {n: rng.random((20, 20)) for n in names}, source="test")
    local = save_local_file(tmp_path / "local.npz", table)
    out = tmp_path / "eval.json"
    result = invoke(eval_main, [authors, "--vocab", vocab_file, "--dataset", tiny_benchmark, "--local", local,
                                "--no-rerank", "--json", out, "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["checkpoint_format"] == "original" and report["local_features"] == f"local file {local}"
    missing_vocab = invoke(eval_main, [authors, "--dataset", tiny_benchmark, "--quiet"])
    assert missing_vocab.exit_code == 2 and "vocab" in missing_vocab.output


@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_torch_commands_let_openmp_threads_sleep_unless_told_otherwise(monkeypatch, preset, expected):
    if preset is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", preset)
    assert invoke(eval_main, ["missing.pt", "--quiet"]).exit_code == 2
    assert os.environ["OMP_WAIT_POLICY"] == expected


def test_eval_refuses_detections_and_local_together(untrained_checkpoint, tiny_benchmark):  # noqa: F811
    result = invoke(eval_main, [untrained_checkpoint, "--dataset", tiny_benchmark, "--detections", tiny_benchmark,
                                "--local", "x.npy"])
    assert result.exit_code == 2 and "not both" in result.output


# ------------------------------------------------------------------------------------------------
# galr-train and galr-synth


def test_train_on_a_tiny_dataset(tiny_benchmark, tmp_path):  # noqa: F811
    out = tmp_path / "m.pt"
    result = invoke(train_main, ["--dataset", tiny_benchmark, "-o", out, "--config", "small", "--epochs", 1,
                                 "--batch-size", 8, "--captions-per-epoch", 1, "--num-threads", 1, "--device", "cpu",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.with_suffix(".best.pt").is_file() and out.with_suffix(".state.pt").is_file()
    assert "trained 1 epochs" in result.output and "best validation mR" in result.output


@pytest.mark.parametrize("args, message", [
    (["--dataset", "nowhere"], "dataset folder not found"),
    (["--batch-size", 1], "batch_size"),
    (["--val-split", "dev"], "validation split 'dev'"),
    (["--device", "tpu"], "device"),
])
def test_train_bad_input_exits_2_with_a_message(tiny_benchmark, tmp_path, args, message):  # noqa: F811
    dataset = [] if "--dataset" in args else ["--dataset", tiny_benchmark]
    result = invoke(train_main, dataset + list(args) + ["-o", tmp_path / "m.pt", "--config", "small", "--quiet"])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_train_rejects_an_unknown_loss():
    assert invoke(train_main, ["--loss", "mean"]).exit_code == 2


def test_train_help_describes_the_presets_as_they_are():
    help_text = " ".join(invoke(train_main, ["--help"]).output.split())
    for name in ("original", "demo", "small"):
        config = train_config_preset(name, ".", 10)
        assert f"{config.epochs} epochs, batch {config.batch_size}" in help_text, name
    demo = train_config_preset("demo", ".", 10)
    lr = f"{demo.lr:.0e}".replace("e-0", "e-")  # 5e-4
    assert f"lr {lr}" in help_text and f"{demo.model.image_size} px" in help_text


def test_synth_generates_then_reuses_and_rejects_bad_values(tmp_path):
    out = tmp_path / "bench"
    args = ["-o", out, "--n-train", 3, "--n-val", 1, "--n-test", 2, "--image-size", 32, "--quiet"]
    first = invoke(synth_main, args)
    assert first.exit_code == 0, first.output
    assert "generated" in first.output and (out / "benchmark.json").is_file()
    info = json.loads((out / "benchmark.json").read_text())
    assert info["config"]["n_test"] == 2 and info["config"]["caption_specificity"] == 0.7
    assert "reused" in invoke(synth_main, args).output
    clash = invoke(synth_main, ["-o", out, "--n-train", 4, "--quiet"])
    assert clash.exit_code == 2 and "different config" in clash.output
    bad = invoke(synth_main, ["-o", tmp_path / "other", "--caption-specificity", 2])
    assert bad.exit_code == 2 and "caption_specificity" in bad.output


# ------------------------------------------------------------------------------------------------
# galr-demo caching (heavy steps replaced)


@pytest.fixture
def demo_world(tmp_path, monkeypatch):
    """A working directory where generating, training and evaluating are recorded, not run."""
    monkeypatch.chdir(tmp_path)
    calls = SimpleNamespace(generate=0, train=[], evaluate=0)
    benchmark_seed = {"value": 0}

    def fake_generate(out_dir, config, progress=True, overwrite=False):
        calls.generate += 1
        config = BenchmarkConfig(seed=benchmark_seed["value"])
        return BenchmarkInfo(Path(out_dir), config, {"train": 1, "val": 1, "test": 1}, vocab_size=50,
                             cached=calls.generate > 1)

    def fake_train(config, output, resume=True, progress=True):
        calls.train.append(resume)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_bytes(b"weights")
        return SimpleNamespace(epochs=config.epochs, seconds=1.0)

    def fake_evaluate(checkpoint, dataset, split, **kwargs):
        calls.evaluate += 1
        metrics = {k: 50.0 for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_medr",
                                     "i2t_meanr", "t2i_medr", "t2i_meanr", "mean_recall")}
        return {"dataset": str(dataset), "split": split, "images": 1, "captions": 5, "metrics": metrics,
                "metrics_rerank": metrics, "rerank": {"k": 30, "wp1": 0.3, "wp2": 1.1, "decay": 0.05}, "warnings": []}

    monkeypatch.setattr("galr.synthetic.benchmark.generate_benchmark", fake_generate)
    monkeypatch.setattr("galr.train.train", fake_train)
    monkeypatch.setattr("galr.torch_encoder.evaluate_checkpoint", fake_evaluate)
    monkeypatch.setattr("galr.cli.demo_benchmark_config", lambda: BenchmarkConfig(seed=benchmark_seed["value"]))
    return SimpleNamespace(calls=calls, benchmark_seed=benchmark_seed, root=tmp_path)


def test_demo_trains_once_then_reuses_the_stamped_model(demo_world):
    first = invoke(demo_main, ["--quiet"])
    assert first.exit_code == 0, first.output
    assert demo_world.calls.train == [False]  # no stamp yet: a fresh run
    assert (demo_world.root / paths.DEMO_DIR / "eval.json").is_file() and "with MR" in first.output
    stamp = json.loads(demo_stamp_path(paths.DEFAULT_CHECKPOINT).read_text())
    assert stamp["complete"] and stamp["train"]["model"]["resnet_widths"] == [16, 32, 64, 128]

    second = invoke(demo_main, ["--quiet"])
    assert second.exit_code == 0, second.output
    assert demo_world.calls.train == [False] and demo_world.calls.evaluate == 2
    assert "up to date" in second.output

    assert invoke(demo_main, ["--retrain", "--quiet"]).exit_code == 0
    assert demo_world.calls.train == [False, False]


def test_demo_retrains_when_the_benchmark_changes_and_resumes_an_interrupted_run(demo_world):
    assert invoke(demo_main, ["--quiet"]).exit_code == 0
    demo_world.benchmark_seed["value"] = 7
    assert invoke(demo_main, ["--quiet"]).exit_code == 0
    assert demo_world.calls.train == [False, False]
    stamp_file = demo_stamp_path(paths.DEFAULT_CHECKPOINT)
    stamp_file.write_text(json.dumps({**json.loads(stamp_file.read_text()), "complete": False}))
    assert invoke(demo_main, ["--quiet"]).exit_code == 0
    assert demo_world.calls.train == [False, False, True]


def test_demo_writes_example_queries_once(demo_world):
    assert invoke(demo_main, ["--quiet"]).exit_code == 0
    queries = (demo_world.root / paths.DEFAULT_QUERIES).read_text().splitlines()
    assert queries[0].startswith("#") and len(queries) >= 5
    (demo_world.root / paths.DEFAULT_QUERIES).write_text("my own query\n")
    assert invoke(demo_main, ["--quiet"]).exit_code == 0
    assert (demo_world.root / paths.DEFAULT_QUERIES).read_text() == "my own query\n"


def test_demo_reports_user_errors_with_exit_code_2(demo_world, monkeypatch):
    from galr.data import DatasetError

    def broken(*args, **kwargs):
        raise DatasetError("dataset folder not found: galr-demo/benchmark")

    monkeypatch.setattr("galr.torch_encoder.evaluate_checkpoint", broken)
    result = invoke(demo_main, ["--quiet"])
    assert result.exit_code == 2 and "galr-demo: dataset folder not found" in result.output
