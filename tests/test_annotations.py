"""import_annotations: ImageScope XML written from known polygons -> the hand-computed label map; our own GeoJSON
export -> import -> the same instances (PQ >= 0.99); overlaps, degenerate polygons, holes; bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import annotations
import dataset
import export
import main
import metrics
import sample_data
from utils import read_csv, read_json

H, W = 8, 14


def _xml(regions_per_annotation) -> str:
    """An Aperio ImageScope XML document; each region is a list of (x, y) vertices."""
    out = ['<?xml version="1.0"?>', '<Annotations MicronsPerPixel="0.252">']
    for a, regions in enumerate(regions_per_annotation, start=1):
        out.append(f'<Annotation Id="{a}" Type="4"><Attributes/><Regions><RegionAttributeHeaders/>')
        for r, vertices in enumerate(regions, start=1):
            out.append(f'<Region Id="{r}" Type="0"><Attributes/><Vertices>')
            out += [f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in vertices]
            out.append("</Vertices></Region>")
        out.append("</Regions><Plots/></Annotation>")
    out.append("</Annotations>")
    return "\n".join(out)


def _write_image(folder: Path, stem: str, height: int, width: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.png"
    Image.fromarray(np.full((height, width, 3), 200, np.uint8)).save(path)
    return path


def test_imagescope_xml_imports_to_the_hand_computed_label_map(tmp_path, capsys):
    # ImageScope vertices are pixel centres: vertex (x, y) = centre of pixel column x, row y (0-based); a pixel
    # belongs to a polygon when its centre lies inside or on the boundary.
    regions_1 = [
        [(1, 1), (4, 1), (4, 3), (1, 3)],                # id 1: rows 1-3, columns 1-4
        [(0, 0), (5, 5), (10, 10)],                      # collinear: degenerate, skipped
        [(2, 2), (3, 2)],                                # two vertices: degenerate, skipped
        [(3, 2), (6, 2), (6, 5), (3, 5)],                # id 2: rows 2-5, columns 3-6; takes rows 2-3 x cols 3-4 from id 1
    ]
    regions_2 = [                                        # a second <Annotation>: ids continue
        [(100, 100), (110, 100), (110, 110)],            # outside the image: no pixel, skipped
        [(8, 0), (12.2, 0), (8, 4.2)],                   # id 3: triangle, pixels with (column - 8) + row <= 4
        [(0.2, 6.2), (2.8, 6.2), (2.8, 7.8), (0.2, 7.8)],  # id 4: centres x 1..2, y 7 inside
    ]
    expected = np.zeros((H, W), np.uint32)
    expected[1:4, 1:5] = 1
    expected[2:6, 3:7] = 2
    for row in range(H):
        for col in range(8, W):
            if (col - 8) + row <= 4:
                expected[row, col] = 3
    expected[7, 1:3] = 4

    images, notes, out = tmp_path / "images", tmp_path / "xml", tmp_path / "data"
    _write_image(images, "tile", H, W)
    notes.mkdir()
    (notes / "tile.xml").write_text(_xml([regions_1, regions_2]))
    assert main.main(["-q", "import_annotations", "--format", "imagescope_xml", "--images", str(images),
                      "--annotations", str(notes), "--output_dir", str(out), "--mpp", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "3 degenerate polygon(s)" in printed and "1 polygon(s) overlapped" in printed
    labels = tifffile.imread(out / "labels" / "tile.tif")
    assert labels.dtype == np.uint16 and np.array_equal(labels, expected)
    report = read_csv(out / "import_report.csv")[0]
    assert {k: int(report[k]) for k in ("polygons", "nuclei", "skipped_degenerate", "overlapping_polygons",
                                        "overwritten_pixels", "hidden_nuclei")} == {
        "polygons": 7, "nuclei": 4, "skipped_degenerate": 3, "overlapping_polygons": 1, "overwritten_pixels": 4,
        "hidden_nuclei": 0}
    # the result is a folders-layout dataset
    assert read_json(out / "dataset.json") == {"mpp": 0.25}
    (sample,) = dataset.discover(out)
    assert sample.rel_path == "images/tile.png" and dataset.dataset_mpp(out) == 0.25


def test_qupath_geojson_vertices_are_pixel_edges(tmp_path):
    # QuPath GeoJSON vertices are pixel edges: the image's top-left corner is (0, 0), pixel column x, row y is
    # the square [x, x+1] x [y, y+1]; a pixel belongs to a polygon when its centre (x + 0.5, y + 0.5) is inside.
    polygons = [
        [(1, 1), (4, 1), (4, 3), (1, 3)],                # id 1: exactly the pixels rows 1-2, columns 1-3
        [(8, 0), (12.2, 0), (8, 4.2)],                   # id 2: centres with (col + 0.5 - 8) + (row + 0.5) <= 4.2
        [(0.2, 6.2), (2.8, 6.2), (2.8, 7.8), (0.2, 7.8)],  # id 3: centres x 0.5..2.5, y 6.5..7.5 inside
    ]
    expected = np.zeros((H, W), np.uint32)
    expected[1:3, 1:4] = 1
    for row in range(H):
        for col in range(8, W):
            if (col - 8) + row <= 3:
                expected[row, col] = 2
    expected[6:8, 0:3] = 3
    images, notes, out = tmp_path / "images", tmp_path / "geo", tmp_path / "out"
    _write_image(images, "tile", H, W)
    notes.mkdir()
    features = [{"type": "Feature", "properties": {},
                 "geometry": {"type": "Polygon", "coordinates": [[list(v) for v in ring + [ring[0]]]]}}
                for ring in polygons]
    (notes / "tile.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    assert main.main(["-q", "import_annotations", "--format", "qupath_geojson", "--images", str(images),
                      "--annotations", str(notes), "--output_dir", str(out)]) == 0
    assert np.array_equal(tifffile.imread(out / "labels" / "tile.tif"), expected)


def test_vertex_conventions_differ_by_half_a_pixel():
    """The same ring read as pixel centres equals it shifted by +0.5 read as pixel edges; the conventions are a
    property of the format and the rasteriser's default is QuPath's pixel edges."""
    assert annotations.VERTEX_CONVENTIONS == {"imagescope_xml": annotations.PIXEL_CENTRE,
                                              "qupath_geojson": annotations.PIXEL_EDGE}
    ring = np.array([[1.3, 0.7], [6.1, 2.2], [4.4, 5.9], [0.6, 4.0]])
    centre = annotations.rasterise([annotations.Shape([(ring, [])])], (8, 8), annotations.PIXEL_CENTRE).labels
    edge = annotations.rasterise([annotations.Shape([(ring + 0.5, [])])], (8, 8), annotations.PIXEL_EDGE).labels
    default = annotations.rasterise([annotations.Shape([(ring + 0.5, [])])], (8, 8)).labels
    assert centre.any() and np.array_equal(centre, edge) and np.array_equal(edge, default)
    # a triangle at integer vertices: pixel centres include the boundary, so 1 + 2 + 3 pixels
    tri = annotations.Shape([(np.array([[0, 0], [2, 0], [0, 2]], float), [])])
    labels = annotations.rasterise([tri], (4, 4), annotations.PIXEL_CENTRE).labels
    assert np.array_equal(labels[:3, :3], [[1, 1, 1], [1, 1, 0], [1, 0, 0]]) and labels.sum() == 6
    # the same vertices as pixel edges: centres (0.5, 0.5), (1.5, 0.5), (0.5, 1.5) are inside or on the edge
    labels = annotations.rasterise([tri], (4, 4)).labels
    assert np.array_equal(labels[:2, :2], [[1, 1], [1, 0]]) and labels.sum() == 3
    with pytest.raises(ValueError):
        annotations.rasterise([tri], (4, 4), "corner")


def test_rasterise_later_wins_hidden_and_holes():
    square = annotations.Shape([(np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float), [])])
    inner = annotations.Shape([(np.array([[1, 1], [3, 1], [3, 3], [1, 3]], float), [])])
    # a later polygon covering an earlier one completely hides it
    result = annotations.rasterise([inner, square], (6, 6))
    assert result.hidden_nuclei == 1 and result.nuclei == 1 and (result.labels[:4, :4] == 2).all()
    # a hole: the ring's inside is left out; a MultiPolygon's parts share one id
    holed = annotations.Shape([(square.parts[0][0], [inner.parts[0][0]])])
    labels = annotations.rasterise([holed], (6, 6)).labels
    assert (labels[1:3, 1:3] == 0).all() and labels[:4, :4].sum() == 12
    two = annotations.Shape([square.parts[0], (np.array([[5, 5], [6, 5], [6, 6], [5, 6]], float), [])])
    labels = annotations.rasterise([two], (6, 6)).labels
    assert labels[5, 5] == 1 and (labels[:4, :4] == 1).all() and len(np.unique(labels)) == 2


def _labels_from_geojson_roundtrip(labels: np.ndarray, tmp_path: Path, offset_name: str) -> np.ndarray:
    images, notes, out = tmp_path / f"images_{offset_name}", tmp_path / f"geo_{offset_name}", tmp_path / f"out_{offset_name}"
    _write_image(images, "tile", *labels.shape)
    notes.mkdir()
    export.save_geojson(notes / "tile.geojson", labels,
                        properties={int(i): {"area_px": int((labels == i).sum())} for i in np.unique(labels) if i})
    assert main.main(["-q", "import_annotations", "--format", "qupath_geojson", "--images", str(images),
                      "--annotations", str(notes), "--output_dir", str(out)]) == 0
    return tifffile.imread(out / "labels" / "tile.tif")


def test_geojson_export_import_round_trip(tmp_path, real_sample_dir_or_none):
    cases = []
    image, labels, _ = sample_data.render_tile(np.random.default_rng(3), 128, sample_data.ORGANS[2])
    cases.append(("synthetic", labels[:100, :]))   # non-square
    if real_sample_dir_or_none is not None:
        for sample in dataset.discover_nuinsseg(real_sample_dir_or_none)[:2]:
            cases.append((sample.name, dataset.read_label_mask(sample.label_path)))
    for name, truth in cases:
        back = _labels_from_geojson_roundtrip(truth, tmp_path, name)
        assert back.shape == truth.shape
        scores = metrics.instance_metrics(truth, back)
        assert scores["pq"] >= 0.99 and scores["num_pred"] == scores["num_true"], (name, scores["pq"])


@pytest.fixture
def real_sample_dir_or_none():
    from conftest import REAL_SAMPLE_DIR

    return REAL_SAMPLE_DIR if REAL_SAMPLE_DIR.is_dir() else None


def test_geojson_variants(tmp_path):
    """A QuPath array of features, a Feature without geometry and a point are read; only polygons count."""
    images, notes, out = tmp_path / "images", tmp_path / "geo", tmp_path / "out"
    _write_image(images, "a", 10, 10)
    notes.mkdir()
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [4, 1], [4, 4], [1, 4], [1, 1]]]},
         "properties": {"objectType": "annotation"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
        {"type": "Feature", "geometry": None, "properties": {}},
    ]
    (notes / "a.json").write_text(json.dumps(features))
    assert main.main(["-q", "import_annotations", "--format", "qupath_geojson", "--images", str(images),
                      "--annotations", str(notes), "--output_dir", str(out)]) == 0
    labels = tifffile.imread(out / "labels" / "a.tif")
    assert (labels[1:4, 1:4] == 1).all() and labels.sum() == 9
    assert read_csv(out / "import_report.csv")[0]["skipped_not_polygon"] == "2"


@pytest.mark.parametrize("problem, expected", [
    ("missing_annotation", "b.png: no annotation file for this image"),
    ("orphan_annotation", "c.xml: annotation file without an image"),
    ("bad_xml", "b.xml: not a valid XML file"),
    ("bad_vertex", "b.xml: Region 1: a Vertex without numeric X and Y"),
    ("bad_geojson", "b.geojson: not a valid GeoJSON file"),
    ("not_geojson", "b.geojson: not a GeoJSON FeatureCollection"),
    ("bad_image", "b.png: unreadable or truncated image"),
    ("output_not_empty", "folder exists and is not empty"),
])
def test_bad_inputs_fail_before_writing(run_error, tmp_path, capsys, problem, expected):
    images, notes, out = tmp_path / "images", tmp_path / "notes", tmp_path / "out"
    fmt = "qupath_geojson" if "geojson" in problem else "imagescope_xml"
    suffix = ".geojson" if fmt == "qupath_geojson" else ".xml"
    good_note = (json.dumps({"type": "FeatureCollection", "features": []}) if fmt == "qupath_geojson"
                 else _xml([[[(1, 1), (3, 1), (3, 3)]]]))
    notes.mkdir()
    for stem in ("a", "b"):   # "a" is fine and sorts first: nothing of it may be written either
        _write_image(images, stem, 6, 6)
        (notes / f"{stem}{suffix}").write_text(good_note)
    if problem == "missing_annotation":
        (notes / "b.xml").unlink()
    elif problem == "orphan_annotation":
        (notes / "c.xml").write_text(good_note)
    elif problem == "bad_xml":
        (notes / "b.xml").write_text("<Annotations><Region>")
    elif problem == "bad_vertex":
        (notes / "b.xml").write_text(_xml([[[(1, 1), (3, "x"), (3, 3)]]]))
    elif problem == "bad_geojson":
        (notes / "b.geojson").write_text("{not json")
    elif problem == "not_geojson":
        (notes / "b.geojson").write_text(json.dumps({"type": "Topology"}))
    elif problem == "bad_image":
        (images / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    elif problem == "output_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    line = run_error(["import_annotations", "--format", fmt, "--images", str(images), "--annotations",
                               str(notes), "--output_dir", str(out)])
    assert expected in line
    if problem == "output_not_empty":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()


def test_polygons_outside_the_image_are_skipped_with_a_warning(tmp_path, caplog):
    """Whole-slide coordinates on a tile: every polygon misses the image; skipped, counted and warned about."""
    images, notes, out = tmp_path / "images", tmp_path / "xml", tmp_path / "out"
    _write_image(images, "tile", 10, 10)
    notes.mkdir()
    (notes / "tile.xml").write_text(_xml([[[(5000, 5000), (5004, 5000), (5004, 5004)],
                                          [(6000, 10), (6004, 10), (6004, 14)]]]))
    assert main.main(["-q", "import_annotations", "--format", "imagescope_xml", "--images", str(images),
                      "--annotations", str(notes), "--output_dir", str(out)]) == 0
    assert not tifffile.imread(out / "labels" / "tile.tif").any()
    assert read_csv(out / "import_report.csv")[0]["skipped_degenerate"] == "2"
    assert "none of its 2 polygon(s) covers a pixel" in caplog.text


def test_implausible_mpp_warns(tmp_path, caplog):
    """--mpp is only recorded in dataset.json, but train and evaluate resize by it: 100 µm/px gets a warning."""
    images, notes, out = tmp_path / "images", tmp_path / "xml", tmp_path / "out"
    _write_image(images, "tile", H, W)
    notes.mkdir()
    (notes / "tile.xml").write_text(_xml([[[(1, 1), (4, 1), (4, 3), (1, 3)]]]))
    with caplog.at_level("WARNING"):
        assert main.main(["-q", "import_annotations", "--format", "imagescope_xml", "--images", str(images),
                          "--annotations", str(notes), "--output_dir", str(out), "--mpp", "100"]) == 0
    assert "--mpp 100: outside 0.05-5 micrometres per pixel" in caplog.text
    assert read_json(out / "dataset.json") == {"mpp": 100.0}
