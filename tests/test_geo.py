"""Scenes, tiling, place filters, GeoJSON and semantic localisation (galr.geo), on scenes written in the test."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from galr.errors import InputError  # noqa: E402
from galr.geo import (  # noqa: E402
    GeoWarning,
    PixelWindow,
    Scene,
    SceneError,
    SceneReadSettings,
    TileSettings,
    clip_detections,
    count_tiles,
    default_bands,
    tile_windows,
)
from galr.geo.filters import PlaceFilter, parse_bbox, parse_date  # noqa: E402
from galr.geo.geojson import hit_features, write_hits_geojson  # noqa: E402
from galr.geo.selo import LocateSettings, WindowEmbeddings, heat_map, selo_windows, strongest_regions  # noqa: E402
from galr.geo.selo_metrics import find_peaks, region_circle, selo_scores  # noqa: E402
from galr.preprocess.detections import Detection, DetectionSet  # noqa: E402
from tests.geo_fixtures import gradient_scene, rasterio, write_scene  # skips without rasterio

SQUARE = [[800, 1000], [1200, 1000], [1200, 1400], [800, 1400]]  # the notes' 400 px target in a 3000 px scene


# -- reading scenes --------------------------------------------------------------------------------


@pytest.mark.parametrize("count, expected", [(1, (1, 1, 1)), (2, (1, 1, 1)), (3, (1, 2, 3)), (4, (1, 2, 3)),
                                             (13, (4, 3, 2))])
def test_default_bands_follow_the_band_count(count, expected):
    assert default_bands(count) == expected


def test_colour_interpretation_wins_over_the_band_count():
    assert default_bands(4, ["blue", "green", "red", "undefined"]) == (3, 2, 1)


@pytest.mark.parametrize("bands", [1, 3, 4, 13])
def test_scenes_of_any_band_count_read_as_8_bit_rgb_windows(tmp_path, bands):
    path = write_scene(tmp_path / "s.tif", gradient_scene(300, 200, bands, "uint16"))
    with Scene.open(path) as scene:
        pixels, valid = scene.read_window(PixelWindow(10, 20, 64, 48))
    assert pixels.shape == (48, 64, 3) and pixels.dtype == np.uint8 and valid == 1.0
    assert pixels.std() > 10  # stretched, not crushed to black


def test_16_bit_stretch_clips_to_the_overview_percentiles(tmp_path):
    data = gradient_scene(256, 256, 3, "uint16")
    path = write_scene(tmp_path / "s.tif", data)
    with Scene.open(path, SceneReadSettings(stretch=(2, 98))) as scene:
        low, high = scene.stretch_range[0]
        pixels, _ = scene.read_window(PixelWindow(0, 0, 256, 256))
    band = data[0].astype(np.float64)
    assert np.percentile(band, 2) * 0.9 <= low <= np.percentile(band, 2) * 1.1 + 50
    expected = np.clip(np.rint((band - low) * 255 / (high - low)), 0, 255)
    assert np.abs(pixels[..., 0].astype(np.float64) - expected).max() <= 1


def test_8_bit_scenes_pass_through_unchanged_and_floats_use_the_stretch(tmp_path):
    data = gradient_scene(128, 96, 3, "uint8")
    with Scene.open(write_scene(tmp_path / "a.tif", data)) as scene:
        assert scene.stretch_range is None
        np.testing.assert_array_equal(scene.read_window(PixelWindow(0, 0, 128, 96))[0], data.transpose(1, 2, 0))
    with Scene.open(write_scene(tmp_path / "f.tif", gradient_scene(128, 96, 3, "float32"))) as scene:
        assert scene.stretch_range is not None and scene.read_window(PixelWindow(0, 0, 64, 64))[0].max() == 255


def test_nodata_is_black_and_counted_as_invalid(tmp_path):
    data = gradient_scene(128, 128, 3, "uint16")
    data[:, :, :96] = 0
    path = write_scene(tmp_path / "n.tif", data, nodata=0)
    with Scene.open(path) as scene:
        pixels, valid = scene.read_window(PixelWindow(0, 0, 128, 128))
    assert valid == pytest.approx(0.25, abs=0.01)
    assert pixels[:, :96].max() == 0


def test_georeference_gives_wgs84_footprints_and_the_gsd(tmp_path):
    path = write_scene(tmp_path / "g.tif", gradient_scene(400, 400), gsd=0.5)
    with Scene.open(path) as scene:
        assert scene.crs_name == "EPSG:32633" and scene.gsd == pytest.approx(0.5)
        footprint = scene.footprint(PixelWindow(0, 0, 400, 400))
        lat, lon = scene.centre(PixelWindow(0, 0, 400, 400))
    assert footprint[0] == footprint[-1] and len(footprint) == 5
    assert footprint[0][0] == pytest.approx(15.0, abs=1e-6) and footprint[0][1] == pytest.approx(45.0, abs=1e-3)
    # 200 m east and 200 m south of the corner: about 0.00254 degrees of longitude and 0.0018 of latitude
    assert lon - footprint[0][0] == pytest.approx(100 / (111_320 * math.cos(math.radians(45))), rel=0.02)
    assert footprint[0][1] - lat == pytest.approx(100 / 111_132, rel=0.02)


def test_a_scene_without_georeference_works_in_pixels_with_a_warning(tmp_path):
    path = write_scene(tmp_path / "p.tif", gradient_scene(64, 64), crs=None)
    with pytest.warns(GeoWarning, match="no georeference"):
        scene = Scene.open(path)
    with scene:
        assert not scene.georeferenced and scene.footprint(PixelWindow(0, 0, 8, 8)) is None and scene.gsd is None
        assert scene.read_window(PixelWindow(0, 0, 8, 8))[0].shape == (8, 8, 3)


def test_a_local_crs_that_cannot_reach_wgs84_works_in_pixels(tmp_path):
    local = 'LOCAL_CS["site grid",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
    path = write_scene(tmp_path / "l.tif", gradient_scene(64, 64), crs=local)
    with pytest.warns(GeoWarning):
        scene = Scene.open(path)
    with scene:
        assert not scene.georeferenced


def test_a_scene_smaller_than_a_tile_is_padded(tmp_path):
    path = write_scene(tmp_path / "small.tif", gradient_scene(100, 60))
    windows = list(tile_windows(100, 60, TileSettings((256,))))
    assert windows == [(256, PixelWindow(0, 0, 100, 60))]
    with Scene.open(path) as scene:
        pixels, valid = scene.read_window(windows[0][1], pad_to=256)
    assert pixels.shape == (256, 256, 3) and valid == pytest.approx(100 * 60 / 256 ** 2)


def test_a_huge_declared_size_is_refused_from_the_header(tmp_path):
    path = write_scene(tmp_path / "big.tif", gradient_scene(300, 300))
    with pytest.raises(InputError, match="max_pixels"):
        Scene.open(path, SceneReadSettings(max_pixels=10_000))


def test_not_a_raster_and_bad_bands_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"II*\x00 not really a tiff")
    with pytest.raises(SceneError, match="cannot be read as a raster"):
        Scene.open(junk)
    path = write_scene(tmp_path / "three.tif", gradient_scene(32, 32))
    with pytest.raises(InputError, match="band 4 but the scene has 3"):
        Scene.open(path, SceneReadSettings(bands=(4, 3, 2)))


def test_a_truncated_scene_fails_per_window_not_per_scene(tmp_path):
    path = write_scene(tmp_path / "t.tif", gradient_scene(512, 512, 3, "uint8", seed=3), tiled=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # the last blocks are gone
    with Scene.open(path) as scene:
        good = scene.read_window(PixelWindow(0, 0, 64, 64))[0]
        assert good.shape == (64, 64, 3)
        with pytest.raises(SceneError, match="cannot be read"):
            scene.read_window(PixelWindow(448, 448, 64, 64))


def test_the_acquisition_date_comes_from_the_tiff_tag(tmp_path):
    path = write_scene(tmp_path / "d.tif", gradient_scene(32, 32))
    with rasterio.open(path, "r+") as dataset:
        dataset.update_tags(TIFFTAG_DATETIME="2024:05:01 10:30:00")
    with Scene.open(path) as scene:
        assert scene.datetime == "2024-05-01T10:30:00"


# -- tiling ----------------------------------------------------------------------------------------


def test_tiles_cover_the_scene_and_the_last_ones_end_at_its_edge():
    settings = TileSettings((256,), overlap=64)
    windows = [w for _, w in tile_windows(700, 500, settings)]
    assert len(windows) == count_tiles(700, 500, settings) == 12
    assert {w.col for w in windows} == {0, 192, 384, 444} and {w.row for w in windows} == {0, 192, 244}
    covered = np.zeros((500, 700), bool)
    for w in windows:
        covered[w.row:w.row + w.height, w.col:w.col + w.width] = True
    assert covered.all()


def test_multi_scale_tiling_and_bad_settings():
    assert count_tiles(1024, 1024, TileSettings((256, 512))) == 16 + 4
    with pytest.raises(InputError, match="overlap"):
        TileSettings((256,), overlap=256)
    with pytest.raises(InputError, match="at least 16"):
        TileSettings((8,))


def test_scene_detections_are_clipped_into_each_tile():
    scene = DetectionSet((Detection("plane", 0.9, (100, 100, 140, 120)), Detection("ship", 0.8, (300, 10, 330, 30)),
                          Detection.from_polygon("plane", 0.7, [(250, 250), (270, 250), (270, 262), (250, 262)])))
    tile = clip_detections(scene, PixelWindow(64, 64, 256, 256), (256, 256))
    labels = sorted(d.label for d in tile.detections)
    assert labels == ["plane", "plane"] and (tile.width, tile.height) == (256, 256)
    boxes = sorted(d.box for d in tile.detections)
    assert boxes[0] == (36, 36, 76, 56)
    assert [d.polygon for d in tile.detections if d.polygon][0][0] == (186, 186)


# -- where and when --------------------------------------------------------------------------------


def test_place_filter_matches_boxes_dates_and_the_antimeridian():
    bounds = np.array([[10, 40, 11, 41], [179.5, 0, 179.9, 1], [-179.9, 0, -179.5, 1], [np.nan] * 4], float)
    times = np.array(["2024-05-01T10:00:00", "2023-01-01T00:00:00", "NaT", "2024-06-01T00:00:00"],
                     dtype="datetime64[s]")
    assert PlaceFilter(bbox=(10.5, 40.5, 12, 42)).matches(bounds, times).tolist() == [True, False, False, False]
    assert PlaceFilter(bbox=(179, -1, -179, 2)).matches(bounds, times).tolist() == [False, True, True, False]
    since = PlaceFilter.from_text(since="2024-01-01")
    assert since.matches(bounds, times).tolist() == [True, False, False, True]
    until = PlaceFilter.from_text(until="2024-05-01")  # the whole day
    assert until.matches(bounds, times).tolist() == [True, True, False, False]


def test_bad_filters_are_refused_with_the_expected_form():
    with pytest.raises(InputError, match="W,S,E,N"):
        parse_bbox("1,2,3")
    with pytest.raises(InputError, match="south"):
        parse_bbox("0,10,1,5")
    with pytest.raises(InputError, match="not a date"):
        parse_date("yesterday")
    with pytest.raises(InputError, match="after"):
        PlaceFilter.from_text(since="2024-02-01", until="2024-01-01")


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_a_filtered_search_is_the_true_top_k_among_the_allowed(kind):
    if kind != "exact":
        pytest.importorskip("faiss", reason="approximate searchers need faiss-cpu")
    from galr.runtime.index.searchers import create_searcher

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 32))
    vectors = (centres[rng.integers(0, 40, 3000)] + 0.3 * rng.standard_normal((3000, 32))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    keys = np.arange(3000, dtype=np.int64) * 2 + 5
    allowed = keys[rng.random(3000) < 0.05]
    searcher = create_searcher(kind, 32, "fp32")
    searcher.add(keys, vectors)
    queries = vectors[:8]
    scores, found = searcher.search(queries, 10, allowed=allowed)
    assert np.isin(found, allowed).all() and found.shape == (8, 10)
    rows = np.isin(keys, allowed)
    truth = np.argsort(-(queries @ vectors[rows].T), axis=1)[:, :10]
    recall = np.mean([len(set(f) & set(keys[rows][t])) / 10 for f, t in zip(found.tolist(), truth)])
    assert recall >= (1.0 if kind == "exact" else 0.9)
    few = allowed[:3]
    assert searcher.search(queries, 10, allowed=few)[1].shape == (8, 3)


# -- GeoJSON ---------------------------------------------------------------------------------------


class _Hit:
    def __init__(self, rank, record):
        self.rank, self.id, self.score, self.rerank_score, self.record = rank, record["id"], 0.5, None, record


class _Result:
    def __init__(self, hits):
        self.query, self.hits = "two planes", hits


def test_hits_become_closed_wgs84_polygons_and_pixel_only_indexes_are_refused(tmp_path):
    ring = [(15.0, 45.0), (15.1, 45.0), (15.1, 44.9), (15.0, 44.9)]
    placed = {"id": "s.tif@256:0,0", "path": "s.tif", "lat": 44.95, "lon": 15.05, "footprint": ring,
              "extra": {"scene": "s.tif", "window": [0, 0, 256, 256], "datetime": "2024-05-01T10:30:00"}}
    features = hit_features([_Result([_Hit(1, placed)])])
    assert features[0]["geometry"]["coordinates"][0][0] == features[0]["geometry"]["coordinates"][0][-1]
    assert features[0]["properties"]["window"] == [0, 0, 256, 256]
    written = json.loads(write_hits_geojson(tmp_path / "h.geojson", [_Result([_Hit(1, placed)])]).read_text())
    assert written["type"] == "FeatureCollection"
    pixels_only = {"id": "a.png", "path": "a.png"}
    with pytest.raises(InputError, match="has a place on Earth"):
        write_hits_geojson(tmp_path / "p.geojson", [_Result([_Hit(1, pixels_only)])])
    assert not (tmp_path / "p.geojson").exists()


# -- semantic localisation -------------------------------------------------------------------------


@pytest.mark.parametrize("size, scales, expected", [((3000, 3000), (256, 512, 768), 389),
                                                    ((3000, 3000), (128, 256, 512), 1462),
                                                    ((10000, 10001), (256, 512, 768), 4283)])
def test_selo_window_counts_match_the_reference(size, scales, expected):
    assert len(selo_windows(*size, scales)) == expected


def test_a_scale_larger_than_the_scene_is_clamped_to_it():
    windows = selo_windows(300, 200, (256, 512))
    assert all(w.col + w.width <= 300 and w.row + w.height <= 200 for w in windows)
    assert PixelWindow(0, 0, 300, 200) in windows


def _grid(cell: int, side: int = 3000):
    centres = np.arange(0, side, cell) + (cell - 1) / 2
    return np.meshgrid(centres, centres)


@pytest.mark.parametrize("cell", [1, 8])
def test_metric_table_of_the_notes(cell):
    """Section 8 of semantic-localization.md (values from an approximate re-run: +-0.01)."""
    xs, ys = _grid(cell)
    mask = ((xs >= 800) & (xs < 1200) & (ys >= 1000) & (ys < 1400)).astype(float)
    gauss = lambda cx, cy, s: np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * s ** 2))  # noqa: E731
    exact = selo_scores(mask, [SQUARE], cell)
    assert exact.rsu == pytest.approx(1, abs=0.01) and exact.rda == 1 and exact.ras < 0.02
    assert exact.rmi == pytest.approx(0.9996, abs=0.01)
    wide = selo_scores(gauss(1000, 1200, 800), [SQUARE], cell)
    assert wide.rsu == pytest.approx(0.86, abs=0.01) and wide.rmi == pytest.approx(0.944, abs=0.01)
    shifted = selo_scores(gauss(1100, 1200, 300), [SQUARE], cell)
    assert shifted.ras == pytest.approx(0.055, abs=0.015) and shifted.rmi == pytest.approx(0.981, abs=0.01)
    elsewhere = selo_scores(gauss(2500, 2500, 200), [SQUARE], cell)
    assert (elsewhere.rsu, elsewhere.ras, elsewhere.rda) == (pytest.approx(0, abs=1e-6), 1.0, 0.0)
    uniform = selo_scores(0.5 + 0.01 * np.random.default_rng(0).random(xs.shape), [SQUARE], cell)
    assert uniform.rsu == pytest.approx(0.507, abs=0.01) and uniform.rmi == pytest.approx(0.20, abs=0.01)


def test_region_geometry_uses_the_vertex_mean_and_1_5_mean_distance():
    centre, radius = region_circle(SQUARE)
    assert centre == (1000, 1200) and radius == int(1.5 * math.hypot(200, 200))


def test_a_distractor_peak_is_the_documented_blind_spot():
    xs, ys = _grid(8)
    target = 0.8 * np.exp(-((xs - 1000) ** 2 + (ys - 1200) ** 2) / (2 * 300 ** 2))
    distractor = np.exp(-((xs - 2600) ** 2 + (ys - 2600) ** 2) / (2 * 200 ** 2))
    scores = selo_scores(np.maximum(target, distractor), [SQUARE], 8)
    assert scores.peaks == 2 and scores.rmi > 0.95


def _coverage_scores(windows, target=(800, 1000, 1200, 1400)):
    w = np.array([x.as_list() for x in windows], float)
    dx = np.clip(np.minimum(w[:, 0] + w[:, 2], target[2]) - np.maximum(w[:, 0], target[0]), 0, None)
    dy = np.clip(np.minimum(w[:, 1] + w[:, 3], target[3]) - np.maximum(w[:, 1], target[1]), 0, None)
    return w.astype(np.int64), dx * dy / (w[:, 2] * w[:, 3])


@pytest.mark.parametrize("sigma, minimum_rmi", [(0.0, 0.99), (0.05, 0.98)])
def test_a_mock_scorer_localises_the_target(sigma, minimum_rmi):
    windows = selo_windows(3000, 3000)
    boxes, scores = _coverage_scores(windows)
    scores = scores + np.random.default_rng(1).normal(0, sigma, len(scores))
    heat = heat_map(scores, boxes, (3000, 3000), LocateSettings())
    assert heat.shape == (188, 188) and heat.max() <= 1 and heat.min() >= 0
    assert selo_scores(heat, [SQUARE], 16).rmi >= minimum_rmi
    best = strongest_regions(heat, LocateSettings(), (3000, 3000))[0].window
    assert best.col <= 1000 <= best.col + best.width and best.row <= 1200 <= best.row + best.height


def test_the_map_does_not_depend_on_window_order_and_constant_scores_give_zeros():
    windows = selo_windows(2000, 1500)
    boxes, scores = _coverage_scores(windows)
    order = np.random.default_rng(0).permutation(len(boxes))
    settings = LocateSettings(cell=8)
    np.testing.assert_array_equal(heat_map(scores, boxes, (2000, 1500), settings),
                                  heat_map(scores[order], boxes[order], (2000, 1500), settings))
    assert not heat_map(np.full(len(boxes), 0.3), boxes, (2000, 1500), settings).any()


def test_transposed_scenes_keep_rows_and_columns_apart():
    windows = selo_windows(5000, 3000)
    boxes, scores = _coverage_scores(windows, target=(3600, 800, 4000, 1200))
    heat = heat_map(scores, boxes, (5000, 3000), LocateSettings())
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    assert heat.shape == (188, 313) and 3400 <= col * 16 <= 4200 and 600 <= row * 16 <= 1400
    peaks = find_peaks(heat, 16)
    assert peaks and 3400 <= peaks[0][0] <= 4200


def test_window_embeddings_cache_round_trip_and_refuse_another_key(tmp_path):
    cached = WindowEmbeddings((100, 80), np.array([[0, 0, 50, 50]], np.int64), np.ones((1, 4), np.float32) / 2,
                              {"model": "a", "scales": [256]})
    cached.save(tmp_path / "w.npz")
    again = WindowEmbeddings.load(tmp_path / "w.npz", {"scales": [256], "model": "a"})
    assert again is not None and again.scene_size == (100, 80) and np.array_equal(again.embeddings, cached.embeddings)
    assert WindowEmbeddings.load(tmp_path / "w.npz", {"model": "b", "scales": [256]}) is None
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert WindowEmbeddings.load(tmp_path / "bad.npz", {}) is None


def test_synthetic_geo_scenes_carry_a_crs_a_date_and_selo_annotations(tmp_path):
    from galr.synthetic.geo import GeoSceneConfig, generate_geo_scenes

    annotations = generate_geo_scenes(tmp_path, GeoSceneConfig(scenes=1, size=512, chip=128, queries=2,
                                                               placements=2), progress=False)
    samples = json.loads(annotations.read_text())
    assert len(samples) == 2 and all(len(s["points"]) == 2 for s in samples)
    assert all(s["caption"] and s["jpg_name"] == "geo_scene_00.tif" for s in samples)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeoWarning)
        with Scene.open(tmp_path / "geo_scene_00.tif") as scene:
            assert scene.crs_name == "EPSG:32633" and scene.datetime == "2024-05-01T10:30:00"
            regions = samples[0]["points"]
            x0, y0 = regions[0][0]
            assert regions[0][2] == [x0 + 256, y0 + 256]  # a target spans 2 x 2 chips
            first = scene.read_window(PixelWindow(x0, y0, 256, 256))[0]
            x1, y1 = regions[1][0]
            np.testing.assert_array_equal(first, scene.read_window(PixelWindow(x1, y1, 256, 256))[0])


def test_out_of_range_locate_settings_are_refused():
    with pytest.raises(InputError):
        LocateSettings(cell=0)
    with pytest.raises(InputError):
        LocateSettings(scales=(8,))


def test_geo_fixture_path_is_a_real_geotiff(tmp_path):
    path = write_scene(tmp_path / "x.tif", gradient_scene(20, 20))
    assert Path(path).read_bytes()[:2] in (b"II", b"MM")


def test_a_large_window_can_be_read_decimated(tmp_path):
    data = gradient_scene(512, 512, 3, "uint8", seed=6)
    with Scene.open(write_scene(tmp_path / "big.tif", data)) as scene:
        small, valid = scene.read_window(PixelWindow(0, 0, 512, 512), max_side=128)
        full, _ = scene.read_window(PixelWindow(0, 0, 512, 512))
    assert small.shape == (128, 128, 3) and valid == 1.0
    expected = full.reshape(128, 4, 128, 4, 3).mean(axis=(1, 3))
    assert np.abs(small.astype(float) - expected).max() <= 1.0


def test_geojson_detections_in_map_coordinates_land_on_scene_pixels(tmp_path):
    from galr.geo.detections import read_geojson_detections

    path = write_scene(tmp_path / "g.tif", gradient_scene(400, 400), gsd=0.5)
    with Scene.open(path) as scene:
        x0, y0 = 500_000.0 + 50 * 0.5, 4_983_000.0 - 100 * 0.5  # pixel (50, 100) in UTM metres
        box = [[x0, y0], [x0 + 20, y0], [x0 + 20, y0 - 10], [x0, y0 - 10], [x0, y0]]
        lons, lats = scene.lonlat([60, 140, 140, 60], [200, 200, 260, 260])
        document = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "EPSG:32633"}},
                    "features": [{"type": "Feature", "properties": {"label": "plane", "score": 0.9},
                                  "geometry": {"type": "Polygon", "coordinates": [box]}}]}
        (tmp_path / "utm.geojson").write_text(json.dumps(document))
        found = read_geojson_detections(tmp_path / "utm.geojson", scene)
        assert found.detections[0].box == pytest.approx((50, 100, 90, 120), abs=1e-6)
        wgs84 = {"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {"class": "ship"},
             "geometry": {"type": "Polygon", "coordinates": [[*zip(lons, lats), (lons[0], lats[0])]]}}]}
        (tmp_path / "wgs.geojson").write_text(json.dumps(wgs84))
        ship = read_geojson_detections(tmp_path / "wgs.geojson", scene).detections[0]
        assert ship.label == "ship" and ship.box == pytest.approx((60, 200, 140, 260), abs=1e-3)
        (tmp_path / "bad.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [15, 45]}}]}))
        with pytest.raises(InputError, match="Polygon geometry and a 'label'"):
            read_geojson_detections(tmp_path / "bad.geojson", scene)
