"""Indexing scenes: every tile of every scene becomes a record with its place, encoded in batches.

Reading and preprocessing run one batch ahead of the encoder on a reader thread (the encoder
releases the GIL while it runs), so a scene is indexed at the encoder's speed. One scene is open
at a time and one batch of tiles is in memory at a time: peak memory does not depend on scene size.

>>> records, embeddings, report = encode_scene_files(encoders, ["s2.tif"], SceneTiling(TileSettings((256,), 64)))
"""  # noqa: E501

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from galr.errors import InputError
from galr.geo.scene import PixelWindow, Scene, SceneError, SceneReadSettings
from galr.geo.tiling import (
    TileSettings,
    clip_detections,
    count_tiles,
    scene_metadata,
    tile_geo_fields,
    tile_id,
    tile_windows,
)
from galr.runtime.index.build import SkippedImage, image_id
from galr.runtime.index.records import ImageRecord
from galr.runtime.index.vectors import checked_vectors


@dataclass(frozen=True)
class SceneTiling:
    """How scenes are indexed: the tiling and the pixel rules."""

    tiles: TileSettings = field(default_factory=TileSettings)
    read: SceneReadSettings = field(default_factory=SceneReadSettings)


@dataclass
class SceneReport:
    """What happened to the tiles: counted, never silent."""

    scenes: int = 0
    tiles: int = 0
    nodata_tiles: int = 0
    skipped: list[SkippedImage] = field(default_factory=list)

    @property
    def unreadable_tiles(self) -> int:
        return sum(1 for item in self.skipped if "@" in item.path)


@dataclass
class _Batch:
    records: list[ImageRecord]
    pixels: list[np.ndarray]
    detections: list[Any]


def _scene_detections(local: Any, path: Path, scene: Scene) -> Any:
    """The whole-scene detections for ``path`` from a detections folder (``None`` when it has none):
    ``<stem>.geojson`` in map coordinates first, else ``<stem>.json``/``.txt`` in scene pixels."""
    if not isinstance(local, (str, os.PathLike)):
        return None
    from galr.preprocess.detections import find_detection_file, read_detections

    geojson = Path(local) / f"{path.stem}.geojson"
    if geojson.is_file():
        from galr.geo.detections import read_geojson_detections

        return read_geojson_detections(geojson, scene)
    found = find_detection_file(local, path)
    return read_detections(found) if found is not None else None


def _tiles(paths: Sequence[Path], tiling: SceneTiling, root: Any, local: Any, batch_size: int,
           report: SceneReport, scene_extra: Mapping[str, Mapping[str, Any]]) -> Iterator[_Batch]:
    """Batches of read tiles, scene after scene (runs on the reader thread)."""
    from galr.preprocess.detections import DetectionSet

    batch = _Batch([], [], [])
    for path in paths:
        scene_name = image_id(path, root)
        try:
            scene = Scene.open(path, tiling.read)
        except (SceneError, OSError) as exc:
            report.skipped.append(SkippedImage(str(path), str(exc)))
            continue
        with scene:
            report.scenes += 1
            try:
                whole = _scene_detections(local, path, scene)
            except InputError as exc:  # a bad detections file loses its scene, not the run
                report.skipped.append(SkippedImage(str(path), f"detections: {exc}"))
                continue
            shared = {"scene": scene_name, **scene_metadata(scene), **scene_extra.get(os.path.abspath(path), {})}
            windows = list(tile_windows(scene.width, scene.height, tiling.tiles))
            places = tile_geo_fields(scene, [window for _, window in windows])
            for (size, window), place in zip(windows, places):
                name = tile_id(scene_name, size, window)
                try:
                    pixels, valid = scene.read_window(window, pad_to=size)
                except SceneError as exc:
                    report.skipped.append(SkippedImage(f"{path}@{size}:{window.col},{window.row}", str(exc)))
                    continue
                if valid < tiling.read.min_valid_fraction:
                    report.nodata_tiles += 1
                    continue
                report.tiles += 1
                record = ImageRecord(name, os.path.abspath(path), pixels.shape[1], pixels.shape[0],
                                     **place,
                                     extra={**shared, "window": window.as_list(), "tile": size})
                batch.records.append(record)
                batch.pixels.append(pixels)
                if whole is not None:
                    batch.detections.append(clip_detections(whole, window, (pixels.shape[1], pixels.shape[0]), name))
                elif isinstance(local, (str, os.PathLike)):
                    batch.detections.append(DetectionSet((), pixels.shape[1], pixels.shape[0], name))
                if len(batch.records) == batch_size:
                    yield batch
                    batch = _Batch([], [], [])
    if batch.records:
        yield batch


def prefetched(batches: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``batches`` on a reader thread, ``depth`` batches ahead; its errors surface here."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def reader() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        handoff.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            handoff.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who raises it
            handoff.put(exc)

    thread = threading.Thread(target=reader, name="galr-scene-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = handoff.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def encode_scene_files(encoders: Any, scene_paths: Sequence[str | os.PathLike], tiling: SceneTiling | None = None,
                       local: Any = None, batch_size: int = 32, progress: bool = True,
                       root: str | os.PathLike | None = None,
                       scene_extra: Mapping[str, Mapping[str, Any]] | None = None
                       ) -> tuple[list[ImageRecord], np.ndarray, SceneReport]:
    """Tile scenes and encode every tile into records (with place) and embeddings.

    Args:
        encoders: the :class:`~galr.runtime.encoders.Encoders`.
        scene_paths: GeoTIFF / COG files.
        tiling: tile sizes, overlap and pixel rules.
        local: DREA input: a folder of whole-scene detection files named like the scenes (scene
            pixel coordinates; clipped into each tile), a detector (run on each tile), or ``None``.
        batch_size: tiles per encoder call.
        progress: a tqdm bar of tiles on stderr.
        root: scene ids are paths relative to this folder.
        scene_extra: absolute scene path -> what its tiles record besides the scene's own facts (a
            STAC item's id and properties; they win over the file's tags).

    Returns:
        ``(records, embeddings, report)``; unreadable scenes and windows are in ``report.skipped``,
        tiles mostly nodata counted in ``report.nodata_tiles``.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    tiling = tiling or SceneTiling()
    paths = [Path(p) for p in scene_paths]
    report = SceneReport()
    total = 0
    for path in paths:  # headers only, for the progress bar's total
        try:
            with Scene.open(path, SceneReadSettings(bands=tiling.read.bands, stretch=None,
                                                    max_pixels=tiling.read.max_pixels)) as scene:
                total += count_tiles(scene.width, scene.height, tiling.tiles)
        except Exception:  # noqa: BLE001 - reported once, by the reader
            continue
    records: list[ImageRecord] = []
    parts: list[np.ndarray] = []
    detector = local if hasattr(local, "detect_one") else None
    with tqdm(total=total, unit="tile", desc="indexing scenes", disable=not progress, smoothing=0.1) as bar:
        for batch in prefetched(_tiles(paths, tiling, root, None if detector else local, batch_size, report,
                                         {os.path.abspath(k): v for k, v in (scene_extra or {}).items()})):
            drea = detector if detector is not None else (batch.detections or None)
            embeddings = encoders.encode_images(batch.pixels, local=drea)
            parts.append(checked_vectors(embeddings, len(batch.records), encoders.embed_dim,
                                         "encoders.encode_images output", unit_norm=True))
            records.extend(batch.records)
            bar.update(len(batch.records))
            bar.set_postfix(nodata=report.nodata_tiles, skipped=len(report.skipped), refresh=False)
        bar.update(max(0, total - bar.n))
    embeddings = np.concatenate(parts) if parts else np.zeros((0, encoders.embed_dim), np.float32)
    return records, embeddings, report


def read_record_pixels(record: Any, read: SceneReadSettings | None = None) -> np.ndarray | None:
    """The pixels of a tile record (8-bit RGB ``[h, w, 3]``), read from its scene; ``None`` for whole images.

    ``record`` is an :class:`ImageRecord` or its dict form. Raises :class:`SceneError` when the
    scene cannot be read any more.
    """
    extra = record.get("extra") if isinstance(record, dict) else record.extra
    if not extra or "window" not in extra:
        return None
    window = PixelWindow.from_list(extra["window"])
    with open_record_scene(record, read) as scene:
        return scene.read_window(window, pad_to=int(extra.get("tile", 0)) or None)[0]


def open_record_scene(record: Any, read: SceneReadSettings | None = None) -> Scene:
    """The scene of a tile record, opened with the bands and stretch it was indexed with (no overview read)."""
    extra = (record.get("extra") if isinstance(record, dict) else record.extra) or {}
    path = record.get("path") if isinstance(record, dict) else record.path
    bands = tuple(extra["bands"]) if extra.get("bands") else None
    return Scene.open(path, SceneReadSettings(bands=bands) if read is None else read,
                      stretch_range=extra.get("stretch"))


__all__ = ["SceneReport", "SceneTiling", "encode_scene_files", "open_record_scene", "prefetched", "read_record_pixels"]
