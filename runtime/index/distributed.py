"""Indexing on a Ray cluster with Ray Data: shards of images encoded by a pool of actors, resumable.

The images are cut into shards of ``shard_size`` in path order. Ray Data runs one row per shard
through a pool of actors that each load the encoders once; an actor encodes its shard and writes it
itself, atomically, as ``shard-00042.npz`` in the shard folder (embeddings, records, skipped images,
and the shard's own key). A shard file that exists and carries its key is done: a job that is
killed, or loses a worker, is started again with the same command and encodes only the shards
that are missing (Ray also restarts lost actors and retries their shard within one run). When every
shard is there, the index is built from the shards in order and the shard folder is removed.

The folder's ``job.json`` names the model, the image list and the settings: a folder left by
another job is refused, never mixed in. The image files (and the bundle) must be readable at the
same paths on every node: a shared filesystem, or the same copy everywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from galr.atomic import write_bytes_atomically, write_text_atomically
from galr.console import process_defaults
from galr.errors import InputError, NotFoundError, UnavailableError
from galr.runtime.index.build import SkippedImage, image_id, new_index
from galr.runtime.index.records import ImageRecord

JOB_FILE = "job.json"
INSTALL_HINT = "pip install 'galr[ray]' (Ray Data)"


@dataclass(frozen=True)
class DistributedSettings:
    """How an index is built on Ray.

    Attributes:
        address: the Ray head (``HOST:PORT``); ``"local"`` starts Ray on this machine.
        workers: encoder actors in the pool (each loads the engine once).
        cpus_per_worker: CPUs Ray reserves per actor.
        shard_size: images per shard (the unit of work and of resumption).
        batch_size: images per encoder call inside a shard.
    """

    address: str = "local"
    workers: int = 2
    cpus_per_worker: float = 1.0
    shard_size: int = 256
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.address != "local":
            from galr.runtime.ray_cluster import check_address_form

            check_address_form(self.address)
        if self.workers < 1 or self.shard_size < 1 or self.batch_size < 1 or self.cpus_per_worker <= 0:
            raise InputError("workers, shard_size and batch_size must be at least 1 and cpus_per_worker positive")


def _job(model_hash: str, paths: Sequence[Path], shard_size: int, root: str | None, local: str | None) -> dict:
    listing = hashlib.sha256("\n".join(os.path.abspath(p) for p in paths).encode()).hexdigest()
    return {"format": "galr-index-shards", "version": 1, "model_hash": model_hash, "images": len(paths),
            "images_sha256": listing, "shard_size": shard_size, "root": root, "local": local}


def shard_key(job: dict, number: int) -> str:
    """What a finished shard file must carry to count as this job's shard ``number``."""
    return hashlib.sha256(f"{job['images_sha256']}:{job['model_hash']}:{job['shard_size']}:{number}".encode()
                          ).hexdigest()[:24]


def shard_path(folder: Path, number: int) -> Path:
    return folder / f"shard-{number:05d}.npz"


def read_shard(path: Path, key: str) -> tuple[list[ImageRecord], np.ndarray, list[SkippedImage]] | None:
    """A finished shard, or ``None`` when it is missing, damaged or another job's."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            records = [ImageRecord.from_dict(item) for item in json.loads(str(data["records"]))]
            skipped = [SkippedImage(*item) for item in json.loads(str(data["skipped"]))]
            embeddings = data["embeddings"].astype(np.float32)
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile):
        return None
    if len(records) != len(embeddings):
        return None
    return records, embeddings, skipped


def write_shard(path: Path, key: str, records: Sequence[ImageRecord], embeddings: np.ndarray,
                skipped: Sequence[SkippedImage]) -> None:
    """Write a shard atomically: it exists complete or not at all."""
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), embeddings=np.asarray(embeddings, np.float32),
             records=np.array(json.dumps([record.to_dict() for record in records])),
             skipped=np.array(json.dumps([[item.path, item.reason] for item in skipped])))
    write_bytes_atomically(path, buffer.getvalue())


def prepare_shard_folder(folder: Path, job: dict) -> None:
    """Create the folder for ``job``, or accept the one a previous run of the same job left.

    Raises:
        InputError: the folder holds another job's shards (another model, image list or setting).
    """
    found = folder / JOB_FILE
    if found.is_file():
        try:
            previous = json.loads(found.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous != job:
            differs = sorted(k for k in job if not isinstance(previous, dict) or previous.get(k) != job[k])
            raise InputError(f"{folder} holds shards of another indexing job (it differs in {differs}); remove the "
                             "folder, or run the job it belongs to")
        return
    if folder.exists() and any(folder.iterdir()):
        raise InputError(f"{folder} exists and is not a shard folder of galr-index --ray; remove it or choose "
                         "another output")
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(found, json.dumps(job, indent=1) + "\n")


class ShardEncoder:
    """The Ray Data actor: loads the engine once, then encodes and writes one shard per row."""

    def __init__(self, bundle: str, folder: str, job: dict, backend: str, device: str, precision: str,
                 batch_size: int, threads: int = 0) -> None:
        import warnings

        from galr.preprocess.drea import NoDetectionsWarning
        from galr.runtime.backends.onnxruntime import OnnxRuntimeOptions
        from galr.runtime.encoders import load_engine

        warnings.filterwarnings("ignore", category=NoDetectionsWarning)  # counted by the shard, not printed
        # ONNX Runtime would start one thread per core in every actor; several actors on a node then
        # fight over the cores. Each takes the CPUs Ray reserved for it.
        self.encoders = load_engine(bundle, backend=backend, device=device, precision=precision,
                                    options=[OnnxRuntimeOptions(intra_op_threads=threads)])
        self.folder, self.job, self.batch_size = Path(folder), job, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from galr.runtime.index.build import encode_image_files

        numbers, counts = [], []
        for number, listing in zip(batch["shard"], batch["paths"]):
            number = int(number)
            paths = [Path(p) for p in json.loads(str(listing))]
            records, embeddings, skipped = encode_image_files(self.encoders, paths, self.job["local"],
                                                              self.batch_size, False, self.job["root"])
            write_shard(shard_path(self.folder, number), shard_key(self.job, number), records, embeddings, skipped)
            numbers.append(number)
            counts.append(len(records))
        return {"shard": np.array(numbers, np.int64), "count": np.array(counts, np.int64)}


def build_index_on_ray(bundle: str | os.PathLike, image_paths: Sequence[str | os.PathLike], output: str | os.PathLike,
                       settings: DistributedSettings, *, model_hash: str, embed_dim: int, root: str | None = None,
                       local: str | None = None, backend: str = "auto", device: str = "auto",
                       precision: str = "auto", storage: str = "fp32", searcher: str = "auto",
                       searcher_params: dict | None = None, shard_folder: str | os.PathLike | None = None,
                       log: Callable[[str], None] = print, progress: bool = True) -> tuple[Any, list[SkippedImage]]:
    """Encode ``image_paths`` on Ray (see the module docstring) and return the index and the skipped images.

    Args:
        bundle: the bundle every worker loads.
        image_paths: the images (readable at these paths on every node).
        output: where the index will be saved (the shard folder defaults to ``<output>.shards``).
        settings: address, pool and shard size.
        model_hash, embed_dim: the bundle's (checked by the workers' engines too).
        root: image ids are relative to it.
        local: a folder of detection files for DREA (``None``: the no-detection fallback).

    Raises:
        UnavailableError: Ray Data is not installed, or nothing answers at ``settings.address``.
        InputError: the shard folder belongs to another job.
    """
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UnavailableError(f"galr-index --ray needs Ray Data: {INSTALL_HINT}") from None
    if settings.address != "local":
        from galr.runtime.ray_cluster import check_address

        check_address(settings.address)
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise NotFoundError("no images to index")
    ids = [image_id(p, root) for p in paths]  # a path outside the root fails here, before Ray starts
    if len(set(ids)) != len(ids):
        raise InputError("some image ids occur twice; each image may be indexed once")
    folder = Path(shard_folder) if shard_folder is not None else Path(f"{output}.shards")
    job = _job(model_hash, paths, settings.shard_size, None if root is None else os.path.abspath(root),
               None if local is None else os.path.abspath(local))
    prepare_shard_folder(folder, job)
    shards = [paths[start:start + settings.shard_size] for start in range(0, len(paths), settings.shard_size)]
    pending = [n for n in range(len(shards)) if read_shard(shard_path(folder, n), shard_key(job, n)) is None]
    log(f"ray: {len(shards)} shards of up to {settings.shard_size} images, {len(shards) - len(pending)} already "
        f"done, {len(pending)} to encode with {settings.workers} worker(s)")
    if pending:
        _run_pending(ray, shards, pending, folder, job, settings, str(bundle), backend, device, precision, log,
                     progress)
    index = new_index(_Model(model_hash, embed_dim), len(paths), storage, root, searcher, searcher_params)
    skipped: list[SkippedImage] = []
    for number in range(len(shards)):
        found = read_shard(shard_path(folder, number), shard_key(job, number))
        if found is None:
            raise UnavailableError(f"shard {number} is missing after the Ray job; run the same command again to "
                                   "encode what is missing")
        records, embeddings, missed = found
        if records:
            index.add(records, embeddings)
        skipped += missed
    return index, skipped


@dataclass(frozen=True)
class _Model:
    """What :func:`new_index` needs of the encoders when the engine runs elsewhere."""

    model_hash: str
    embed_dim: int
    info: Any = None


def _run_pending(ray: Any, shards: list[list[Path]], pending: list[int], folder: Path, job: dict,
                 settings: DistributedSettings, bundle: str, backend: str, device: str, precision: str,
                 log: Callable[[str], None], progress: bool) -> None:
    from tqdm import tqdm

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=settings.address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        rows = [{"shard": n, "paths": json.dumps([str(p) for p in shards[n]])} for n in pending]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        encoded = dataset.map_batches(
            ShardEncoder, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(settings.workers, len(rows))),
            num_cpus=settings.cpus_per_worker, runtime_env={"env_vars": process_defaults()},
            fn_constructor_kwargs={"bundle": bundle, "folder": str(folder), "job": job, "backend": backend,
                                   "device": device, "precision": precision, "batch_size": settings.batch_size,
                                   "threads": max(1, round(settings.cpus_per_worker))})
        total = sum(len(shards[n]) for n in pending)
        with tqdm(total=total, unit="img", desc="indexing on ray", disable=not progress) as bar:
            for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(int(sum(len(shards[int(n)]) for n in batch["shard"])))
    finally:
        if started_here:
            ray.shutdown()


def remove_shard_folder(folder: Path) -> None:
    """Remove a finished job's shards (after the index is saved)."""
    for item in folder.glob("shard-*.npz"):
        item.unlink(missing_ok=True)
    (folder / JOB_FILE).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # something else was put there: left alone


__all__ = ["DistributedSettings", "ShardEncoder", "build_index_on_ray", "prepare_shard_folder", "read_shard",
           "remove_shard_folder", "shard_key", "shard_path", "write_shard"]
