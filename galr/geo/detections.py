"""Detections of a whole scene given as GeoJSON (boxes or oriented boxes in map coordinates, any CRS).

A FeatureCollection of Polygon features, each with a ``label`` (or ``class``/``category``) and an
optional ``score`` property. Coordinates are WGS84 longitude/latitude as RFC 7946 says, unless the
collection names another CRS the 2008 way (``"crs": {"type": "name", "properties": {"name":
"EPSG:32633"}}``). Polygons are mapped to scene pixels; a four-corner polygon stays an oriented box,
any other polygon becomes its bounding box. The result is an ordinary
:class:`~galr.preprocess.detections.DetectionSet` in scene pixels, clipped into tiles like the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from galr.errors import InputError
from galr.geo.scene import Scene

if TYPE_CHECKING:
    from galr.preprocess.detections import DetectionSet


def _crs_name(document: dict[str, Any]) -> str:
    crs = document.get("crs")
    if isinstance(crs, dict) and isinstance(crs.get("properties"), dict) and crs["properties"].get("name"):
        name = str(crs["properties"]["name"])
        return "EPSG:4326" if name.endswith("CRS84") else name
    return "EPSG:4326"


def read_geojson_detections(path: str | Path, scene: Scene) -> "DetectionSet":
    """The detections of a GeoJSON file in ``scene``'s pixel coordinates.

    Raises:
        InputError: not a FeatureCollection of labelled polygons, an unknown CRS, or a scene without georeference.
    """
    from galr.preprocess.detections import Detection, DetectionSet

    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a GeoJSON file ({exc})") from None
    if not isinstance(document, dict) or document.get("type") != "FeatureCollection":
        raise InputError(f"{path}: detections in GeoJSON are a FeatureCollection of Polygon features")
    crs = _crs_name(document)
    found = []
    for number, feature in enumerate(document.get("features") or []):
        geometry = (feature or {}).get("geometry") or {}
        properties = (feature or {}).get("properties") or {}
        label = properties.get("label") or properties.get("class") or properties.get("category")
        if geometry.get("type") != "Polygon" or not label:
            raise InputError(f"{path}: feature {number} needs a Polygon geometry and a 'label' property")
        ring = geometry["coordinates"][0]
        if len(ring) > 1 and ring[0] == ring[-1]:
            ring = ring[:-1]
        cols, rows = scene.to_pixels([p[0] for p in ring], [p[1] for p in ring], crs)
        score = float(properties.get("score", 1.0))
        if len(ring) == 4:
            found.append(Detection.from_polygon(str(label), score, list(zip(cols.tolist(), rows.tolist()))))
        else:
            found.append(Detection(str(label), score, (float(cols.min()), float(rows.min()), float(cols.max()),
                                                        float(rows.max()))))
    return DetectionSet(tuple(found), scene.width, scene.height, str(path), scene.path.name)


__all__ = ["read_geojson_detections"]
