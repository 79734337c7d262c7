"""The original pickled local-feature file (read without running pickles) and our .npz."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from numpy.lib import format as npy_format

from galr.preprocess.local_file import (
    LocalFeatureTable,
    LocalFileError,
    load_local_file,
    local_key,
    save_local_file,
)


def original_dict(names=("boat_0.txt", "airport_3.txt"), shape=(20, 20), seed=0):
    rng = np.random.default_rng(seed)
    return {
        "local_rep": {name: rng.random(shape) for name in names},
        "adj_matrix": {name: rng.random((shape[0], shape[0])) for name in names},
    }


def write_npy_payload(path, payload: bytes) -> None:
    """An object .npy whose pickle bytes we choose (np.save always writes the running numpy's names)."""
    with open(path, "wb") as stream:
        npy_format.write_array_header_1_0(stream, {"descr": "|O", "fortran_order": False, "shape": ()})
        stream.write(payload)


class RunsShell:
    """A pickle that would run a shell command when loaded with np.load(allow_pickle=True)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("image_name", ["boat_0.tif", "boat_0", "boat_0.txt", "RSITMD/images/boat_0.tif"])
def test_file_written_like_the_original_loads(tmp_path, image_name):
    data = original_dict()
    path = tmp_path / "rsitmd_local.npy"
    np.save(path, data)  # exactly the original's writer: a 0-d object array around the dict
    table = load_local_file(path)
    assert len(table) == 2 and set(table.names()) == {"boat_0.txt", "airport_3.txt"}
    rep, adj = table.lookup(image_name)
    assert rep.dtype == adj.dtype == np.float32 and rep.shape == adj.shape == (20, 20)
    np.testing.assert_array_equal(rep, data["local_rep"]["boat_0.txt"].astype(np.float32))
    np.testing.assert_array_equal(adj, data["adj_matrix"]["boat_0.txt"].astype(np.float32))
    assert image_name in table and "boat_1.tif" not in table


def test_numpy1_protocol2_pickle_names_are_accepted(tmp_path):
    # numpy 1.x wrote `numpy.core.multiarray`; protocol 2 adds `_codecs.encode` for bytes.
    payload = pickle.dumps(np.array(original_dict(), dtype=object), protocol=2)
    payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in payload and b"_codecs" in payload
    path = tmp_path / "old.npy"
    write_npy_payload(path, payload)
    assert load_local_file(path).lookup("airport_3.jpg")[0].shape == (20, 20)


def test_missing_image_names_image_and_file(tmp_path):
    path = tmp_path / "rsitmd_local.npy"
    np.save(path, original_dict())
    table = load_local_file(path)
    with pytest.raises(KeyError, match=r"'harbor_9.tif' \(key 'harbor_9.txt'\).*rsitmd_local.npy"):
        table.lookup("harbor_9.tif")
    with pytest.raises(KeyError, match="harbor_9"):
        table.lookup_batch(["boat_0.tif", "harbor_9.tif"])
    rep, adj = table.lookup_batch(["airport_3.jpg", "boat_0.jpg"])
    assert rep.shape == adj.shape == (2, 20, 20)


@pytest.mark.parametrize("where", ["top", "inside"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, where):
    marker = tmp_path / "pwned"
    evil = RunsShell(marker)
    data = evil if where == "top" else {"local_rep": {"boat_0.txt": evil}, "adj_matrix": {}}
    path = tmp_path / "evil.npy"
    np.save(path, np.array(data, dtype=object) if where == "top" else data, allow_pickle=True)
    with pytest.raises(LocalFileError, match=r"refused to unpickle '(posix|nt|os)\.system'") as error:
        load_local_file(path)
    assert str(path) in str(error.value)
    assert not marker.exists()


def test_other_dangerous_globals_are_refused(tmp_path):
    payload = b"\x80\x02cbuiltins\neval\nX\x0b\x00\x00\x00print(\"hi\")\x85R."
    path = tmp_path / "eval.npy"
    write_npy_payload(path, payload)
    with pytest.raises(LocalFileError, match=r"'builtins\.eval'"):
        load_local_file(path)


def test_npz_round_trip_and_suffix_rule(tmp_path):
    original = tmp_path / "rsicd_local.npy"
    np.save(original, original_dict(names=("a.txt", "b.txt", "c.txt")))
    table = load_local_file(original)
    path = save_local_file(tmp_path / "rsicd_local.npz", table)
    again = load_local_file(path)
    assert again.names() == table.names() and again.source == str(path)
    np.testing.assert_array_equal(again.local_rep, table.local_rep)
    np.testing.assert_array_equal(again.adj_matrix, table.adj_matrix)
    with np.load(path, allow_pickle=False) as archive:  # readable without pickle by anyone
        assert archive["local_rep"].shape == (3, 20, 20)
    with pytest.raises(ValueError, match=r"\.npz"):
        save_local_file(tmp_path / "table.npy", table)


def test_tables_from_arrays_use_original_keys():
    rep, adj = np.zeros((2, 4, 7)), np.zeros((2, 4, 4))
    table = LocalFeatureTable(("images/boat_0.tif", "boat_1.tif"), rep, adj)
    assert table.names() == ("boat_0.txt", "boat_1.txt") and (table.num_objects, table.object_dim) == (4, 7)
    with pytest.raises(LocalFileError, match="map to key 'boat_0.txt'"):
        LocalFeatureTable(("boat_0.tif", "boat_0.jpg"), rep, adj)
    assert local_key("a.b.tif") == "a.txt"  # the original keeps the name up to the first dot


def test_shapes_are_validated(tmp_path):
    data = original_dict()
    data["local_rep"]["boat_0.txt"] = np.zeros((20, 19))
    path = tmp_path / "bad.npy"
    np.save(path, data)
    with pytest.raises(LocalFileError, match=r"local_rep\['boat_0.txt'\] is float64 \(20, 19\)"):
        load_local_file(path)
    small = tmp_path / "small.npy"
    np.save(small, original_dict(shape=(10, 10)))
    with pytest.raises(LocalFileError, match=r"expected numbers of shape \(20, 20\)"):
        load_local_file(small)
    assert load_local_file(small, num_objects=10, object_dim=10).num_objects == 10
    assert load_local_file(small, num_objects=None, object_dim=None).object_dim == 10


def test_mismatched_key_sets_are_reported(tmp_path):
    data = original_dict()
    del data["adj_matrix"]["boat_0.txt"]
    path = tmp_path / "partial.npy"
    np.save(path, data)
    with pytest.raises(LocalFileError, match="only one of local_rep/adj_matrix.*boat_0.txt"):
        load_local_file(path)


@pytest.mark.parametrize(
    "kind, message",
    [("plain", "plain float64 array"), ("list", "expected a dict"), ("garbage", "neither a .npy"),
     ("truncated", "pickled payload is corrupt")],
)
def test_wrong_files_are_explained(tmp_path, kind, message):
    path = tmp_path / f"{kind}.npy"
    if kind == "plain":
        np.save(path, np.zeros((20, 20)))
    elif kind == "list":
        np.save(path, np.array([1, "x"], dtype=object), allow_pickle=True)
    elif kind == "garbage":
        path.write_bytes(b"not numpy at all")
    else:
        np.save(path, original_dict())
        path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(LocalFileError, match=message) as error:
        load_local_file(path)
    assert str(path) in str(error.value)
