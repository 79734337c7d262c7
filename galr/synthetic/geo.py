"""Large geo-referenced synthetic scenes with SeLo ground truth, for galr-locate and scene indexing.

A scene is a mosaic of synthetic chips (:func:`~galr.synthetic.scenes.render_scene`, the same
renderer as the retrieval benchmark), written as a tiled GeoTIFF on a real projected CRS (UTM) with
an acquisition date tag. For every query one chip content (a :class:`SceneSpec`) is planted at
``placements`` places; the query is one of its generated captions and its ground-truth regions are
those chips' squares. The annotations file is the authors' SeLo format
(``[{caption, jpg_name, points}]``), so ``galr-locate --annotations`` scores Rsu, Ras, Rda and Rmi.

The scene is written one row of chips at a time: memory does not grow with the scene.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galr.atomic import write_text_atomically
from galr.errors import InputError
from galr.geo.scene import require_rasterio
from galr.synthetic.captions import generate_captions
from galr.synthetic.scenes import SceneConfig, render_scene, sample_scene


@dataclass(frozen=True)
class GeoSceneConfig:
    """What :func:`generate_geo_scenes` makes.

    Attributes:
        scenes: how many scenes.
        size: scene side in pixels (a multiple of ``chip * target_chips``).
        chip: side of each synthetic background chip in pixels.
        target_chips: side of a planted target in chips (2: a 512 px target among 256 px chips, about the
            size of the SeLo windows and of AIR-SLT's regions relative to their scenes).
        queries: annotated queries per scene.
        placements: where each query's content is planted (its ground-truth regions).
        gsd: metres per pixel.
        crs: a projected CRS in metres (default UTM 33N).
        origin: map coordinates of the first scene's top-left corner; later scenes sit to its east.
        date: acquisition time written into the file's tags.
        seed: master seed.
    """

    scenes: int = 2
    size: int = 4096
    chip: int = 256
    target_chips: int = 2
    queries: int = 3
    placements: int = 2
    gsd: float = 0.5
    crs: str = "EPSG:32633"
    origin: tuple[float, float] = (500_000.0, 4_983_000.0)
    date: str = "2024-05-01T10:30:00"
    seed: int = 0

    def __post_init__(self) -> None:
        block = self.chip * self.target_chips
        if self.chip < 32 or self.target_chips < 1 or self.size < block or self.size % block:
            raise InputError(f"size ({self.size}) must be a multiple of chip x target_chips ({block}), chip at least 32")
        blocks = (self.size // block) ** 2
        if self.scenes < 1 or self.queries < 1 or self.placements < 1 or self.queries * self.placements > blocks:
            raise InputError(f"need scenes, queries and placements >= 1 and queries x placements <= {blocks} targets")


def _plant(rng: np.random.Generator, config: GeoSceneConfig) -> tuple[list[Any], dict[int, int]]:
    """The planted specs and which target block shows which of them."""
    blocks = (config.size // (config.chip * config.target_chips)) ** 2
    specs = [sample_scene(rng, SceneConfig(salient_groups=(2, 3), distractor_groups=(0, 0)))
             for _ in range(config.queries)]
    chosen = rng.choice(blocks, size=config.queries * config.placements, replace=False)
    planted = {int(block): number // config.placements for number, block in enumerate(chosen)}
    return specs, planted


def generate_geo_scenes(root: str | Path, config: GeoSceneConfig | None = None, progress: bool = True) -> Path:
    """Write ``config.scenes`` GeoTIFFs and ``anno.json`` (SeLo format) under ``root``; returns the annotations path."""
    from rasterio.transform import from_origin
    from tqdm import tqdm

    rasterio = require_rasterio()
    config = config or GeoSceneConfig()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    per_side = config.size // config.chip
    annotations = []
    with tqdm(total=config.scenes * per_side * per_side, unit="chip", desc="rendering scenes",
              disable=not progress) as bar:
        for number in range(config.scenes):
            name = f"geo_scene_{number:02d}.tif"
            specs, planted = _plant(rng, config)
            target = config.chip * config.target_chips
            blocks_per_side = config.size // target
            planted_pictures = [np.asarray(render_scene(spec, target)) for spec in specs]
            east = config.origin[0] + number * config.size * config.gsd * 1.25
            profile = {"driver": "GTiff", "width": config.size, "height": config.size, "count": 3, "dtype": "uint8",
                       "crs": config.crs, "transform": from_origin(east, config.origin[1], config.gsd, config.gsd),
                       "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
            with rasterio.open(root / name, "w", **profile) as dataset:
                dataset.update_tags(TIFFTAG_DATETIME=config.date.replace("-", ":").replace("T", " "))
                for row in range(per_side):
                    strip = np.zeros((config.chip, config.size, 3), np.uint8)
                    for col in range(per_side):
                        block_row, block_col = row // config.target_chips, col // config.target_chips
                        block = block_row * blocks_per_side + block_col
                        if block in planted:  # this chip's share of the planted target
                            y0 = (row % config.target_chips) * config.chip
                            x0 = (col % config.target_chips) * config.chip
                            picture = planted_pictures[planted[block]][y0:y0 + config.chip, x0:x0 + config.chip]
                        else:
                            picture = np.asarray(render_scene(sample_scene(rng), config.chip))
                        strip[:, col * config.chip:(col + 1) * config.chip] = picture
                        bar.update(1)
                    window = rasterio.windows.Window(0, row * config.chip, config.size, config.chip)
                    dataset.write(strip.transpose(2, 0, 1), window=window)
            for query, spec in enumerate(specs):
                regions = []
                for block in (block for block, which in planted.items() if which == query):
                    x0, y0 = (block % blocks_per_side) * target, (block // blocks_per_side) * target
                    x1, y1 = x0 + target, y0 + target
                    regions.append([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
                caption = generate_captions(spec, rng, 1, specificity=1.0)[0]
                annotations.append({"caption": caption, "jpg_name": name, "points": regions})
    path = root / "anno.json"
    write_text_atomically(path, json.dumps(annotations, indent=1) + "\n")
    write_text_atomically(root / "geo_scenes.json", json.dumps(asdict(config), indent=1) + "\n")
    return path


__all__ = ["GeoSceneConfig", "generate_geo_scenes"]
