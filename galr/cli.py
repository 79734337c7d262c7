"""Command-line tools of the model side: ``galr-synth``, ``galr-train``, ``galr-eval`` and ``galr-demo``.

Parsing and printing only; the work is done by :mod:`galr.synthetic.benchmark`, :mod:`galr.train`
and :mod:`galr.torch_encoder`. Bad input (missing dataset, wrong vocabulary, unreadable checkpoint,
bad option values) ends with a one-line message and the exit code of :mod:`galr.errors`' table.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import click

from galr import paths
from galr.atomic import write_text_atomically
from galr.config import RerankConfig
from galr.console import GalrCommand
from galr.errors import InputError

_CONTEXT = {"help_option_names": ["-h", "--help"]}

# The query file galr-demo leaves in the working directory for `galr-run query.txt`.
EXAMPLE_QUERIES = """\
# Example queries for `galr-run query.txt` (one per line; lines starting with # are ignored).
There are several white planes at the airport.
Many ships are moored in the harbor next to the water.
There is a bridge across the river.
Two tennis courts next to a swimming pool in the city.
Some storage tanks on the bare land.
Many cars are parked in the urban area.
"""


def _passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning; only effective before torch is imported.

    torch's OpenMP threads busy-wait by default. On 2 cores shared with any other busy process that
    made 2-thread training many times slower (measured in docs/training.md, "Threads"); passive waiting
    costs nothing measurable when the machine is idle. A value the user set is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _given(values: Mapping[str, Any]) -> dict[str, Any]:
    """The options the user actually passed (click gives None for the others)."""
    return {k: v for k, v in values.items() if v is not None}


def _log(tool: str) -> Callable[[str], None]:
    return lambda message: click.echo(f"[{tool}] {message}", err=True)


# ------------------------------------------------------------------------------------------------
# galr-synth


def _benchmark_config(difficulty: str, config_file: Path | None, overrides: Mapping[str, Any]):
    from galr.synthetic.benchmark import BenchmarkConfig

    if config_file is not None:
        try:
            values = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{config_file}: not a readable JSON BenchmarkConfig ({exc})") from None
        values = values.get("config", values)  # a benchmark.json holds the config under "config"
        return BenchmarkConfig.from_dict({**values, **overrides})
    return BenchmarkConfig.preset(difficulty, **overrides)


@click.command("galr-synth", cls=GalrCommand, context_settings=_CONTEXT)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=paths.DEFAULT_BENCHMARK, show_default=True,
              help="Benchmark folder (original RSITMD layout).")
@click.option("--difficulty", type=click.Choice(["easy", "medium", "hard"]), default="medium", show_default=True,
              help="Preset for caption detail, scene clutter and detector noise; the options below override it.")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="JSON BenchmarkConfig (or a benchmark.json) to start from instead of --difficulty.")
@click.option("--seed", type=int, default=None, help="Master seed [preset: 0].")
@click.option("--n-train", type=int, default=None, help="Training images [preset: 400].")
@click.option("--n-val", type=int, default=None, help="Validation images [preset: 50].")
@click.option("--n-test", type=int, default=None, help="Test images [preset: 100].")
@click.option("--image-size", type=int, default=None, help="Image side in pixels [preset: 256].")
@click.option("--captions-per-image", type=int, default=None, help="Captions per image [preset: 5].")
@click.option("--caption-specificity", type=float, default=None,
              help="0..1, detail in captions; lower is harder [preset: 0.7 for medium].")
@click.option("--vocab-min-count", type=int, default=None, help="Rarer train words become <unk> [preset: 1].")
@click.option("--geo-scenes", type=click.IntRange(min=1), default=None,
              help="Instead of the benchmark: this many large geo-referenced scenes (GeoTIFF, UTM, dated) with SeLo "
                   "annotations (anno.json) for galr-locate and galr-index --tile. Needs `pip install 'galr[geo]'`.")
@click.option("--geo-size", type=click.IntRange(min=256), default=4096, show_default=True,
              help="--geo-scenes: scene side in pixels (a multiple of --image-size).")
@click.option("--geo-queries", type=click.IntRange(min=1), default=3, show_default=True,
              help="--geo-scenes: annotated queries per scene (each planted at 2 places).")
@click.option("--overwrite", is_flag=True, help="Regenerate even if OUTPUT holds another benchmark.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth_main(output: Path, difficulty: str, config_file: Path | None, overwrite: bool, quiet: bool,
               **fields: Any) -> None:
    """Generate the synthetic retrieval benchmark (images, 5 captions each, detections, vocabulary).

    A folder that already holds the same benchmark is reused; generation is deterministic.
    """
    from galr.synthetic.benchmark import generate_benchmark

    geo_scenes, geo_size, geo_queries = fields.pop("geo_scenes"), fields.pop("geo_size"), fields.pop("geo_queries")
    if geo_scenes is not None:
        from galr.synthetic.geo import GeoSceneConfig, generate_geo_scenes

        chip = fields.get("image_size") or 256
        seed = fields.get("seed") or 0
        annotations = generate_geo_scenes(output, GeoSceneConfig(scenes=geo_scenes, size=geo_size, chip=chip,
                                                                 queries=geo_queries, seed=seed), progress=not quiet)
        click.echo(f"{output}: {geo_scenes} scenes of {geo_size} px, annotations {annotations}")
        return

    def work():
        config = _benchmark_config(difficulty, config_file, _given(fields))
        return generate_benchmark(output, config, progress=not quiet, overwrite=overwrite)

    info = work()
    state = "reused" if info.cached else f"generated in {info.seconds:.1f}s"
    counts = ", ".join(f"{split} {n}" for split, n in info.images.items())
    click.echo(f"{output}: {state} ({counts} images, {info.vocab_size} words)")


# ------------------------------------------------------------------------------------------------
# galr-train


def _vocab_size(dataset: Path, vocab_file: Path | None) -> int:
    from galr.data import DatasetPaths
    from galr.preprocess.text import Vocabulary

    return Vocabulary.load(DatasetPaths.find(dataset, vocab_file=vocab_file).vocab()).max_id


def _train_options(command: Callable) -> Callable:
    """The TrainConfig options (None = the preset's value)."""
    options = [
        click.option("--epochs", type=int, default=None, help="Total epochs."),
        click.option("--batch-size", type=int, default=None, help="(image, caption) pairs per step."),
        click.option("--lr", type=float, default=None, help="Adam learning rate [original: 2e-4]."),
        click.option("--lr-decay", type=float, default=None, help="Step decay factor [0.7]."),
        click.option("--lr-decay-every", type=int, default=None, help="Decay period in epochs [20]."),
        click.option("--margin", type=float, default=None, help="Hinge margin [0.2]."),
        click.option("--loss", type=click.Choice(["sum", "hardest"]), default=None,
                     help="All negatives (original) or VSE++ hardest negative."),
        click.option("--grad-clip", type=float, default=None, help="Max gradient norm; 0 = off."),
        click.option("--captions-per-epoch", type=int, default=None,
                     help="Captions of each image per epoch (default all, as the original)."),
        click.option("--augment/--no-augment", default=None, help="Original random rotation + crop."),
        click.option("--seed", type=int, default=None),
        click.option("--device", type=str, default=None, help="auto, cpu, cuda or cuda:N [auto]."),
        click.option("--num-threads", type=int, default=None, help="CPU threads for torch; 0 = torch's default."),
        click.option("--train-split", type=str, default=None, help="[train]"),
        click.option("--val-split", type=str, default=None, help="Validation split, or 'none' [val]."),
        click.option("--fold", type=int, default=None, help="k-fold index: re-split the train images (0-based)."),
        click.option("--num-folds", type=int, default=None, help="Folds of the k-fold protocol [3]."),
        click.option("--eval-every", type=int, default=None, help="Validate every N epochs; 0 = after the last only."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


TRAIN_EPILOG = """\b
Presets (--config; any option above overrides them):
  original  the authors' GaLR and recipe: 20 epochs, batch 100, lr 2e-4 x0.7 from epoch 20,
            sum loss, every caption each epoch, rotation + crop augmentation
  demo      the CPU demo of docs/training.md: GaLR narrowed to 5.2 M parameters at 256 px,
            9 epochs, batch 32, lr 5e-4, one caption per image per epoch, no augmentation
  small     a tiny 64 px model for tests: 3 epochs, batch 16
Exit codes: 0 trained; 2 bad input (missing dataset, wrong vocabulary, invalid values).
"""


@click.command("galr-train", cls=GalrCommand, context_settings=_CONTEXT, epilog=TRAIN_EPILOG)
@click.option("--dataset", type=click.Path(path_type=Path), default=paths.DEFAULT_BENCHMARK, show_default=True,
              help="Dataset folder in the original layout (e.g. made by galr-synth).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=paths.DEFAULT_CHECKPOINT, show_default=True,
              help="Checkpoint of the last epoch; .best.pt and .state.pt files go next to it.")
@click.option("--config", "preset", type=click.Choice(["small", "demo", "original"]), default="demo", show_default=True,
              help="Model size and training defaults: the authors' GaLR, the CPU demo, or a tiny test model.")
@click.option("--backbone-weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="ImageNet ResNet-18 state dict (torchvision names) for the image trunk.")
@click.option("--vocab", "vocab_file", type=click.Path(path_type=Path), default=None,
              help="Vocabulary JSON [found in the dataset folder].")
@click.option("--detections", "detections_dir", type=click.Path(path_type=Path), default=None,
              help="Detection files for DREA [DATASET/detections].")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from OUTPUT's .state.pt when it exists (same settings only).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_train_options
def train_main(dataset: Path, output: Path, preset: str, backbone_weights: Path | None, vocab_file: Path | None,
               detections_dir: Path | None, resume: bool, quiet: bool, **options: Any) -> None:
    """Train GaLR on a retrieval dataset, with a checkpoint after every epoch.

    The --config preset sets the model and the defaults (original: the authors' model and
    recipe; demo: the CPU demo recipe of docs/training.md); every other option overrides it.
    """
    _passive_openmp()
    from galr.train import train, train_config_preset

    overrides = _given(options)
    if isinstance(overrides.get("val_split"), str) and overrides["val_split"].lower() == "none":
        overrides["val_split"] = None
    overrides.update(_given({"backbone_weights": backbone_weights, "vocab_file": vocab_file,
                             "detections_dir": detections_dir}))

    def work():
        if not dataset.is_dir():
            hint = " (run `galr-synth` or `galr-demo` first)" if dataset == paths.DEFAULT_BENCHMARK else ""
            raise InputError(f"dataset folder not found: {dataset}{hint}")
        config = train_config_preset(preset, dataset, _vocab_size(dataset, vocab_file), **overrides)
        return train(config, output, resume=resume, progress=not quiet)

    result = work()
    click.echo(f"trained {result.epochs} epochs in {result.seconds:.1f}s -> {result.checkpoint}")
    if result.best_checkpoint is not None:
        click.echo(f"best validation mR {result.best_val_mean_recall:.2f} at epoch {result.best_epoch + 1} "
                   f"-> {result.best_checkpoint}")


# ------------------------------------------------------------------------------------------------
# galr-eval


def format_evaluation(report: Mapping[str, Any]) -> str:
    """The tables galr-eval prints: the metrics without and with multivariate rerank."""
    from galr.retrieval.metrics import RetrievalMetrics

    where = f"{report['dataset']} [{report['split']}]: {report['images']} images, {report['captions']} captions"
    parts = [RetrievalMetrics.from_dict(report["metrics"]).format_table(f"{where}\nwithout MR")]
    if report.get("metrics_rerank"):
        rerank = report["rerank"]
        title = f"with MR (k={rerank['k']}, wp1={rerank['wp1']}, wp2={rerank['wp2']})"
        parts.append(RetrievalMetrics.from_dict(report["metrics_rerank"]).format_table(title))
    return "\n\n".join(parts)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2) + "\n")


@click.command("galr-eval", cls=GalrCommand, context_settings=_CONTEXT)
@click.argument("checkpoint", type=click.Path(path_type=Path), default=paths.DEFAULT_CHECKPOINT)
@click.option("--dataset", type=click.Path(path_type=Path), default=paths.DEFAULT_BENCHMARK, show_default=True)
@click.option("--split", default="test", show_default=True)
@click.option("--vocab", "vocab_file", type=click.Path(path_type=Path), default=None,
              help="Vocabulary JSON (required for an authors' .pth.tar; overrides a galr checkpoint's own).")
@click.option("--images", "image_dir", type=click.Path(path_type=Path), default=None,
              help="Image folder [DATASET/images].")
@click.option("--detections", "detections_dir", type=click.Path(path_type=Path), default=None,
              help="Detection files for DREA [DATASET/detections when it exists].")
@click.option("--local", "local_file", type=click.Path(path_type=Path), default=None,
              help="Precomputed DREA matrices instead: the authors' *_local.npy or a galr .npz.")
@click.option("--rerank/--no-rerank", default=True, show_default=True, help="Also score with multivariate rerank (MR).")
@click.option("--k", "mr_k", type=int, default=RerankConfig.k, show_default=True, help="MR candidates.")
@click.option("--wp1", type=float, default=RerankConfig.wp1, show_default=True, help="MR salience weight.")
@click.option("--wp2", type=float, default=RerankConfig.wp2, show_default=True, help="MR reverse-rank weight.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the numbers as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_main(checkpoint: Path, dataset: Path, split: str, vocab_file: Path | None, image_dir: Path | None,
              detections_dir: Path | None, local_file: Path | None, rerank: bool, mr_k: int, wp1: float, wp2: float,
              device: str, batch_size: int, json_path: Path | None, quiet: bool) -> None:
    """Score CHECKPOINT (galr or authors' format) on a split: R@1/5/10 both ways and mR, with and without MR."""
    _passive_openmp()
    from galr.torch_encoder import evaluate_checkpoint

    if detections_dir is not None and local_file is not None:
        raise click.UsageError("give either --detections or --local, not both")
    rerank_config = RerankConfig(k=mr_k, wp1=wp1, wp2=wp2) if rerank else None
    report = evaluate_checkpoint(
        checkpoint, dataset, split, vocab=vocab_file, image_dir=image_dir, detections_dir=detections_dir,
        local_file=local_file, rerank=rerank_config, device=device, batch_size=batch_size, progress=not quiet,
    )
    for warning in report.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    click.echo(format_evaluation(report))
    if json_path is not None:
        _write_json(json_path, report)
        click.echo(f"\nwrote {json_path}")


# ------------------------------------------------------------------------------------------------
# galr-demo


def demo_benchmark_config():
    """The synthetic benchmark of the demo (see docs/training.md for how it was chosen)."""
    from galr.synthetic.benchmark import BenchmarkConfig

    return BenchmarkConfig(seed=0, n_train=2000, n_val=50, n_test=100)


def _demo_stamp(benchmark: Mapping[str, Any], train_config: Mapping[str, Any]) -> dict[str, Any]:
    """What the demo checkpoint depends on; a different stamp means it must be retrained."""
    from galr.train import EXECUTION_FIELDS

    recipe = {k: v for k, v in train_config.items() if k not in EXECUTION_FIELDS}
    digest = hashlib.sha256(json.dumps({"benchmark": benchmark, "train": recipe}, sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "benchmark": benchmark, "train": recipe}


def demo_stamp_path(checkpoint: Path) -> Path:
    """The stamp next to the demo checkpoint: ``model.pt`` -> ``model.stamp.json``."""
    return checkpoint.with_suffix(".stamp.json")


def _read_stamp(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def ensure_demo_benchmark(log: Callable[[str], None], progress: bool):
    """Generate (or reuse) the demo benchmark in :data:`galr.paths.DEFAULT_BENCHMARK`."""
    from galr.synthetic.benchmark import BenchmarkError, generate_benchmark

    config = demo_benchmark_config()
    try:
        return generate_benchmark(paths.DEFAULT_BENCHMARK, config, progress=progress)
    except BenchmarkError as exc:
        # The folder is the demo's own; an older or hand-made benchmark there is replaced.
        log(f"{exc}; regenerating the demo benchmark")
        return generate_benchmark(paths.DEFAULT_BENCHMARK, config, progress=progress, overwrite=True)


def ensure_demo_model(benchmark_info, device: str, retrain: bool, log: Callable[[str], None], progress: bool):
    """Train the demo model into :data:`galr.paths.DEFAULT_CHECKPOINT` unless its stamp says it is current.

    Returns:
        The :class:`galr.train.TrainResult`, or None when the cached checkpoint was kept.
    """
    from galr.train import train, train_config_preset

    checkpoint = paths.DEFAULT_CHECKPOINT
    config = train_config_preset("demo", paths.DEFAULT_BENCHMARK, benchmark_info.vocab_size, device=device)
    benchmark = {"config": benchmark_info.config.to_dict(), "generator_version": benchmark_info.generator_version}
    stamp = _demo_stamp(benchmark, config.to_dict())
    stamp_file = demo_stamp_path(checkpoint)
    previous = _read_stamp(stamp_file)
    same_recipe = previous.get("digest") == stamp["digest"]
    if same_recipe and previous.get("complete") and checkpoint.is_file() and not retrain:
        log(f"{checkpoint} is up to date (stamp {stamp_file}); not retraining")
        return None
    # An interrupted run of the same recipe resumes; anything else starts over.
    resume = same_recipe and not retrain
    stamp_file.parent.mkdir(parents=True, exist_ok=True)
    _write_json(stamp_file, {**stamp, "complete": False})
    result = train(config, checkpoint, resume=resume, progress=progress)
    _write_json(stamp_file, {**stamp, "complete": True, "train_seconds": round(result.seconds, 1)})
    return result


@click.command("galr-demo", cls=GalrCommand, context_settings=_CONTEXT)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--retrain", is_flag=True, help="Train again even if the cached demo model is current.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_main(device: str, retrain: bool, quiet: bool) -> None:
    """Make the demo: synthetic benchmark, trained demo model, test-split scores and an example query file.

    Everything lands in ./galr-demo (cached: a second run only re-evaluates) and ./query.txt;
    then `galr-export --fp16` and `galr-run query.txt` work without arguments.
    """
    _passive_openmp()
    from galr.torch_encoder import evaluate_checkpoint

    log, progress = _log("galr-demo"), not quiet
    started = time.perf_counter()
    log(f"1/4 synthetic benchmark -> {paths.DEFAULT_BENCHMARK}")
    info = ensure_demo_benchmark(log, progress)
    counts = ", ".join(f"{split} {n}" for split, n in info.images.items())
    log(f"    {'reused' if info.cached else 'generated'}: {counts} images")
    log(f"2/4 demo model -> {paths.DEFAULT_CHECKPOINT}")
    result = ensure_demo_model(info, device, retrain, log, progress)
    if result is not None:
        log(f"    trained {result.epochs} epochs in {result.seconds:.0f}s")
    log("3/4 evaluating on the test split")
    report = evaluate_checkpoint(
        paths.DEFAULT_CHECKPOINT, paths.DEFAULT_BENCHMARK, "test", rerank=RerankConfig(), device=device,
        progress=progress,
    )
    eval_file = paths.DEMO_DIR / "eval.json"
    _write_json(eval_file, report)
    click.echo(format_evaluation(report))
    log(f"    wrote {eval_file}")
    queries = paths.DEFAULT_QUERIES
    if queries.exists():
        log(f"4/4 {queries} exists; left as it is")
    else:
        write_text_atomically(queries, EXAMPLE_QUERIES)
        log(f"4/4 wrote example queries to {queries}")
    log(f"done in {time.perf_counter() - started:.0f}s. Next: galr-export --fp16, then galr-run {queries}")


__all__ = [
    "EXAMPLE_QUERIES",
    "TRAIN_EPILOG",
    "demo_benchmark_config",
    "demo_main",
    "demo_stamp_path",
    "ensure_demo_benchmark",
    "ensure_demo_model",
    "eval_main",
    "format_evaluation",
    "synth_main",
    "train_main",
]
