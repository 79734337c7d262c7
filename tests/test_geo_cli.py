"""Scenes end to end on a real (small, random-weight) bundle: galr-index --tile, galr-run --geojson/--bbox/--since,
the HTML scene overview, and galr-locate with its cache and SeLo metrics."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from galr.errors import NothingDoneError  # noqa: E402
from galr.runtime.cli.index import main as index_main  # noqa: E402
from galr.runtime.cli.locate import main as locate_main  # noqa: E402
from galr.runtime.cli.run import main as run_main  # noqa: E402
from galr.runtime.index import load_index  # noqa: E402
from tests.geo_fixtures import gradient_scene, rasterio, write_scene  # skips without rasterio
from tests.test_runtime_cli import deployment  # noqa: E402,F401  (the shared module fixture)


@pytest.fixture(scope="module")
def site(deployment, tmp_path_factory):  # noqa: F811
    """The small bundle (64 px model), a folder with a dated UTM scene, an undated scene with nodata, and a PNG."""
    root = tmp_path_factory.mktemp("geo")
    bundle = deployment["bundle"]
    scenes = root / "scenes"
    scenes.mkdir()
    dated = write_scene(scenes / "dated.tif", gradient_scene(320, 256, 4, "uint16", seed=1))
    with rasterio.open(dated, "r+") as dataset:
        dataset.update_tags(TIFFTAG_DATETIME="2024:05:01 10:30:00")
    holes = gradient_scene(256, 192, 3, "uint8", seed=2)
    holes[:, :, 128:] = 0
    write_scene(scenes / "holes.tif", holes, nodata=0, origin=(520_000.0, 4_983_000.0))
    from PIL import Image

    Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(scenes / "chip.png")
    queries = root / "q.txt"
    queries.write_text("two white planes\nmany ships in the harbor\n", encoding="utf-8")
    return {"root": root, "bundle": bundle, "scenes": scenes, "queries": queries}


def _invoke(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args])


def _index(site, name="archive.gidx", *extra):
    output = site["root"] / name
    result = _invoke(index_main, "--no-progress", site["scenes"], "--engine", site["bundle"], "--tile", "64",
                     "--overlap", "16", "-o", output, "--overwrite", *extra)
    assert result.exit_code == 0, result.output
    return output, result.output


def test_scenes_are_tiled_with_place_and_plain_images_are_indexed_whole(site):
    output, text = _index(site)
    index = load_index(output)
    records = {record.id: record for record in index.records}
    assert "chip.png" in records and records["chip.png"].footprint is None
    dated = [r for r in records.values() if r.id.startswith("dated.tif@64:")]
    assert len(dated) == 7 * 5  # 320 px: starts 0, 48, ..., 240 and 256 (the edge); 256 px: 0, 48, ..., 192
    tile = records["dated.tif@64:48,96"]
    assert tile.extra["window"] == [48, 96, 64, 64] and tile.extra["crs"] == "EPSG:32633"
    assert tile.extra["gsd"] == pytest.approx(0.5) and tile.extra["datetime"] == "2024-05-01T10:30:00"
    assert len(tile.footprint) == 5 and 44.99 < tile.lat < 45.0 and 15.0 < tile.lon < 15.01
    holes = [r for r in records.values() if r.id.startswith("holes.tif@")]
    assert holes and all(r.extra["window"][0] + 64 <= 128 + 32 for r in holes)  # mostly-nodata tiles left out
    assert "mostly-nodata tiles skipped" in text and "2 read" in text


def test_geojson_hits_and_a_bbox_filter_inside_the_search(site):
    output, _ = _index(site)
    geojson = site["root"] / "hits.geojson"
    result = _invoke(run_main, site["queries"], "--engine", site["bundle"], "--index", output, "--top-k", "5",
                     "--no-rerank", "--geojson", geojson, "--json", site["root"] / "hits.json")
    assert result.exit_code == 0, result.output
    collection = json.loads(geojson.read_text())
    hits = json.loads((site["root"] / "hits.json").read_text())["results"]
    assert len(collection["features"]) == sum(len(r["hits"]) for r in hits) == 10
    index = load_index(output)
    # a box around the western half of the dated scene only
    lons = [p[0] for r in index.records if r.id.startswith("dated") for p in r.footprint]
    lats = [p[1] for r in index.records if r.id.startswith("dated") for p in r.footprint]
    west, east = min(lons), min(lons) + (max(lons) - min(lons)) * 0.3
    bbox = f"{west},{min(lats)},{east},{max(lats)}"
    result = _invoke(run_main, site["queries"], "--engine", site["bundle"], "--index", output, "--top-k", "4",
                     "--no-rerank", "--bbox", bbox, "--json", site["root"] / "box.json")
    assert result.exit_code == 0, result.output
    boxed = json.loads((site["root"] / "box.json").read_text())["results"]
    allowed = {r.id for r in index.records if r.footprint and min(p[0] for p in r.footprint) <= east}
    assert 4 <= len(allowed) < len(index) and "images match" in result.output
    from galr.runtime.retriever import Retriever

    with Retriever.open(site["bundle"], output) as retriever:
        query = retriever.encoders.encode_text(["two white planes"])[0]
    scores = {r.id: float(v) for r, v in zip(index.records, index.image_vectors() @ query)}
    best = sorted(allowed, key=lambda i: -scores[i])[:4]
    assert [h["id"] for h in boxed[0]["hits"]] == best


def test_date_filters_and_an_empty_match_are_clear(site):
    output, _ = _index(site)
    result = _invoke(run_main, site["queries"], "--engine", site["bundle"], "--index", output, "--no-rerank",
                     "--since", "2024-05-01", "--until", "2024-05-01", "--json", site["root"] / "dated.json")
    assert result.exit_code == 0, result.output
    found = json.loads((site["root"] / "dated.json").read_text())["results"][0]["hits"]
    assert found and all(h["id"].startswith("dated.tif@") for h in found)
    result = _invoke(run_main, site["queries"], "--engine", site["bundle"], "--index", output, "--since", "2030-01-01")
    assert result.exit_code == NothingDoneError.exit_code and "no image" in result.output


def test_geojson_is_refused_for_an_index_without_places(site, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(site["scenes"] / "chip.png", plain / "chip.png")
    output = tmp_path / "plain.gidx"
    assert _invoke(index_main, "--no-progress", plain, "--engine", site["bundle"], "-o", output).exit_code == 0
    target = tmp_path / "h.geojson"
    result = _invoke(run_main, site["queries"], "--engine", site["bundle"], "--index", output, "--geojson", target)
    assert result.exit_code != 0 and "no georeferenced tiles" in result.output and not target.exists()


def test_the_contact_sheet_shows_tiles_their_place_and_the_scene_overview(site):
    output, _ = _index(site)
    page = site["root"] / "hits.html"
    result = _invoke(run_main, site["queries"], "--engine", site["bundle"], "--index", output, "--no-rerank",
                     "--html", page)
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert "<h2>Scenes</h2>" in text and "hit windows" in text and "image not found" not in text
    assert "44.99" in text  # latitudes of tiles


def test_a_truncated_scene_keeps_its_readable_tiles_and_lists_the_rest(site, tmp_path):
    folder = tmp_path / "cut"
    folder.mkdir()
    full = write_scene(folder / "cut.tif", gradient_scene(512, 512, 3, "uint8", seed=5))
    data = full.read_bytes()
    full.write_bytes(data[: len(data) * 2 // 3])
    output = tmp_path / "cut.gidx"
    result = _invoke(index_main, "--no-progress", folder, "--engine", site["bundle"], "--tile", "128", "-o", output)
    assert result.exit_code == 0, result.output
    assert "unreadable windows" in result.output and "skipped" in result.output
    indexed = len(load_index(output))
    assert 0 < indexed < 16


def test_update_adds_a_scene_to_an_archive(site, tmp_path):
    output, _ = _index(site, "update.gidx")
    before = len(load_index(output))
    extra = tmp_path / "more"
    extra.mkdir()
    write_scene(extra / "new.tif", gradient_scene(128, 128, 3, "uint8", seed=9), origin=(530_000.0, 4_983_000.0))
    result = _invoke(index_main, "--no-progress", extra / "new.tif", "--engine", site["bundle"], "--tile", "64",
                     "--update", "-o", output, "--root", extra)
    assert result.exit_code == 0, result.output
    assert len(load_index(output)) == before + 4


def test_locate_writes_a_georeferenced_map_an_overlay_regions_and_reuses_window_embeddings(site, tmp_path):
    scene = site["scenes"] / "dated.tif"
    out = tmp_path / "out"
    args = [scene, "--engine", site["bundle"], "--query", "two white planes", "--query", "many ships",
            "-o", out, "--scales", "64,128", "--cell", "8", "--no-progress"]
    first = _invoke(locate_main, *args)
    assert first.exit_code == 0, first.output
    assert "encoded in" in first.output
    report = json.loads((out / "locate.json").read_text())
    entry = report["scenes"][0]["queries"][0]
    heat = out / entry["heat"]
    with rasterio.open(heat) as dataset, rasterio.open(scene) as source:
        assert dataset.crs == source.crs and (dataset.width, dataset.height) == (40, 32)
        assert dataset.transform.a == pytest.approx(source.transform.a * 8)
        values = dataset.read(1)
    assert values.max() <= 1 and values.min() >= 0
    assert (out / entry["overlay"]).read_bytes()[:4] == b"\x89PNG"
    regions = json.loads((out / entry["regions_geojson"]).read_text())
    assert regions["features"] and regions["features"][0]["geometry"]["type"] == "Polygon"
    second = _invoke(locate_main, *args)
    assert second.exit_code == 0 and "from the cache" in second.output
    with rasterio.open(out / entry["heat"]) as dataset:
        np.testing.assert_array_equal(dataset.read(1), values)


def test_locate_scores_selo_annotations(site, tmp_path):
    scene = site["scenes"] / "dated.tif"
    annotations = tmp_path / "anno.json"
    annotations.write_text(json.dumps([{"caption": "two white planes\n", "jpg_name": "dated.tif",
                                        "points": [[[0, 0], [128, 0], [128, 128], [0, 128]]]}]))
    out = tmp_path / "selo"
    result = _invoke(locate_main, scene, "--engine", site["bundle"], "--annotations", annotations, "-o", out,
                     "--scales", "64,128", "--cell", "8", "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "locate.json").read_text())
    metrics = report["scenes"][0]["queries"][0]["selo"]
    assert set(metrics) == {"rsu", "ras", "rda", "rmi", "peaks"} and 0 <= metrics["rmi"] <= 1
    assert report["selo_mean"]["samples"] == 1
    missing = tmp_path / "other.json"
    missing.write_text(json.dumps([{"caption": "x", "jpg_name": "absent.tif", "points": [[[0, 0], [1, 0], [1, 1]]]}]))
    refused = _invoke(locate_main, scene, "--engine", site["bundle"], "--annotations", missing, "-o", out)
    assert refused.exit_code != 0 and "absent.tif" in refused.output


def test_a_stac_item_collection_is_an_input_and_its_item_facts_reach_every_tile(site, tmp_path):
    scene = tmp_path / "assets" / "s1.tif"
    scene.parent.mkdir()
    write_scene(scene, gradient_scene(128, 128, 3, "uint8", seed=4))
    footprint = {"type": "Polygon", "coordinates": [[[15, 45], [15.1, 45], [15.1, 44.9], [15, 44.9], [15, 45]]]}

    def item(identifier, href):
        return {"type": "Feature", "stac_version": "1.0.0", "id": identifier, "geometry": footprint,
                "bbox": [15, 44.9, 15.1, 45], "links": [],
                "properties": {"datetime": "2023-07-14T09:00:00Z", "platform": "sat-1", "eo:cloud_cover": 3.5},
                "assets": {"visual": {"href": href, "type": "image/tiff; application=geotiff", "roles": ["visual"]}}}

    collection = tmp_path / "items.json"
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": [
        item("scene-1", "assets/s1.tif"), item("remote", "https://example.com/r.tif")]}))
    output = tmp_path / "stac.gidx"
    result = _invoke(index_main, "--no-progress", collection, "--engine", site["bundle"], "--tile", "64", "-o", output)
    assert result.exit_code == 0, result.output
    assert "STAC" in result.output and "remote" in result.output  # the item without a local file is listed
    records = load_index(output).records
    assert len(records) == 4 and records[0].id == "assets/s1.tif@64:0,0"
    extra = records[0].extra
    assert extra["stac_item"] == "scene-1" and extra["eo:cloud_cover"] == 3.5 and extra["platform"] == "sat-1"
    assert extra["datetime"] == "2023-07-14T09:00:00"
    needs_tiles = _invoke(index_main, "--no-progress", collection, "--engine", site["bundle"], "-o", tmp_path / "x")
    assert needs_tiles.exit_code != 0 and "--tile" in needs_tiles.output


def test_the_service_filters_by_place_and_date_and_serves_tile_thumbnails(site):
    pytest.importorskip("fastapi", reason="galr-serve needs the serve extra")
    pytest.importorskip("httpx", reason="the FastAPI test client needs httpx")
    from galr.runtime.serve import ServeSettings, create_app
    from tests.test_serve import started

    output, _ = _index(site, "served.gidx")
    index = load_index(output)
    holes = [r for r in index.records if r.id.startswith("holes.tif@")]
    lons = [p[0] for r in holes for p in r.footprint]
    lats = [p[1] for r in holes for p in r.footprint]
    client = started(create_app(ServeSettings(bundle=site["bundle"], index=output)))
    try:
        body = {"queries": ["two white planes"], "top_k": 50, "rerank": False,
                "bbox": [min(lons), min(lats), max(lons), max(lats)]}
        hits = client.post("/v1/search/text", json=body).json()["results"][0]["hits"]
        assert hits and {h["id"] for h in hits} == {r.id for r in holes}
        dated = client.post("/v1/search/text", json={"queries": ["ships"], "top_k": 50, "since": "2024-05-01"}).json()
        assert all(h["id"].startswith("dated.tif@") for h in dated["results"][0]["hits"])
        bad = client.post("/v1/search/text", json={"queries": ["ships"], "bbox": [0, 10, 1, 5]})
        assert bad.status_code == 400 and "south" in bad.json()["error"]["message"]
        thumb = client.get("/v1/thumbnail", params={"id": holes[0].id})
        assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    finally:
        client.__exit__(None, None, None)


def test_an_all_nodata_scene_indexes_nothing_and_says_so(site, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    write_scene(folder / "empty.tif", np.zeros((3, 200, 200), np.uint8), nodata=0)
    output = tmp_path / "empty.gidx"
    result = _invoke(index_main, "--no-progress", folder, "--engine", site["bundle"], "--tile", "64", "-o", output)
    assert result.exit_code == NothingDoneError.exit_code and "nodata" in result.output and not output.exists()


def test_scene_detections_in_geojson_reach_the_tiles_that_hold_them(site, tmp_path):
    from galr.geo import Scene, TileSettings
    from galr.runtime.encoders import load_engine
    from galr.runtime.index.scenes import SceneTiling, encode_scene_files

    scene = site["scenes"] / "dated.tif"
    detections = tmp_path / "dets"
    detections.mkdir()
    with Scene.open(scene) as opened:
        lons, lats = opened.lonlat([10, 40, 40, 10], [10, 10, 30, 30])
    (detections / "dated.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"label": "plane"},
         "geometry": {"type": "Polygon", "coordinates": [[*zip(lons, lats), (lons[0], lats[0])]]}}]}))

    class Spy:
        def __init__(self, engine):
            self.engine, self.sets = engine, []
            self.embed_dim = engine.embed_dim

        def encode_images(self, images, local=None):
            self.sets += list(local)
            return self.engine.encode_images(images, local=local)

    with load_engine(site["bundle"]) as engine, pytest.warns(UserWarning, match="no usable detections"):
        spy = Spy(engine)  # tiles without a detection warn: the documented fallback
        records, _, report = encode_scene_files(spy, [scene], SceneTiling(TileSettings((64,))), local=detections,
                                                progress=False, root=site["scenes"])
    holding = [r.id for r, found in zip(records, spy.sets) if len(found)]
    assert holding == ["dated.tif@64:0,0"] and spy.sets[0].detections[0].box == pytest.approx((10, 10, 40, 30), abs=1e-3)
    assert report.tiles == len(records) == len(spy.sets)
