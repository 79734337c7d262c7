"""STAC on disk as an input: the GeoTIFF/COG assets of a Catalog, Collection or ItemCollection, with their items' facts.

Each item gives one scene: its ``visual`` asset when it has one, else the first asset whose media
type is a TIFF (``image/tiff``, ``image/tiff; application=geotiff``, COG profiles) or whose file
name ends in ``.tif``/``.tiff``. Asset links are resolved against the file that lists them; only
files on this machine are read (no network). Every tile of the scene records the item id and the
properties archives search by: ``datetime``, ``platform``, ``constellation``, ``gsd``,
``eo:cloud_cover`` (those present).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galr.errors import InputError, NotFoundError, UnavailableError
from galr.geo.scene import INSTALL_HINT

#: Item properties copied into every tile's record.
KEPT_PROPERTIES: tuple[str, ...] = ("datetime", "platform", "constellation", "gsd", "eo:cloud_cover")


@dataclass(frozen=True)
class StacScene:
    """One item's scene file and what its tiles record about the item."""

    path: Path
    item_id: str
    properties: dict[str, Any] = field(default_factory=dict)


def _is_tiff(asset: Any) -> bool:
    media = (asset.media_type or "").lower()
    return "tiff" in media or asset.href.lower().split("?")[0].endswith((".tif", ".tiff"))


def _asset(item: Any) -> Any | None:
    assets = item.assets
    if "visual" in assets and _is_tiff(assets["visual"]):
        return assets["visual"]
    return next((asset for asset in assets.values() if _is_tiff(asset)), None)


def _local(href: str, base: Path) -> Path | None:
    if "://" in href and not href.startswith("file://"):
        return None
    path = Path(href[len("file://"):] if href.startswith("file://") else href)
    return path if path.is_absolute() else (base / path)


def is_stac_file(path: str | os.PathLike) -> bool:
    """A ``.json`` file that is a STAC Catalog, Collection, Item or ItemCollection (by its ``type``/``stac_version``)."""
    import json

    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        with path.open("r", encoding="utf-8") as handle:
            head = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(head, dict) and ("stac_version" in head or (head.get("type") == "FeatureCollection" and any(
        isinstance(f, dict) and "stac_version" in f for f in head.get("features", [])[:1])))


def read_stac_scenes(path: str | os.PathLike) -> tuple[list[StacScene], list[str]]:
    """The scenes of a STAC file on disk and the items left out (with why).

    Raises:
        UnavailableError: pystac is not installed.
        InputError: not a STAC document pystac can read.
    """
    try:
        import pystac
    except ImportError:
        raise UnavailableError(f"reading STAC needs pystac: {INSTALL_HINT}") from None
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such STAC file")
    try:
        import json

        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("type") == "FeatureCollection":
            items = list(pystac.ItemCollection.from_dict(document, preserve_dict=False))
        elif document.get("type") == "Feature":
            items = [pystac.Item.from_dict(document)]
        else:
            catalog = pystac.read_file(str(path))
            items = list(catalog.get_items(recursive=True))
    except Exception as exc:  # noqa: BLE001 - pystac raises many kinds for a bad document
        raise InputError(f"{path}: not a STAC catalog, collection, item or item collection ({exc})") from None
    scenes, left_out = [], []
    for item in items:
        asset = _asset(item)
        if asset is None:
            left_out.append(f"STAC item {item.id}: no GeoTIFF asset")
            continue
        base = Path(item.get_self_href()).parent if item.get_self_href() else path.parent
        local = _local(asset.href, base)
        if local is None or not local.is_file():
            left_out.append(f"STAC item {item.id}: asset {asset.href} is not a file on this machine")
            continue
        kept = {name: item.properties[name] for name in KEPT_PROPERTIES if item.properties.get(name) is not None}
        if item.datetime is not None:
            kept["datetime"] = item.datetime.strftime("%Y-%m-%dT%H:%M:%S")
        scenes.append(StacScene(local, item.id, kept))
    return scenes, left_out


__all__ = ["KEPT_PROPERTIES", "StacScene", "is_stac_file", "read_stac_scenes"]
