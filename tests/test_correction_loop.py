"""The correction loop end to end (issue 18, point 6; docs/correction_loop.md): predict a synthetic slide,
edit its GeoJSON as a person would in QuPath (delete some nuclei, draw missed ones, mark two areas), import,
fine-tune one epoch with --init_model, predict again, score before/after; every file on the way is checked.
Tiny: a 512 x 512 slide at 1 µm/px, input size 64, a first model of 2 epochs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage
from skimage.measure import points_in_poly

import dataset
import export
import main
import metrics
import nuclei_model as nm
import sample_data
import slides
import utils

RECT = (140, 140, 262, 250)  # x0, y0, x1, y1 at pixel edges
POLY = [[270.2, 150.3], [380.1, 160.4], [370.3, 300.2], [280.4, 260.1]]  # no pixel centre on an edge
TRAIN = ["--pretrained", "none", "--batch_size", "4", "--lora_rank", "2", "--no_augment", "--device", "cpu",
         "--num_workers", "0"]


def _run(*argv: str) -> None:
    assert main.main(["-q", *argv]) == 0, argv


def _feature(ring, object_type, class_name):
    ring = [list(map(float, p)) for p in ring]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + [ring[0]]]},
            "properties": {"objectType": object_type, "classification": {"name": class_name}}}


def _missed_nuclei(image: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """What a person would draw: dark blobs (nuclei of the synthetic H&E) away from every predicted nucleus."""
    dark = ndimage.binary_opening(image.mean(axis=2) < 140, iterations=1)
    dark &= ~ndimage.binary_dilation(predicted > 0, iterations=2)
    labels, _ = ndimage.label(dark)
    sizes = np.bincount(labels.ravel())
    labels[sizes[labels] < 15] = 0
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):  # filled, as QuPath's outline is
        if sl is not None:
            labels[sl][ndimage.binary_fill_holes(labels[sl] == k)] = k
    return labels


@pytest.fixture(scope="module")
def loop(synthetic_data_dir, tmp_path_factory, one_torch_thread):
    tmp = tmp_path_factory.mktemp("loop")
    slide = sample_data.make_sample_slide(tmp / "slide.svs", tiles=4, seed=3, image_size=128)
    # 1. a first model, and its predictions on the slide
    _run("train", "--data_dir", str(synthetic_data_dir), "--output_dir", str(tmp / "model1"), *TRAIN,
         "--input_size", "64", "--epochs", "2", "--learning_rate", "1e-3", "--warmup_epochs", "0",
         "--fold", "0", "--num_folds", "3")
    _run("predict", "--model_path", str(tmp / "model1" / "best_model.pth"), "--input", str(slide), "--output_dir",
         str(tmp / "before"), "--label_image", "--device", "cpu")
    with slides.open_slide(slide) as reader:
        image = reader.read_region(0, 0, *reader.dimensions)
    predicted = tifffile.imread(tmp / "before" / "slide_labels.tif")
    # 2. the person's edits: delete every other predicted nucleus, draw the missed ones, mark two areas
    collection = json.loads((tmp / "before" / "slide.geojson").read_text())
    kept = collection["features"][::2]
    deleted = [int(f["properties"]["id"]) for f in collection["features"][1::2]]
    missed = _missed_nuclei(image, predicted)
    drawn = export.labels_to_geojson(missed)["features"]
    for f in drawn:  # drawn with the brush in QuPath: annotations of the class Nucleus
        f["properties"] = {"objectType": "annotation", "classification": {"name": "Nucleus"}}
    areas = [_feature([[RECT[0], RECT[1]], [RECT[2], RECT[1]], [RECT[2], RECT[3]], [RECT[0], RECT[3]]],
                      "annotation", "Region"), _feature(POLY, "annotation", "Region")]
    edited = dict(collection, features=areas + kept + drawn)
    (tmp / "corrected").mkdir()
    (tmp / "corrected" / "slide.geojson").write_text(json.dumps(edited))
    # 3. import, fine-tune one epoch, predict again, score before/after on the corrected areas
    _run("import_annotations", "--format", "qupath_geojson", "--slide", str(slide), "--annotations",
         str(tmp / "corrected" / "slide.geojson"), "--output_dir", str(tmp / "corrected_data"))
    _run("train", "--data_dir", str(tmp / "corrected_data"), "--output_dir", str(tmp / "model2"), *TRAIN,
         "--init_model", str(tmp / "model1" / "best_model.pth"), "--all_data", "--val_fraction", "0", "--epochs", "1")
    _run("predict", "--model_path", str(tmp / "model2" / "best_model.pth"), "--input", str(slide), "--output_dir",
         str(tmp / "after"), "--label_image", "--device", "cpu")
    for name in ("model1", "model2"):
        _run("evaluate", "--data_dir", str(tmp / "corrected_data"), "--model_path",
             str(tmp / name / "best_model.pth"), "--output_dir", str(tmp / f"scores_{name}"), "--device", "cpu")
    return {"tmp": tmp, "slide": slide, "image": image, "predicted": predicted, "deleted": deleted,
            "missed": missed, "collection": collection}


def _expected_labels(loop, box) -> np.ndarray:
    """The label map the import must give for a box: predicted nuclei not deleted + the drawn ones."""
    x, y, w, h = box
    pred = loop["predicted"][y:y + h, x:x + w].astype(np.int64)
    pred[np.isin(pred, loop["deleted"])] = 0
    missed = loop["missed"][y:y + h, x:x + w].astype(np.int64)
    return np.where(missed > 0, missed + 10 ** 6, pred)


def test_every_file_of_the_loop(loop):
    tmp, image = loop["tmp"], loop["image"]
    assert len(loop["collection"]["features"]) >= 2 and loop["deleted"]  # there was something to delete
    data = tmp / "corrected_data"
    # the areas: the rectangle is its own box; the polygon's box is its extent's pixels
    rows = utils.read_csv(data / "import_report.csv")
    boxes = [(140, 140, 122, 110), (270, 150, 110, 150)]
    assert [r["image"] for r in rows] == [f"slide_x{x}_y{y}_{w}x{h}.png" for x, y, w, h in boxes]
    assert [r["area_class"] for r in rows] == ["Region", "Region"]
    assert utils.read_json(data / "dataset.json") == {"mpp": 1.0}  # the slide's pixel size
    assert [r["group"] for r in utils.read_csv(data / "groups.csv")] == ["slide", "slide"]
    for row, box in zip(rows, boxes):
        x, y, w, h = box
        stem = Path(row["image"]).stem
        assert np.array_equal(np.asarray(Image.open(data / "images" / row["image"])), image[y:y + h, x:x + w])
        labels = tifffile.imread(data / "labels" / f"{stem}.tif")
        expected = _expected_labels(loop, box)
        m = metrics.instance_metrics(expected, labels)
        assert m["pq"] >= 0.999 and m["num_pred"] == int(row["nuclei"]) > 3, m
    # the ignore masks: none for the rectangle; the polygon's box minus the pixels whose centre is inside it
    assert not (data / "ignore" / f"{Path(rows[0]['image']).stem}.png").exists()
    ignore = np.asarray(Image.open(data / "ignore" / f"{Path(rows[1]['image']).stem}.png")) > 0
    x, y, w, h = boxes[1]
    yy, xx = np.mgrid[y:y + h, x:x + w]
    inside = points_in_poly(np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1), np.array(POLY)).reshape(h, w)
    assert np.array_equal(ignore, ~inside) and ignore.any() and not ignore.all()
    assert int(rows[1]["ignored_pixels"]) == int(ignore.sum())
    samples = dataset.discover_folders(data)
    assert [s.vague_path is not None for s in samples] == [False, True]
    # the fine-tuned model: kept settings, lineage, no held-out score
    first = nm.read_checkpoint(tmp / "model1" / "best_model.pth")
    config = utils.read_json(tmp / "model2" / "config.json")
    for key in ("input_size", "head", "lora_rank", "lora_targets", "mpp", "tile_size"):
        assert config[key] == first["config"][key], key
    assert config["mpp"] == 1.0 and config["data_mpp"] == 1.0
    lineage = nm.read_checkpoint(tmp / "model2" / "best_model.pth")["config"]["init_from"]
    assert lineage["sha1"] == nm.file_fingerprint(tmp / "model1" / "best_model.pth")["sha1"]
    summary = utils.read_json(tmp / "model2" / "summary.json")
    assert summary["held_out_score"] is None and "no held-out score" in summary["note"]
    assert utils.read_json(tmp / "model2" / "folds.json")["folds"][0]["train"] == [0, 1]
    # the second prediction: every output, consistent with each other
    for name in ("before", "after"):
        labels = tifffile.imread(tmp / name / "slide_labels.tif")
        assert labels.shape == (512, 512)
        features = json.loads((tmp / name / "slide.geojson").read_text())["features"]
        csv_rows = utils.read_csv(tmp / name / "slide_nuclei.csv")
        ids = sorted(np.unique(labels[labels > 0]).tolist())
        assert sorted(int(f["properties"]["id"]) for f in features) == [int(r["id"]) for r in csv_rows] == ids
        assert (tmp / name / "slide_overview.png").is_file()
    # before/after scores on the corrected areas (here also the training images: docs/correction_loop.md
    # says to import held-out areas for an honest comparison)
    for name in ("model1", "model2"):
        per_image = utils.read_csv(tmp / f"scores_{name}" / "per_image.csv")
        assert sorted(Path(r["image"]).name for r in per_image) == sorted(r["image"] for r in rows)
        assert all(0.0 <= float(r["pq"]) <= 1.0 for r in per_image)
        assert "PQ" in (tmp / f"scores_{name}" / "summary.md").read_text()


import export as _export  # noqa: E402


def test_loop_confidence_columns(loop):
    """Every predicted nucleus has a confidence in [0, 1] in the CSV and in the GeoJSON measurements."""
    column = _export.CONFIDENCE_COLUMN
    for name in ("before", "after"):
        rows = utils.read_csv(loop["tmp"] / name / "slide_nuclei.csv")
        assert rows and all(0.0 <= float(r[column]) <= 1.0 for r in rows)
        features = json.loads((loop["tmp"] / name / "slide.geojson").read_text())["features"]
        for f in features:
            values = {m["name"]: m["value"] for m in f["properties"].get("measurements", [])}
            assert 0.0 <= float(values[column]) <= 1.0
