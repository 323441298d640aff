"""Per-image result files of the `predict` command: label TIFF, QuPath GeoJSON, per-nucleus measurements.

- `save_label_tiff` writes the instance label map as a zlib-compressed uint32 TIFF (0 = background).
- `labels_to_geojson` / `save_geojson` turn the label map into a GeoJSON FeatureCollection that QuPath
  imports as detection objects of class "Nucleus" (File > Import objects from file, or drag and drop).
  Each instance becomes one Polygon that follows the pixel edges of the instance's outer boundary.
- `measure_nuclei` / `save_measurements_csv` compute one row of morphology and colour measurements per
  nucleus (scikit-image `regionprops_table`) and write them as CSV.
- `GeoJSONWriter` / `CSVWriter` stream the same files feature by feature / row by row for whole slides
  (temporary file renamed on a successful close, removed on an error; gzip output is byte-deterministic).

Coordinates are pixel units with the origin at the top-left corner of the image, x to the right and y
downwards (QuPath's convention). See docs/export.md for the formats and the QuPath import steps.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

import utils

log = logging.getLogger(__name__)

CLASS_NAME = "Nucleus"
CLASS_COLOR = (230, 60, 60)  # RGB shown by QuPath for the "Nucleus" class

# Columns of the measurement CSV (in this order); the two µm columns only when a pixel size is known.
MEASUREMENT_COLUMNS = (
    "id", "centroid_x", "centroid_y", "area_px", "perimeter_px", "eccentricity", "solidity",
    "major_axis_px", "minor_axis_px", "mean_r", "mean_g", "mean_b", "mean_gray",
)
MICRON_COLUMNS = ("area_um2", "perimeter_um")

_4_CONNECTED = ndimage.generate_binary_structure(2, 1)
_8_CONNECTED = ndimage.generate_binary_structure(2, 2)


def measurement_columns(mpp: float | None = None) -> list[str]:
    """The CSV columns `measure_nuclei` produces (with `area_um2`, `perimeter_um` when `mpp` is given)."""
    return list(MEASUREMENT_COLUMNS) + (list(MICRON_COLUMNS) if mpp else [])


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise ValueError(f"label map must hold integers, got dtype {labels.dtype}")
    if labels.size and labels.dtype.kind == "i" and labels.min() < 0:
        raise ValueError("label map has negative ids (0 = background, ids must be positive)")
    return labels


def _index_map(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(index map, ids): an integer map whose values 1..n index the instances, and ids[k - 1] = id of
    index k, or None when the index is the id itself. Ids are compacted only when they are very large
    (scipy's `find_objects` and scikit-image allocate per possible id); sorting the whole image for
    `np.unique` is the slow path.
    """
    max_id = int(labels.max()) if labels.size else 0
    if max_id <= max(labels.size, 1 << 16):
        return labels.astype(np.int64 if max_id >= 2**31 else np.int32, copy=False), None
    ids, compact = np.unique(labels, return_inverse=True)
    compact = compact.reshape(labels.shape).astype(np.int64)
    if ids[0] == 0:
        return compact, ids[1:]
    return compact + 1, ids


# ----------------------------------------------------------------------------------------------
# Label TIFF
# ----------------------------------------------------------------------------------------------
def save_label_tiff(path: str | os.PathLike, labels: np.ndarray, smallest: bool = False) -> Path:
    """Write `labels` as a zlib-compressed uint32 TIFF of the same size (ids unchanged), atomically.
    `smallest=True` writes uint16 (NuInsSeg's own label format) when the ids fit, else uint32."""
    import tifffile

    labels = _check_labels(labels)
    if labels.size and (labels.min() < 0 or int(labels.max()) > np.iinfo(np.uint32).max):
        raise ValueError("label ids must lie in 0..2**32-1 to be stored as uint32")
    top = int(labels.max()) if labels.size else 0
    dtype = np.uint16 if smallest and top <= np.iinfo(np.uint16).max else np.uint32
    buf = io.BytesIO()
    tifffile.imwrite(buf, labels.astype(dtype, copy=False), compression="zlib",
                     photometric="minisblack", metadata=None)
    return utils.atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------
# GeoJSON polygons
# ----------------------------------------------------------------------------------------------
def _bridge_diagonals(mask: np.ndarray) -> np.ndarray:
    """Add one pixel wherever two pixels touch only at a corner, so the mask becomes 4-connected.

    Without this the outline of an 8-connected shape would pass twice through the shared corner
    (a self-touching ring, which GIS tools and QuPath treat as invalid).
    """
    mask = mask.copy()
    while True:
        a, b = mask[:-1, :-1], mask[:-1, 1:]
        c, d = mask[1:, :-1], mask[1:, 1:]
        main_diag = a & d & ~b & ~c   # top-left + bottom-right only: fill top-right
        anti_diag = b & c & ~a & ~d   # top-right + bottom-left only: fill top-left
        if not (main_diag.any() or anti_diag.any()):
            return mask
        rows, cols = np.nonzero(main_diag)
        mask[rows, cols + 1] = True
        rows, cols = np.nonzero(anti_diag)
        mask[rows, cols] = True


def _largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected piece of `mask` (ties: the first in raster order)."""
    pieces, count = ndimage.label(mask, structure=_8_CONNECTED)
    if count <= 1:
        return mask
    sizes = np.bincount(pieces.ravel())[1:]
    return pieces == (int(np.argmax(sizes)) + 1)


def _outer_ring(mask: np.ndarray) -> list[tuple[int, int]]:
    """Outer boundary of a 4-connected, hole-free mask with an empty 1-pixel frame, along pixel edges.

    Returns the corner points (x, y) in mask pixel-edge coordinates, closed (first point repeated),
    only where the direction changes, ordered so the signed (shoelace) area is positive.
    """
    # Directed unit edges with the foreground on one fixed side: each boundary pixel side becomes
    # an edge (start -> end). For a 4-connected hole-free mask every corner has exactly one outgoing edge.
    m = mask
    height, width = m.shape
    stride = width + 1  # vertex (x, y) -> integer key y * stride + x
    starts, ends = [], []
    r, c = np.nonzero(m & ~np.roll(m, 1, axis=0))    # background above: top side, left -> right
    starts.append(r * stride + c); ends.append(r * stride + c + 1)
    r, c = np.nonzero(m & ~np.roll(m, -1, axis=1))   # background right: right side, top -> bottom
    starts.append(r * stride + c + 1); ends.append((r + 1) * stride + c + 1)
    r, c = np.nonzero(m & ~np.roll(m, -1, axis=0))   # background below: bottom side, right -> left
    starts.append((r + 1) * stride + c + 1); ends.append((r + 1) * stride + c)
    r, c = np.nonzero(m & ~np.roll(m, 1, axis=1))    # background left: left side, bottom -> top
    starts.append((r + 1) * stride + c); ends.append(r * stride + c)
    start = np.concatenate(starts)
    end = np.concatenate(ends)

    order = np.argsort(start, kind="stable")
    sorted_start = start[order]
    successor = order[np.searchsorted(sorted_start, end)]  # edge that begins where this one ends

    # Follow the chain from the first edge (the top-left-most corner) once around.
    chain = np.empty(len(start), dtype=np.int64)
    edge = int(order[0])
    for i in range(len(start)):
        chain[i] = edge
        edge = int(successor[edge])
    if edge != chain[0]:
        raise RuntimeError("outline tracing did not close (mask not 4-connected or not hole-free)")

    xs = start[chain] % stride
    ys = start[chain] // stride
    dx = (end[chain] % stride) - xs
    dy = (end[chain] // stride) - ys
    turn = (dx != np.roll(dx, 1)) | (dy != np.roll(dy, 1))  # keep corners only
    points = list(zip(xs[turn].tolist(), ys[turn].tolist()))
    points.append(points[0])
    if _signed_area(points) < 0:
        points.reverse()
    return points


def _signed_area(ring: Sequence[Sequence[float]]) -> float:
    """Shoelace area of a closed ring; positive when counter-clockwise in (x, y) as written."""
    xy = np.asarray(ring, dtype=np.float64)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def instance_outline(mask: np.ndarray) -> list[tuple[int, int]]:
    """Closed outer outline (pixel edges, (x, y) in the mask's coordinates) of one instance mask.

    The largest 8-connected piece is used; pieces touching only at a corner are joined by one pixel
    and holes are filled, so the result is a simple ring whose area equals the piece's pixel count
    plus the filled hole and bridge pixels.
    """
    mask = np.pad(np.asarray(mask, dtype=bool), 1)
    if not mask.any():
        raise ValueError("empty mask has no outline")
    piece = _largest_piece(mask)
    piece = ndimage.binary_fill_holes(_bridge_diagonals(piece), structure=_4_CONNECTED)
    return [(x - 1, y - 1) for x, y in _outer_ring(piece)]


def _instance_slices(labels: np.ndarray) -> list[tuple[int, tuple[slice, slice]]]:
    """(id, bounding-box slices) for each non-zero id, sorted by id."""
    index, ids = _index_map(labels)
    boxes = ndimage.find_objects(index)
    return [(k + 1 if ids is None else int(ids[k]), box) for k, box in enumerate(boxes) if box is not None]


def _json_number(value: Any) -> float | int | None:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return None


def labels_to_geojson(labels: np.ndarray, offset: tuple[float, float] = (0, 0),
                      properties: Mapping[int, Mapping[str, Any]] | None = None,
                      scale: float = 1.0) -> dict:
    """GeoJSON FeatureCollection with one QuPath detection ("Nucleus") per instance id.

    `offset` (x, y) is added to every coordinate (e.g. the position of a crop in a larger slide), and the
    sum is multiplied by `scale` (e.g. level-0 pixels per pixel of the grid the labels were made on).
    `properties` optionally maps an instance id to numeric values (e.g. a row of `measure_nuclei`),
    stored in the feature's `measurements` as a list of {"name", "value"} (the form every QuPath
    version from 0.2 reads; QuPath shows them in its measurement table; non-numeric values and the
    `id` key are skipped, and the key is left out when there is nothing to store). The feature's
    `properties` also carry `name` ("Nucleus <id>", shown by QuPath) and `id` (the label id; QuPath
    ignores it, other tools can use it). Each Polygon is the outer boundary of the instance's largest
    piece along pixel edges: a closed ring, counter-clockwise in (x, y) as written (RFC 7946; this
    looks clockwise on screen because y points down), without holes.
    """
    labels = _check_labels(labels)
    ox, oy = float(offset[0]), float(offset[1])
    features = []
    for label_id, (rows, cols) in _instance_slices(labels):
        mask = labels[rows, cols] == label_id
        ring = [[float(x + cols.start + ox), float(y + rows.start + oy)]
                for x, y in instance_outline(mask)]
        if scale != 1.0:
            ring = [[x * float(scale), y * float(scale)] for x, y in ring]
        feature_properties: dict[str, Any] = {
            "objectType": "detection",
            "name": f"{CLASS_NAME} {label_id}",
            "classification": {"name": CLASS_NAME, "color": list(CLASS_COLOR)},
            "id": label_id,
        }
        measurements = []
        for key, value in ((properties or {}).get(label_id) or {}).items():
            number = _json_number(value)
            if key != "id" and number is not None:
                measurements.append({"name": str(key), "value": number})
        if measurements:
            feature_properties["measurements"] = measurements
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": feature_properties,
        })
    return {"type": "FeatureCollection", "features": features}


def save_geojson(path: str | os.PathLike, labels: np.ndarray, offset: tuple[float, float] = (0, 0),
                 properties: Mapping[int, Mapping[str, Any]] | None = None) -> Path:
    """Atomically write `labels_to_geojson(labels, offset, properties)` to `path` (compact JSON)."""
    collection = labels_to_geojson(labels, offset=offset, properties=properties)
    return utils.atomic_write_text(path, json.dumps(collection, separators=(",", ":")) + "\n")


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
def measure_nuclei(labels: np.ndarray, image: np.ndarray | None,
                   mpp: float | None = None) -> list[dict[str, Any]]:
    """One dict per instance id (sorted by id) with the columns of `measurement_columns(mpp)`.

    Centroids are in pixel coordinates (x, y) of pixel centres (pixel (0, 0) has its centre at
    (0, 0)). `perimeter_px` is scikit-image's `perimeter` (4-neighbourhood, through boundary pixel
    centres: a w x h rectangle gives 2(w-1) + 2(h-1)). `eccentricity`, axes and `solidity` come from the
    region's moments and convex hull. Colour means are over the instance's pixels of the RGB `image`;
    `mean_gray` uses 0.299 R + 0.587 G + 0.114 B. All pieces of a multi-piece id count as one nucleus.
    With `mpp` (micrometres per pixel) `area_um2` and `perimeter_um` are added. Without an image the
    colour columns are left out.
    """
    from skimage.measure import regionprops_table

    labels = _check_labels(labels)
    if image is not None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != labels.shape:
            raise ValueError(f"image shape {image.shape} does not match label map {labels.shape} (H, W, 3)")
    if mpp is not None and not (mpp > 0):
        raise ValueError(f"mpp must be positive, got {mpp}")
    index, ids = _index_map(labels)
    if not index.any():
        return []

    props = ["label", "centroid", "area", "perimeter", "eccentricity", "solidity",
             "axis_major_length", "axis_minor_length"]
    intensity = None
    if image is not None:
        rgb = image.astype(np.float32)
        gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        intensity = np.concatenate([rgb, gray[..., None]], axis=2)
        props.append("intensity_mean")
    table = regionprops_table(index, intensity_image=intensity, properties=props)

    rows = []
    for i, label in enumerate(table["label"]):
        area = float(table["area"][i])
        perimeter = float(table["perimeter"][i])
        row: dict[str, Any] = {
            "id": int(label) if ids is None else int(ids[int(label) - 1]),
            "centroid_x": float(table["centroid-1"][i]),
            "centroid_y": float(table["centroid-0"][i]),
            "area_px": int(round(area)),
            "perimeter_px": perimeter,
            "eccentricity": float(table["eccentricity"][i]),
            "solidity": float(table["solidity"][i]),
            "major_axis_px": float(table["axis_major_length"][i]),
            "minor_axis_px": float(table["axis_minor_length"][i]),
        }
        if intensity is not None:
            for channel, name in enumerate(("mean_r", "mean_g", "mean_b", "mean_gray")):
                row[name] = float(table[f"intensity_mean-{channel}"][i])
        if mpp:
            row["area_um2"] = area * mpp * mpp
            row["perimeter_um"] = perimeter * mpp
        rows.append(row)
    return rows


def save_measurements_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                          columns: Sequence[str] | None = None) -> Path:
    """Write `measure_nuclei` rows as CSV (atomic). Columns default to those of the first row, or
    `measurement_columns()` when there are no rows, so an image without nuclei gives a header-only file."""
    if columns is None:
        columns = list(rows[0].keys()) if rows else measurement_columns()
    return utils.write_csv(path, rows, columns=columns)


# ----------------------------------------------------------------------------------------------
# Streaming writers (whole slides: results arrive region by region)
# ----------------------------------------------------------------------------------------------
class _StreamingFile:
    """A text file written through a temporary file beside `path`: renamed onto `path` by `close()`,
    deleted by `abort()` (or by leaving a `with` block through an exception), so an existing `path` is
    never touched by a failed write. With `gzip=True` the bytes are gzip-compressed with a fixed header
    (mtime 0, no file name), so the same content always gives the same bytes."""

    def __init__(self, path: str | os.PathLike, gzip: bool = False):
        import gzip as gzip_module

        self.path = Path(path)
        self._tmp = utils.temp_file_beside(self.path)
        self._raw = open(self._tmp, "wb")
        self._zip = (gzip_module.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=6)
                     if gzip else None)
        self._text = io.TextIOWrapper(self._zip or self._raw, encoding="utf-8", newline="\n",
                                      write_through=False)
        self.closed = False

    def _write(self, text: str) -> None:
        if self.closed:
            raise ValueError(f"{self.path}: writer already closed")
        self._text.write(text)

    def _finish(self) -> None:
        """Write whatever ends the file (subclasses)."""

    def close(self) -> Path:
        """Finish the file and rename it onto `path`."""
        if self.closed:
            return self.path
        try:
            self._finish()
            self._text.flush()
            self._text.detach()
            if self._zip is not None:
                self._zip.close()
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        return self.path

    def abort(self) -> None:
        """Drop the temporary file; `path` keeps what it had before."""
        self.closed = True
        try:
            self._text.detach()
        except Exception:  # noqa: BLE001 - already detached, or its stream already failed
            pass
        for stream in (self._zip, self._raw):
            try:
                if stream is not None:
                    stream.close()
            except Exception:  # noqa: BLE001 - closing a half-written stream on the error path
                pass
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:  # an unclosed writer never leaves its temporary file behind
        if not getattr(self, "closed", True):
            self.abort()


class GeoJSONWriter(_StreamingFile):
    """Writes a GeoJSON FeatureCollection feature by feature: `add(features)` with features as made by
    `labels_to_geojson(...)["features"]`. The bytes equal `save_geojson`'s for the same features (compact
    JSON, one final newline); `.geojson.gz` with `gzip=True`. `count` is the number of features written."""

    def __init__(self, path: str | os.PathLike, gzip: bool = False):
        super().__init__(path, gzip=gzip)
        self.count = 0
        self._write('{"type":"FeatureCollection","features":[')

    def add(self, features: Sequence[Mapping[str, Any]]) -> None:
        if self.closed:
            raise ValueError(f"{self.path}: writer already closed")
        for feature in features:
            self._write(("," if self.count else "") + json.dumps(feature, separators=(",", ":")))
            self.count += 1

    def _finish(self) -> None:
        self._text.write("]}\n")


class CSVWriter(_StreamingFile):
    """Writes a CSV file row by row with the fixed `columns` (header first; missing values empty, extra keys
    ignored; floats with 6 significant digits), byte-identical to `utils.write_csv` for the same rows."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str], gzip: bool = False):
        import csv

        super().__init__(path, gzip=gzip)
        self.columns = list(columns)
        self.count = 0
        self._csv = csv.DictWriter(self._text, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        self._csv.writeheader()

    def add(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if self.closed:
            raise ValueError(f"{self.path}: writer already closed")
        for row in rows:
            self._csv.writerow({k: _csv_cell(row.get(k, "")) for k in self.columns})
            self.count += 1


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return value
