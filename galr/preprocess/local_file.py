"""Precomputed DREA matrices: the original's pickled ``.npy`` file (read safely) and our ``.npz``.

**The original file** (``dataset.local_path``, e.g. ``rsitmd_local.npy``) was written as::

    np.save(path, {"local_rep": {"boat_0.txt": array(20, 20), ...},
                   "adj_matrix": {"boat_0.txt": array(20, 20), ...}})

i.e. a 0-d object array whose payload is a pickle, and read with
``np.load(path, allow_pickle=True)[()]``. Unpickling runs whatever code the file names, so
:func:`load_local_file` never calls ``np.load(allow_pickle=True)``: it parses the ``.npy`` header
with :mod:`numpy.lib.format` and unpickles the payload with an unpickler that only resolves the
handful of numpy/stdlib names a dict of arrays needs (:data:`ALLOWED_PICKLE_GLOBALS`). Anything
else is refused with :class:`LocalFileError` before it is called.

**Keys** follow the original rule (``R:data.py:47,63``): the image file name up to its first dot,
plus ``.txt`` (``boat_0.tif`` -> ``boat_0.txt``), see :func:`local_key`.

**Our format** (:func:`save_local_file`) is a pickle-free ``.npz`` with ``names`` (unicode),
``local_rep`` float32 ``[n, N, F]``, ``adj_matrix`` float32 ``[n, N, N]`` and a ``format`` marker.
:func:`load_local_file` tells the two apart by their magic bytes.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

import numpy as np
from numpy.lib import format as npy_format

from galr.atomic import atomic_output
from galr.errors import InputError

REP_KEY = "local_rep"
ADJ_KEY = "adj_matrix"
NPZ_FORMAT = "galr-local-v1"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"

# (module, name) pairs a pickled dict of numpy arrays may reference. numpy 2 writes
# `numpy._core.*`, numpy 1 wrote `numpy.core.*`; both resolve to the running numpy's objects, so
# the module named in the file is never imported. `_frombuffer` appears with pickle protocol 5,
# `_codecs.encode` with protocol 2 bytes, `OrderedDict` if the writer used one.
ALLOWED_PICKLE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {(prefix + ".multiarray", name) for prefix in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")}
    | {(prefix + ".numeric", "_frombuffer") for prefix in ("numpy.core", "numpy._core")}
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode")}
)


class LocalFileError(InputError):
    """A local-feature file is unreadable, unsafe or has the wrong shapes; the message names it."""


def local_key(image_name: str | os.PathLike) -> str:
    """The original's key for an image: base name up to the first dot, plus ``.txt``.

    ``"boat_0.tif"``, ``"boat_0"``, ``"boat_0.txt"`` and ``"data/boat_0.tif"`` all give ``"boat_0.txt"``.
    """
    base = os.fspath(image_name).replace("\\", "/").rsplit("/", 1)[-1]
    return base.split(".")[0] + ".txt"


def _numpy_core() -> tuple[Any, Any]:
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return multiarray, numeric


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_PICKLE_GLOBALS`."""

    def __init__(self, stream: BinaryIO, source: str) -> None:
        # latin1 keeps numpy arrays pickled by Python 2 readable, as numpy's own loader does.
        super().__init__(stream, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_PICKLE_GLOBALS:
            raise LocalFileError(
                f"{self._source}: refused to unpickle '{module}.{name}'; a local-feature file only holds dicts of "
                "numpy arrays, so this file is corrupt or malicious. Do not open it with np.load(allow_pickle=True)"
            )
        multiarray, numeric = _numpy_core()
        if module.endswith(".multiarray"):
            return getattr(multiarray, name)
        if module.endswith(".numeric"):
            return getattr(numeric, name)
        if module == "numpy":
            return getattr(np, name)
        if module == "collections":
            from collections import OrderedDict

            return OrderedDict
        import codecs

        return codecs.encode

    def persistent_load(self, pid: Any) -> Any:
        raise LocalFileError(f"{self._source}: refused a persistent pickle reference; not a local-feature file")


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous
class LocalFeatureTable:
    """DREA matrices of many images, looked up by image name.

    Attributes:
        keys: one original-style key (``<stem>.txt``) per image.
        local_rep: float32 ``[n, num_objects, object_dim]``.
        adj_matrix: float32 ``[n, num_objects, num_objects]``.
        source: the file the table came from (for messages).
    """

    keys: tuple[str, ...]
    local_rep: np.ndarray
    adj_matrix: np.ndarray
    source: str = "<memory>"
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = tuple(local_key(k) for k in self.keys)
        rep = np.asarray(self.local_rep, dtype=np.float32)
        adj = np.asarray(self.adj_matrix, dtype=np.float32)
        if rep.ndim != 3 or adj.ndim != 3 or len(rep) != len(keys) or len(adj) != len(keys):
            raise LocalFileError(
                f"{self.source}: expected {len(keys)} images with local_rep [n, N, F] and adj_matrix [n, N, N], got "
                f"{rep.shape} and {adj.shape}"
            )
        if adj.shape[1:] != (rep.shape[1], rep.shape[1]):
            raise LocalFileError(
                f"{self.source}: adj_matrix {adj.shape[1:]} does not match {rep.shape[1]} objects per image"
            )
        index: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key in index:
                raise LocalFileError(
                    f"{self.source}: two images map to key {key!r} ({self.keys[index[key]]!r}, {self.keys[i]!r})"
                )
            index[key] = i
        if not (np.isfinite(rep).all() and np.isfinite(adj).all()):
            raise LocalFileError(f"{self.source}: local_rep/adj_matrix contain NaN or infinity")
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "local_rep", rep)
        object.__setattr__(self, "adj_matrix", adj)
        object.__setattr__(self, "_index", index)

    @classmethod
    def from_mapping(
        cls,
        local_rep: Mapping[str, Any],
        adj_matrix: Mapping[str, Any],
        source: str = "<memory>",
        num_objects: int | None = 20,
        object_dim: int | None = 20,
    ) -> "LocalFeatureTable":
        """Build a table from the original's two dicts (``{key: array}``).

        Args:
            local_rep: ``{"<stem>.txt": [num_objects, object_dim]}``.
            adj_matrix: ``{"<stem>.txt": [num_objects, num_objects]}``, same keys.
            source: name used in messages.
            num_objects: required rows (None: take the first entry's, all must agree).
            object_dim: required rep columns (None: take the first entry's).

        Raises:
            LocalFileError: different key sets or a matrix of the wrong shape (names the key).
        """
        missing = sorted(set(local_rep) ^ set(adj_matrix))
        if missing:
            raise LocalFileError(
                f"{source}: {len(missing)} images have only one of local_rep/adj_matrix, e.g. {missing[:5]}"
            )
        keys = sorted(local_rep)  # deterministic order whatever the dict order was
        if keys and (num_objects is None or object_dim is None):
            first = np.shape(local_rep[keys[0]])
            num_objects = first[0] if num_objects is None else num_objects
            object_dim = first[-1] if object_dim is None else object_dim
        n_obj, dim = num_objects or 0, object_dim or 0
        reps = np.zeros((len(keys), n_obj, dim), dtype=np.float32)
        adjs = np.zeros((len(keys), n_obj, n_obj), dtype=np.float32)
        for i, key in enumerate(keys):
            checks = ((reps, local_rep[key], (n_obj, dim), REP_KEY), (adjs, adj_matrix[key], (n_obj, n_obj), ADJ_KEY))
            for target, value, shape, what in checks:
                array = np.asarray(value)
                if array.shape != shape or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
                    raise LocalFileError(
                        f"{source}: {what}[{key!r}] is {array.dtype} {array.shape}, expected numbers of shape {shape}; "
                        "is the file made for a model with other num_objects/object_dim?"
                    )
                target[i] = array
        return cls(tuple(keys), reps, adjs, source)

    @property
    def num_objects(self) -> int:
        return int(self.local_rep.shape[1])

    @property
    def object_dim(self) -> int:
        return int(self.local_rep.shape[2])

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, image_name: object) -> bool:
        return isinstance(image_name, (str, os.PathLike)) and local_key(image_name) in self._index

    def names(self) -> tuple[str, ...]:
        """The stored keys (``<stem>.txt``), in table order."""
        return self.keys

    def lookup(self, image_name: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
        """The matrices of one image.

        Args:
            image_name: ``"boat_0.tif"``, ``"boat_0"``, ``"boat_0.txt"`` or a path; see :func:`local_key`.

        Returns:
            tuple[np.ndarray, np.ndarray]: ``rep`` float32 ``[N, F]`` and ``adj`` float32 ``[N, N]``
            (views into the table; copy before writing to them).

        Raises:
            KeyError: the image is not in the table (names the image, the key and the file).
        """
        key = local_key(image_name)
        index = self._index.get(key)
        if index is None:
            raise KeyError(
                f"image {os.fspath(image_name)!r} (key {key!r}) is not in local-feature file {self.source} "
                f"({len(self)} images); build its DREA matrices or use the file made for this dataset"
            )
        return self.local_rep[index], self.adj_matrix[index]

    def lookup_batch(self, image_names: Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
        """Stack :meth:`lookup` for several images: ``[B, N, F]`` and ``[B, N, N]`` float32."""
        indices = []
        for name in image_names:
            self.lookup(name)  # raises the descriptive KeyError
            indices.append(self._index[local_key(name)])
        return self.local_rep[indices], self.adj_matrix[indices]


# ---------------------------------------------------------------------------------------------
# Reading


def _read_original_npy(stream: BinaryIO, source: str) -> Any:
    """Unpickle the payload of an object ``.npy`` with the restricted unpickler."""
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise LocalFileError(f"{source}: .npy format version {version} is not supported (expected 1.0 or 2.0)")
    except (ValueError, EOFError) as exc:
        if isinstance(exc, LocalFileError):
            raise
        raise LocalFileError(f"{source}: corrupt .npy header ({exc})") from exc
    if not dtype.hasobject:
        raise LocalFileError(
            f"{source}: holds a plain {dtype} array of shape {shape}, not the original's pickled "
            "{'local_rep': ..., 'adj_matrix': ...} dict"
        )
    try:
        payload = _RestrictedUnpickler(stream, source).load()
    except LocalFileError:
        raise
    except Exception as exc:  # truncated or garbled pickles raise many types
        raise LocalFileError(f"{source}: the pickled payload is corrupt ({type(exc).__name__}: {exc})") from exc
    if isinstance(payload, np.ndarray) and payload.shape == ():
        payload = payload.item()  # the original's `[()]`
    return payload


def _table_from_original(
    payload: Any, source: str, num_objects: int | None, object_dim: int | None
) -> LocalFeatureTable:
    is_dict = isinstance(payload, dict)
    if not (is_dict and isinstance(payload.get(REP_KEY), dict) and isinstance(payload.get(ADJ_KEY), dict)):
        found = sorted(map(str, payload)) if is_dict else type(payload).__name__
        raise LocalFileError(f"{source}: expected a dict with '{REP_KEY}' and '{ADJ_KEY}' dicts, found {found}")
    return LocalFeatureTable.from_mapping(payload[REP_KEY], payload[ADJ_KEY], source, num_objects, object_dim)


def _table_from_npz(path: Path, num_objects: int | None, object_dim: int | None) -> LocalFeatureTable:
    source = str(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            members = set(archive.files)
            needed = {"format", "names", REP_KEY, ADJ_KEY}
            if not needed <= members:
                raise LocalFileError(f"{source}: not a galr local-feature .npz (missing {sorted(needed - members)})")
            marker = str(archive["format"])
            if marker != NPZ_FORMAT:
                raise LocalFileError(f"{source}: local-feature format {marker!r} is not {NPZ_FORMAT!r}; update galr")
            names, rep, adj = [str(n) for n in archive["names"]], archive[REP_KEY], archive[ADJ_KEY]
    except (ValueError, OSError, EOFError) as exc:
        if isinstance(exc, LocalFileError):
            raise
        raise LocalFileError(f"{source}: unreadable .npz ({exc})") from exc
    table = LocalFeatureTable(tuple(names), rep, adj, source)
    expected = (num_objects or table.num_objects, object_dim or table.object_dim)
    if len(table) and (table.num_objects, table.object_dim) != expected:
        raise LocalFileError(
            f"{source}: holds {table.num_objects}x{table.object_dim} local_rep matrices, "
            f"expected {expected[0]}x{expected[1]}"
        )
    return table


def load_local_file(
    path: str | os.PathLike, num_objects: int | None = 20, object_dim: int | None = 20
) -> LocalFeatureTable:
    """Read an original pickled ``.npy`` local file (safely) or our ``.npz``.

    Args:
        path: the file; the format is recognised by its first bytes.
        num_objects: required rows per image (the original model: 20); None accepts any, if consistent.
        object_dim: required ``local_rep`` columns (20); None accepts any, if consistent.

    Returns:
        LocalFeatureTable: matrices by image key.

    Raises:
        FileNotFoundError: no such file.
        LocalFileError: unknown format, a refused pickle global (nothing from it is executed),
            a corrupt file or a matrix of the wrong shape; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such local-feature file")
    with path.open("rb") as stream:
        magic = stream.read(6)
        stream.seek(0)
        if magic == _NPY_MAGIC:
            payload = _read_original_npy(stream, str(path))
            return _table_from_original(payload, str(path), num_objects, object_dim)
    if magic.startswith(_ZIP_MAGIC):
        return _table_from_npz(path, num_objects, object_dim)
    raise LocalFileError(f"{path}: neither a .npy (original GaLR) nor a .npz (galr) local-feature file")


def save_local_file(path: str | os.PathLike, table: LocalFeatureTable) -> Path:
    """Write a table as a pickle-free, compressed ``.npz`` that :func:`load_local_file` reads.

    Args:
        path: destination; must end in ``.npz`` (numpy would otherwise append it silently).
        table: the matrices.

    Returns:
        Path: the written path.

    Raises:
        ValueError: ``path`` does not end in ``.npz``.
    """
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise InputError(f"{path}: local-feature files are written as .npz; use a name ending in .npz")
    with atomic_output(path) as stream:
        np.savez_compressed(
            stream,
            format=np.array(NPZ_FORMAT),
            names=np.array(table.keys, dtype=np.str_).reshape(len(table.keys)),
            local_rep=table.local_rep,
            adj_matrix=table.adj_matrix,
        )
    return path


__all__ = [
    "ALLOWED_PICKLE_GLOBALS",
    "LocalFeatureTable",
    "LocalFileError",
    "NPZ_FORMAT",
    "load_local_file",
    "local_key",
    "save_local_file",
]
