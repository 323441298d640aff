"""`import_annotations --slide` (issue 18, points 1, 2 and 7): areas and nuclei drawn on a whole slide ->
training images, the same coordinate convention as `predict`'s GeoJSON, and the bad inputs."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import dataset
import main
import metrics
import predict
import sample_data
import slide_annotations
import utils
import wsi
from test_predict import PP, pure_maps, synthetic_slide


def _predict_slide(path: Path, out: Path) -> Path:
    options = predict.PredictOptions(model_path="unused", tile_size=256, overlap=64, tissue_mask="none",
                                     region_size=384, num_workers=0, read_threads=1, batch_size=6, label_image=True)
    predictor = predict.load_predictor(options, maps_fn=pure_maps)
    predictor.postprocess = dict(PP)
    outcome = wsi.predict_slide(predictor, path, path.stem, out, options)
    assert outcome.status == "ok", outcome.error
    return out / f"{path.stem}.geojson"


def area_feature(ring: list, class_name: str | None = "Region", name: str = "") -> dict:
    properties: dict = {"objectType": "annotation"}
    if class_name is not None:
        properties["classification"] = {"name": class_name, "color": [0, 0, 255]}
    if name:
        properties["name"] = name
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + [ring[0]]]},
            "properties": properties}


def rect(x0, y0, x1, y1) -> list:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


# an L-shaped area with integer vertices: its pixels are known exactly (centres never on an edge)
L_SHAPE = [[500, 100], [800, 100], [800, 250], [650, 250], [650, 400], [500, 400]]


def l_shape_mask() -> np.ndarray:
    mask = np.zeros((300, 300), bool)
    mask[:150, :] = True
    mask[:, :150] = True
    return mask


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """A synthetic slide (0.25 µm/px, the model's: level 0 = the target grid) segmented by `predict`'s slide
    path (label image + GeoJSON)."""
    tmp = tmp_path_factory.mktemp("slide_import")
    image, _ = synthetic_slide(900, 1000, seed=7)
    path = tmp / "slideA.tif"
    sample_data.write_pyramidal_tiff(path, image, 0.25, tile_size=256)
    geojson = _predict_slide(path, tmp / "pred")
    labels = tifffile.imread(tmp / "pred" / "slideA_labels.tif")
    return {"slide": path, "image": image, "geojson": geojson, "labels": labels, "tmp": tmp}


def _import(slide, geojson, out, *extra) -> int:
    return main.main(["-q", "import_annotations", "--format", "qupath_geojson", "--slide", str(slide),
                      "--annotations", str(geojson), "--output_dir", str(out), *extra])


def test_prediction_exported_and_imported_gives_back_its_labels(predicted, tmp_path):
    collection = json.loads(predicted["geojson"].read_text())
    n = len(collection["features"])
    assert n > 300
    collection["features"] += [area_feature(rect(100.0, 150.0, 420.0, 500.0), "Region", "first"),
                               area_feature(L_SHAPE, None)]
    edited = tmp_path / "slideA.geojson"
    edited.write_text(json.dumps(collection))
    out = tmp_path / "data"
    assert _import(predicted["slide"], edited, out) == 0
    rows = utils.read_csv(out / "import_report.csv")
    assert [r["image"] for r in rows] == ["slideA_x100_y150_320x350.png", "slideA_x500_y100_300x300.png"]
    assert utils.read_json(out / "dataset.json") == {"mpp": 0.25}
    assert [r["group"] for r in utils.read_csv(out / "groups.csv")] == ["slideA", "slideA"]
    truth = predicted["labels"]
    for row, (x, y, w, h) in zip(rows, [(100, 150, 320, 350), (500, 100, 300, 300)]):
        stem = Path(row["image"]).stem
        image = np.asarray(Image.open(out / "images" / row["image"]))
        assert np.array_equal(image, predicted["image"][y:y + h, x:x + w])  # level-0 pixels of the box
        labels = tifffile.imread(out / "labels" / f"{stem}.tif")
        crop = truth[y:y + h, x:x + w]
        m = metrics.instance_metrics(crop, labels)
        assert m["pq"] >= 0.999 and m["num_true"] == m["num_pred"] == int(row["nuclei"]) > 20, m
    # the rectangle is its box: no ignore mask; the L shape's box minus the L is ignored
    assert not (out / "ignore" / "slideA_x100_y150_320x350.png").exists()
    ignore = np.asarray(Image.open(out / "ignore" / "slideA_x500_y100_300x300.png")) > 0
    assert np.array_equal(ignore, ~l_shape_mask())
    assert int(rows[1]["ignored_pixels"]) == 150 * 150
    # the folders layout reads it back, the ignore mask paired with its image
    samples = dataset.discover_folders(out)
    assert [s.vague_path is not None for s in samples] == [False, True]


def test_pixel_span_hand_computed():
    assert slide_annotations.pixel_span(100.0, 420.0, 1000) == (100, 420)
    assert slide_annotations.pixel_span(100.4, 420.6, 1000) == (100, 421)  # centres 100.5 .. 420.5
    assert slide_annotations.pixel_span(100.6, 101.4, 1000) == (101, 101)  # no centre inside: empty
    assert slide_annotations.pixel_span(-50, 30, 20) == (0, 20)  # clipped to the slide


def test_areas_nuclei_and_classes(tmp_path, predicted, caplog):
    """Nuclei drawn as annotations of the nucleus class, detections, cells (their nucleus outline), points and
    lines skipped; nuclei outside every area counted; overlaps later-wins; --area_class."""
    nucleus = lambda ring, kind="annotation", cls="Nucleus": {  # noqa: E731
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + [ring[0]]]},
        "properties": {"objectType": kind, "classification": {"name": cls}}}
    cell = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [rect(0, 0, 40, 40) + [[0, 0]]]},
            "nucleusGeometry": {"type": "Polygon", "coordinates": [rect(30, 30, 36, 36) + [[30, 30]]]},
            "properties": {"objectType": "cell"}}
    features = [area_feature(rect(20, 20, 60, 60), "Region"), area_feature(rect(200, 200, 230, 230), "Test"),
                nucleus(rect(22, 22, 30, 30), cls="nucleus"),  # any case
                nucleus(rect(40, 22, 50, 30), kind="detection", cls="Other"),
                nucleus(rect(45, 25, 55, 35), kind="detection"),  # overlaps the previous one: wins
                cell,
                nucleus(rect(300, 300, 310, 310)),  # outside every area
                area_feature(rect(52, 50, 70, 70), "Ignore*"),  # QuPath's ignore class: not an area
                {"type": "Feature", "geometry": {"type": "Point", "coordinates": [25, 25]}, "properties": {}},
                {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[1, 1], [9, 9]]},
                 "properties": {}}]
    path = tmp_path / "slideA.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    objects = slide_annotations.parse_slide_geojson(path)
    assert len(objects.areas) == 2 and len(objects.nuclei) == 5 and objects.skipped_objects == 2
    assert len(objects.ignored) == 1
    out = tmp_path / "data"
    with caplog.at_level(logging.INFO):
        assert _import(predicted["slide"], path, out, "--area_class", "region*") == 0  # any case, star or not
    rows = utils.read_csv(out / "import_report.csv")
    assert len(rows) == 1 and rows[0]["area_class"] == "Region"
    labels = tifffile.imread(out / "labels" / "slideA_x20_y20_40x40.tif")
    expected = np.zeros((40, 40), np.uint32)
    expected[2:10, 2:10] = 1
    expected[2:10, 20:30] = 2
    expected[5:15, 25:35] = 3
    expected[10:16, 10:16] = 4
    assert np.array_equal(labels, expected)
    assert rows[0]["nuclei"] == "4" and rows[0]["overlapping_polygons"] == "1"
    assert rows[0]["overwritten_pixels"] == str(5 * 5)
    assert "1 nuclei outside every area" in caplog.text or "(1 outside every area" in caplog.text
    ignore = np.asarray(Image.open(out / "ignore" / "slideA_x20_y20_40x40.png")) > 0
    expected_ignore = np.zeros((40, 40), bool)
    expected_ignore[30:, 32:] = True
    assert np.array_equal(ignore, expected_ignore) and rows[0]["ignored_pixels"] == str(10 * 8)


def _expect_error(run_error, argv, out: Path, text: str) -> str:
    line = run_error(argv)
    assert text in line, line
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.import-*"))
    return line


def _argv(slide, geojson, out, *extra):
    return ["import_annotations", "--format", "qupath_geojson", "--slide", str(slide), "--annotations",
            str(geojson), "--output_dir", str(out), *extra]


def test_bad_inputs_one_line_nothing_written(predicted, tmp_path, run_error, monkeypatch):
    slide, out = predicted["slide"], tmp_path / "out"
    collection = json.loads(predicted["geojson"].read_text())

    def write(features, name="slideA.geojson"):
        path = tmp_path / name
        path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        return path

    # no area at all: how to mark one
    line = _expect_error(run_error, _argv(slide, write(collection["features"]), out), out, "no area")
    assert "rectangle or polygon tool" in line and "'Nucleus'" in line
    # another slide's export: everything far outside this slide
    moved = copy.deepcopy(collection["features"]) + [area_feature(rect(100, 100, 300, 300))]
    for f in moved:
        f["geometry"]["coordinates"] = [[[x + 5000, y + 8000] for x, y in ring] for ring in f["geometry"]["coordinates"]]
    _expect_error(run_error, _argv(slide, write(moved), out), out, "another slide")
    # an area of zero size
    _expect_error(run_error, _argv(slide, write([area_feature([[10, 10], [50, 10], [90, 10]])]), out), out,
                  "zero size")
    _expect_error(run_error, _argv(slide, write([area_feature(rect(10.6, 10, 11.4, 40))]), out), out, "zero size")
    sliver = [[10.0, 10.3], [40.0, 40.3], [40.1, 40.3]]  # a box of pixels, but no pixel centre inside
    _expect_error(run_error, _argv(slide, write([area_feature(sliver, name="thin")]), out), out,
                  "area 1 ('thin', class 'Region'): zero size (no pixel centre")
    # an area larger than the limit (checked before reading)
    monkeypatch.setattr(slide_annotations, "MAX_AREA_SIDE", 300)
    _expect_error(run_error, _argv(slide, write([area_feature(rect(0, 0, 301, 20))]), out), out, "larger than 300")
    monkeypatch.undo()
    # a slide that cannot be opened
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide at all" * 100)
    _expect_error(run_error, _argv(broken, write([area_feature(rect(0, 0, 30, 30))]), out), out, "broken.svs")
    # slides of different pixel sizes in one dataset
    other = tmp_path / "slideB.tif"
    sample_data.write_pyramidal_tiff(other, predicted["image"][:400, :400], 0.5, tile_size=256)
    folder = tmp_path / "notes"
    folder.mkdir()
    for stem in ("slideA", "slideB"):
        (folder / f"{stem}.geojson").write_text(json.dumps(
            {"type": "FeatureCollection", "features": [area_feature(rect(0, 0, 64, 64))]}))
    argv = ["import_annotations", "--format", "qupath_geojson", "--slide", str(slide), str(other),
            "--annotations", str(folder), "--output_dir", str(out)]
    _expect_error(run_error, argv, out, "differs from")
    # ... and with the same pixel size (--mpp overrides both) they import together, paired by stem
    assert main.main(["-q", *argv, "--mpp", "0.25"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["slideA_x0_y0_64x64.png", "slideB_x0_y0_64x64.png"]


def test_other_frame_warns(predicted, tmp_path, caplog):
    """Nuclei in another frame than the areas (here: scaled by 4, as from a 4x downsampled image): the areas
    hold none of them, some lie outside the slide: warned, as the tile importer does."""
    collection = json.loads(predicted["geojson"].read_text())
    for f in collection["features"]:
        f["geometry"]["coordinates"] = [[[4 * x, 4 * y] for x, y in ring] for ring in f["geometry"]["coordinates"]]
    collection["features"].append(area_feature(rect(0, 0, 100, 100)))
    path = tmp_path / "slideA.geojson"
    path.write_text(json.dumps(collection))
    with caplog.at_level(logging.WARNING):
        assert _import(predicted["slide"], path, tmp_path / "out") == 0
    assert "outside" in caplog.text and "another frame" in caplog.text


def test_roundtrip_at_another_pixel_size(tmp_path):
    """A slide at 0.3 µm/px segmented at the model's 0.25 (scale 1.2: many level-0 pixel centres fall exactly
    on the edges of the polygons `predict` writes) gives back its label image exactly."""
    image, _ = synthetic_slide(520, 520, seed=11)
    path = tmp_path / "slideC.tif"
    sample_data.write_pyramidal_tiff(path, image, 0.3, tile_size=256)
    geojson = _predict_slide(path, tmp_path / "pred")
    truth = tifffile.imread(tmp_path / "pred" / "slideC_labels.tif")
    collection = json.loads(geojson.read_text())
    collection["features"].append(area_feature(rect(40, 30, 470, 500)))
    geojson.write_text(json.dumps(collection))
    assert _import(path, geojson, tmp_path / "data") == 0
    labels = tifffile.imread(tmp_path / "data" / "labels" / "slideC_x40_y30_430x470.tif")
    m = metrics.instance_metrics(truth[30:500, 40:470], labels)
    assert m["pq"] == 1.0 and m["num_true"] > 50, m
    assert utils.read_json(tmp_path / "data" / "dataset.json") == {"mpp": 0.3}
