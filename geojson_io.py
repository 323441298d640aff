"""Reading GeoJSON as QuPath and `predict` write it: the features of a file and the rings of its (Multi)Polygons.

Used by both importers (`annotations` for per-image files, `slide_annotations` for whole-slide files). Errors
are `UserError`s naming the file and, for a ring, the feature.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from utils import UserError

GEOMETRY_TYPES = ("Polygon", "MultiPolygon", "Point", "LineString", "MultiPoint", "MultiLineString",
                  "GeometryCollection")


def read_features(path: str | os.PathLike) -> list[Any]:
    """The features of a GeoJSON FeatureCollection, a single Feature or bare geometry, or a JSON array of
    features (what older QuPath versions export)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid GeoJSON file ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        kind = obj.get("type")
        if kind == "FeatureCollection" and isinstance(obj.get("features"), list):
            return obj["features"]
        if kind == "Feature":
            return [obj]
        if kind in GEOMETRY_TYPES:
            return [{"type": "Feature", "geometry": obj}]
    raise UserError(f"{path}: not a GeoJSON FeatureCollection, Feature or array of features (in QuPath: File > "
                    "Export objects as GeoJSON, 'Export as FeatureCollection')")


def ring(points: Any, path: str | os.PathLike, where: str) -> np.ndarray:
    """(N, 2) float64 (x, y) vertices of one ring; an empty ring gives (0, 2)."""
    try:
        xy = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: {where}: coordinates are not numbers") from None
    if xy.size == 0:
        return np.zeros((0, 2))
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise UserError(f"{path}: {where}: expected a list of [x, y] points")
    return xy[:, :2]


def polygon_parts(geometry: Any, path: str | os.PathLike, where: str
                  ) -> list[tuple[np.ndarray, list[np.ndarray]]] | None:
    """[(exterior ring, [hole rings])] of a Polygon / MultiPolygon geometry (empty polygons left out); None for
    any other geometry."""
    if not isinstance(geometry, dict) or geometry.get("type") not in ("Polygon", "MultiPolygon"):
        return None
    coords = geometry.get("coordinates")
    polygons = [coords] if geometry["type"] == "Polygon" else coords
    if not isinstance(polygons, list):
        raise UserError(f"{path}: {where}: {geometry['type']} coordinates must be a list")
    return [(ring(polygon[0], path, where), [ring(h, path, where) for h in polygon[1:]])
            for polygon in polygons if isinstance(polygon, list) and polygon]
