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
    # BT.601 luma of each pixel, one float32 operation at a time (as `export.luma` defines it), on the whole image
    gray = (rgb[..., 0] * np.float32(0.299) + rgb[..., 1] * np.float32(0.587)) + rgb[..., 2] * np.float32(0.114)
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


def test_luma_is_the_same_bits_wherever_a_pixel_lies():
    # a pixel's gray value must not depend on how many pixels are computed with it (a BLAS `rgb @ weights` did:
    # its last bit changed with the array's length on an AMD EPYC, and mean_gray with it)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (57, 43, 3)).astype(np.uint8)
    whole = export.luma(image).ravel()
    flat = image.reshape(-1, 3)
    for n in (1, 2, 3, 5, 17, 100, 712):
        pix = np.sort(rng.choice(flat.shape[0], n, replace=False))
        assert np.array_equal(export.luma(np.take(flat, pix, axis=0)), whole[pix])
    # by hand, in float32 operations: 0.299 * 200 + 0.587 * 100 + 0.114 * 50
    expected = (np.float32(200) * np.float32(0.299) + np.float32(100) * np.float32(0.587)) \
        + np.float32(50) * np.float32(0.114)
    assert export.luma(np.array([200, 100, 50], np.uint8)) == expected
    assert export.luma(np.array([200, 100, 50], np.uint8)) == pytest.approx(59.8 + 58.7 + 5.7, rel=1e-6)


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


# ----------------------------------------------------------------------------------------------
# Issue 17, third step: measurements and outlines from one scan of the label changes, text by templates.
# The former implementations, kept as the references (verbatim but for the names and the shared helpers).
# ----------------------------------------------------------------------------------------------
def _former_ring_table(labels: np.ndarray) -> tuple[np.ndarray, list[int], list[tuple[int, int]]]:
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
    labels = export._check_labels(labels)
    index, ids = export._index_map(labels)
    height, width = index.shape
    if not index.any():
        return np.zeros((0, 2), np.int64), [], []
    padded = np.zeros((height + 2, width + 2), index.dtype)
    padded[1:-1, 1:-1] = index
    pw = width + 2
    pf = padded.ravel()
    pix = np.flatnonzero(pf)
    lab = pf[pix].astype(np.int64)
    r = pix // pw - 1
    c = pix % pw - 1
    stride = width + 1                      # corner (x, y) -> y * stride + x
    corners = (height + 1) * stride
    starts, ends, owner = [], [], []
    for off, (sy, sx, ey, ex) in ((-pw, (0, 0, 0, 1)), (1, (0, 1, 1, 1)), (pw, (1, 1, 1, 0)), (-1, (1, 0, 0, 0))):
        side = pf[pix + off] != lab         # background (or another instance) on that side
        rr, cc, ll = r[side], c[side], lab[side]
        starts.append(ll * corners + (rr + sy) * stride + cc + sx)
        ends.append(ll * corners + (rr + ey) * stride + cc + ex)
        owner.append(ll)
    start = np.concatenate(starts)
    end = np.concatenate(ends)
    inst = np.concatenate(owner)
    order = np.argsort(start, kind="stable")
    sorted_start = start[order]
    n_index = int(lab.max())
    complex_ids = np.zeros(n_index + 1, bool)
    dup = sorted_start[1:] == sorted_start[:-1]
    complex_ids[inst[order[1:][dup]]] = True      # a corner with two outgoing edges: corner contact
    nxt = order[np.clip(np.searchsorted(sorted_start, end), 0, len(order) - 1)]
    # each instance's first edge: the smallest start key (its top-left-most corner)
    first_pos = np.flatnonzero(np.r_[True, inst[order[1:]] != inst[order[:-1]]])
    first_edge = order[first_pos]
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
    local = start[edges] % corners
    xs, ys = local % stride, local // stride
    local_end = end[edges] % corners
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
        boxes = ndimage.find_objects(index)
        total = len(flat)
        for index_id in complex_list:
            box = boxes[index_id - 1]
            outline = np.array(export.instance_outline(index[box] == index_id), np.int64)
            outline += np.array([box[1].start, box[0].start])
            extra.append(outline)
            pieces[index_id] = (total, total + len(outline))
            total += len(outline)
        flat = np.concatenate([flat] + extra)
    keys = sorted(pieces)
    return flat, [(k if ids is None else int(ids[k - 1])) for k in keys], [pieces[k] for k in keys]


def _former_polygons_json(xy: np.ndarray, spans) -> list[str]:
    """`polygon_json` of each ring `xy[a:b]` (float64 (N, 2) corners) for (a, b) in `spans`, in one pass over
    the coordinates (floats written with their repr, as json does)."""
    text = list(map(repr, np.asarray(xy, np.float64).ravel().tolist()))
    pairs = [a + "," + b for a, b in zip(text[0::2], text[1::2])]
    return ['{"type":"Polygon","coordinates":[[[' + "],[".join(pairs[a:b]) + "]]]}" for a, b in spans]



def _former_measure_table(index: np.ndarray, image: np.ndarray | None,
                   foreground: np.ndarray | None) -> dict[str, np.ndarray] | None:
    """Per-instance arrays (rows for the present indices 1..n, ascending) of `measure_nuclei`, vectorised."""
    height, width = index.shape
    flat = index.ravel()
    pix = np.flatnonzero(flat)
    if pix.size == 0:
        return None
    lab = flat[pix].astype(np.int64)
    n = int(lab.max())
    r = pix // width
    c = pix - r * width
    count = np.bincount(lab, minlength=n + 1)
    present = np.flatnonzero(count)
    present = present[present > 0]
    area = count[present].astype(np.float64)
    # centroids: mean of the integer coordinates (sums are exact in float64, as scikit-image's mean)
    cy_all = np.bincount(lab, weights=r, minlength=n + 1)[present] / area
    cx_all = np.bincount(lab, weights=c, minlength=n + 1)[present] / area
    out: dict[str, np.ndarray] = {"present": present, "area": area, "centroid_y": cy_all, "centroid_x": cx_all}
    # second central moments -> inertia tensor (scikit-image: [[mu02, -mu11], [-mu11, mu20]] / mu00)
    pos = np.zeros(n + 1, np.int64)
    pos[present] = np.arange(len(present))
    k = pos[lab]
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
    out["perimeter"] = _former_perimeters(index, pix, lab, r, c, pos, len(present))
    out["solidity"] = area / _former_convex_areas(k, r, c, len(present), lab, pix, width)
    if image is not None:
        rgb = image.reshape(-1, 3)[pix]
        sums = [np.bincount(k, weights=rgb[:, ch], minlength=len(present)) for ch in range(3)]
        # float32 means of the channels as scikit-image's (exact integer sums, one float32 division)
        for ch, name in enumerate(("mean_r", "mean_g", "mean_b")):
            out[name] = (sums[ch].astype(np.float32) / area.astype(np.float32)).astype(np.float64)
        # gray: per-pixel float32 values summed in float32 in raster order, as scikit-image's mean does
        gray = export.luma(rgb)
        gray_sum = np.zeros(len(present), np.float32)
        np.add.at(gray_sum, k, gray)
        out["mean_gray"] = (gray_sum / area.astype(np.float32)).astype(np.float64)
    if foreground is not None:
        fg = foreground.ravel()[pix].astype(np.float64)
        out["confidence"] = np.bincount(k, weights=fg, minlength=len(present)) / area
    return out


def _former_perimeters(index: np.ndarray, pix: np.ndarray, lab: np.ndarray, r: np.ndarray, c: np.ndarray,
                pos: np.ndarray, m: int) -> np.ndarray:
    """scikit-image's `perimeter(mask, 4)` of every instance at once: the instance's border pixels (those with
    a 4-neighbour outside it), each weighted by the pattern of its border neighbours (code 1 + 2 per
    4-neighbour + 10 per diagonal neighbour that is a border pixel of the same instance)."""
    height, width = index.shape
    padded = np.zeros((height + 2, width + 2), index.dtype)   # a frame of background around the map
    padded[1:-1, 1:-1] = index
    pw = width + 2
    pf = padded.ravel()
    p = (r + 1) * pw + (c + 1)
    interior = pf[p - pw] == lab
    for off in (pw, -1, 1):
        interior &= pf[p + off] == lab
    edge = ~interior
    bp, bl = p[edge], lab[edge]
    is_border = np.zeros(pf.size, bool)
    is_border[bp] = True
    code = np.ones(len(bp), np.int64)
    for off, weight in ((-pw, 2), (pw, 2), (-1, 2), (1, 2), (-pw - 1, 10), (-pw + 1, 10), (pw - 1, 10), (pw + 1, 10)):
        q = bp + off
        code += weight * (is_border[q] & (pf[q] == bl))
    hist = np.bincount(pos[bl] * 50 + code, minlength=m * 50).reshape(m, 50)
    return hist.astype(np.float64) @ export._PERIMETER_WEIGHTS


def _former_convex_areas(k: np.ndarray, r: np.ndarray, c: np.ndarray, m: int, lab_flat: np.ndarray,
                  pix: np.ndarray, width: int) -> np.ndarray:
    """Pixel count of each instance's convex hull as scikit-image's `convex_hull_image` makes it (hull of the
    midpoints of the pixels' edges; a pixel whose centre lies inside or on the hull counts), for all instances
    at once and in exact integer arithmetic (coordinates doubled)."""
    # runs of one instance along a row (pixels are in raster order); per (instance, row) the leftmost run
    # start and the rightmost run end bound the hull
    lab = lab_flat
    starts = np.r_[True, (pix[1:] != pix[:-1] + 1) | (lab[1:] != lab[:-1]) | (c[1:] == 0)]
    ends = np.r_[starts[1:], True]
    run_k, run_r, run_c0, run_c1 = k[starts], r[starts], c[starts], c[ends]
    key = run_k * (int(r.max()) + 1) + run_r
    order = np.argsort(key, kind="stable")
    ks = key[order]
    first = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    inst = run_k[order][first]
    row = run_r[order][first]
    left = np.minimum.reduceat(run_c0[order], first)
    right = np.maximum.reduceat(run_c1[order], first)
    # points (instance, y2, x2) in doubled coordinates: the row's midpoints and the top/bottom midpoints
    inst3 = np.concatenate([inst, inst, inst, inst, inst, inst])
    y2 = np.concatenate([2 * row, 2 * row - 1, 2 * row + 1, 2 * row, 2 * row - 1, 2 * row + 1])
    x2 = np.concatenate([2 * left - 1, 2 * left, 2 * left, 2 * right + 1, 2 * right, 2 * right])
    # per (instance, level): smallest and largest x
    lkey = inst3 * (2 * int(r.max()) + 4) + (y2 + 1)
    o = np.lexsort((x2, lkey))
    lk, yy, xx, ii = lkey[o], y2[o], x2[o], inst3[o]
    f = np.flatnonzero(np.r_[True, lk[1:] != lk[:-1]])
    g = np.r_[f[1:] - 1, len(lk) - 1]
    lev_inst, lev_y = ii[f], yy[f]
    xmin, xmax = xx[f], xx[g]
    lo = export._convex_chain(lev_inst, lev_y, xmin, lower=True)
    hi = export._convex_chain(lev_inst, lev_y, -xmax, lower=True)
    # count the pixel centres (even doubled coordinates) between the two chains on every row of each
    # instance's vertical extent (also rows without pixels of a multi-piece instance)
    ymin = np.full(m, np.iinfo(np.int64).max)
    ymax = np.full(m, np.iinfo(np.int64).min)
    np.minimum.at(ymin, inst, row)
    np.maximum.at(ymax, inst, row)
    span = ymax - ymin + 1
    all_inst = np.repeat(np.arange(m), span)
    all_rows = np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span) + ymin[all_inst]
    xl_num, xl_den = export._chain_at(lo, all_inst, 2 * all_rows)
    xr_num, xr_den = export._chain_at(hi, all_inst, 2 * all_rows)
    # x >= xl -> doubled even 2j >= xl_num / xl_den -> j >= ceil(xl_num / (2 xl_den)); x <= -xr
    j_lo = -((-xl_num) // (2 * xl_den))
    j_hi = (-xr_num) // (2 * xr_den)  # the right chain is the minorant of -x: x <= -xr_num / xr_den
    counts = np.maximum(j_hi - j_lo + 1, 0)
    return np.bincount(all_inst, weights=counts, minlength=m)




def _former_rows(labels: np.ndarray, image, mpp, foreground) -> list[dict]:
    """The former `measure_nuclei` rows: `_former_measure_table` put into rows as `measure_nuclei` does."""
    index, ids = export._index_map(export._check_labels(labels))
    table = _former_measure_table(index, image, foreground)
    if table is None:
        return []
    present = table["present"]
    out_ids = present if ids is None else ids[present - 1]
    columns = {"id": [int(v) for v in out_ids.tolist()], "centroid_x": table["centroid_x"].tolist(),
               "centroid_y": table["centroid_y"].tolist()}
    if foreground is not None:
        columns["confidence"] = table["confidence"].tolist()
    area = table["area"]
    columns.update({"area_px": area.astype(np.int64).tolist(), "perimeter_px": table["perimeter"].tolist(),
                    "eccentricity": table["eccentricity"].tolist(), "solidity": table["solidity"].tolist(),
                    "major_axis_px": table["major"].tolist(), "minor_axis_px": table["minor"].tolist()})
    if image is not None:
        for name in ("mean_r", "mean_g", "mean_b", "mean_gray"):
            columns[name] = table[name].tolist()
    if mpp:
        columns["area_um2"] = (area * mpp * mpp).tolist()
        columns["perimeter_um"] = (table["perimeter"] * mpp).tolist()
    names = list(columns)
    return [dict(zip(names, values)) for values in zip(*(columns[k] for k in names))]


def _edge_case_maps():
    """Hand-made label maps: the cases where a scan of the label changes could go wrong."""
    maps = []
    one = np.zeros((5, 6), np.int32)
    one[2, 3] = 4                                   # a single pixel
    maps.append(one)
    full = np.full((7, 9), 3, np.int32)             # one instance filling the map (touches every border)
    maps.append(full)
    rows = np.zeros((6, 10), np.int32)
    rows[0, :] = 1                                  # a row along the top border, one along the bottom
    rows[5, 2:9] = 2
    rows[2:4, 0] = 5                                # a column on the left border, one on the right
    rows[1:5, 9] = 6
    maps.append(rows)
    touching = np.zeros((8, 8), np.int32)
    touching[1:4, 1:4] = 1                          # instances touching along sides and at corners only
    touching[1:4, 4:7] = 2
    touching[4:7, 4:7] = 1                          # id 1 again: two pieces meeting at one corner
    touching[4, 1:4] = 3
    maps.append(touching)
    ring = np.zeros((9, 9), np.int32)
    ring[1:8, 1:8] = 7
    ring[3:6, 3:6] = 0                              # a hole
    ring[4, 4] = 8                                  # an instance inside the hole
    maps.append(ring)
    gaps = np.zeros((12, 7), np.int32)
    gaps[1:3, 1:5] = 9                              # one id in pieces on rows far apart, the hull spans the gap
    gaps[8:11, 3:6] = 9
    gaps[5, 0:7] = 10                               # runs split by background on one row
    gaps[5, 3] = 0
    maps.append(gaps)
    big = np.zeros((6, 6), np.int64)
    big[1:3, 1:3] = 5_000_000_000                   # ids beyond the compaction threshold
    big[3:5, 2:5] = 7
    maps.append(big)
    maps.append(np.zeros((4, 4), np.int32))        # no instance
    return maps


def _label_cases(real_sample_dir=None):
    from PIL import Image

    rng = np.random.default_rng(5)
    for labels in _edge_case_maps():
        yield labels, rng.integers(0, 256, labels.shape + (3,)).astype(np.uint8)
    yield from _random_label_maps(80, seed=7)
    if real_sample_dir is not None:
        for f in sorted(real_sample_dir.glob("*/label masks modify/*.tif"))[:8]:
            png = Path(str(f).replace("label masks modify", "tissue images")).with_suffix(".png")
            yield tifffile.imread(f).astype(np.int32), np.asarray(Image.open(png).convert("RGB"))


def _assert_same_ring_tables(a, b) -> None:
    assert a[0].dtype == b[0].dtype and a[0].tolist() == b[0].tolist()
    assert a[1] == b[1] and a[2] == b[2]


def test_one_scan_measurements_and_outlines_equal_the_former_per_pixel_code(real_sample_dir):
    """`measure_and_outline`, `measure_nuclei` and `ring_table` (pixel sides from one scan of the label changes,
    runs and hull levels from those sides) give exactly the values of the former per-pixel code (every float
    bit for bit, the same rings), on hand-made edge cases, random maps with holes, pieces and corner contacts,
    and real NuInsSeg label maps."""
    count = 0
    for labels, image in _label_cases(real_sample_dir):
        fg = np.random.default_rng(count).random(labels.shape).astype(np.float32)
        former_rows = _former_rows(labels, image, 0.25, fg)
        rows, table = export.measure_and_outline(labels, image, mpp=0.25, foreground=fg)
        assert rows == former_rows                  # == on floats: bit for bit (no NaN in these columns)
        assert export.measure_nuclei(labels, image, mpp=0.25, foreground=fg) == former_rows
        assert export.measure_nuclei(labels, None) == _former_rows(labels, None, None, None)
        former_table = _former_ring_table(labels)
        _assert_same_ring_tables(table, former_table)
        _assert_same_ring_tables(export.ring_table(labels), former_table)
        for small in (np.uint8, np.uint16, np.int16):    # index maps kept in their own (small) dtype
            if labels.max() <= np.iinfo(small).max:
                rows_small, table_small = export.measure_and_outline(labels.astype(small), image, mpp=0.25,
                                                                     foreground=fg)
                assert rows_small == former_rows
                _assert_same_ring_tables(table_small, former_table)
        count += 1
    assert count > 90


def test_whole_number_polygon_texts_equal_the_former_reprs():
    """Whole-number corners (scale 1) are written from their digits into one buffer: the text of the former
    repr-based `polygons_json`, for 0, every digit count, large values, one-point and overlapping spans; other
    coordinates (fractions, negative numbers, -0.0) keep the repr path."""
    rng = np.random.default_rng(2)
    values = np.concatenate([[0, 1, 9, 10, 99, 100, 12345, 999999, 10**7, 2**40, 2**51], rng.integers(0, 5000, 400)])
    xy = np.stack([values, rng.permutation(values)], axis=1).astype(np.float64)
    spans = [(0, 5), (5, 6), (6, 200), (3, 9), (200, len(xy))]
    assert export.polygons_json(xy, spans) == _former_polygons_json(xy, spans)
    kept = np.zeros((40, 50), np.int32)
    for i, (y, x) in enumerate(rng.integers(0, 35, (12, 2))):
        kept[y:y + 5, x:x + 4] = i + 1
    corners, _, ring_spans = export.ring_table(kept)
    for offset in ((0, 0), (1920, 7), (123456, 98765)):
        xy = corners.astype(np.float64) + np.array(offset, np.float64)
        assert export.polygons_json(xy, ring_spans) == _former_polygons_json(xy, ring_spans)
    for odd in (xy / 3.0, xy - 200000.0, np.where(xy == xy[0, 0], -0.0, xy), xy + 0.5):
        assert export.polygons_json(odd, ring_spans) == _former_polygons_json(odd, ring_spans)
    assert export.polygons_json(np.zeros((0, 2)), []) == []


def test_row_and_measurement_texts_equal_json_dumps_and_measurements_json(real_sample_dir):
    """The region file's rows text and the features' measurement texts, written by templates from one repr per
    value, equal `json.dumps(rows)` and `measurements_json` of each row: on the rows of real nuclei (in slide
    coordinates, as `finish_region` makes them) and on rows that take the general path (NaN, bools, numpy
    numbers, text, mixed key orders, names that need escaping or hold %)."""
    from PIL import Image

    label_file = sorted(real_sample_dir.glob("*/label masks modify/*.tif"))[0]
    png = Path(str(label_file).replace("label masks modify", "tissue images")).with_suffix(".png")
    labels = tifffile.imread(label_file).astype(np.int32)
    rows = export.measure_nuclei(labels, np.asarray(Image.open(png).convert("RGB")), mpp=0.25,
                                 foreground=(labels > 0).astype(np.float32) * 0.9)
    assert len(rows) > 20
    for row in rows:
        row["centroid_x"] += 1920
        row["centroid_y"] += 4096
    scaled = [dict(r, area_px=r["area_px"] / 2.25) for r in rows]
    cases = [rows, scaled, rows[:1], [], [{"id": 1}], [{"id": 2, "a%s": 1.5, 'q"\\': 3}] * 3,
             rows[:3] + [dict(rows[3], solidity=float("nan"))], rows[:2] + [dict(rows[2], area_px=True)],
             [{"id": 1, "x": 1.0}, {"x": 2.0, "id": 2}],
             [{"id": 1, "x": "text"}], [{"id": 1, "x": 1e-300, "y": -0.0, "z": 1e22}]]
    for case in cases:
        text, measured = export.rows_and_measurements_json(case)
        assert text == json.dumps(case)
        assert measured == [export.measurements_json(r) for r in case]
        assert export.rows_json(case) == json.dumps(case)
        assert export.measurements_json_list(case) == measured
    numpy_numbers = rows[:2] + [dict(rows[2], area_px=np.int64(5))]     # json.dumps refuses them, as before
    assert export.measurements_json_list(numpy_numbers) == [export.measurements_json(r) for r in numpy_numbers]
    with pytest.raises(TypeError):
        export.rows_and_measurements_json(numpy_numbers)


def test_feature_texts_by_template_equal_feature_json():
    geometries = ['{"type":"Polygon","coordinates":[[[0.0,0.0],[1.0,0.0],[0.0,0.0]]]}', "%s%d", "{}"]
    measurements = ['[{"name":"a","value":1.5}]', "", '[{"name":"%d","value":2}]']
    ids = [1, np.int64(70000), 3]
    assert export.features_json(ids, geometries, measurements) == [
        export.feature_json(i, g, m) for i, g, m in zip(ids, geometries, measurements)]


# ----------------------------------------------------------------------------------------------
# Issue 17, fourth step: the kept nuclei as a pixel list, CSV rows by one %-format each
# ----------------------------------------------------------------------------------------------
def _as_pixels(labels: np.ndarray):
    flat = labels.ravel()
    pix = np.flatnonzero(flat)
    return pix, flat[pix]


def _assert_pixel_path_equals_map_path(labels, image, fg, sums=None) -> None:
    rows, table = export.measure_and_outline(labels, image, mpp=0.25, foreground=fg)
    pix, values = _as_pixels(labels)
    rows_p, table_p, (y0, x0, box) = export.measure_and_outline_pixels(labels.shape, pix, values, image, mpp=0.25,
                                                                        foreground=fg, sums=sums)
    assert rows_p == rows                        # bit for bit (no NaN in these columns)
    _assert_same_ring_tables(table_p, table)
    if pix.size:
        rr, cc = np.nonzero(labels)
        assert (y0, x0) == (rr.min(), cc.min())
        assert box.dtype == labels.dtype or labels.dtype not in export._SMALL_INDEX_TYPES
        assert np.array_equal(box, labels[y0:rr.max() + 1, x0:cc.max() + 1])
    else:
        assert rows_p == [] and box.shape == (0, 0)


def test_measurements_from_a_pixel_list_equal_those_of_the_label_map(real_sample_dir):
    """`measure_and_outline_pixels` (the instances' pixel list; the scan covers only their bounding box, optional
    pixel counts and coordinate sums from the caller) gives exactly `measure_and_outline` of the label map: every
    float bit for bit, the same rings, and the box of the map that holds every instance pixel; on the hand-made
    edge cases (one pixel, instances along every border of the map, corner contacts, holes, ids beyond the
    compaction threshold, no instance), random maps and real NuInsSeg label maps, as uint16 / uint32 values."""
    count = 0
    for labels, image in _label_cases(real_sample_dir):
        fg = np.random.default_rng(count).random(labels.shape).astype(np.float32)
        _assert_pixel_path_equals_map_path(labels, image, fg)
        if labels.max() < 2**16:
            _assert_pixel_path_equals_map_path(labels.astype(np.uint16), image, fg)
            _assert_pixel_path_equals_map_path(labels.astype(np.uint32), None, None)
            # the caller's sums: per label value 0..max, exact integers (as finish_region has them)
            pix, values = _as_pixels(labels)
            top = int(labels.max())
            rr, cc = np.divmod(pix, labels.shape[1])
            sums = (np.bincount(values, minlength=top + 1), np.bincount(values, rr, top + 1).astype(np.float64),
                    np.bincount(values, cc, top + 1))
            _assert_pixel_path_equals_map_path(labels, image, fg, sums=sums)
        count += 1
    assert count > 90


def test_pixel_list_measurements_many_instances_and_bad_input():
    """Over 65,535 instances (uint32 values, the region file's dtype then) measured from the pixel list equal the
    label map's; pixel positions out of order, outside the map, zero values and mismatched images are refused."""
    labels = np.zeros((520, 530), np.uint32)
    labels[::2, ::2] = np.arange(1, 260 * 265 + 1, dtype=np.uint32).reshape(260, 265)   # 68,900 single pixels
    labels[100:104, 100:110] = 5                                                         # one bigger, two pieces
    rgb = np.random.default_rng(1).integers(0, 256, labels.shape + (3,)).astype(np.uint8)
    _assert_pixel_path_equals_map_path(labels, rgb, None)
    pix, values = _as_pixels(labels)
    with pytest.raises(ValueError):
        export.measure_and_outline_pixels(labels.shape, pix[::-1], values[::-1], None)
    with pytest.raises(ValueError):
        export.measure_and_outline_pixels((10, 10), pix, values, None)
    with pytest.raises(ValueError):
        export.measure_and_outline_pixels(labels.shape, pix, values * 0, None)
    with pytest.raises(ValueError):
        export.measure_and_outline_pixels(labels.shape, pix, values, rgb[:-1])


def _special_rows(real_sample_dir) -> list[dict]:
    from PIL import Image

    label_file = sorted(real_sample_dir.glob("*/label masks modify/*.tif"))[1]
    image_file = Path(str(label_file).replace("label masks modify", "tissue images")).with_suffix(".png")
    labels = tifffile.imread(label_file).astype(np.int32)
    rgb = np.asarray(Image.open(image_file).convert("RGB"))
    rows = export.measure_nuclei(labels, rgb, mpp=0.25, foreground=(labels > 0).astype(np.float32))
    specials = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 5e-324, 1e-310, 1.7976931348623157e308,
                123456.5, 999999.5, 1e16, -2.5e-7, 0.1 + 0.2, 1 / 3]
    rng = np.random.default_rng(3)
    for i, value in enumerate(specials + list(rng.standard_normal(40) * 10.0 ** rng.integers(-12, 12, 40))):
        row = dict(rows[i % len(rows)])
        row["centroid_x"] = float(value)
        row["id"] = -i if i % 7 == 0 else 10**20 + i    # negative and big ints
        rows.append(row)
    return rows


def test_csv_rows_by_one_format_per_row_equal_the_former_dict_writer(real_sample_dir, tmp_path):
    """`CSVWriter.add` and `add_columns` of rows of plain floats and ints (one "%.6g" / "%d" %-format per row)
    write the bytes of the former `csv.DictWriter` version: real measurement rows plus floats at the edges of
    "%.6g" (signed zeros, NaN, infinities, subnormals, the largest double, halves that round, random magnitudes)
    and big or negative ints; rows with text, None, numpy numbers or a missing column take the csv path."""
    rows = _special_rows(real_sample_dir)
    columns = list(rows[0])

    def reference(rows, columns, name):
        with open(tmp_path / name, "w", newline="") as f:   # the former CSVWriter
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: export._csv_cell(row.get(k, "")) for k in columns})
        return (tmp_path / name).read_bytes()

    expected = reference(rows, columns, "reference.csv")
    with export.CSVWriter(tmp_path / "rows.csv", columns) as by_rows:
        by_rows.add(rows[:7])
        by_rows.add(rows[7:])
    with export.CSVWriter(tmp_path / "columns.csv", columns) as by_columns:
        for part in (rows[:30], [], rows[30:]):
            by_columns.add_columns({k: [row[k] for row in part] for k in columns + ["unused"] if k != "unused"}
                                   if part else {})
    assert by_rows.count == by_columns.count == len(rows)
    assert (tmp_path / "rows.csv").read_bytes() == expected == (tmp_path / "columns.csv").read_bytes()
    # the csv path: text that needs quoting, None, numpy numbers, a missing column
    odd = [dict(rows[0], name='a "b", c'), dict(rows[1], id=None), dict(rows[2], centroid_x=np.float32(1.5))]
    wide = columns + ["name"]
    with export.CSVWriter(tmp_path / "odd.csv", wide) as writer:
        writer.add(odd)
        writer.add_columns({k: [row.get(k, "") for row in odd] for k in columns})   # "name" not given: empty
    expected = reference(odd + [{k: v for k, v in row.items() if k != "name"} for row in odd], wide,
                         "odd_reference.csv")
    assert (tmp_path / "odd.csv").read_bytes() == expected
    with export.CSVWriter(tmp_path / "bad.csv", columns) as writer:
        with pytest.raises(ValueError):
            writer.add_columns({"id": [1, 2], "area_px": [3]})


def test_fractional_polygon_texts_from_a_table_of_distinct_values_equal_the_former_reprs(real_sample_dir):
    """Corners that are not whole numbers (a scale other than 1) are written from one repr per distinct value laid
    out in a byte array: the text of the former repr-per-coordinate `polygons_json`, for the rings of real nuclei
    at several scales and offsets, special values (NaN, infinities, the smallest and largest doubles, negative
    numbers; -0.0 keeps the repr path), one-point, empty and overlapping spans."""
    labels = tifffile.imread(sorted(real_sample_dir.glob("*/label masks modify/*.tif"))[3]).astype(np.int32)
    corners, _, spans = export.ring_table(labels)
    assert len(spans) > 10
    for scale in (0.8, 1.0107, 2.0, 0.2527 / 0.25, 7.3):
        for offset in ((0, 0), (1920, 128), (98765, 43210)):
            xy = (corners.astype(np.float64) + np.array(offset, np.float64)) / scale
            assert export.polygons_json(xy, spans) == _former_polygons_json(xy, spans)
    rng = np.random.default_rng(8)
    special = np.array([np.nan, np.inf, -np.inf, 5e-324, 1.7976931348623157e308, -3.5, 1e16, 1e-5, 0.1, 0.0,
                        123456789.123, -1e-300])
    xy = rng.choice(np.concatenate([special, rng.standard_normal(50) * 1e4]), (300, 2))
    odd_spans = [(0, 1), (1, 1), (2, 40), (30, 80), (80, 300), (5, 5)]
    assert export.polygons_json(xy, odd_spans) == _former_polygons_json(xy, odd_spans)
    signed = xy.copy()
    signed[3, 1] = -0.0
    assert export.polygons_json(signed, odd_spans) == _former_polygons_json(signed, odd_spans)
    assert export.polygons_json(xy, [(4, 4)]) == _former_polygons_json(xy, [(4, 4)])


def test_texts_of_columns_equal_the_texts_of_the_rows(real_sample_dir):
    """`columns_and_measurements_json` of rows given column by column equals `rows_and_measurements_json` of the
    rows themselves (which a test checks against `json.dumps` and `measurements_json`): real measurement rows
    (floats, ints), only ints, only the id, NaN / infinite values, numpy numbers, non-string keys, no rows."""
    rows = _special_rows(real_sample_dir)
    finite = [r for r in rows if all(not isinstance(v, float) or np.isfinite(v) for v in r.values())]
    cases = [finite, rows, [{"id": 1, "area_px": 4}, {"id": 2, "area_px": 5}], [{"id": 3}], [],
             [dict(r, centroid_x=np.float64(r["centroid_x"])) for r in finite[:5]],
             [{1: 2.5, "id": 4}], [{"id": 1, "x": True}]]
    for case in cases:
        columns = {k: [r[k] for r in case] for k in (case[0] if case else {})}
        assert export.columns_and_measurements_json(columns) == export.rows_and_measurements_json(case)
    assert export.columns_and_measurements_json({}) == ("[]", [])
    with pytest.raises(ValueError):
        export.columns_and_measurements_json({"id": [1], "x": [1.0, 2.0]})


def test_channel_sums_packed_in_one_bincount_equal_three():
    """`_channel_sums`: red and green summed in one `bincount` (uint8: red * 2**b + green) equal the three
    `bincount`s exactly, for white and random pixels; instances too large to pack, and other dtypes, take three."""
    rng = np.random.default_rng(9)
    for n, m, big in ((50000, 300, False), (300000, 2, True)):
        k = rng.integers(0, m, n)
        if big:
            k[:] = 0       # one instance of 300,000 pixels: 2 * bits(255 * 300000) > 53
        for rgb in (np.full((n, 3), 255, np.uint8), rng.integers(0, 256, (n, 3)).astype(np.uint8),
                    rng.integers(0, 4096, (n, 3)).astype(np.uint16)):
            area = np.bincount(k, minlength=m).astype(np.float64)
            got = export._channel_sums(rgb, k, area, m)
            for ch in range(3):
                expected = np.bincount(k, weights=rgb[:, ch], minlength=m)
                assert got[ch].dtype == np.float64 and np.array_equal(got[ch], expected)
