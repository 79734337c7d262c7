"""Memory bounds: what many queries and large images cost at peak, each measured in its own process.

==============  ===========================================================================================
case            what runs (a fresh Python process each; peak = its ``VmHWM``)
==============  ===========================================================================================
queries         ``galr-run`` over N text queries (MR on) against an index whose text bank has
                ``text_bank`` captions: peak memory must not grow with N (the retriever works in blocks)
bands TIFF      ``load_image`` of a small TIFF that declares ``tiff_bands`` 16-bit bands of
                ``tiff_side``\\ ² pixels: refused from its header, before decoding
large PNGs      ``Encoders.encode_images`` of ``png_count`` PNGs of ``png_side``\\ ² pixels in one batch: one
                image is decoded at a time, so the peak is about one decoded image above the model's own
==============  ===========================================================================================

The model is the benchmark's random-weight bundle; the text bank holds random unit vectors (memory
does not depend on their values). Peaks include the Python process, numpy and ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galr.bench.harness import STATUS_OK, Log, not_run, stopwatch


@dataclass(frozen=True)
class BoundsSettings:
    """Sizes of the memory-bound cases (see the module docstring)."""

    query_counts: tuple[int, ...] = (100, 10_000)
    text_bank: int = 10_000
    gallery: int = 2_000
    tiff_side: int = 4096
    tiff_bands: int = 64
    png_side: int = 12_000
    png_count: int = 4
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PEAK = textwrap.dedent("""
    import atexit, sys
    from galr.bench.harness import peak_bytes
    _peak_file = sys.argv.pop(1)
    atexit.register(lambda: open(_peak_file, "w").write(str(peak_bytes())))
""")


def _peak_of(code: str, *args: str) -> tuple[int | None, str]:
    """Run ``code`` in a fresh interpreter; its peak resident bytes, and its stderr's last line."""
    with tempfile.NamedTemporaryFile("r", suffix=".peak") as peak_file:
        completed = subprocess.run([sys.executable, "-c", _PEAK + code, peak_file.name, *args],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        text = Path(peak_file.name).read_text().strip()
    last = (completed.stderr.strip().splitlines() or [""])[-1]
    return (int(text) if text else None), last


def write_random_index(bench: Any, folder: Path, gallery: int, text_bank: int, seed: int) -> Path:
    """An index for the benchmark bundle: ``gallery`` random unit embeddings and a text bank of
    ``text_bank`` in-vocabulary captions with random unit embeddings (memory and speed do not
    depend on their values)."""
    from galr.bench.encoders import synthetic_queries
    from galr.bundle import read_bundle
    from galr.runtime.index import GalleryIndex, ImageRecord

    bundle = read_bundle(bench.bundle)
    dim = bundle.config.embed_dim
    rng = np.random.default_rng(seed)

    def unit(rows: int) -> np.ndarray:
        x = rng.standard_normal((rows, dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    index = GalleryIndex(bundle.model_hash, dim, "fp32")
    index.add([ImageRecord(f"tile_{i:06d}.png", f"/archive/tile_{i:06d}.png", 256, 256)
               for i in range(gallery)], unit(gallery))
    captions = synthetic_queries(bench.vocab, text_bank, 8, seed)
    index.add_text_bank(captions, unit(text_bank))
    return index.save(folder / "bank.gidx")


_RUN = textwrap.dedent("""
    sys.argv = ["galr-run", *sys.argv[1:]]
    from galr.console import galr_run
    galr_run()
""")


def measure_queries(bench: Any, folder: Path, settings: BoundsSettings, log: Log) -> list[dict[str, Any]]:
    from galr.bench.encoders import synthetic_queries

    index = write_random_index(bench, folder, settings.gallery, settings.text_bank, settings.seed)
    rows = []
    for count in settings.query_counts:
        queries = folder / f"queries_{count}.txt"
        queries.write_text("\n".join(synthetic_queries(bench.vocab, count, 12, settings.seed + count)) + "\n")
        log(f"bounds: galr-run over {count} queries, text bank {settings.text_bank}")
        elapsed = stopwatch()
        peak, last = _peak_of(_RUN, str(queries), "--engine", str(bench.bundle), "--index", str(index),
                              "--backend", "onnxruntime", "--device", "cpu", "--precision", "fp32")
        rows.append({"queries": count, "text_bank": settings.text_bank, "gallery": settings.gallery,
                     "peak_mb": None if peak is None else peak / 2**20, "seconds": round(elapsed(), 1),
                     **({"status": STATUS_OK} if peak is not None else not_run(f"galr-run failed: {last}"))})
    return rows


_TIFF = textwrap.dedent("""
    from galr.preprocess.image import ImageLoadError, load_image
    try:
        load_image(sys.argv[1])
        print("accepted", file=sys.stderr)
    except ImageLoadError as exc:
        print("refused: " + str(exc), file=sys.stderr)
""")


def measure_tiff(folder: Path, settings: BoundsSettings, log: Log) -> dict[str, Any]:
    try:
        import tifffile
    except ImportError:
        return not_run("tifffile is not installed (pip install 'galr[tiff]')")
    side, bands = settings.tiff_side, settings.tiff_bands
    path = folder / "bands.tif"
    tile = np.zeros((256, 256, bands), np.uint16)
    tiles = (tile for _ in range((side // 256) ** 2))
    tifffile.imwrite(path, data=tiles, shape=(side, side, bands), dtype=np.uint16, tile=(256, 256),
                     compression="zlib", planarconfig="contig")
    log(f"bounds: load_image of a {side}x{side} TIFF of {bands} 16-bit bands ({path.stat().st_size / 2**20:.1f} MiB)")
    peak, last = _peak_of(_TIFF, str(path))
    return {"status": STATUS_OK, "side": side, "bands": bands, "file_mb": path.stat().st_size / 2**20,
            "decoded_mb": side * side * bands * 2 / 2**20, "peak_mb": None if peak is None else peak / 2**20,
            "outcome": last}


_PNGS = textwrap.dedent("""
    import warnings
    from galr.runtime.encoders import load_engine
    encoders = load_engine(sys.argv[1], backend="onnxruntime", device="cpu", precision="fp32")
    if len(sys.argv) > 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoders.encode_images(sys.argv[2:])
""")


def measure_pngs(bench: Any, folder: Path, settings: BoundsSettings, log: Log) -> dict[str, Any]:
    from PIL import Image

    side = settings.png_side
    paths = []
    for number in range(settings.png_count):
        path = folder / f"large_{number}.png"
        Image.new("RGB", (side, side), (40 * number, 90, 60)).save(path)
        paths.append(str(path))
    log(f"bounds: encode_images of {len(paths)} PNGs of {side}x{side} in one batch")
    baseline, _ = _peak_of(_PNGS, str(bench.bundle))
    peak, last = _peak_of(_PNGS, str(bench.bundle), *paths)
    decoded = side * side * 3
    return {"status": STATUS_OK if peak is not None else "not run", "side": side, "count": len(paths),
            "file_mb": sum(Path(p).stat().st_size for p in paths) / 2**20, "decoded_mb_each": decoded / 2**20,
            "model_peak_mb": None if baseline is None else baseline / 2**20,
            "peak_mb": None if peak is None else peak / 2**20, "error": None if peak is not None else last}


def run_bounds_benchmarks(bench: Any | None, settings: BoundsSettings, log: Log) -> dict[str, Any]:
    """The ``bounds`` section (needs the benchmark model for the query and PNG cases)."""
    if bench is None:
        return not_run("the encoder section's model was not built (encoders not selected)")
    elapsed = stopwatch()
    with tempfile.TemporaryDirectory(prefix="galr-bench-bounds-") as work:
        folder = Path(work)
        section = {"status": STATUS_OK, "settings": settings.to_dict(),
                   "queries": measure_queries(bench, folder, settings, log),
                   "tiff": measure_tiff(folder, settings, log),
                   "pngs": measure_pngs(bench, folder, settings, log)}
    section["seconds"] = round(elapsed(), 1)
    return section


__all__ = ["BoundsSettings", "run_bounds_benchmarks", "write_random_index"]
