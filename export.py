"""Per-image result files of the `predict` command: label TIFF, QuPath GeoJSON, per-nucleus measurements.

- `save_label_tiff` writes the instance label map as a zlib-compressed uint32 TIFF (0 = background).
- `labels_to_geojson` / `save_geojson` turn the label map into a GeoJSON FeatureCollection that QuPath
  imports as detection objects of class "Nucleus" (File > Import objects from file, or drag and drop).
  Each instance becomes one Polygon that follows the pixel edges of the instance's outer boundary.
- `measure_nuclei` / `save_measurements_csv` compute one row of morphology and colour measurements per
  nucleus (scikit-image `regionprops_table`) and write them as CSV.
- `GeoJSONWriter` / `CSVWriter` stream the same files feature by feature / row by row for whole slides
  (temporary file renamed on a successful close, removed on an error; gzip output is byte-deterministic).
- For whole slides: `measure_and_outline` gives `measure_nuclei`'s rows and `ring_table`'s outlines from one scan
  of the label map; `polygons_json`, `rows_and_measurements_json` and `features_json` write the texts the
  region files and the streamed GeoJSON hold (the bytes `json.dumps` gives).

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

import jit_kernels
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
# mean foreground probability over the nucleus's pixels (docs/export.md): QuPath can sort and colour by it
CONFIDENCE_COLUMN = "confidence"

_4_CONNECTED = ndimage.generate_binary_structure(2, 1)
_8_CONNECTED = ndimage.generate_binary_structure(2, 2)


def measurement_columns(mpp: float | None = None, confidence: bool = False) -> list[str]:
    """The CSV columns `measure_nuclei` produces (with `area_um2`, `perimeter_um` when `mpp` is given, and
    `confidence` after the centroid columns when a foreground map or confidence values are given)."""
    columns = list(MEASUREMENT_COLUMNS)
    if confidence:
        columns.insert(columns.index("centroid_y") + 1, CONFIDENCE_COLUMN)
    return columns + (list(MICRON_COLUMNS) if mpp else [])


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise ValueError(f"label map must hold integers, got dtype {labels.dtype}")
    if labels.size and labels.dtype.kind == "i" and labels.min() < 0:
        raise ValueError("label map has negative ids (0 = background, ids must be positive)")
    return labels


_SMALL_INDEX_TYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16), np.dtype(np.int32))


def _index_map(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(index map, ids): an integer map whose values 1..n index the instances, and ids[k - 1] = id of
    index k, or None when the index is the id itself. Ids are compacted only when they are very large
    (scipy's `find_objects` and scikit-image allocate per possible id); sorting the whole image for
    `np.unique` is the slow path.
    """
    max_id = int(labels.max()) if labels.size else 0
    if max_id <= max(labels.size, 1 << 16):
        if labels.dtype in _SMALL_INDEX_TYPES:
            return labels, None    # as it is: a copy to int32 would only make the scans of the map slower
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


def instance_rings(labels: np.ndarray) -> dict[int, np.ndarray]:
    """{id: closed outer outline} of every instance id, each an int64 array (n, 2) of (x, y) pixel-edge corners:
    exactly `instance_outline(labels == id)` placed at the instance's position, for all ids at once
    (`ring_table`)."""
    flat, ids, spans = ring_table(labels)
    return {i: flat[a:b] for i, (a, b) in zip(ids, spans)}


def ring_table(labels: np.ndarray) -> tuple[np.ndarray, list[int], list[tuple[int, int]]]:
    """(corners (N, 2) int64 of all rings one after the other, ids ascending, [(start, stop)] of each id's ring
    in corners). See `instance_rings`.

    The common case, an instance that is one 4-connected piece without holes and without two pixels touching
    only at a corner, is traced for all such instances together: each boundary pixel side becomes a directed
    edge keyed by (instance, start corner), every edge's successor is found by one sorted search, and the
    edges are put in ring order by pointer doubling (log2 of the longest ring steps), starting from each
    ring's top-left-most corner as `_outer_ring` does. Instances that are not that simple (several pieces,
    holes, corner contacts: detected on the way, a vertex with two outgoing edges or a ring shorter than the
    instance's boundary) go through `instance_outline` one by one.
    """
    labels = _check_labels(labels)
    index, ids = _index_map(labels)
    return _ring_table(index, ids, _LabelPixels(index))


class _LabelPixels:
    """The instance pixels of an index map, in raster order, shared by the outlines and the measurements:
    `pf` the map with a frame of background (flattened, row length `pw`), `ppix` the pixels' positions in it,
    `pix` in the map itself, `r`, `c`, `lab` (int64 index), and `sides[k]` (top, right, bottom, left): the
    positions in `pf` (raster order) of the pixels whose neighbour on that side is background, the frame or
    another instance, found where the map changes between vertical / horizontal neighbours (a scan of the map
    instead of a look-up per pixel and side).

    `from_pixels` makes the same from the pixel list itself (no map): `pf` then frames only the instances'
    bounding box, whose top-left corner in the map is `origin` (`box` is the index map inside that box); `shape`,
    `pix`, `r`, `c` and `side_pixels` are always in the whole map's coordinates, so every value computed from
    them is the same."""

    def __init__(self, index: np.ndarray):
        height, width = index.shape
        self.shape = (height, width)
        self.origin = (0, 0)
        self.box = index
        padded = np.zeros((height + 2, width + 2), index.dtype)
        padded[1:-1, 1:-1] = index
        self.pw = pw = width + 2
        self.pf = pf = padded.ravel()
        self.ppix = ppix = np.flatnonzero(pf != 0)   # (on a bool array: several times faster than on ints)
        self.lab = pf[ppix].astype(np.int64)
        self.r = r = ppix // pw - 1
        self.c = c = ppix - (r + 1) * pw - 1
        self.pix = r * width + c
        self._scan_sides()

    @classmethod
    def from_pixels(cls, shape: tuple[int, int], pix: np.ndarray, index_values: np.ndarray) -> "_LabelPixels":
        """The pixels of the index map of `shape` that is `index_values` (positive) at the flat positions `pix`
        (int64, strictly ascending, not empty) and 0 elsewhere."""
        self = cls.__new__(cls)
        height, width = self.shape = (int(shape[0]), int(shape[1]))
        self.pix = pix
        self.r = r = pix // width
        self.c = c = pix - r * width
        y0, y1 = int(r[0]), int(r[-1]) + 1                 # raster order: the first and last rows
        x0, x1 = int(c.min()), int(c.max()) + 1
        self.origin = (y0, x0)
        self.pw = pw = x1 - x0 + 2
        self.ppix = ppix = (r - (y0 - 1)) * pw + (c - (x0 - 1))
        self.pf = pf = np.zeros((y1 - y0 + 2) * pw, index_values.dtype)
        pf[ppix] = index_values
        self.box = pf.reshape(y1 - y0 + 2, pw)[1:-1, 1:-1]
        self.lab = index_values.astype(np.int64)
        self._scan_sides()
        return self

    def _scan_sides(self) -> None:
        pf, pw = self.pf, self.pw
        q = np.flatnonzero(pf[pw:] != pf[:-pw])          # pixel q and the one below differ
        above, below = pf[q] != 0, pf[q + pw] != 0
        top, bottom = q[below] + pw, q[above]
        q = np.flatnonzero(pf[1:] != pf[:-1])            # pixel q and its right neighbour differ
        here, after = pf[q] != 0, pf[q + 1] != 0
        left, right = q[after] + 1, q[here]
        self.sides = [top, right, bottom, left]

    def side_pixels(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, int64 index) of the pixels of `sides[k]`, in raster order (the whole map's coordinates)."""
        pos = self.sides[k]
        local = pos // self.pw
        rows = local + (self.origin[0] - 1)
        return rows, pos - local * self.pw + (self.origin[1] - 1), self.pf[pos].astype(np.int64)


def _ring_table(index: np.ndarray, ids: np.ndarray | None,
                px: _LabelPixels) -> tuple[np.ndarray, list[int], list[tuple[int, int]]]:
    height, width = px.shape
    if not px.ppix.size:
        return np.zeros((0, 2), np.int64), [], []
    lab = px.lab
    stride = width + 1                      # corner (x, y) -> y * stride + x
    starts, ends, owner = [], [], []
    for side, (sy, sx, ey, ex) in enumerate(((0, 0, 0, 1), (0, 1, 1, 1), (1, 1, 1, 0), (1, 0, 0, 0))):
        # background (or another instance) on that side
        rr, cc, ll = px.side_pixels(side)
        starts.append((rr + sy) * stride + cc + sx)     # the edge's start and end corners
        ends.append((rr + ey) * stride + cc + ex)
        owner.append(ll)
    start = np.concatenate(starts)
    end = np.concatenate(ends)
    inst = np.concatenate(owner)
    n_index = int(lab.max())
    # edges keyed by (corner, instance): each side's keys ascend already (raster order), so the stable sort merges
    # four sorted runs (keyed by (instance, corner), the same pairs, it had to sort short runs: 3-4x slower)
    start_key = start * (n_index + 1) + inst
    order = np.argsort(start_key, kind="stable")
    sorted_start = start_key[order]
    complex_ids = np.zeros(n_index + 1, bool)
    dup = sorted_start[1:] == sorted_start[:-1]
    complex_ids[inst[order[1:][dup]]] = True      # a corner with two outgoing edges: corner contact
    # the edge that begins where this one ends: every corner has as many edges in as out, so the sorted end keys
    # are the sorted start keys and the k-th smallest end is followed by the k-th smallest start (where a corner
    # has one edge out, the only choice; two: a corner contact, an instance traced one by one below anyway)
    nxt = np.empty_like(order)
    nxt[np.argsort(end * (n_index + 1) + inst, kind="stable")] = order
    # each instance's first edge: the one from its smallest start corner (its top-left-most corner; several edges
    # only at a corner contact)
    first_corner = np.full(n_index + 1, np.iinfo(np.int64).max)
    np.minimum.at(first_corner, inst, start)
    first_edge = np.flatnonzero(start == first_corner[inst])
    head = np.zeros(n_index + 1, np.int64)
    head[inst[first_edge]] = first_edge
    count = np.bincount(inst, minlength=n_index + 1)
    is_head = np.zeros(len(start), bool)
    is_head[first_edge] = True
    dist = np.where(is_head, 0, 1).astype(np.int64)
    ptr = np.where(is_head, np.arange(len(start)), nxt)
    for _ in range(max(int(count.max()), 1).bit_length() + 1):
        dist = dist + dist[ptr]
        ptr = ptr[ptr]
    on_ring = ptr == head[inst]
    complex_ids[inst[~on_ring]] = True              # a second ring: holes or several pieces
    simple = ~complex_ids[inst]
    e_idx = np.flatnonzero(simple)
    e_inst = inst[e_idx]
    length = count[e_inst]
    position = (length - dist[e_idx]) % length
    offsets = np.cumsum(count) - count
    chain = np.empty(len(start), np.int64)
    chain[offsets[e_inst] + position] = e_idx
    # walk the simple instances' rings in order
    valid_ids = np.flatnonzero((count > 0) & ~complex_ids)
    valid_ids = valid_ids[valid_ids > 0]
    seg_lengths = count[valid_ids]
    seg_offsets = offsets[valid_ids]
    gather = (np.repeat(seg_offsets - np.cumsum(seg_lengths) + seg_lengths, seg_lengths)
              + np.arange(int(seg_lengths.sum())))
    edges = chain[gather]
    local = start[edges]
    xs, ys = local % stride, local // stride
    local_end = end[edges]
    dx, dy = local_end % stride - xs, local_end // stride - ys
    seg_start = np.repeat(np.cumsum(seg_lengths) - seg_lengths, seg_lengths)
    seg_pos = np.arange(len(edges)) - seg_start
    prev = seg_start + (seg_pos - 1) % np.repeat(seg_lengths, seg_lengths)
    turn = (dx != dx[prev]) | (dy != dy[prev])
    # orientation: shoelace over the edges (= over the corners kept)
    seg_id = np.repeat(np.arange(len(valid_ids)), seg_lengths)
    area2 = np.bincount(seg_id, weights=(xs * (ys + dy) - (xs + dx) * ys).astype(np.float64),
                        minlength=len(valid_ids))
    kept = np.flatnonzero(turn)
    points = np.stack([xs[kept], ys[kept]], axis=1)
    bounds = np.r_[0, np.cumsum(np.bincount(seg_id[kept], minlength=len(valid_ids)))]
    # closed rings, reversed where the shoelace area is negative (as `_outer_ring`)
    n_points = np.diff(bounds) + 1
    ring_start = np.cumsum(n_points) - n_points
    local_pos = np.arange(int(n_points.sum())) - np.repeat(ring_start, n_points)
    size = np.repeat(n_points - 1, n_points)
    step = np.where(np.repeat(area2 < 0, n_points), (size - local_pos) % size, local_pos % size)
    flat = points[np.repeat(bounds[:-1], n_points) + step]
    pieces = {int(i): (int(a), int(b)) for i, a, b in zip(valid_ids.tolist(), ring_start.tolist(),
                                                          (ring_start + n_points).tolist())}
    extra = []
    complex_list = [i for i in np.flatnonzero(complex_ids).tolist() if i and count[i]]
    if complex_list:
        boxes = ndimage.find_objects(px.box)
        total = len(flat)
        oy, ox = px.origin
        for index_id in complex_list:
            box = boxes[index_id - 1]
            outline = np.array(instance_outline(px.box[box] == index_id), np.int64)
            outline += np.array([box[1].start + ox, box[0].start + oy])
            extra.append(outline)
            pieces[index_id] = (total, total + len(outline))
            total += len(outline)
        flat = np.concatenate([flat] + extra)
    keys = sorted(pieces)
    return flat, [(k if ids is None else int(ids[k - 1])) for k in keys], [pieces[k] for k in keys]


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
    corners, ring_ids, spans = ring_table(labels)
    xy = corners.astype(np.float64) + np.array([ox, oy])
    if scale != 1.0:
        xy = xy * float(scale)
    xy = xy.tolist()
    for label_id, (a, b) in zip(ring_ids, spans):
        ring = xy[a:b]
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


def polygon_json(ring: Sequence[Sequence[float]]) -> str:
    """Compact JSON of a GeoJSON Polygon with one ring (what `labels_to_geojson` features hold)."""
    return '{"type":"Polygon","coordinates":[' + json.dumps(ring, separators=(",", ":")) + "]}"


def measurements_json(values: Mapping[str, Any]) -> str:
    """Compact JSON of a feature's `measurements` list (numeric values but `id`), "" when there is none; the
    text `json.dumps` gives (Python floats and ints are written with their own repr, as json does)."""
    items = []
    for key, value in values.items():
        if key == "id":
            continue
        kind = type(value)
        if kind is float:
            if not math.isfinite(value):
                continue
            text = repr(value)
        elif kind is int:
            text = str(value)
        else:
            number = _json_number(value)
            if number is None:
                continue
            text = json.dumps(number)
        name = _NAME_JSON.get(key) if type(key) is str else None
        if name is None:
            name = '{"name":' + json.dumps(str(key)) + ',"value":'
            if type(key) is str and len(_NAME_JSON) < 1000:
                _NAME_JSON[key] = name
        items.append(name + text + "}")
    return "[" + ",".join(items) + "]" if items else ""


_NAME_JSON: dict = {}   # measurement name -> '{"name":<its JSON text>,"value":' (the same few names on every row)


def polygons_json(xy: np.ndarray, spans: Sequence[tuple[int, int]]) -> list[str]:
    """`polygon_json` of each ring `xy[a:b]` (float64 (N, 2) corners) for (a, b) in `spans`, in one pass over
    the coordinates (floats written with their repr, as json does). Whole-number coordinates (pixel corners at
    scale 1) are written from ints: `repr(float(k))` is the digits of k and ".0" for |k| < 2**53."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    whole = xy.astype(np.int64) if xy.size and bool(np.all((xy >= 0) & (xy < 2.0 ** 52))) else None
    if whole is not None and np.array_equal(whole, xy) and not bool(np.any(np.signbit(xy))):
        return _whole_polygons_json(whole, spans)
    if xy.size and not bool(np.any((xy == 0) & np.signbit(xy))):   # (-0.0 and 0.0 are one value to np.unique)
        return _table_polygons_json(xy, spans)
    pairs = list(map("{!r},{!r}".format, xy[:, 0].tolist(), xy[:, 1].tolist()))
    return [_POLYGON_HEAD + "],[".join(pairs[a:b]) + _POLYGON_TAIL for a, b in spans]


_POLYGON_HEAD, _POLYGON_TAIL = '{"type":"Polygon","coordinates":[[[', "]]]}"


def _decimal_digits(values: np.ndarray) -> np.ndarray:
    """Number of decimal digits of each non-negative int64 (1 for 0)."""
    digits = np.ones(values.shape, np.int64)
    power = 10
    top = int(values.max()) if values.size else 0
    while power <= top:
        digits += values >= power
        power *= 10
    return digits


def _whole_polygons_json(xy: np.ndarray, spans: Sequence[tuple[int, int]]) -> list[str]:
    """`polygons_json` of non-negative whole-number corners (int64 (N, 2)): every ring's text written at once
    into one byte buffer (digits by array arithmetic; `repr(float(k))` is k's digits and ".0"), then cut."""
    spans = np.asarray(spans, np.int64).reshape(-1, 2)
    counts = np.maximum(spans[:, 1] - spans[:, 0], 0)
    total = int(counts.sum())
    ring_of = np.repeat(np.arange(len(spans)), counts)
    point = (np.repeat(spans[:, 0] - np.cumsum(counts) + counts, counts) + np.arange(total)) if total else \
        np.zeros(0, np.int64)
    x, y = xy[point, 0], xy[point, 1]
    nx, ny = _decimal_digits(x), _decimal_digits(y)
    last = np.zeros(total, bool)
    last[(np.cumsum(counts) - 1)[counts > 0]] = True
    length = nx + ny + 5 + np.where(last, 0, 3)          # "<x>.0,<y>.0" and "],[" but after a ring's last point
    head, tail = len(_POLYGON_HEAD), len(_POLYGON_TAIL)
    points_length = np.bincount(ring_of, weights=length, minlength=len(spans)).astype(np.int64)
    ring_end = np.cumsum(head + tail + points_length)
    ring_start = ring_end - (head + tail + points_length)
    # a point's text starts after its ring's head and the texts of the ring's points before it
    before = np.cumsum(length) - length                      # all points before it
    start = before + (ring_start + head - (np.cumsum(points_length) - points_length))[ring_of]
    buffer = np.empty(int(ring_end[-1]) if len(spans) else 0, np.uint8)

    def put(at: np.ndarray, text: str) -> None:
        for i, code in enumerate(text.encode()):
            buffer[at + i] = code

    def put_digits(at: np.ndarray, values: np.ndarray, digits: np.ndarray) -> None:
        # from the last digit: the j-th from the right is (value // 10**j) % 10, for the values with more than j
        at = at + digits - 1
        for j in range(int(digits.max()) if digits.size else 0):
            if j and not bool(np.all(digits > j)):
                on = digits > j
                at, values, digits = at[on], values[on], digits[on]
            buffer[at - j] = 48 + (values // 10 ** j) % 10

    put(ring_start, _POLYGON_HEAD)
    put(ring_end - tail, _POLYGON_TAIL)
    put_digits(start, x, nx)
    put(start + nx, ".0,")
    put_digits(start + nx + 3, y, ny)
    put(start + nx + 3 + ny, ".0")
    put((start + nx + ny + 5)[~last], "],[")
    text = buffer.tobytes().decode("ascii")
    return [text[a:b] for a, b in zip(ring_start.tolist(), ring_end.tolist())]


def _table_polygons_json(xy: np.ndarray, spans: Sequence[tuple[int, int]]) -> list[str]:
    """`polygons_json` of any float64 corners but signed zeros: the repr of each distinct value once (a slide's
    corners take few distinct values: the region's pixel rows and columns over the scale), the points' texts
    laid out at once in a byte array (one row per point: x text, ",", y text, "],[", each padded to the longest
    text, the padding dropped by one mask), then cut into rings."""
    spans_a = np.asarray(spans, np.int64).reshape(-1, 2)
    counts = np.maximum(spans_a[:, 1] - spans_a[:, 0], 0)
    total = int(counts.sum())
    if not total:
        return [_POLYGON_HEAD + _POLYGON_TAIL for _ in range(len(spans_a))]
    point = np.repeat(spans_a[:, 0] - np.cumsum(counts) + counts, counts) + np.arange(total)
    values, inverse = np.unique(xy[point], return_inverse=True)   # (NaN: one value, whose repr is the same)
    inverse = inverse.reshape(-1, 2)
    texts = list(map(repr, values.tolist()))
    lengths = np.fromiter(map(len, texts), np.int64, len(texts))
    width = int(lengths.max())
    cols = np.arange(width)
    table = np.zeros((len(texts), width), np.uint8)
    table[cols < lengths[:, None]] = np.frombuffer("".join(texts).encode("ascii"), np.uint8)   # row-major order
    last = np.zeros(total, bool)
    last[(np.cumsum(counts) - 1)[counts > 0]] = True               # a ring's last point: no "],[" after it
    nx, ny = lengths[inverse[:, 0]], lengths[inverse[:, 1]]
    rows = np.empty((total, 2 * width + 4), np.uint8)
    rows[:, :width] = table[inverse[:, 0]]
    rows[:, width] = ord(",")
    rows[:, width + 1:2 * width + 1] = table[inverse[:, 1]]
    rows[:, 2 * width + 1:] = np.frombuffer(b"],[", np.uint8)
    mask = np.empty(rows.shape, bool)
    mask[:, :width] = cols < nx[:, None]
    mask[:, width] = True
    mask[:, width + 1:2 * width + 1] = cols < ny[:, None]
    mask[:, 2 * width + 1:] = ~last[:, None]
    text = rows[mask].tobytes().decode("ascii")
    point_length = nx + ny + 1 + np.where(last, 0, 3)
    ring_length = np.bincount(np.repeat(np.arange(len(spans_a)), counts), weights=point_length,
                              minlength=len(spans_a)).astype(np.int64)
    ends = np.cumsum(ring_length).tolist()
    return [_POLYGON_HEAD + text[a:b] + _POLYGON_TAIL for a, b in zip([0] + ends[:-1], ends)]


def _row_template(names: Sequence[str], row: Mapping[str, Any], open_: str, close: str, sep: str,
                  item, item_end: str = "") -> str:
    """A %-format template: `open_`, then for each name `item(name)` + %r (float) or %d (int, as in `row`) +
    `item_end`, joined by `sep`, then `close` (literal text with its % doubled)."""
    parts = [item(key).replace("%", "%%") + ("%r" if type(row[key]) is float else "%d") + item_end.replace("%", "%%")
             for key in names]
    return open_.replace("%", "%%") + sep.replace("%", "%%").join(parts) + close.replace("%", "%%")


def _uniform_columns(rows: Sequence[Mapping[str, Any]], skip: str | None = None):
    """(names, value columns) when every row has the keys of the first row in the same order and each column
    holds only finite floats or only plain ints; else None."""
    names = [k for k in rows[0] if k != skip]
    keys = list(rows[0])
    if any(list(row) != keys for row in rows):
        return None
    columns = []
    for key in names:
        column = [row[key] for row in rows]
        kinds = set(map(type, column))
        if kinds == {float}:
            if not all(map(math.isfinite, column)):
                return None
        elif kinds != {int}:
            return None
        columns.append(column)
    return names, columns


def measurements_json_list(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """`[measurements_json(row) for row in rows]`, by one %-format template for all rows when they have the
    same keys and every value is a finite float or a plain int (`%r` of a float is its repr, `%d` of an int its
    str: the text json writes)."""
    if not rows:
        return []
    uniform = _uniform_columns(rows, skip="id")
    if uniform is None or not uniform[0] or not all(type(k) is str for k in uniform[0]):
        return [measurements_json(row) for row in rows]
    names, columns = uniform
    template = _row_template(names, rows[0], "[", "]", ",", lambda k: '{"name":' + json.dumps(k) + ',"value":', "}")
    return list(map(template.__mod__, zip(*columns)))


def rows_and_measurements_json(rows: Sequence[Mapping[str, Any]]) -> tuple[str, list[str]]:
    """(`rows_json(rows)`, `measurements_json_list(rows)`), writing each value's text once for both when the
    rows have the same string keys and every value is a finite float or a plain int (the reprs are most of
    the work)."""
    if not rows or not all(type(k) is str for k in rows[0]):
        return rows_json(rows), measurements_json_list(rows)
    uniform = _uniform_columns(rows)
    if uniform is None or not uniform[0]:
        return rows_json(rows), measurements_json_list(rows)
    return _uniform_texts(*uniform, len(rows))


def columns_and_measurements_json(columns: Mapping[str, Sequence[Any]]) -> tuple[str, list[str]]:
    """`rows_and_measurements_json(rows)` of the rows given column by column (row i: {key: columns[key][i]} in
    the order of `columns`, all columns of one length), without making the rows when every key is a string and
    each column holds only finite floats or only plain ints."""
    names = list(columns)
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ValueError("columns of different lengths")
    count = lengths.pop() if lengths else 0
    values = [list(columns[k]) for k in names]
    uniform = count > 0 and all(type(k) is str for k in names)
    for column in values if uniform else []:
        kinds = set(map(type, column))
        if not (kinds == {int} or (kinds == {float} and all(map(math.isfinite, column)))):
            uniform = False
            break
    if not uniform:
        return rows_and_measurements_json([dict(zip(names, row)) for row in zip(*values)])
    return _uniform_texts(names, values, count)


def _uniform_texts(names: list[str], columns: list[list], count: int) -> tuple[str, list[str]]:
    texts = [list(map(repr, column)) for column in columns]     # repr: a float's json text, and an int's
    row_template = "{" + ", ".join(json.dumps(k).replace("%", "%%") + ": %s" for k in names) + "}"
    measured = [i for i, k in enumerate(names) if k != "id"]
    if not measured:
        return "[" + ", ".join(map(row_template.__mod__, zip(*texts))) + "]", [""] * count
    item_template = "[" + ",".join('{"name":' + json.dumps(names[i]).replace("%", "%%") + ',"value":%s}'
                                   for i in measured) + "]"
    return ("[" + ", ".join(map(row_template.__mod__, zip(*texts))) + "]",
            list(map(item_template.__mod__, zip(*(texts[i] for i in measured)))))


def rows_json(rows: Sequence[Mapping[str, Any]]) -> str:
    """`json.dumps(rows)` (default separators) of a list of flat dicts, by one %-format template when they have
    the same string keys and every value is a finite float or a plain int; else `json.dumps` itself."""
    if not rows or not all(type(k) is str for k in rows[0]):
        return json.dumps(list(rows))
    uniform = _uniform_columns(rows)
    if uniform is None or not uniform[0]:
        return json.dumps(list(rows))
    names, columns = uniform
    template = _row_template(names, rows[0], "{", "}", ", ", lambda k: json.dumps(k) + ": ")
    return "[" + ", ".join(map(template.__mod__, zip(*columns))) + "]"


def feature_json(label_id: int, geometry: str, measurements: str) -> str:
    """The compact JSON text of one `labels_to_geojson` feature from its parts (`polygon_json`,
    `measurements_json`): byte for byte `json.dumps(feature, separators=(",", ":"))`."""
    label_id = int(label_id)
    text = ('{"type":"Feature","geometry":' + geometry + ',"properties":{"objectType":"detection","name":"'
            + f"{CLASS_NAME} {label_id}" + '","classification":{"name":"' + CLASS_NAME + '","color":['
            + ",".join(str(int(v)) for v in CLASS_COLOR) + ']},"id":' + str(label_id))
    if measurements:
        text += ',"measurements":' + measurements
    return text + "}}"


def features_json(label_ids: Sequence[int], geometries: Sequence[str], measurements: Sequence[str]) -> list[str]:
    """`[feature_json(i, g, m) for i, g, m in zip(label_ids, geometries, measurements)]` by two %-format
    templates (with and without measurements)."""
    head = ('{"type":"Feature","geometry":%s,"properties":{"objectType":"detection","name":"'
            + f"{CLASS_NAME} ".replace("%", "%%") + '%d","classification":{"name":"' + CLASS_NAME.replace("%", "%%")
            + '","color":[' + ",".join(str(int(v)) for v in CLASS_COLOR) + ']},"id":%d')
    bare, full = head + "}}", head + ',"measurements":%s}}'
    out = []
    for label_id, geometry, measured in zip(label_ids, geometries, measurements):
        label_id = int(label_id)
        out.append(full % (geometry, label_id, label_id, measured) if measured
                   else bare % (geometry, label_id, label_id))
    return out


def save_geojson(path: str | os.PathLike, labels: np.ndarray, offset: tuple[float, float] = (0, 0),
                 properties: Mapping[int, Mapping[str, Any]] | None = None) -> Path:
    """Atomically write `labels_to_geojson(labels, offset, properties)` to `path` (compact JSON)."""
    collection = labels_to_geojson(labels, offset=offset, properties=properties)
    return utils.atomic_write_text(path, json.dumps(collection, separators=(",", ":")) + "\n")


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
def measure_nuclei(labels: np.ndarray, image: np.ndarray | None, mpp: float | None = None,
                   foreground: np.ndarray | None = None,
                   confidence: Mapping[int, float] | None = None) -> list[dict[str, Any]]:
    """One dict per instance id (sorted by id) with the columns of `measurement_columns(mpp, ...)`.

    Centroids are in pixel coordinates (x, y) of pixel centres (pixel (0, 0) has its centre at
    (0, 0)). `perimeter_px` is scikit-image's `perimeter` (4-neighbourhood, through boundary pixel
    centres: a w x h rectangle gives 2(w-1) + 2(h-1)). `eccentricity` and the axes come from the
    region's second central moments, `solidity` is the area over the pixel count of the convex hull of the
    pixels' edge midpoints (scikit-image's `regionprops` definitions). Colour means are over the instance's
    pixels of the RGB `image`; `mean_gray` uses 0.299 R + 0.587 G + 0.114 B. All pieces of a multi-piece id
    count as one nucleus. With `mpp` (micrometres per pixel) `area_um2` and `perimeter_um` are added. Without
    an image the colour columns are left out.

    `confidence` (column after `centroid_y`): the mean of `foreground` (the network's foreground probability,
    same shape as `labels`) over the instance's pixels, or the value of `confidence` (id -> value) when the
    probabilities live on another grid (plain images segmented at the model's pixel size). Without either the
    column is left out.

    Every quantity is computed for all instances at once from per-pixel sums (`np.bincount`), not instance by
    instance; `tests/test_export.py` checks it against `regionprops_table`.
    """
    labels, image, foreground = _check_measure_inputs(labels, image, mpp, foreground)
    index, ids = _index_map(labels)
    return _measure_rows(index, ids, image, mpp, foreground, confidence, _LabelPixels(index))


def _check_measure_inputs(labels, image, mpp, foreground):
    """The label map (`_check_labels`), image and foreground as arrays; ValueError when their shapes disagree
    or `mpp` is not positive."""
    labels = _check_labels(labels)
    if image is not None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != labels.shape:
            raise ValueError(f"image shape {image.shape} does not match label map {labels.shape} (H, W, 3)")
    if foreground is not None:
        foreground = np.asarray(foreground)
        if foreground.shape != labels.shape:
            raise ValueError(f"foreground map shape {foreground.shape} does not match label map {labels.shape}")
    if mpp is not None and not (mpp > 0):
        raise ValueError(f"mpp must be positive, got {mpp}")
    return labels, image, foreground


def measure_and_outline(labels: np.ndarray, image: np.ndarray | None, mpp: float | None = None,
                        foreground: np.ndarray | None = None
                        ) -> tuple[list[dict[str, Any]], tuple[np.ndarray, list[int], list[tuple[int, int]]]]:
    """(`measure_nuclei(labels, image, mpp, foreground=foreground)`, `ring_table(labels)`): the same values, from
    one scan of the label map (the pixels and their neighbours are found once for both)."""
    labels, image, foreground = _check_measure_inputs(labels, image, mpp, foreground)
    index, ids = _index_map(labels)
    px = _LabelPixels(index)
    return _measure_rows(index, ids, image, mpp, foreground, None, px), _ring_table(index, ids, px)


def measure_and_outline_pixels(shape: tuple[int, int], pix: np.ndarray, values: np.ndarray,
                               image: np.ndarray | None, mpp: float | None = None,
                               foreground: np.ndarray | None = None, sums: tuple | None = None,
                               as_columns: bool = False):
    """`measure_and_outline(labels, image, mpp, foreground)` of the label map `labels` of `shape` that holds
    `values` (positive integers) at the flat positions `pix` (strictly ascending) and 0 elsewhere, without
    making that map: the scan covers only the bounding box of the pixels (`finish_region`: a region's kept
    nuclei, known as a pixel list). Returns (rows, ring table, (y0, x0, box)): `box` is `labels[y0:y0 + h,
    x0:x0 + w]` for that bounding box (a view), (0, 0, empty (0, 0) map) without pixels. `sums` (optional):
    (pixel count, sum of rows, sum of columns) of each label value 0..max(values), exact integers, when the
    caller has them; they replace the same counts here. `as_columns=True`: the rows as one list per column
    ({name: values}, {} without pixels) instead of dicts."""
    height, width = int(shape[0]), int(shape[1])
    pix = np.asarray(pix, np.int64).ravel()
    values = np.asarray(values).ravel()
    if values.shape != pix.shape or values.dtype.kind not in "iu":
        raise ValueError("values must be integers, one per pixel position")
    if pix.size and (pix[0] < 0 or pix[-1] >= height * width or not bool(np.all(pix[1:] > pix[:-1]))):
        raise ValueError("pixel positions must be strictly ascending and inside the map")
    if values.size and values.min() < 1:
        raise ValueError("label values at the pixel positions must be positive")
    if image is not None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != (height, width):
            raise ValueError(f"image shape {image.shape} does not match label map {(height, width)} (H, W, 3)")
    if foreground is not None:
        foreground = np.asarray(foreground)
        if foreground.shape != (height, width):
            raise ValueError(f"foreground map shape {foreground.shape} does not match label map {(height, width)}")
    if mpp is not None and not (mpp > 0):
        raise ValueError(f"mpp must be positive, got {mpp}")
    if not pix.size:
        return {} if as_columns else [], (np.zeros((0, 2), np.int64), [], []), (0, 0, np.zeros((0, 0), values.dtype))
    # the index values as `_index_map` makes them from the map
    max_id = int(values.max())
    ids = None
    given = values
    if max_id <= max(height * width, 1 << 16):
        if values.dtype not in _SMALL_INDEX_TYPES:
            values = values.astype(np.int64 if max_id >= 2**31 else np.int32, copy=False)
    else:
        ids, inverse = np.unique(values, return_inverse=True)
        values = inverse.astype(np.int64) + 1
        sums = None
    px = _LabelPixels.from_pixels((height, width), pix, values)
    rows = (_measure_columns if as_columns else _measure_rows)(px.box, ids, image, mpp, foreground, None, px, sums)
    box = px.box
    if ids is not None:   # the compact index -> the values themselves
        box = np.where(box > 0, ids[np.maximum(box, 1) - 1], 0).astype(given.dtype)
    return rows, _ring_table(px.box, ids, px), (px.origin[0], px.origin[1], box)


def _measure_rows(index: np.ndarray, ids: np.ndarray | None, image: np.ndarray | None, mpp: float | None,
                  foreground: np.ndarray | None, confidence: Mapping[int, float] | None,
                  px: _LabelPixels, sums: tuple | None = None) -> list[dict[str, Any]]:
    columns = _measure_columns(index, ids, image, mpp, foreground, confidence, px, sums)
    names = list(columns)
    return [dict(zip(names, values)) for values in zip(*(columns[k] for k in names))]


def _measure_columns(index: np.ndarray, ids: np.ndarray | None, image: np.ndarray | None, mpp: float | None,
                     foreground: np.ndarray | None, confidence: Mapping[int, float] | None,
                     px: _LabelPixels, sums: tuple | None = None) -> dict[str, list]:
    """`_measure_rows` column by column ({name: values}, {} without instances)."""
    table = _measure_table(index, image, foreground, px, sums)
    if table is None:
        return {}
    present = table["present"]
    out_ids = present if ids is None else ids[present - 1]
    columns: dict[str, list] = {
        "id": [int(v) for v in out_ids.tolist()],
        "centroid_x": table["centroid_x"].tolist(), "centroid_y": table["centroid_y"].tolist(),
    }
    if foreground is not None:
        columns["confidence"] = table["confidence"].tolist()
    elif confidence is not None:
        columns["confidence"] = [float(confidence.get(i, float("nan"))) for i in columns["id"]]
    area = table["area"]
    columns.update({
        "area_px": area.astype(np.int64).tolist(), "perimeter_px": table["perimeter"].tolist(),
        "eccentricity": table["eccentricity"].tolist(), "solidity": table["solidity"].tolist(),
        "major_axis_px": table["major"].tolist(), "minor_axis_px": table["minor"].tolist(),
    })
    if image is not None:
        for name in ("mean_r", "mean_g", "mean_b", "mean_gray"):
            columns[name] = table[name].tolist()
    if mpp:
        columns["area_um2"] = (area * mpp * mpp).tolist()
        columns["perimeter_um"] = (table["perimeter"] * mpp).tolist()
    return columns


_PERIMETER_WEIGHTS = np.zeros(50, dtype=np.float64)   # scikit-image's `perimeter` (4-neighbourhood) weights
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = math.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + math.sqrt(2)) / 2


def _measure_table(index: np.ndarray, image: np.ndarray | None,
                   foreground: np.ndarray | None, px: _LabelPixels | None = None,
                   sums: tuple | None = None) -> dict[str, np.ndarray] | None:
    """Per-instance arrays (rows for the present indices 1..n, ascending) of `measure_nuclei`, vectorised.
    `sums`: (pixel count, sum of rows, sum of columns) per index value 0..max, when the caller has them (exact
    integers: the same values as counted here)."""
    px = px if px is not None else _LabelPixels(index)
    pix = px.pix
    if pix.size == 0:
        return None
    lab, r, c = px.lab, px.r, px.c
    if sums is None:
        n = int(lab.max())
        count = np.bincount(lab, minlength=n + 1)
        sum_r = np.bincount(lab, weights=r, minlength=n + 1)
        sum_c = np.bincount(lab, weights=c, minlength=n + 1)
    else:
        count, sum_r, sum_c = (np.asarray(v) for v in sums)
        n = len(count) - 1
    present = np.flatnonzero(count)
    present = present[present > 0]
    area = count[present].astype(np.float64)
    # centroids: mean of the integer coordinates (sums are exact in float64, as scikit-image's mean)
    cy_all = sum_r[present].astype(np.float64) / area
    cx_all = sum_c[present].astype(np.float64) / area
    out: dict[str, np.ndarray] = {"present": present, "area": area, "centroid_y": cy_all, "centroid_x": cx_all}
    # second central moments -> inertia tensor (scikit-image: [[mu02, -mu11], [-mu11, mu20]] / mu00)
    pos = np.zeros(n + 1, np.int64)
    pos[present] = np.arange(len(present))
    k = pos[lab]
    # the per-instance sums in one compiled pass where numba is installed (the same values), else numpy's
    fused = jit_kernels.instance_sums(k, r, c, cy_all, cx_all, pix, None if image is None else image.reshape(-1, 3),
                                      foreground)
    if fused is not None:
        mu20, mu02, mu11 = fused["mu20"], fused["mu02"], fused["mu11"]
    else:
        dy = r - cy_all[k]
        dx = c - cx_all[k]
        mu20 = np.bincount(k, weights=dy * dy, minlength=len(present))
        mu02 = np.bincount(k, weights=dx * dx, minlength=len(present))
        mu11 = np.bincount(k, weights=dy * dx, minlength=len(present))
    tensor = np.empty((len(present), 2, 2), np.float64)
    tensor[:, 0, 0] = mu02 / area
    tensor[:, 1, 1] = mu20 / area
    tensor[:, 0, 1] = tensor[:, 1, 0] = -mu11 / area
    eig = np.clip(np.linalg.eigvalsh(tensor), 0, None)   # ascending
    l1, l2 = eig[:, 1], eig[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["eccentricity"] = np.where(l1 == 0, 0.0, np.sqrt(np.clip(1 - l2 / np.where(l1 == 0, 1, l1), 0, None)))
    out["major"] = 4 * np.sqrt(l1)
    out["minor"] = 4 * np.sqrt(l2)
    out["perimeter"] = _perimeters(px, pos, len(present))
    out["solidity"] = area / _convex_areas(px, pos, len(present))
    if image is not None:
        if fused is not None:
            sums, gray_sum = fused["channels"], fused["gray"]
        else:
            rgb = np.take(image.reshape(-1, 3), pix, axis=0)   # (np.take: several times faster than [pix] here)
            sums = _channel_sums(rgb, k, area, len(present))
            # gray: per-pixel float32 values summed in float32 in raster order, as scikit-image's mean does
            gray_sum = np.zeros(len(present), np.float32)
            np.add.at(gray_sum, k, luma(rgb))
        # float32 means of the channels as scikit-image's (exact integer sums, one float32 division)
        for ch, name in enumerate(("mean_r", "mean_g", "mean_b")):
            out[name] = (sums[ch].astype(np.float32) / area.astype(np.float32)).astype(np.float64)
        out["mean_gray"] = (gray_sum / area.astype(np.float32)).astype(np.float64)
    if foreground is not None:
        if fused is not None:
            fg_sum = fused["foreground"]
        else:
            fg_sum = np.bincount(k, weights=np.take(foreground.ravel(), pix).astype(np.float64), minlength=len(present))
        out["confidence"] = fg_sum / area
    return out


def luma(rgb: np.ndarray) -> np.ndarray:
    """0.299 R + 0.587 G + 0.114 B (ITU-R BT.601) of an (..., 3) array, in float32, pixel by pixel: products and sums
    as separate float32 operations, so a pixel's value is the same bits wherever it lies. (A matrix-vector product
    `rgb @ weights` goes to BLAS, whose last bit depends on the array's length on some CPUs: OpenBLAS on AMD EPYC
    gives a pixel of a whole image and the same pixel in a gathered list different values, 1 in about 170.)"""
    x = rgb.astype(np.float32, copy=False)
    return (x[..., 0] * np.float32(0.299) + x[..., 1] * np.float32(0.587)) + x[..., 2] * np.float32(0.114)


def _channel_sums(rgb: np.ndarray, k: np.ndarray, area: np.ndarray, m: int) -> list[np.ndarray]:
    """Per-instance sums of the three channels of `rgb` (pixels in rows, `k` their instance rows 0..m-1), float64
    (exact integers for integer images). For uint8 the red and green sums come from one `bincount` of
    red * 2**b + green, b the bits of the largest possible sum (255 * largest area): every partial sum an integer
    below 2**(2 b) <= 2**53, so exact, and split exactly."""
    b = (255 * int(area.max())).bit_length() if area.size else 0
    if rgb.dtype != np.uint8 or 2 * b > 53:
        return [np.bincount(k, weights=rgb[:, ch], minlength=m) for ch in range(3)]
    weight = rgb[:, 0].astype(np.int64) << b
    weight |= rgb[:, 1]
    total = np.bincount(k, weights=weight, minlength=m).astype(np.int64)
    return [(total >> b).astype(np.float64), (total & ((1 << b) - 1)).astype(np.float64),
            np.bincount(k, weights=rgb[:, 2], minlength=m)]


def _perimeters(px: _LabelPixels, pos: np.ndarray, m: int) -> np.ndarray:
    """scikit-image's `perimeter(mask, 4)` of every instance at once: the instance's border pixels (those with
    a 4-neighbour outside it), each weighted by the pattern of its border neighbours (code 1 + 2 per
    4-neighbour + 10 per diagonal neighbour that is a border pixel of the same instance)."""
    pw, pf = px.pw, px.pf
    is_border = np.zeros(pf.size, bool)     # (a bool map: an index map here costs more in page faults than it saves)
    for side in px.sides:
        is_border[side] = True
    bp = np.flatnonzero(is_border)
    bl = pf[bp]
    del is_border
    border_map = np.zeros(pf.size, pf.dtype)    # the index at the border pixels, 0 elsewhere (instances are > 0)
    border_map[bp] = bl
    code = np.ones(len(bp), np.uint8)           # at most 1 + 4 * 2 + 4 * 10 = 49
    for off, weight in ((-pw, 2), (pw, 2), (-1, 2), (1, 2), (-pw - 1, 10), (-pw + 1, 10), (pw - 1, 10), (pw + 1, 10)):
        code += (border_map[bp + off] == bl) * np.uint8(weight)   # a border pixel of the same instance there
    hist = np.bincount(pos[bl] * 50 + code, minlength=m * 50).reshape(m, 50)
    return hist.astype(np.float64) @ _PERIMETER_WEIGHTS


def _convex_areas(px: _LabelPixels, pos: np.ndarray, m: int) -> np.ndarray:
    """Pixel count of each instance's convex hull as scikit-image's `convex_hull_image` makes it (hull of the
    midpoints of the pixels' edges; a pixel whose centre lies inside or on the hull counts), for all instances
    at once and in exact integer arithmetic (coordinates doubled). `pos[index]`: the instance's row in the
    result."""
    # runs of one instance along a row: a run starts at a pixel whose left side is on the boundary and ends at
    # one whose right side is (both in raster order, so the i-th start and the i-th end are one run); per
    # (instance, row) the leftmost run start and the rightmost run end bound the hull
    run_r, run_c0, run_lab = px.side_pixels(3)
    _, run_c1, _ = px.side_pixels(1)
    run_k = pos[run_lab]
    key = run_k * (int(run_r.max()) + 1) + run_r
    order = np.argsort(key, kind="stable")
    ks = key[order]
    first = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    inst = run_k[order][first]
    row = run_r[order][first]
    left = np.minimum.reduceat(run_c0[order], first)
    right = np.maximum.reduceat(run_c1[order], first)
    # points (instance, y2, x2) in doubled coordinates: the row's midpoints (level 2 row: x2 = 2 left - 1 and
    # 2 right + 1) and its top / bottom midpoints (levels 2 row -+ 1: 2 left and 2 right), a level between two
    # rows of the instance holding the points of both. Per (instance, level), in ascending order: the smallest
    # and largest x2. (inst, row) are sorted, so the levels come out sorted: 2 row - 1 (unless the row above is
    # of the same instance: then it is that row's 2 row + 1), 2 row, 2 row + 1.
    joined = np.r_[False, (inst[1:] == inst[:-1]) & (row[1:] == row[:-1] + 1)]   # row above of the same instance
    below = np.r_[joined[1:], False]
    l2, r2 = 2 * left, 2 * right
    next_l2, next_r2 = np.r_[l2[1:], 0], np.r_[r2[1:], 0]
    keep = np.stack([~joined, np.ones_like(joined), np.ones_like(joined)], axis=1)
    lev_inst = np.repeat(inst, 3)[keep.ravel()]
    lev_y = np.stack([2 * row - 1, 2 * row, 2 * row + 1], axis=1)[keep]
    xmin = np.stack([l2, l2 - 1, np.where(below, np.minimum(l2, next_l2), l2)], axis=1)[keep]
    xmax = np.stack([r2, r2 + 1, np.where(below, np.maximum(r2, next_r2), r2)], axis=1)[keep]
    lo = _convex_chain(lev_inst, lev_y, xmin, lower=True)
    hi = _convex_chain(lev_inst, lev_y, -xmax, lower=True)
    # count the pixel centres (even doubled coordinates) between the two chains on every row of each
    # instance's vertical extent (also rows without pixels of a multi-piece instance)
    ymin = np.full(m, np.iinfo(np.int64).max)
    ymax = np.full(m, np.iinfo(np.int64).min)
    np.minimum.at(ymin, inst, row)
    np.maximum.at(ymax, inst, row)
    span = ymax - ymin + 1
    all_inst = np.repeat(np.arange(m), span)
    all_rows = np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span) + ymin[all_inst]
    xl_num, xl_den = _chain_at(lo, all_inst, 2 * all_rows)
    xr_num, xr_den = _chain_at(hi, all_inst, 2 * all_rows)
    # x >= xl -> doubled even 2j >= xl_num / xl_den -> j >= ceil(xl_num / (2 xl_den)); x <= -xr
    j_lo = -((-xl_num) // (2 * xl_den))
    j_hi = (-xr_num) // (2 * xr_den)  # the right chain is the minorant of -x: x <= -xr_num / xr_den
    counts = np.maximum(j_hi - j_lo + 1, 0)
    return np.bincount(all_inst, weights=counts, minlength=m)


def _convex_chain(inst: np.ndarray, y: np.ndarray, x: np.ndarray, lower: bool = True):
    """Convex minorant x(y) of each instance's points (sorted by instance, then y ascending, one per y):
    drops every point on or right of the segment between its remaining neighbours until none is.
    Returns (inst, y, x) of the chain vertices."""
    keep = np.ones(len(inst), bool)
    idx = np.arange(len(inst))
    while True:
        sel = idx[keep]
        ci, cy, cx = inst[sel], y[sel], x[sel]
        if len(sel) < 3:
            break
        same = (ci[:-2] == ci[1:-1]) & (ci[2:] == ci[1:-1])
        # cross product of (p1 - p0) x (p2 - p0) in (y, x): the middle point is kept when strictly left
        cross = (cy[1:-1] - cy[:-2]) * (cx[2:] - cx[:-2]) - (cx[1:-1] - cx[:-2]) * (cy[2:] - cy[:-2])
        drop = same & (cross <= 0)
        if not drop.any():
            break
        keep[sel[1:-1][drop]] = False
    sel = idx[keep]
    return inst[sel], y[sel], x[sel]


def _chain_at(chain, inst: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x of each instance's chain at height y, as an exact fraction (numerator, positive denominator)."""
    ci, cy, cx = chain
    big = int(max(np.abs(cy).max(), np.abs(y).max())) * 2 + 4
    keys = ci * big + cy
    q = inst * big + y
    j = np.searchsorted(keys, q, side="left")          # first vertex at or above y
    j = np.clip(j, 0, len(keys) - 1)
    exact = keys[j] == q
    i0 = np.clip(j - 1, 0, len(keys) - 1)
    y0, x0, y1, x1 = cy[i0], cx[i0], cy[j], cx[j]
    den = np.where(exact, 1, y1 - y0)
    num = np.where(exact, x1, x0 * (y1 - y0) + (y - y0) * (x1 - x0))
    return num, den


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

    def add_text(self, features: Sequence[str]) -> None:
        """Add features given as their compact JSON text (`feature_json`), as `add` would write them."""
        if self.closed:
            raise ValueError(f"{self.path}: writer already closed")
        if features:
            self._write(("," if self.count else "") + ",".join(features))
            self.count += len(features)

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
        # a plain csv.writer fed lists in column order: what csv.DictWriter(extrasaction="ignore") writes, without
        # its per-row dict and generator
        self._csv = csv.writer(self._text, lineterminator="\n")
        self._csv.writerow(self.columns)

    def add(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if self.closed:
            raise ValueError(f"{self.path}: writer already closed")
        if not rows:
            return
        self._add_columns([[row.get(key, "") for row in rows] for key in self.columns], len(rows))

    def add_columns(self, columns: Mapping[str, Sequence[Any]]) -> None:
        """`add` of rows given column by column: row i has the value `columns[key][i]` for each key (all columns
        of one length; a column of `self.columns` that is not given is empty, extra ones are ignored)."""
        if self.closed:
            raise ValueError(f"{self.path}: writer already closed")
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError("columns of different lengths")
        count = lengths.pop() if lengths else 0
        if count:
            self._add_columns([list(columns[key]) if key in columns else [""] * count for key in self.columns],
                              count)

    def _add_columns(self, columns: list[list], count: int) -> None:
        # column by column: a column of plain floats is formatted by one C-level map (the text `_csv_cell` gives)
        kinds = [set(map(type, column)) for column in columns]
        if columns and all(k == {float} or k == {int} for k in kinds):
            # only plain floats and ints (no text, so nothing csv would quote): one %-format per row, "%.6g" the
            # text of "{:.6g}".format and "%d" that of str() for these types
            template = ",".join("%.6g" if k == {float} else "%d" for k in kinds) + "\n"
            self._write("".join(map(template.__mod__, zip(*columns))))
            self.count += count
            return
        cells = []
        for column, kind in zip(columns, kinds):
            if kind == {float}:
                cells.append(list(map(_FLOAT_CELL, column)))
            elif kind <= _PLAIN_CELL_TYPES:
                cells.append(column)
            else:
                cells.append(list(map(_csv_cell, column)))
        self._csv.writerows(zip(*cells))
        self.count += count


_FLOAT_CELL = "{:.6g}".format        # f"{float(value):.6g}" of a Python float
_PLAIN_CELL_TYPES = {int, str, type(None), bool}   # written as they are by `_csv_cell`


def _csv_cell(value: Any) -> Any:
    if type(value) is float or isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return value
