"""Records in SQLite beside the .gidx: round trip, lazy lookups, edits, migration, damage."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

from galr.errors import InputError
from galr.geo.filters import PlaceFilter
from galr.runtime.index import GalleryIndex, ImageRecord, load_index
from galr.runtime.index.records_sqlite import SqliteRecordStore

DIM = 8


def _unit(rows: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _records(names, scene="/data/s.tif"):
    out = []
    for number, name in enumerate(names):
        lon, lat = 15 + number * 0.01, 45.0
        out.append(ImageRecord(name, scene, 256, 256, lat, lon,
                               ((lon, lat), (lon + 0.01, lat), (lon + 0.01, lat - 0.01), (lon, lat)),
                               {"window": [number * 256, 0, 256, 256], "datetime": "2024-05-01T10:30:00"}
                               if number % 2 else {"window": [number * 256, 0, 256, 256]}))
    return out


def _index(count: int = 40) -> GalleryIndex:
    index = GalleryIndex("model-1", DIM, "fp32")
    index.add(_records([f"s.tif@256:{n}" for n in range(count)]), _unit(count, 0))
    index.add_text_bank(["a caption", "another"], _unit(2, 1))
    return index


def test_sqlite_records_round_trip_and_answer_like_json(tmp_path):
    index = _index()
    index.save(tmp_path / "j.gidx", records="json")
    index.save(tmp_path / "s.gidx", records="sqlite")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert [f for f in files if f.endswith(".sqlite")] and all(f.startswith("s.gidx.records-") for f in files
                                                              if f.endswith(".sqlite"))
    as_json, as_sqlite = load_index(tmp_path / "j.gidx"), load_index(tmp_path / "s.gidx")
    assert isinstance(as_sqlite.record_store, SqliteRecordStore)
    assert as_sqlite.records == as_json.records == index.records and as_sqlite.ids == index.ids
    queries = _unit(3, 5)
    assert as_sqlite.search(queries, 5).ids == index.search(queries, 5).ids
    where = PlaceFilter(bbox=(15.05, 44.9, 15.2, 45.1), since=np.datetime64("2024-01-01T00:00:00", "s"))
    np.testing.assert_array_equal(as_sqlite.keys_matching(where), as_json.keys_matching(where))
    assert len(as_sqlite.keys_matching(where)) > 0
    assert as_sqlite.get("s.tif@256:7").extra["window"] == [7 * 256, 0, 256, 256]


def test_edits_over_sqlite_records_are_written_as_a_new_file_and_the_old_one_goes(tmp_path):
    path = tmp_path / "a.gidx"
    _index().save(path, records="sqlite")
    first = next(tmp_path.glob("a.gidx.records-*.sqlite"))
    index = load_index(path)
    index.remove(["s.tif@256:3"])
    index.update(_records(["s.tif@256:5"], scene="/data/new.tif"), _unit(1, 9))
    index.add(_records(["extra-1", "extra-2"]), _unit(2, 8))
    assert len(index) == 41 and "s.tif@256:3" not in index and index.get("s.tif@256:5").path == "/data/new.tif"
    index.save(path)  # auto keeps SQLite
    files = list(tmp_path.glob("a.gidx.records-*.sqlite"))
    assert len(files) == 1 and files[0] != first
    again = load_index(path)
    assert again.ids == index.ids and again.records == index.records
    assert again.ids.index("s.tif@256:5") == 4  # a replaced record keeps its place in the gallery order
    rows = sqlite3.connect(files[0]).execute("select count(*) from records").fetchone()[0]
    assert rows == 41


def test_a_missing_or_damaged_records_file_is_refused(tmp_path):
    path = tmp_path / "d.gidx"
    _index().save(path, records="sqlite")
    records = next(tmp_path.glob("d.gidx.records-*.sqlite"))
    data = bytearray(records.read_bytes())
    data[-100] ^= 0xFF
    records.write_bytes(bytes(data))
    with pytest.raises(InputError, match="SHA-256"):
        load_index(path)
    records.unlink()
    with pytest.raises(InputError, match="missing"):
        load_index(path)


def test_a_json_index_is_migrated_with_galr_index_update_records_sqlite(tmp_path):
    from galr.runtime.cli.index import main

    path = tmp_path / "m.gidx"
    _index().save(path, records="json")
    result = CliRunner().invoke(main, ["--update", "--records", "sqlite", "-o", str(path)])
    assert result.exit_code == 0, result.output
    assert "records in SQLite" in result.output
    migrated = load_index(path)
    assert isinstance(migrated.record_store, SqliteRecordStore) and migrated.records == _index().records
    back = CliRunner().invoke(main, ["--update", "--records", "json", "-o", str(path)])
    assert back.exit_code == 0 and not list(tmp_path.glob("m.gidx.records-*.sqlite"))
    assert load_index(path).records == _index().records
