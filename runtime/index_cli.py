"""``galr-index``: build or edit a gallery index (``.gidx``) from image files (torch-free).

The command only parses arguments, opens files and reports; the work is in :mod:`galr.runtime.index`.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import click

from galr import paths
from galr.runtime.backends.base import RunnerError
from galr.runtime.encoders import QueryError, load_engine
from galr.runtime.index import (
    IMAGE_SUFFIXES,
    GalleryIndex,
    IndexFormatError,
    IndexModelMismatchError,
    SkippedImage,
    build_index,
    encode_image_files,
    iter_image_files,
    load_index,
    read_text_lines,
)

EXIT_OK = 0
EXIT_NOTHING_INDEXED = 1  # no image found, or every image failed; nothing was written
EXIT_INPUT = 2  # bad usage or a bad input file: bundle, index, local-feature file, text bank, ids

_MAX_REASONS = 20  # skipped images listed one per line; the rest are counted

_EPILOG = """\b
Examples:
  galr-index scenes/ --engine galr.plan --detections dets/ -o gallery.gidx
  galr-index new_scenes/ --update --text-bank captions.txt
  galr-index --remove harbour/0042.png --remove harbour/0043.png
\b
Exit codes:
  0  index written
  1  nothing indexed (no image found, or every image failed); nothing written
  2  bad usage or input: missing/corrupt bundle or index, index of another model,
     unreadable --local or --text-bank file, unknown ids to remove
"""


class InputError(click.ClickException):
    """A bad input file or value: printed without a traceback, exit code 2."""

    exit_code = EXIT_INPUT


def _collect_images(arguments: Sequence[Path]) -> list[Path]:
    """Image files named by IMAGES: folders are scanned recursively, files are taken as given."""
    files: list[Path] = []
    for argument in arguments:
        if argument.is_dir():
            files.extend(iter_image_files(argument))
        elif argument.is_file():
            files.append(argument)
        else:
            raise InputError(f"{argument}: no such image file or folder")
    return files


def _image_root(arguments: Sequence[Path], explicit: Path | None, index: GalleryIndex | None) -> Path | None:
    """The folder ids are relative to: --root, the index's own root, or the one folder given."""
    if explicit is not None:
        return explicit
    if index is not None and index.image_root is not None:
        return Path(index.image_root)
    if len(arguments) == 1 and arguments[0].is_dir():
        return arguments[0]
    return None


def _open_engine(bundle: Path, backend: str, device: str, precision: str) -> Any:
    from galr.runtime.backends.device import BackendUnavailableError
    from galr.runtime.bundle import BundleError

    if not bundle.is_file():
        raise InputError(f"no bundle at {bundle}: make one with `galr-export`, or pass --engine PATH")
    try:
        return load_engine(bundle, backend=backend, device=device, precision=precision)
    except (BundleError, BackendUnavailableError, FileNotFoundError) as exc:
        raise InputError(str(exc)) from None


def _local_input(detections: Path | None, local_file: Path | None, engine: Any) -> Any:
    """The DREA source handed to the encoder: a detections folder, a local-feature table or None."""
    if detections is not None:
        return detections
    if local_file is None:
        return None
    from galr.preprocess.local_file import LocalFileError, load_local_file

    drea = getattr(engine, "drea_config", None)
    shape = {"num_objects": drea.num_objects, "object_dim": drea.feature_dim} if drea is not None else {}
    try:
        return load_local_file(local_file, **shape)
    except (LocalFileError, FileNotFoundError) as exc:
        raise InputError(str(exc)) from None


def _read_captions(text_bank: Path) -> list[str]:
    try:
        captions = read_text_lines(text_bank)
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(str(exc)) from None
    if not captions:
        raise InputError(f"{text_bank} has no captions (one per line; blank lines and # comments are ignored)")
    return captions


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
        click.echo(f"  {item.reason if item.path in item.reason else f'{item.path}: {item.reason}'}", err=True)
    if len(skipped) > _MAX_REASONS:
        click.echo(f"  ... and {len(skipped) - _MAX_REASONS} more", err=True)


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


@click.command(name="galr-index", context_settings={"help_option_names": ["-h", "--help"]}, epilog=_EPILOG)
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--engine", "bundle", type=click.Path(path_type=Path), default=paths.DEFAULT_BUNDLE, show_default=True,
              help="The galr.plan bundle whose image encoder makes the embeddings.")
@click.option("--detections", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="Folder of detection files named like the images (<stem>.json or <stem>.txt).")
@click.option("--local", "local_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The authors' precomputed local-feature file (.npy) or a galr .npz.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=paths.DEFAULT_INDEX,
              show_default=True, help="The index file to write (or edit, with --update/--remove).")
@click.option("--storage", type=click.Choice(["fp32", "fp16"]), default=None,
              help="Embedding storage; fp16 halves memory and file size  [default: fp32; an existing index keeps its own]")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per engine call.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8"]), default="auto", show_default=True)
@click.option("--text-bank", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Captions (one per line, # comments) stored as the MR text bank, replacing any earlier bank.")
@click.option("--update", is_flag=True, help="Add IMAGES to the existing index, replacing images with the same id.")
@click.option("--remove", "remove_ids", multiple=True, metavar="ID",
              help="Remove this image id (repeat it; without --update, the IMAGES arguments are taken as ids too).")
@click.option("--root", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Image ids are paths relative to this folder  [default: the index's root, else the one IMAGES "
                   "folder, else the paths as given]")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def main(images: tuple[Path, ...], bundle: Path, detections: Path | None, local_file: Path | None, output: Path,
         storage: str | None, batch_size: int, backend: str, device: str, precision: str, text_bank: Path | None,
         update: bool, remove_ids: tuple[str, ...], root: Path | None, progress: bool) -> None:
    """Embed the images in IMAGES (folders are scanned for png/jpg/tif/bmp) into a gallery index.

    The index holds one embedding per image, the images' metadata, the model hash of the bundle
    (other models are refused when searching or updating) and the text bank MR reranks with.
    """
    if detections is not None and local_file is not None:
        raise click.UsageError("give --detections or --local, not both")
    removals = list(remove_ids)
    if removals and not update:
        removals += [argument.as_posix() for argument in images]  # `--remove ID ID ...`
        images = ()
    editing = update or bool(removals)
    if not editing and not images:
        raise click.UsageError("give IMAGES (a folder or image files) to index, or --update/--remove to edit an index")
    if update and not (images or text_bank or removals):
        raise click.UsageError("--update needs IMAGES to add, --text-bank or --remove")
    if editing and not output.is_file():
        raise InputError(f"no index at {output} to edit; build it first: galr-index IMAGES --engine {bundle} -o {output}")

    started = time.perf_counter()
    captions = _read_captions(text_bank) if text_bank is not None else None
    files = _collect_images(images)
    if images and not files:
        suffixes = ", ".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
        click.echo(f"galr-index: no images ({suffixes}) in {', '.join(map(str, images))}; nothing written", err=True)
        sys.exit(EXIT_NOTHING_INDEXED)

    engine = _open_engine(bundle, backend, device, precision) if (files or captions) else None
    try:
        if engine is not None:
            click.echo(f"engine: {engine.info.describe()} ({bundle})")
        _run(engine, files, images, output, storage, batch_size, detections, local_file, captions, editing,
             removals, root, progress)
    except RunnerError as exc:  # the bundle's graphs disagree with its manifest or this machine
        raise InputError(f"the engine of {bundle} failed: {exc}") from None
    finally:
        if engine is not None and hasattr(engine, "close"):
            engine.close()
    size = _size_text(output.stat().st_size)
    click.echo(f"wrote {output} ({size}) in {time.perf_counter() - started:.1f} s")


def _run(engine: Any, files: list[Path], images: Sequence[Path], output: Path, storage: str | None, batch_size: int,
         detections: Path | None, local_file: Path | None, captions: list[str] | None, editing: bool,
         removals: list[str], root: Path | None, progress: bool) -> None:
    """Load or build the index, apply the edits and save it (the body of :func:`main`)."""
    index = None
    if editing:
        try:
            index = load_index(output, expected_model_hash=engine.model_hash if engine is not None else None)
        except (IndexFormatError, IndexModelMismatchError, FileNotFoundError) as exc:
            raise InputError(str(exc)) from None
        if storage is not None and storage != index.storage:
            raise InputError(f"{output} stores {index.storage} embeddings; to change to {storage} rebuild it: "
                             f"galr-index IMAGES --storage {storage} -o {output}")
        if removals:
            try:
                index.remove(removals)
            except KeyError as exc:
                raise InputError(exc.args[0]) from None
            click.echo(f"removed {_count(len(set(removals)), 'image')}")

    if files:
        local = _local_input(detections, local_file, engine)
        image_root = _image_root(images, root, index)
        try:
            if index is None:
                (index, skipped), without = _encode_quietly(build_index, engine, files, local, batch_size,
                                                            storage or "fp32", progress, image_root)
                indexed, replaced = len(index), 0
            else:
                (records, embeddings, skipped), without = _encode_quietly(
                    encode_image_files, engine, files, local, batch_size, progress, image_root)
                indexed, replaced = len(records), sum(record.id in index for record in records)
                if records:
                    index.add(records, embeddings, replace=True)
        except (ValueError, NotADirectoryError) as exc:  # repeated ids, a path outside --root
            raise InputError(str(exc)) from None
        _report_skipped(skipped)
        if indexed == 0:
            click.echo(f"galr-index: none of the {len(files)} images could be indexed; nothing written", err=True)
            sys.exit(EXIT_NOTHING_INDEXED)
        if local is None:
            click.echo("note: no --detections or --local given, so every image uses the no-detection fallback "
                       "(all-zero local features)")
        elif without:
            click.echo(f"note: {_count(len(without), 'image')} had no usable detections (all-zero local features)")
        click.echo(f"indexed {_count(indexed, 'image')} ({indexed - replaced} new, {replaced} replaced), "
                   f"skipped {len(skipped)}")

    if captions is not None:
        try:
            index.add_text_bank(captions, engine.encode_text(captions), replace=True)
        except QueryError as exc:
            raise InputError(f"text bank: {exc}") from None
        click.echo(f"text bank: {_count(len(captions), 'caption')}")
    index.save(output)
    click.echo(f"index: {_count(len(index), 'image')}, {index.storage}, "
               f"text bank {_count(len(index.text_bank_texts), 'caption')}")


__all__ = ["EXIT_INPUT", "EXIT_NOTHING_INDEXED", "EXIT_OK", "main"]
