"""GeoJSON (RFC 7946) of search hits and localised regions: WGS84 longitude/latitude, closed rings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from galr.atomic import write_text_atomically
from galr.errors import InputError


def polygon(ring: Sequence[Sequence[float]]) -> dict[str, Any]:
    """A GeoJSON Polygon of one ``(lon, lat)`` ring (closed here when it is not)."""
    points = [[float(x), float(y)] for x, y in ring]
    if points and points[0] != points[-1]:
        points.append(points[0])
    return {"type": "Polygon", "coordinates": [points]}


def hit_features(results: Iterable[Any]) -> list[dict[str, Any]]:
    """One Feature per hit of every query result: footprint polygon (``null`` when the hit has no place) and
    the hit's query, rank, scores, id, scene, window, centre and date."""
    features = []
    for result in results:
        for hit in result.hits:
            record = hit.record or {}
            extra = record.get("extra") or {}
            properties = {"query": result.query, "rank": hit.rank, "id": hit.id, "score": round(hit.score, 6),
                          "mr_score": None if hit.rerank_score is None else round(hit.rerank_score, 6),
                          "scene": extra.get("scene"), "window": extra.get("window"), "path": record.get("path"),
                          "lat": record.get("lat"), "lon": record.get("lon"), "datetime": extra.get("datetime")}
            footprint = record.get("footprint")
            features.append({"type": "Feature", "geometry": polygon(footprint) if footprint else None,
                             "properties": properties})
    return features


def feature_collection(features: list[dict[str, Any]], **properties: Any) -> dict[str, Any]:
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if properties:
        collection["properties"] = properties  # a foreign member, allowed by RFC 7946 section 6.1
    return collection


def write_hits_geojson(path: str | Path, results: Sequence[Any]) -> Path:
    """Write every hit of ``results`` as a FeatureCollection (atomically).

    Raises:
        InputError: no hit has a footprint (the index holds no georeferenced tiles), so nothing
            could be placed on a map; JSON output (``--json``) has the pixel windows instead.
    """
    features = hit_features(results)
    if features and not any(feature["geometry"] for feature in features):
        raise InputError("none of the hits has a place on Earth (the index holds no georeferenced scene tiles); "
                         "--geojson needs an index built from GeoTIFF scenes with --tile; use --json for pixel windows")
    write_text_atomically(Path(path), json.dumps(feature_collection(features), indent=1) + "\n")
    return Path(path)


__all__ = ["feature_collection", "hit_features", "polygon", "write_hits_geojson"]
