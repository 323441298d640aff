"""Tests of export.py: label TIFF, QuPath GeoJSON polygons, per-nucleus measurements."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage.draw import ellipse

import export


def shoelace(ring) -> float:
    xy = np.asarray(ring, dtype=float)
    return 0.5 * float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]))


def segments_intersect_improperly(ring) -> bool:
    """True if two non-adjacent edges of the closed ring touch or cross (brute force, small rings)."""
    pts = [tuple(p) for p in ring[:-1]]
    n = len(pts)
    edges = [(pts[i], pts[(i + 1) % n]) for i in range(n)]

    def on_segment(p, a, b):
        return (min(a[0], b[0]) <= p[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= p[1] <= max(a[1], b[1])
                and (b[0] - a[0]) * (p[1] - a[1]) == (b[1] - a[1]) * (p[0] - a[0]))

    def orient(a, b, c):
        v = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
        return (v > 0) - (v < 0)

    for i in range(n):
        for j in range(i + 1, n):
            if j == i + 1 or (i == 0 and j == n - 1):
                continue  # adjacent edges share a corner
            (a, b), (c, d) = edges[i], edges[j]
            o1, o2, o3, o4 = orient(a, b, c), orient(a, b, d), orient(c, d, a), orient(c, d, b)
            if o1 != o2 and o3 != o4:
                return True
            if any(on_segment(p, *seg) for p, seg in ((c, (a, b)), (d, (a, b)), (a, (c, d)), (b, (c, d)))):
                return True
    return False


@pytest.fixture
def scene():
    """Label map 60 x 80 with: 3 = rectangle rows 5..14, cols 10..29 (10 x 20 px); 7 = ellipse with
    semi-axes 12 (rows) and 6 (cols) centred at (40, 20); 12 = L-shape; 20 = two pieces (9 px + 2 px)."""
    labels = np.zeros((60, 80), dtype=np.int32)
    labels[5:15, 10:30] = 3
    rr, cc = ellipse(40, 20, 12, 6, shape=labels.shape)
    labels[rr, cc] = 7
    labels[30:45, 50:55] = 12
    labels[40:45, 55:65] = 12
    labels[5:8, 60:63] = 20
    labels[10, 70:72] = 20
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    image[..., 0] = 200
    image[..., 1] = np.arange(80, dtype=np.uint8)[None, :]
    image[..., 2] = 50
    return labels, image


# ----------------------------------------------------------------------------------------------
# TIFF
# ----------------------------------------------------------------------------------------------
def test_label_tiff_round_trip(tmp_path, scene):
    labels, _ = scene
    labels = labels.astype(np.int64)
    labels[0, 0] = 4_000_000_000  # beyond int32: must survive as uint32
    path = export.save_label_tiff(tmp_path / "labels.tif", labels)
    back = tifffile.imread(path)
    assert back.dtype == np.uint32 and back.shape == labels.shape
    np.testing.assert_array_equal(back, labels)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression != 1  # compressed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]  # no temporary file left


def test_label_tiff_rejects_bad_maps(tmp_path):
    with pytest.raises(ValueError):
        export.save_label_tiff(tmp_path / "x.tif", np.zeros((2, 3, 3), dtype=np.int32))
    with pytest.raises(ValueError):
        export.save_label_tiff(tmp_path / "x.tif", -np.ones((4, 4), dtype=np.int32))
    assert not (tmp_path / "x.tif").exists()


# ----------------------------------------------------------------------------------------------
# GeoJSON
# ----------------------------------------------------------------------------------------------
def test_rectangle_outline_is_exact():
    mask = np.zeros((20, 40), dtype=bool)
    mask[5:15, 10:30] = True
    ring = export.instance_outline(mask)
    assert ring[0] == ring[-1] and len(ring) == 5
    assert {tuple(p) for p in ring} == {(10, 5), (30, 5), (30, 15), (10, 15)}  # pixel-edge corners
    assert shoelace(ring) == 200.0  # counter-clockwise in (x, y) and exactly the pixel area


def test_geojson_structure_and_polygons(tmp_path, scene):
    labels, _ = scene
    path = export.save_geojson(tmp_path / "nuclei.geojson", labels)
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    features = data["features"]
    ids = [f["properties"]["id"] for f in features]
    assert ids == [3, 7, 12, 20]  # one feature per instance
    for feature in features:
        props = feature["properties"]
        assert feature["type"] == "Feature"
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "Nucleus" and props["name"] == f"Nucleus {props['id']}"
        assert len(props["classification"]["color"]) == 3
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 1  # no holes
        ring = geometry["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 5
        assert shoelace(ring) > 0  # counter-clockwise exterior (RFC 7946) in (x, y) as written
        assert not segments_intersect_improperly(ring)
        label_id = props["id"]
        pixel_area = int((labels == label_id).sum())
        if label_id == 20:
            assert shoelace(ring) == 9  # largest piece only (3 x 3)
            xs, ys = zip(*ring)
            assert (min(xs), max(xs), min(ys), max(ys)) == (60, 63, 5, 8)
        else:
            assert shoelace(ring) == pixel_area  # pixel-edge outline encloses exactly the pixels


def test_geojson_offset_and_measurements(scene):
    labels, image = scene
    rows = {row["id"]: row for row in export.measure_nuclei(labels, image)}
    data = export.labels_to_geojson(labels, offset=(100, 1000), properties=rows)
    rect = data["features"][0]
    xs, ys = zip(*rect["geometry"]["coordinates"][0])
    assert (min(xs), max(xs), min(ys), max(ys)) == (110, 130, 1005, 1015)
    measurements = {m["name"]: m["value"] for m in rect["properties"]["measurements"]}
    assert measurements["area_px"] == 200 and "id" not in measurements
    assert measurements["centroid_x"] == pytest.approx(19.5)
    assert "measurements" not in export.labels_to_geojson(labels)["features"][0]["properties"]
    json.dumps(data, allow_nan=False)  # strictly valid JSON


def test_geojson_diagonal_pieces_and_holes_give_simple_ring():
    labels = np.zeros((12, 12), dtype=np.uint16)
    labels[2:5, 2:5] = 9
    labels[5:8, 5:8] = 9           # touches the first square only at a corner
    labels[1:4, 8:11] = 4
    labels[2, 9] = 0               # one-pixel hole
    features = {f["properties"]["id"]: f for f in export.labels_to_geojson(labels)["features"]}
    ring9 = features[9]["geometry"]["coordinates"][0]
    assert not segments_intersect_improperly(ring9)
    assert shoelace(ring9) == 18 + 1  # both squares kept, joined by one bridging pixel
    ring4 = features[4]["geometry"]["coordinates"][0]
    assert shoelace(ring4) == 9  # hole filled: outer boundary only


def test_geojson_large_ids_and_touching_instances():
    labels = np.zeros((10, 10), dtype=np.uint32)
    labels[2:8, 2:5] = 3_000_000_000
    labels[2:8, 5:8] = 17  # shares an edge with the other instance
    features = export.labels_to_geojson(labels)["features"]
    assert [f["properties"]["id"] for f in features] == [17, 3_000_000_000]
    assert [shoelace(f["geometry"]["coordinates"][0]) for f in features] == [18, 18]


def test_empty_label_map(tmp_path):
    labels = np.zeros((16, 16), dtype=np.int32)
    assert export.labels_to_geojson(labels) == {"type": "FeatureCollection", "features": []}
    data = json.loads(export.save_geojson(tmp_path / "e.geojson", labels).read_text())
    assert data["features"] == []
    rows = export.measure_nuclei(labels, np.zeros((16, 16, 3), dtype=np.uint8))
    assert rows == []
    path = export.save_measurements_csv(tmp_path / "e.csv", rows)
    assert path.read_text().strip() == ",".join(export.measurement_columns())


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
def test_measurements_rectangle_and_ellipse(scene):
    labels, image = scene
    rows = {row["id"]: row for row in export.measure_nuclei(labels, image, mpp=0.5)}
    assert sorted(rows) == [3, 7, 12, 20]
    rect = rows[3]
    assert rect["area_px"] == 200
    assert rect["centroid_x"] == pytest.approx(19.5) and rect["centroid_y"] == pytest.approx(9.5)
    assert rect["perimeter_px"] == pytest.approx(2 * (20 - 1) + 2 * (10 - 1))  # through pixel centres
    assert rect["area_um2"] == pytest.approx(50.0) and rect["perimeter_um"] == pytest.approx(28.0)
    assert rect["solidity"] == pytest.approx(1.0)
    assert rect["mean_r"] == pytest.approx(200) and rect["mean_b"] == pytest.approx(50)
    assert rect["mean_g"] == pytest.approx(np.arange(10, 30).mean())
    assert rect["mean_gray"] == pytest.approx(0.299 * 200 + 0.587 * np.arange(10, 30).mean() + 0.114 * 50,
                                              rel=1e-5)
    ell = rows[7]
    assert ell["centroid_x"] == pytest.approx(20, abs=0.05) and ell["centroid_y"] == pytest.approx(40, abs=0.05)
    assert ell["eccentricity"] == pytest.approx(np.sqrt(1 - (6 / 12) ** 2), abs=0.03)
    assert ell["area_px"] == pytest.approx(np.pi * 12 * 6, rel=0.05)
    assert rows[20]["area_px"] == 11  # all pieces of a multi-piece id count
    assert rows[12]["area_px"] == 15 * 5 + 5 * 10


def test_measurements_csv(tmp_path, scene):
    labels, image = scene
    rows = export.measure_nuclei(labels, image, mpp=0.25)
    path = export.save_measurements_csv(tmp_path / "m.csv", rows)
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0].keys()) == export.measurement_columns(0.25)
    assert [int(r["id"]) for r in table] == [3, 7, 12, 20]
    assert float(table[0]["area_um2"]) == pytest.approx(200 * 0.25 ** 2)


def test_measurements_without_image_and_bad_input(scene):
    labels, image = scene
    rows = export.measure_nuclei(labels, None)
    assert "mean_r" not in rows[0] and rows[0]["area_px"] == 200
    with pytest.raises(ValueError):
        export.measure_nuclei(labels, image[:10])
    with pytest.raises(ValueError):
        export.measure_nuclei(labels, image, mpp=0)


# ----------------------------------------------------------------------------------------------
# Streaming writers
# ----------------------------------------------------------------------------------------------
def _two_crops():
    labels = np.zeros((40, 60), dtype=np.uint32)
    labels[5:15, 5:20] = 7
    labels[20:35, 30:50] = 9
    return labels[:, :30], labels[:, 30:], labels


def test_geojson_writer_matches_save_geojson_and_gzip_is_deterministic(tmp_path):
    import gzip

    left, right, whole = _two_crops()
    export.save_geojson(tmp_path / "reference.geojson", whole)
    with export.GeoJSONWriter(tmp_path / "streamed.geojson") as writer:
        writer.add(export.labels_to_geojson(left)["features"])
        writer.add([])
        writer.add(export.labels_to_geojson(right, offset=(30, 0))["features"])
    assert writer.count == 2
    assert (tmp_path / "streamed.geojson").read_bytes() == (tmp_path / "reference.geojson").read_bytes()
    blobs = []
    for run in range(2):
        with export.GeoJSONWriter(tmp_path / f"run{run}.geojson.gz", gzip=True) as writer:
            writer.add(export.labels_to_geojson(whole)["features"])
        blobs.append((tmp_path / f"run{run}.geojson.gz").read_bytes())
    assert blobs[0] == blobs[1]
    assert blobs[0][4:8] == b"\0\0\0\0" and not blobs[0][3] & 0x08  # gzip header: mtime 0, no file name
    assert gzip.decompress(blobs[0]) == (tmp_path / "reference.geojson").read_bytes()
    empty = export.GeoJSONWriter(tmp_path / "empty.geojson")
    empty.close()
    assert json.loads((tmp_path / "empty.geojson").read_text()) == {"type": "FeatureCollection", "features": []}


def test_geojson_scale_maps_a_coarser_grid_to_level_0():
    labels = np.zeros((10, 10), dtype=np.uint8)
    labels[2:4, 3:6] = 1
    ring = export.labels_to_geojson(labels, offset=(100, 50), scale=2.0)["features"][0]["geometry"]["coordinates"][0]
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    assert (min(xs), max(xs), min(ys), max(ys)) == (206.0, 212.0, 104.0, 108.0)


def test_csv_writer_matches_write_csv(tmp_path):
    import utils

    rows = [{"id": 1, "centroid_x": 1.23456789, "area_px": 10}, {"id": 2, "centroid_x": np.float32(2.5), "extra": 1}]
    utils.write_csv(tmp_path / "reference.csv", rows, columns=["id", "centroid_x", "area_px"])
    with export.CSVWriter(tmp_path / "streamed.csv", ["id", "centroid_x", "area_px"]) as writer:
        writer.add(rows[:1])
        writer.add(rows[1:])
    assert writer.count == 2
    assert (tmp_path / "streamed.csv").read_bytes() == (tmp_path / "reference.csv").read_bytes()


@pytest.mark.parametrize("kind", ["geojson", "csv"])
def test_streaming_writer_failure_keeps_the_existing_file(tmp_path, kind):
    path = tmp_path / f"result.{kind}"
    path.write_text("previous result\n")
    with pytest.raises(RuntimeError, match="crash"):
        with (export.GeoJSONWriter(path) if kind == "geojson" else export.CSVWriter(path, ["id"])) as writer:
            writer.add([{"type": "Feature"}] if kind == "geojson" else [{"id": 1}])
            raise RuntimeError("crash")
    assert path.read_text() == "previous result\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # temporary file removed
    with pytest.raises(ValueError, match="closed"):
        writer.add([])
    # abort without a with block, and a writer dropped without closing, leave nothing either
    other = export.CSVWriter(tmp_path / "other.csv", ["id"])
    other.add([{"id": 3}])
    other.abort()
    dropped = export.GeoJSONWriter(tmp_path / "dropped.geojson")
    del dropped
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# ----------------------------------------------------------------------------------------------
# Vectorised measurements and outlines (issue 17) against the per-instance references they replaced
# ----------------------------------------------------------------------------------------------
def _reference_measurements(labels: np.ndarray, image: np.ndarray, mpp: float) -> list[dict]:
    """The former `measure_nuclei`: scikit-image `regionprops_table`, region by region."""
    from skimage.measure import regionprops_table

    rgb = image.astype(np.float32)
    gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    table = regionprops_table(labels, intensity_image=np.concatenate([rgb, gray[..., None]], axis=2),
                              properties=["label", "centroid", "area", "perimeter", "eccentricity", "solidity",
                                          "axis_major_length", "axis_minor_length", "intensity_mean"])
    rows = []
    for i, label in enumerate(table["label"]):
        area, perimeter = float(table["area"][i]), float(table["perimeter"][i])
        rows.append({"id": int(label), "centroid_x": table["centroid-1"][i], "centroid_y": table["centroid-0"][i],
                     "area_px": int(round(area)), "perimeter_px": perimeter,
                     "eccentricity": table["eccentricity"][i], "solidity": table["solidity"][i],
                     "major_axis_px": table["axis_major_length"][i], "minor_axis_px": table["axis_minor_length"][i],
                     "mean_r": table["intensity_mean-0"][i], "mean_g": table["intensity_mean-1"][i],
                     "mean_b": table["intensity_mean-2"][i], "mean_gray": table["intensity_mean-3"][i],
                     "area_um2": area * mpp * mpp, "perimeter_um": perimeter * mpp})
    return rows


def _reference_geojson(labels: np.ndarray, offset=(0, 0)) -> dict:
    """The former `labels_to_geojson` polygons: `instance_outline` of each instance's mask, one by one."""
    index_boxes = ndimage.find_objects(labels)
    features = []
    for k, box in enumerate(index_boxes):
        if box is None:
            continue
        rows, cols = box
        ring = [[float(x + cols.start + offset[0]), float(y + rows.start + offset[1])]
                for x, y in export.instance_outline(labels[box] == k + 1)]
        features.append(ring)
    return features


def _random_label_maps(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        shape = (int(rng.integers(8, 60)), int(rng.integers(8, 60)))
        mask = ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.5, 3)) > rng.uniform(0.45, 0.6)
        labels, _ = ndimage.label(mask, structure=np.ones((3, 3)) if i % 2 else None)
        if i % 3 == 0:   # several pieces per id
            labels = np.where(labels > 0, (labels + 2) // 3, 0)
        if i % 5 == 0:   # holes and pixels touching only at a corner
            labels = np.where(rng.random(shape) < 0.06, 0, labels)
        if labels.max():
            yield labels.astype(np.int32), rng.integers(0, 256, shape + (3,)).astype(np.uint8)


def _assert_rows_match(new: list[dict], old: list[dict]) -> None:
    assert [r["id"] for r in new] == [r["id"] for r in old]
    for a, b in zip(new, old):
        assert [k for k in a if k != "confidence"] == list(b)
        for key in ("id", "area_px", "centroid_x", "centroid_y", "solidity", "mean_r", "mean_g", "mean_b",
                    "mean_gray", "area_um2"):
            assert a[key] == b[key], key    # the same sums: bit for bit
        for key in ("perimeter_px", "perimeter_um", "eccentricity", "major_axis_px", "minor_axis_px"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-9), key   # summation order only


def test_vectorised_measurements_equal_regionprops():
    for labels, image in _random_label_maps(120):
        _assert_rows_match(export.measure_nuclei(labels, image, mpp=0.25),
                           _reference_measurements(labels, image, 0.25))


def test_vectorised_measurements_equal_regionprops_on_real_nuclei(real_sample_dir):
    import tifffile
    from PIL import Image

    files = sorted((real_sample_dir).glob("*/label masks modify/*.tif"))[:12]
    assert files
    for f in files:
        labels = tifffile.imread(f).astype(np.int32)
        png = Path(str(f).replace("label masks modify", "tissue images")).with_suffix(".png")
        image = np.asarray(Image.open(png).convert("RGB"))
        if labels.max():
            _assert_rows_match(export.measure_nuclei(labels, image, mpp=0.25),
                               _reference_measurements(labels, image, 0.25))


def test_outlines_of_all_instances_at_once_equal_instance_outline():
    for labels, _ in _random_label_maps(200, seed=1):
        rings = export.instance_rings(labels)
        reference = _reference_geojson(labels)
        assert len(rings) == len(reference)
        for ring, ref in zip(rings.values(), reference):
            assert ring.tolist() == [[int(x), int(y)] for x, y in ref]
        features = export.labels_to_geojson(labels, offset=(3, 7))["features"]
        assert [f["geometry"]["coordinates"][0] for f in features] == _reference_geojson(labels, (3, 7))


def test_feature_text_is_json_dumps_of_the_feature():
    labels = np.zeros((20, 20), np.int32)
    labels[2:6, 3:9] = 4
    labels[10:15, 10:12] = 9
    rows = {r["id"]: r for r in export.measure_nuclei(labels, None, foreground=np.full((20, 20), 0.25))}
    for feature in export.labels_to_geojson(labels, properties=rows)["features"]:
        i = feature["properties"]["id"]
        text = export.feature_json(i, export.polygon_json(feature["geometry"]["coordinates"][0]),
                                   export.measurements_json(rows[i]))
        assert text == json.dumps(feature, separators=(",", ":"))
    assert export.measurements_json({"id": 3}) == ""
    odd = {"a": float("nan"), "b": np.float32(0.1), "c": True, "d": "text", "e": 1e-300, "f": -0.0, "g": 7}
    assert export.measurements_json(odd) == json.dumps(
        [{"name": k, "value": export._json_number(v)} for k, v in odd.items()
         if export._json_number(v) is not None], separators=(",", ":"))
    xy = np.array([[0.1, 2.0], [1 / 3, 5e20], [-7.25, 1e-7], [0.1, 2.0]])
    assert export.polygons_json(xy, [(0, 4), (1, 3)]) == [export.polygon_json(xy[0:4].tolist()),
                                                          export.polygon_json(xy[1:3].tolist())]


def test_confidence_is_the_mean_foreground_probability():
    labels = np.zeros((10, 12), np.int32)
    labels[1:4, 1:4] = 1            # 9 pixels at 0.8
    labels[5:7, 6:10] = 2           # 8 pixels: four at 0.25, four at 0.75 -> 0.5
    fg = np.zeros((10, 12), np.float32)
    fg[1:4, 1:4] = 0.8
    fg[5:7, 6:8] = 0.25
    fg[5:7, 8:10] = 0.75
    fg[0, :] = 1.0                  # background probability is not counted
    rows = export.measure_nuclei(labels, None, foreground=fg)
    assert [r["confidence"] for r in rows] == [pytest.approx(0.8, abs=1e-7), 0.5]
    assert list(rows[0])[:4] == ["id", "centroid_x", "centroid_y", "confidence"]
    assert export.measurement_columns(0.25, confidence=True)[:4] == ["id", "centroid_x", "centroid_y", "confidence"]
    given = export.measure_nuclei(labels, None, confidence={1: 0.1, 2: 0.9})
    assert [r["confidence"] for r in given] == [0.1, 0.9]
    assert "confidence" not in export.measure_nuclei(labels, None)[0]
    with pytest.raises(ValueError):
        export.measure_nuclei(labels, None, foreground=fg[:5])


def test_csv_writer_by_lists_equals_the_former_dict_writer_on_real_nuclei(real_sample_dir, tmp_path):
    """`CSVWriter` (a plain csv.writer fed lists) writes the bytes of the former `csv.DictWriter` version: the
    measurement rows of a real NuInsSeg tile (floats, ints, the class name) plus rows with missing and extra
    keys, None, numpy numbers and text that needs quoting."""
    from PIL import Image

    label_file = sorted(real_sample_dir.glob("*/label masks modify/*.tif"))[0]
    image_file = Path(str(label_file).replace("label masks modify", "tissue images")).with_suffix(".png")
    labels = tifffile.imread(label_file).astype(np.int32)
    rgb = np.asarray(Image.open(image_file).convert("RGB"))
    rows = export.measure_nuclei(labels, rgb, mpp=0.25, foreground=(labels > 0).astype(np.float32))
    assert len(rows) > 20
    rows = rows + [{"id": np.int64(7), "centroid_x": np.float32(1.5), "extra": 3}, {"name": 'a "b", c\nd'},
                   {"id": None, "area_px": np.float64(1e-7), "centroid_y": float("nan")}]
    columns = list(rows[0]) + ["name"]
    with open(tmp_path / "reference.csv", "w", newline="") as f:   # the former CSVWriter, line for line
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: export._csv_cell(row.get(k, "")) for k in columns})
    with export.CSVWriter(tmp_path / "streamed.csv", columns) as streamed:
        streamed.add(rows[:5])
        streamed.add([])
        streamed.add(rows[5:])
    assert streamed.count == len(rows)
    assert (tmp_path / "streamed.csv").read_bytes() == (tmp_path / "reference.csv").read_bytes()


def test_measurement_names_cached_as_json_text_give_json_dumps():
    """`measurements_json` keeps each name's JSON text from call to call: the same text as `json.dumps` on the
    first and on later calls, for names that need escaping, and for keys that are not text (1, 1.0, True are
    one dict key but three different names)."""
    for _ in range(2):
        for values in ({"área µm²": 1.5, 'a"b\\c': 2, "area_px": 3}, {1: 0.5, "x": 1}, {1.0: 0.5}, {True: 0.5}):
            assert export.measurements_json(values) == json.dumps(
                [{"name": str(k), "value": v} for k, v in values.items()], separators=(",", ":"))
