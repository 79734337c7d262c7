"""Reading remote-sensing scenes (GeoTIFF / COG) window by window, as 8-bit RGB the model can see.

A scene is never read whole: every read is a window (:meth:`Scene.read_window`), the stretch is
computed from a decimated read (the file's overviews when it has them), and the overview picture
for reports is one more decimated read. Peak memory therefore depends on the tile size, not on the
scene size.

Rules (what a remote-sensing viewer does, so tiles look like the chips the model was trained on):

* **Bands** (:func:`default_bands`): 1-based as in GDAL. A scene whose colour interpretation names
  red, green and blue uses those; otherwise 1-2 bands are shown as grey (band 1 three times),
  3-12 bands as 1,2,3, and 13 or more (Sentinel-2 order B1..B12 with B8A) as 4,3,2 (true colour).
  ``--bands 4,3,2`` overrides.
* **Stretch** (:class:`SceneReadSettings`): 8-bit data is passed through unchanged (it is already
  what viewers show). Other data types are clipped per band to the ``stretch`` percentiles of the
  valid pixels of the overview read (default 2-98 %) and scaled linearly to 0-255.
* **Nodata**: the dataset mask (nodata values, alpha band or internal mask) marks invalid pixels;
  they become black, and a window whose valid fraction is below ``min_valid_fraction`` is skipped
  by the tiler and counted.
* **Georeference**: a scene without one (no CRS) works in pixel coordinates with a warning; a CRS
  that cannot be turned into longitude/latitude (a local engineering CRS) does the same.

rasterio is an optional dependency (``pip install 'galr[geo]'``); nothing else in galr needs it.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np

from galr.errors import InputError, NotFoundError, UnavailableError

SCENE_SUFFIXES = frozenset({".tif", ".tiff", ".vrt", ".jp2", ".img"})
#: Scenes larger than this many pixels are refused from their header (a 65k x 65k scene); raise it
#: with ``SceneReadSettings.max_pixels`` for bigger mosaics.
DEFAULT_MAX_SCENE_PIXELS = 1 << 32
INSTALL_HINT = "install the geo extra: pip install 'galr[geo]'"


class SceneError(InputError):
    """A scene cannot be opened or read (not a raster, corrupt, unsupported layout)."""


class GeoWarning(UserWarning):
    """A scene is used without a usable georeference (results are in pixel coordinates)."""


def require_rasterio() -> ModuleType:
    """The ``rasterio`` module, or :class:`~galr.errors.UnavailableError` saying how to install it."""
    try:
        import rasterio
    except ImportError:
        raise UnavailableError(f"reading GeoTIFF scenes needs rasterio: {INSTALL_HINT}") from None
    return rasterio


@dataclass(frozen=True)
class SceneReadSettings:
    """How scene pixels become 8-bit RGB.

    Attributes:
        bands: 1-based band numbers shown as R, G, B; ``None`` = :func:`default_bands`.
        stretch: lower and upper percentiles of the per-band clip for data that is not 8-bit;
            ``None`` = scale by the data type's range instead (no statistics read).
        overview_side: longest side of the decimated read the statistics and overview come from.
        min_valid_fraction: windows with fewer valid (not nodata) pixels are skipped by the tiler.
        max_pixels: refuse scenes whose header declares more pixels than this.
        gdal_cache_mb: GDAL's block cache while a scene is open. Windows are read once, in order, so
            a small cache suffices; GDAL's default (5 % of RAM) keeps every block read, and memory
            then grows with the scene (a 16k x 16k scene: +770 MiB).
    """

    bands: tuple[int, ...] | None = None
    stretch: tuple[float, float] | None = (2.0, 98.0)
    overview_side: int = 1024
    min_valid_fraction: float = 0.5
    max_pixels: int = DEFAULT_MAX_SCENE_PIXELS
    gdal_cache_mb: int = 64

    def __post_init__(self) -> None:
        if self.bands is not None:
            bands = tuple(self.bands)
            if len(bands) not in (1, 3) or any(isinstance(b, bool) or int(b) != b or b < 1 for b in bands):
                raise InputError(f"bands must be 1 or 3 band numbers counted from 1 (e.g. 4,3,2), got {self.bands}")
            object.__setattr__(self, "bands", tuple(int(b) for b in bands) * (3 if len(bands) == 1 else 1))
        if self.stretch is not None:
            low, high = (float(v) for v in self.stretch)
            if not 0.0 <= low < high <= 100.0:
                raise InputError(f"stretch percentiles must satisfy 0 <= low < high <= 100, got {self.stretch}")
            object.__setattr__(self, "stretch", (low, high))
        if self.overview_side < 64:
            raise InputError(f"overview_side must be at least 64 pixels, got {self.overview_side}")
        if not 0.0 <= self.min_valid_fraction <= 1.0:
            raise InputError(f"min_valid_fraction must be in [0, 1], got {self.min_valid_fraction}")
        if self.max_pixels < 1 or self.gdal_cache_mb < 1:
            raise InputError(f"max_pixels and gdal_cache_mb must be positive, got {self.max_pixels} and "
                             f"{self.gdal_cache_mb}")


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """``"4,3,2"`` -> ``(4, 3, 2)``; ``None`` or ``""`` -> ``None`` (the defaults)."""
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--bands takes band numbers separated by commas (e.g. 4,3,2), got {text!r}") from None


def default_bands(count: int, colour_names: Sequence[str] = ()) -> tuple[int, int, int]:
    """The bands shown as RGB for a scene of ``count`` bands (see the module docstring)."""
    names = [name.lower() for name in colour_names]
    if all(colour in names for colour in ("red", "green", "blue")):
        return (names.index("red") + 1, names.index("green") + 1, names.index("blue") + 1)
    if count < 3:
        return (1, 1, 1)
    if count >= 13:
        return (4, 3, 2)
    return (1, 2, 3)


@dataclass(frozen=True)
class PixelWindow:
    """A rectangle of scene pixels: column and row of its top-left corner, width and height."""

    col: int
    row: int
    width: int
    height: int

    def as_list(self) -> list[int]:
        return [self.col, self.row, self.width, self.height]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> "PixelWindow":
        if len(values) != 4:
            raise InputError(f"a pixel window is [col, row, width, height], got {list(values)}")
        return cls(*(int(v) for v in values))


def _metres_per_unit(crs: Any) -> float | None:
    """Metres per CRS unit for projected CRSs (``None`` for geographic ones)."""
    if crs is None or crs.is_geographic:
        return None
    try:
        return float(crs.linear_units_factor[1])
    except Exception:  # noqa: BLE001 - an exotic unit: assume metres, as most projected CRSs are
        return 1.0


class Scene:
    """An open scene: its size, bands, georeference, and windowed 8-bit reads.

    Use as a context manager (``with Scene.open(path) as scene:``); the dataset stays open until then.

    Attributes:
        path: the file.
        width, height: pixels.
        count: bands in the file.
        bands: the 1-based bands shown as R, G, B.
        crs: the rasterio CRS, or ``None`` when the scene has no usable georeference.
        gsd: ground sample distance in metres (``None`` without georeference).
        datetime: acquisition time as ISO text from the file's tags (:data:`DATETIME_TAGS`), or ``None``.
        stretch_range: per shown band, the ``(low, high)`` values mapped to 0 and 255 (``None`` = 8-bit pass-through).
    """

    def __init__(self, dataset: Any, path: Path, settings: SceneReadSettings, env: Any = None,
                 stretch_range: Sequence[Sequence[float]] | None = None) -> None:
        self._dataset = dataset
        self._env = env  # the rasterio.Env (GDAL's cache size) that lives as long as the scene is open
        self.path = path
        self.settings = settings
        self.width, self.height, self.count = int(dataset.width), int(dataset.height), int(dataset.count)
        colour_names = [getattr(c, "name", str(c)) for c in dataset.colorinterp]
        self.bands = settings.bands or default_bands(self.count, colour_names)
        if max(self.bands) > self.count:
            raise InputError(f"{path}: --bands {','.join(map(str, self.bands))} asks for band {max(self.bands)} but "
                             f"the scene has {self.count} band(s); choose bands from 1 to {self.count}")
        self.dtype = np.dtype(dataset.dtypes[self.bands[0] - 1])
        from rasterio.enums import MaskFlags

        # No nodata value, no mask, no alpha: every pixel is valid and the mask need not be read.
        self._all_valid = all(flags == [MaskFlags.all_valid] for flags in dataset.mask_flag_enums)
        self.crs, self._to_wgs84 = self._usable_crs()
        self.datetime = _acquired(dataset.tags())
        self.gsd = self._gsd()
        self.stretch_range = ([(float(lo), float(hi)) for lo, hi in stretch_range] if stretch_range is not None
                              else self._stretch_range())

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, settings: SceneReadSettings | None = None, *,
             stretch_range: Sequence[Sequence[float]] | None = None) -> "Scene":
        """Open ``path`` (header and statistics only; no full read).

        ``stretch_range`` reuses the per-band range an earlier opening computed (a tile record keeps
        it), so reading one window does not read the overview again.

        Raises:
            NotFoundError: no such file.
            SceneError: not a raster GDAL can read, or corrupt headers.
            InputError: the scene declares more than ``settings.max_pixels`` pixels, or bad ``--bands``.
            UnavailableError: rasterio is not installed.
        """
        rasterio = require_rasterio()
        settings = settings or SceneReadSettings()
        path = Path(path)
        if not path.is_file():
            raise NotFoundError(f"{path}: scene not found")
        env = rasterio.Env(GDAL_CACHEMAX=settings.gdal_cache_mb)
        env.__enter__()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NotGeoreferencedWarning: said once, in our words, below
                try:
                    dataset = rasterio.open(path)
                except Exception as exc:  # rasterio's RasterioIOError and GDAL's errors
                    raise SceneError(f"{path}: cannot be read as a raster scene ({_short(exc)}); "
                                     "give a GeoTIFF, COG or another GDAL raster") from None
            try:
                if dataset.width * dataset.height > settings.max_pixels:
                    raise InputError(f"{path}: declares {dataset.width} x {dataset.height} pixels, more than the "
                                     f"limit of {settings.max_pixels} (SceneReadSettings.max_pixels); split the "
                                     "scene or raise it")
                return cls(dataset, path, settings, env, stretch_range)
            except BaseException:
                dataset.close()
                raise
        except BaseException:
            env.__exit__(None, None, None)
            raise

    def close(self) -> None:
        self._dataset.close()
        if self._env is not None:
            self._env.__exit__(None, None, None)
            self._env = None

    def __enter__(self) -> "Scene":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- georeference --------------------------------------------------------------------------

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None

    @property
    def crs_name(self) -> str | None:
        """``"EPSG:32633"`` or the CRS's WKT name; ``None`` without georeference."""
        if self.crs is None:
            return None
        epsg = self.crs.to_epsg()
        return f"EPSG:{epsg}" if epsg else self.crs.to_string()

    def _usable_crs(self) -> tuple[Any, Any]:
        dataset = self._dataset
        crs = dataset.crs
        if crs is None:
            warnings.warn(GeoWarning(f"{self.path}: no georeference (no CRS); results are in pixel coordinates"),
                          stacklevel=3)
            return None, None
        from rasterio.warp import transform as warp_transform

        try:
            lon, lat = warp_transform(crs, "EPSG:4326", [dataset.transform.c], [dataset.transform.f])
            if not (math.isfinite(lon[0]) and math.isfinite(lat[0])):
                raise ValueError("not finite")
        except Exception as exc:  # noqa: BLE001 - local/engineering CRSs cannot reach WGS84
            warnings.warn(GeoWarning(f"{self.path}: its CRS ({crs.to_string()[:60]}) cannot be converted to "
                                     f"longitude/latitude ({_short(exc)}); results are in pixel coordinates"),
                          stacklevel=3)
            return None, None
        return crs, lambda xs, ys: warp_transform(crs, "EPSG:4326", xs, ys)

    def _gsd(self) -> float | None:
        if self.crs is None:
            return None
        transform = self._dataset.transform
        size = (math.hypot(transform.a, transform.d) + math.hypot(transform.b, transform.e)) / 2
        factor = _metres_per_unit(self.crs)
        if factor is not None:
            return size * factor
        _, lat = self.lonlat([self.width / 2], [self.height / 2])
        return size * 111_320.0 * math.cos(math.radians(lat[0]))  # degrees -> metres at the scene centre

    def lonlat(self, cols: Sequence[float], rows: Sequence[float]) -> tuple[list[float], list[float]]:
        """Pixel coordinates (column, row; may be fractional) -> WGS84 longitudes and latitudes.

        Raises:
            InputError: the scene has no usable georeference.
        """
        if self._to_wgs84 is None:
            raise InputError(f"{self.path} has no usable georeference; it has pixel coordinates only")
        transform = self._dataset.transform
        xs, ys = zip(*(transform @ (c, r) for c, r in zip(cols, rows)))
        lon, lat = self._to_wgs84(list(xs), list(ys))
        return [float(v) for v in lon], [float(v) for v in lat]

    def to_pixels(self, xs: Sequence[float], ys: Sequence[float], crs: str = "EPSG:4326"
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Map coordinates in ``crs`` -> scene pixel columns and rows (fractional).

        Raises:
            InputError: the scene has no usable georeference, or ``crs`` is unknown.
        """
        if self.crs is None:
            raise InputError(f"{self.path} has no usable georeference; map coordinates cannot be placed on it")
        from rasterio.warp import transform as warp_transform

        try:
            xs, ys = warp_transform(crs, self.crs, list(xs), list(ys))
        except Exception as exc:  # noqa: BLE001 - pyproj/GDAL errors for an unknown CRS
            raise InputError(f"cannot convert coordinates from {crs!r} to the scene's CRS ({_short(exc)})") from None
        inverse = ~self._dataset.transform
        cols, rows = zip(*(inverse @ (x, y) for x, y in zip(xs, ys))) if len(xs) else ((), ())
        return np.asarray(cols, float), np.asarray(rows, float)

    def footprint(self, window: PixelWindow) -> tuple[tuple[float, float], ...] | None:
        """The window's outline in WGS84 ``(lon, lat)``, closed (first point repeated); ``None`` without georeference."""
        if self._to_wgs84 is None:
            return None
        c0, r0, c1, r1 = window.col, window.row, window.col + window.width, window.row + window.height
        lon, lat = self.lonlat([c0, c1, c1, c0, c0], [r0, r0, r1, r1, r0])
        return tuple(zip(lon, lat))

    def centre(self, window: PixelWindow) -> tuple[float, float] | None:
        """``(lat, lon)`` of the window's centre; ``None`` without georeference."""
        if self._to_wgs84 is None:
            return None
        lon, lat = self.lonlat([window.col + window.width / 2], [window.row + window.height / 2])
        return lat[0], lon[0]

    @property
    def transform(self) -> Any:
        """The affine pixel -> CRS transform (rasterio's ``Affine``)."""
        return self._dataset.transform

    # -- pixels --------------------------------------------------------------------------------

    def _stretch_range(self) -> list[tuple[float, float]] | None:
        if self.dtype == np.uint8:
            return None
        if self.settings.stretch is None:
            if np.issubdtype(self.dtype, np.integer):
                return [(0.0, float(np.iinfo(self.dtype).max))] * 3
            return [(0.0, 1.0)] * 3
        data, valid = self._decimated(self.settings.overview_side)
        low, high = self.settings.stretch
        ranges = []
        for band in data:
            values = band[valid & np.isfinite(band)]
            if values.size == 0:
                ranges.append((0.0, 1.0))
                continue
            lo, hi = (float(v) for v in np.percentile(values, [low, high]))
            ranges.append((lo, hi if hi > lo else lo + 1.0))
        return ranges

    def _decimated(self, side: int) -> tuple[np.ndarray, np.ndarray]:
        """The shown bands read at most ``side`` pixels on the long side (overviews used when present)."""
        from rasterio.enums import Resampling

        scale = max(self.width, self.height) / side
        shape = (max(1, round(self.height / max(scale, 1))), max(1, round(self.width / max(scale, 1))))
        try:
            data = self._dataset.read(list(self.bands), out_shape=(3, *shape), resampling=Resampling.average,
                                      masked=False).astype(np.float32)
            valid = self._dataset.dataset_mask(out_shape=shape) > 0
        except Exception as exc:  # noqa: BLE001 - a corrupt file fails here first
            raise SceneError(f"{self.path}: cannot read its overview ({_short(exc)}); the file may be truncated") from None
        return data, valid

    def _to_uint8(self, data: np.ndarray) -> np.ndarray:
        if self.stretch_range is None:
            return data.astype(np.uint8, copy=False)
        out = np.empty(data.shape, np.float32)
        for band, (lo, hi) in enumerate(self.stretch_range):
            values = data[band].astype(np.float32, copy=False)
            out[band] = (values - lo) * (255.0 / (hi - lo))
        np.nan_to_num(out, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def read_window(self, window: PixelWindow, pad_to: int | None = None,
                    max_side: int | None = None) -> tuple[np.ndarray, float]:
        """8-bit RGB pixels ``[h, w, 3]`` of ``window`` and the fraction of them that is valid.

        Parts of the window outside the scene (a scene smaller than a tile) are read as nodata, so
        the result is ``pad_to`` x ``pad_to`` when given. A window longer than ``max_side`` is read
        decimated (GDAL's average, from overviews when the file has them) to at most ``max_side``
        pixels a side, so large windows cost what small ones do.

        Raises:
            SceneError: the window's bytes cannot be read (a truncated or corrupt file).
        """
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        width = max(window.width, pad_to or 0)
        height = max(window.height, pad_to or 0)
        box = Window(window.col, window.row, width, height)
        shape = None
        if max_side is not None and max(width, height) > max_side:
            factor = max(width, height) / max_side
            shape = (max(1, round(height / factor)), max(1, round(width / factor)))
        # Boundless reads go through a virtual dataset (slow): only windows that leave the scene need them.
        inside = window.col >= 0 and window.row >= 0 and window.col + width <= self.width \
            and window.row + height <= self.height
        options: dict[str, Any] = {"window": box} if inside else {"window": box, "boundless": True}
        if shape is not None:
            options["out_shape"] = shape
        try:
            with warnings.catch_warnings():
                # rasterio 1.4's own boundless-read code still multiplies affines with `*`
                warnings.simplefilter("ignore", PendingDeprecationWarning)
                read_shape = {"out_shape": (3, *shape), "resampling": Resampling.average} if shape else {}
                data = self._dataset.read(list(self.bands), **{**options, **read_shape},
                                          **({} if inside else {"fill_value": 0}))
                if self._all_valid and inside:
                    mask = np.ones(data.shape[1:], dtype=bool)
                else:
                    mask = self._dataset.dataset_mask(**options) > 0
        except Exception as exc:  # noqa: BLE001 - GDAL reports a bad block as an I/O error
            raise SceneError(f"{self.path}: window {window.as_list()} cannot be read ({_short(exc)})") from None
        pixels = self._to_uint8(data)
        pixels[:, ~mask] = 0
        return np.ascontiguousarray(pixels.transpose(1, 2, 0)), float(mask.mean()) if mask.size else 0.0

    def overview(self, side: int = 1024) -> np.ndarray:
        """The whole scene as 8-bit RGB ``[h, w, 3]`` at most ``side`` pixels on the long side."""
        data, valid = self._decimated(side)
        pixels = self._to_uint8(data)
        pixels[:, ~valid] = 0
        return np.ascontiguousarray(pixels.transpose(1, 2, 0))


#: Dataset tags that may hold the acquisition time, most specific first.
DATETIME_TAGS: tuple[str, ...] = ("ACQUISITIONDATETIME", "ACQUISITION_DATE", "datetime", "TIFFTAG_DATETIME")


def _acquired(tags: dict[str, str]) -> str | None:
    """The scene's time as ISO text (``2024-05-01T10:30:00``) from its tags, or ``None``."""
    from galr.geo.filters import parse_date

    for name in DATETIME_TAGS:
        if tags.get(name):
            try:
                return str(parse_date(tags[name]))
            except InputError:
                continue
    return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def is_scene_file(path: str | os.PathLike) -> bool:
    """A file galr reads as a scene (by suffix) rather than as a plain image."""
    return Path(path).suffix.lower() in SCENE_SUFFIXES


__all__ = [
    "DEFAULT_MAX_SCENE_PIXELS",
    "INSTALL_HINT",
    "SCENE_SUFFIXES",
    "GeoWarning",
    "PixelWindow",
    "Scene",
    "SceneError",
    "SceneReadSettings",
    "default_bands",
    "is_scene_file",
    "parse_bands",
    "require_rasterio",
]
