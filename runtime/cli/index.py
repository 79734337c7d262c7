"""``galr-index``: build or edit a gallery index (``.gidx``) from image files (torch-free).

The command only parses arguments, opens files and reports; the work is in :mod:`galr.runtime.index`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import click

from galr import paths
from galr.atomic import check_writable, exclusive_lock
from galr.console import GalrCommand, printable
from galr.errors import InputError, NotFoundError, NothingDoneError
from galr.preprocess.text import read_text_lines
from galr.runtime.backends.registry import AUTO, REQUESTABLE_DEVICES, backend_names
from galr.runtime.encoders import QueryError, load_engine
from galr.runtime.index import (
    IMAGE_SUFFIXES,
    GalleryIndex,
    SkippedImage,
    build_index,
    encode_image_files,
    load_index,
    new_index,
    scan_image_files,
)
from galr.runtime.index.searchers import AUTO_APPROXIMATE, AUTO_EXACT_LIMIT, SEARCHERS, resolve_searcher_kind

_MAX_REASONS = 20  # skipped images listed one per line; the rest are counted

_EPILOG = """\b
Examples:
  galr-index chips/ --engine galr.plan --detections dets/ -o gallery.gidx
  galr-index scenes/ --engine galr.plan --tile 256 --overlap 64 -o archive.gidx
  galr-index new_scenes/ --update --text-bank captions.txt
  galr-index --remove harbour/0042.png --remove harbour/0043.png
"""


def _collect_images(arguments: Sequence[Path]) -> tuple[list[Path], list[SkippedImage]]:
    """Image files named by IMAGES (folders are scanned recursively, files are taken as given), and
    image names found in the folders that cannot be read."""
    files: list[Path] = []
    unreadable: list[SkippedImage] = []
    for argument in arguments:
        if argument.is_dir():
            found, skipped = scan_image_files(argument)
            files.extend(found)
            unreadable.extend(skipped)
        elif argument.is_file():
            files.append(argument)
        else:
            raise NotFoundError(f"{argument}: no such image file or folder")
    return files, unreadable


def _image_root(arguments: Sequence[Path], explicit: Path | None, index: GalleryIndex | None) -> Path | None:
    """The folder ids are relative to: --root, the index's own root, or the one folder given."""
    if explicit is not None:
        return explicit
    if index is not None and index.image_root is not None:
        return Path(index.image_root)
    if len(arguments) == 1 and arguments[0].is_dir():
        return arguments[0]
    if len(arguments) == 1 and arguments[0].suffix.lower() == ".json":  # a STAC file: ids relative to it
        return arguments[0].parent
    return None


def _local_input(detections: Path | None, local_file: Path | None, encoders: Any, detector: Path | None = None,
                 use_bundled: bool = True) -> Any:
    """The DREA source handed to the encoder: a detections folder, a local-feature table, a detector
    (the one named, else the bundle's own) or None."""
    if detections is not None:
        return detections
    if local_file is None:
        from galr.runtime.detector import choose_detector

        chosen, line = choose_detector(detector, getattr(encoders, "bundle", None),
                                       drea_classes=encoders.spec.drea.classes, use_bundled=use_bundled,
                                       backend=getattr(getattr(encoders, "info", None), "backend", "auto"))
        if line:
            click.echo(line)
        return chosen
    from galr.preprocess.local_file import load_local_file

    drea = encoders.spec.drea
    return load_local_file(local_file, num_objects=drea.num_objects, object_dim=drea.feature_dim)


def _encode_quietly(encode, *args: Any) -> tuple[Any, set[str]]:
    """Run ``encode`` and gather the per-image no-detection warnings into one count.

    Other warnings are shown once each; a gallery of 10^5 images must not print 10^5 lines.
    """
    from galr.preprocess.drea import NoDetectionsWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = encode(*args)
    without_detections, shown = set(), set()
    for warning in caught:
        message = str(warning.message)
        if issubclass(warning.category, NoDetectionsWarning):
            without_detections.add(message)
        elif message not in shown:
            shown.add(message)
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return result, without_detections


def _report_skipped(skipped: Sequence[SkippedImage]) -> None:
    if not skipped:
        return
    click.echo(f"skipped {_count(len(skipped), 'image')}:", err=True)
    for item in skipped[:_MAX_REASONS]:
        # Image errors already name the file; other reasons get the path in front.
        reason = item.reason if item.path in item.reason else f"{item.path}: {item.reason}"
        click.echo(f"  {printable(reason)}", err=True)
    if len(skipped) > _MAX_REASONS:
        click.echo(f"  ... and {len(skipped) - _MAX_REASONS} more", err=True)


def _tiling(tile_sizes: str | None, overlap: int, bands: str | None, stretch: str, min_valid: float) -> Any:
    """The scene tiling the options ask for (``None`` without --tile)."""
    if tile_sizes is None:
        if bands is not None or overlap:
            raise click.UsageError("--bands and --overlap apply to scenes: add --tile PX")
        return None
    from galr.geo import SceneReadSettings, TileSettings, parse_bands, require_rasterio
    from galr.geo.tiling import parse_tile_sizes
    from galr.runtime.index.scenes import SceneTiling

    require_rasterio()  # before the engine loads, not after
    if stretch.strip().lower() == "none":
        clip = None
    else:
        try:
            clip = tuple(float(part) for part in stretch.split(","))
        except ValueError:
            raise click.BadParameter(f"{stretch!r} is not LOW,HIGH percentiles or none", param_hint="--stretch") from None
    return SceneTiling(TileSettings(parse_tile_sizes(tile_sizes), overlap),
                       SceneReadSettings(bands=parse_bands(bands), stretch=clip, min_valid_fraction=min_valid))


def _stac_scenes(stac_files: Sequence[Path]) -> tuple[dict[str, dict[str, Any]], list[SkippedImage]]:
    """Scene path -> its STAC item's facts, for every STAC file given; items without a local GeoTIFF are listed."""
    from galr.geo.stac import read_stac_scenes

    extra: dict[str, dict[str, Any]] = {}
    left_out: list[SkippedImage] = []
    for stac_file in stac_files:
        scenes, missing = read_stac_scenes(stac_file)
        click.echo(f"STAC {printable(stac_file)}: {_count(len(scenes), 'scene')}")
        left_out += [SkippedImage(str(stac_file), reason) for reason in missing]
        for scene in scenes:
            extra[str(scene.path.resolve())] = {"stac_item": scene.item_id, **scene.properties}
    return extra, left_out


def _encode_with_scenes(encoders: Any, files: list[Path], tiling: Any, local: Any, batch_size: int, progress: bool,
                        root: Path | None, scene_extra: dict[str, dict[str, Any]] | None = None
                        ) -> tuple[list, Any, list[SkippedImage]]:
    """Scenes (GeoTIFF) tiled, plain images whole; one list of records and embeddings."""
    import numpy as np

    from galr.geo import is_scene_file
    from galr.runtime.index.scenes import encode_scene_files

    scenes = [path for path in files if is_scene_file(path)]
    pictures = [path for path in files if not is_scene_file(path)]
    records, parts, skipped = [], [], []
    if pictures:
        found, embeddings, missed = encode_image_files(encoders, pictures, local, batch_size, progress, root)
        records += found
        parts.append(embeddings)
        skipped += missed
    if scenes:
        found, embeddings, report = encode_scene_files(encoders, scenes, tiling, local, batch_size, progress, root,
                                                       scene_extra)
        records += found
        parts.append(embeddings)
        skipped += report.skipped
        click.echo(f"scenes: {report.scenes} read, {report.tiles} tiles indexed, {report.nodata_tiles} mostly-nodata "
                   f"tiles skipped, {report.unreadable_tiles} unreadable windows")
    embeddings = np.concatenate(parts) if parts else np.zeros((0, encoders.embed_dim), np.float32)
    return records, embeddings, skipped


@dataclass(frozen=True)
class RayJob:
    """What --ray asked for: the cluster and pool, and how the workers load the engine."""

    settings: Any
    bundle: str
    backend: str
    device: str
    precision: str


@dataclass(frozen=True)
class SearchChoice:
    """What --search and --search-setting asked for (``kind`` None: keep or pick automatically)."""

    kind: str | None
    settings: dict[str, int]


def _settings(pairs: Sequence[str]) -> dict[str, int]:
    settings: dict[str, int] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            settings[name.strip()] = int(value)
        except ValueError:
            raise click.BadParameter(f"{pair!r} is not NAME=INTEGER (e.g. nlist=4096)",
                                     param_hint="--search-setting") from None
    return settings


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _size_text(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value, unit = float(size), "B"
    for unit in ("KB", "MB", "GB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


@click.command("galr-index", cls=GalrCommand, context_settings={"help_option_names": ["-h", "--help"]},
               epilog=_EPILOG)
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--engine", "bundle", type=click.Path(path_type=Path), default=paths.DEFAULT_BUNDLE, show_default=True,
              help="The galr.plan bundle whose image encoder makes the embeddings.")
@click.option("--detections", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="Folder of detection files named like the images (<stem>.json or <stem>.txt).")
@click.option("--detector", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="An Ultralytics oriented-box detector ONNX (yolo export ... format=onnx) run on every image "
                   "for the DREA input.")
@click.option("--no-detector", "no_detector", is_flag=True,
              help="Do not run the detector stored in the bundle (galr-export --detector); images without "
                   "detections use the all-zero fallback.")
@click.option("--local", "local_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The authors' precomputed local-feature file (.npy) or a galr .npz.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=paths.DEFAULT_INDEX,
              show_default=True, help="The index file to write (or edit, with --update/--remove).")
@click.option("--storage", type=click.Choice(["fp32", "fp16"]), default=None,
              help="Embedding storage; fp16 halves memory and file size  [default: fp32; an existing index keeps its own]")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per encoder call.")
@click.option("--backend", type=click.Choice([AUTO, *backend_names()]), default=AUTO, show_default=True)
@click.option("--device", type=click.Choice(list(REQUESTABLE_DEVICES)), default=AUTO, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8", "int8-cpu"]), default="auto",
              show_default=True, help="auto: int8-cpu on ONNX Runtime CPU when the bundle has it, else fp32 (fp16 on GPUs).")
@click.option("--text-bank", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Captions (one per line, # comments) stored as the MR text bank, replacing any earlier bank.")
@click.option("--update", is_flag=True, help="Add IMAGES to the existing index, replacing images with the same id.")
@click.option("--remove", "remove_ids", multiple=True, metavar="ID",
              help="Remove this image id (repeat it; without --update, the IMAGES arguments are taken as ids too).")
@click.option("--root", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Image ids are paths relative to this folder  [default: the index's root, else the one IMAGES "
                   "folder, else the paths as given]")
@click.option("--search", "search_kind", type=click.Choice(["auto", *SEARCHERS]), default=None,
              help="How the gallery is searched: exact, or approximate with FAISS (ivf, ivfpq, hnsw; "
                   "`pip install 'galr[faiss]'`). auto: exact up to "
                   f"{AUTO_EXACT_LIMIT:,} images, {AUTO_APPROXIMATE} beyond  [default: auto; an existing index "
                   "keeps its own unless this is given]")
@click.option("--search-setting", "search_settings", multiple=True, metavar="NAME=INT",
              help="A build setting of the approximate searcher (repeat): ivf/ivfpq nlist, nprobe, train_size, "
                   "m, nbits, rerank (ivfpq: re-score rerank x k candidates with exact vectors kept on disk); hnsw M, "
                   "ef_construction, ef.")
@click.option("--tile", "tile_sizes", default=None, metavar="PX[,PX...]",
              help="Tile GeoTIFF scenes (.tif/.tiff) into windows of this many pixels (several sizes: 256,512); "
                   "each tile is indexed with its scene, window, CRS, ground sample distance, centre and WGS84 "
                   "footprint. Plain images are indexed whole. Needs `pip install 'galr[geo]'`.")
@click.option("--overlap", type=click.IntRange(min=0), default=0, show_default=True,
              help="--tile: pixels shared by neighbouring tiles.")
@click.option("--bands", default=None, metavar="R,G,B",
              help="--tile: scene bands shown as R,G,B, counted from 1 (e.g. 4,3,2 for Sentinel-2)  "
                   "[default: by colour interpretation, else 1,2,3; 13+ bands 4,3,2; 1-2 bands grey]")
@click.option("--stretch", default="2,98", show_default=True, metavar="LOW,HIGH|none",
              help="--tile: per-band percentile clip for 16-bit and float scenes (8-bit scenes are kept as they are); "
                   "none scales by the data type's range.")
@click.option("--min-valid", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="--tile: skip (and count) tiles with a smaller fraction of valid (not nodata) pixels.")
@click.option("--records", "records_kind", type=click.Choice(["auto", "json", "sqlite"]), default="auto",
              show_default=True,
              help="Where records live: inside the .gidx (json), or in a checked SQLite file beside it (sqlite: "
                   "indexes of millions open in seconds and read only the records they show). auto: SQLite past "
                   "100,000 images or when the index already uses it. `--update --records sqlite` migrates an index.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[HOST:PORT]",
              help="Encode on Ray (Ray Data, `pip install 'galr[ray]'`): on this machine, or on the cluster whose "
                   "head is HOST:PORT. Resumable: run the same command again after an interruption and only "
                   "the missing shards are encoded. Images must be readable at the same paths on every node.")
@click.option("--ray-workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="--ray: encoder actors (each loads the engine once).")
@click.option("--ray-worker-cpus", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="--ray: CPUs Ray reserves per encoder actor.")
@click.option("--shard-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="--ray: images per shard (the unit of work and of resumption).")
@click.option("--overwrite", is_flag=True, help="Replace an existing index at --output with a new one.")
@click.option("--lock-timeout", type=click.FloatRange(min=0), default=600, show_default=True,
              help="Seconds to wait while another galr-index writes the same index, then give up (exit 2).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def main(images: tuple[Path, ...], bundle: Path, detections: Path | None, detector: Path | None, no_detector: bool,
         local_file: Path | None, output: Path,
         storage: str | None, batch_size: int, backend: str, device: str, precision: str, text_bank: Path | None,
         update: bool, remove_ids: tuple[str, ...], root: Path | None, search_kind: str | None,
         search_settings: tuple[str, ...], tile_sizes: str | None, overlap: int, bands: str | None, stretch: str,
         min_valid: float, records_kind: str, ray_address: str | None, ray_workers: int, ray_worker_cpus: float,
         shard_size: int, overwrite: bool, lock_timeout: float, progress: bool) -> None:
    """Embed the images in IMAGES (folders are scanned for png/jpg/tif/bmp) into a gallery index.

    The index holds one embedding per image, the images' metadata, the model hash of the bundle
    (other models are refused when searching or updating) and the text bank MR reranks with.
    Writers of one index take turns (an OS lock beside it); an existing index is only replaced with
    --overwrite.
    """
    if sum(source is not None for source in (detections, local_file, detector)) > 1:
        raise click.UsageError("give one of --detections, --local or --detector")
    removals = list(remove_ids)
    if removals and not update:
        removals += [argument.as_posix() for argument in images]  # `--remove ID ID ...`
        images = ()
    editing = update or bool(removals)
    if not editing and not images:
        raise click.UsageError("give IMAGES (a folder or image files) to index, or --update/--remove to edit an index")
    if update and not (images or text_bank or removals or records_kind != "auto"):
        raise click.UsageError("--update needs IMAGES to add, --text-bank, --remove or --records")
    if editing and not output.is_file():
        raise NotFoundError(f"no index at {output} to edit; build it first: galr-index IMAGES --engine {bundle} "
                            f"-o {output}")
    check_writable(output)
    if not editing and output.exists() and not overwrite:
        raise InputError(f"{output} already exists; add IMAGES to it with --update, or replace it with --overwrite")

    search = SearchChoice(search_kind, _settings(search_settings))
    tiling = _tiling(tile_sizes, overlap, bands, stretch, min_valid)
    ray_job = None
    if ray_address is not None:
        if editing or tiling is not None or detector is not None or local_file is not None:
            raise click.UsageError("--ray builds a new index from image files (with --detections at most); it does "
                                   "not combine with --update/--remove, --tile, --detector or --local")
        from galr.runtime.index.distributed import DistributedSettings

        ray_job = RayJob(DistributedSettings(address=ray_address, workers=ray_workers, cpus_per_worker=ray_worker_cpus,
                                             shard_size=shard_size, batch_size=batch_size),
                         str(bundle), backend, device, precision)
    started = time.perf_counter()
    captions = [line.text for line in read_text_lines(text_bank, "captions")] if text_bank is not None else None
    stac_files = [argument for argument in images if argument.suffix.lower() == ".json"]
    scene_extra: dict[str, dict[str, Any]] = {}
    if stac_files:
        if tiling is None:
            raise click.UsageError("a STAC file lists scenes: add --tile PX to index them")
        scene_extra, unreadable_stac = _stac_scenes(stac_files)
        images = tuple(argument for argument in images if argument not in stac_files)
    files, unreadable = _collect_images(images)
    if stac_files:
        files += [Path(path) for path in scene_extra]
        unreadable += unreadable_stac
        images = images + tuple(stac_files)
    if images and not files:
        suffixes = ", ".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
        _report_skipped(unreadable)
        raise NothingDoneError(f"no images ({suffixes}) in {', '.join(map(str, images))}; nothing written")

    encoders = load_engine(bundle, backend=backend, device=device, precision=precision) if (files or captions) else None
    try:
        if encoders is not None:
            click.echo(f"engine: {encoders.info.describe()}")
        # From reading the index to replacing it, no other writer may save it: its edits would be lost.
        with exclusive_lock(output, timeout=lock_timeout, on_wait=lambda message: click.echo(message, err=True)):
            _run(encoders, files, unreadable, images, output, storage, batch_size, detections, local_file, captions,
                 editing, removals, root, search, progress, detector, tiling, scene_extra, records_kind, ray_job,
                 not no_detector)
    finally:
        if encoders is not None:
            encoders.close()
    size = _size_text(output.stat().st_size)
    click.echo(f"wrote {printable(output)} ({size}) in {time.perf_counter() - started:.1f} s")


def _run(encoders: Any, files: list[Path], unreadable: list[SkippedImage], images: Sequence[Path], output: Path,
         storage: str | None, batch_size: int, detections: Path | None, local_file: Path | None,
         captions: list[str] | None, editing: bool, removals: list[str], root: Path | None, search: "SearchChoice",
         progress: bool, detector: Path | None = None, tiling: Any = None,
         scene_extra: dict[str, dict[str, Any]] | None = None, records_kind: str = "auto",
         ray_job: "RayJob | None" = None, use_bundled_detector: bool = True) -> None:
    """Load or build the index, apply the edits and save it (the body of :func:`main`)."""
    index = None
    if editing:
        index = load_index(output, expected_model_hash=encoders.model_hash if encoders is not None else None)
        if storage is not None and storage != index.storage:
            raise InputError(f"{output} stores {index.storage} embeddings; to change to {storage} rebuild it: "
                             f"galr-index IMAGES --storage {storage} -o {output}")
        if removals:
            index.remove(removals)
            click.echo(f"removed {_count(len(set(removals)), 'image')}")

    if files:
        local = _local_input(detections, local_file, encoders, detector,
                             use_bundled_detector and ray_job is None)  # Ray workers: detections files only
        image_root = _image_root(images, root, index)
        if ray_job is not None:
            from galr.runtime.index.distributed import build_index_on_ray

            index, skipped = build_index_on_ray(
                ray_job.bundle, files, output, ray_job.settings, model_hash=encoders.model_hash,
                embed_dim=encoders.embed_dim, root=None if image_root is None else str(image_root),
                local=None if detections is None else str(detections), backend=ray_job.backend, device=ray_job.device,
                precision=ray_job.precision, storage=storage or "fp32", searcher=search.kind or "auto",
                searcher_params=search.settings, log=click.echo, progress=progress)
            without: set[str] = set()
            indexed, replaced = len(index), 0
        elif tiling is not None:
            (records, embeddings, skipped), without = _encode_quietly(
                _encode_with_scenes, encoders, files, tiling, local, batch_size, progress, image_root, scene_extra)
            if index is None:
                index = new_index(encoders, len(records), storage or "fp32", image_root, search.kind or "auto",
                                  search.settings)
            indexed, replaced = len(records), sum(record.id in index for record in records)
            if records:
                index.add(records, embeddings, replace=True)
        elif index is None:
            (index, skipped), without = _encode_quietly(build_index, encoders, files, local, batch_size,
                                                        storage or "fp32", progress, image_root,
                                                        search.kind or "auto", search.settings)
            indexed, replaced = len(index), 0
        else:
            (records, embeddings, skipped), without = _encode_quietly(
                encode_image_files, encoders, files, local, batch_size, progress, image_root)
            indexed, replaced = len(records), sum(record.id in index for record in records)
            if records:
                index.add(records, embeddings, replace=True)
        skipped = unreadable + skipped
        _report_skipped(skipped)
        if indexed == 0:
            raise NothingDoneError(f"none of the {len(files)} images or scenes gave anything to index (unreadable, "
                                   "or scenes of nodata only); nothing written")
        if local is None:
            click.echo("note: no --detections, --local or --detector given, so every image uses the no-detection fallback "
                       "(all-zero local features)")
        elif without:
            click.echo(f"note: {_count(len(without), 'image')} had no usable detections (all-zero local features)")
        click.echo(f"indexed {_count(indexed, 'image')} ({indexed - replaced} new, {replaced} replaced), "
                   f"skipped {len(skipped)}")

    if editing and (search.kind not in (None, index.images.kind) or search.settings):
        kind = resolve_searcher_kind(search.kind or index.images.kind, len(index))
        index.change_searcher(kind, **search.settings)
        click.echo(f"search: {kind} (moved {_count(len(index), 'image')})")
    if captions is not None:
        try:
            index.add_text_bank(captions, encoders.encode_text(captions), replace=True)
        except QueryError as exc:
            raise InputError(f"text bank: {exc}") from None
        click.echo(f"text bank: {_count(len(captions), 'caption')}")
    index.save(output, records=records_kind)
    if ray_job is not None:
        from galr.runtime.index.distributed import remove_shard_folder

        remove_shard_folder(Path(f"{output}.shards"))  # saved: the shards are no longer needed
    from galr.runtime.index.records_sqlite import SqliteRecordStore

    where = "records in SQLite beside it" if isinstance(index.record_store, SqliteRecordStore) or (
        records_kind == "sqlite") else "records inside"
    click.echo(f"index: {_count(len(index), 'image')}, {index.storage}, {index.images.kind} search, "
               f"text bank {_count(len(index.text_bank_texts), 'caption')}, {where}")


__all__ = ["main"]
