"""Tests of tissue.py: automatic tissue detection, mask files (image, QuPath GeoJSON), mask queries."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage.draw import disk

import tissue
from utils import UserError


def _thumbnail() -> tuple[np.ndarray, np.ndarray]:
    """(RGB thumbnail 200 x 300: white glass, a pink tissue blob with a small hole and a dust speck,
    the true tissue mask). At downsample 32 and 0.25 um/px one pixel is 8 x 8 um = 64 um^2."""
    rng = np.random.default_rng(0)
    image = np.full((200, 300, 3), 240, dtype=np.float32) + rng.normal(0, 3, (200, 300, 3))
    truth = np.zeros((200, 300), dtype=bool)
    truth[disk((100, 140), 70, shape=truth.shape)] = True
    pink = np.array([215, 140, 190], dtype=np.float32) + rng.normal(0, 6, (200, 300, 3))
    image[truth] = pink[truth]
    hole = np.zeros_like(truth)
    hole[disk((90, 150), 3, shape=truth.shape)] = True  # ~30 px = 1900 um^2 < MAX_HOLE_UM2: filled
    image[hole] = 238
    speck = np.zeros_like(truth)
    speck[disk((30, 270), 3, shape=truth.shape)] = True  # dust, 1900 um^2 < MIN_TISSUE_UM2: removed
    image[speck] = (120, 60, 90)
    return np.clip(image, 0, 255).astype(np.uint8), truth


def test_detect_tissue_on_a_synthetic_thumbnail():
    image, truth = _thumbnail()
    mask = tissue.detect_tissue(image, downsample=32.0, mpp=0.25, dimensions=(9600, 6400))
    assert mask.source == "auto" and mask.mask.shape == truth.shape and mask.downsample == 32.0
    assert not mask.mask[20:40, 260:280].any()  # dust removed
    assert mask.mask[90, 150]  # small hole filled
    iou = (mask.mask & truth).sum() / (mask.mask | truth).sum()
    assert iou > 0.97
    # area: pixel count x (32 px x 0.25 um)^2
    assert mask.area_mm2(0.25) == pytest.approx(mask.mask.sum() * 64 / 1e6)
    # queries in level-0 pixels
    assert mask.touches((140 * 32, 100 * 32, 10, 10))
    assert not mask.touches((0, 0, 40 * 32, 40 * 32))
    assert mask.touches((0, 0, 75 * 32, 101 * 32))  # the blob's left edge is at column 70
    assert not mask.touches((140 * 32, 100 * 32, 0, 10))


def test_blank_slide_gives_an_empty_mask():
    rng = np.random.default_rng(1)
    blank = np.clip(240 + rng.normal(0, 3, (120, 160, 3)), 0, 255).astype(np.uint8)
    for image in (blank, np.full((50, 50, 3), 255, np.uint8), np.zeros((50, 50, 3), np.uint8)):
        mask = tissue.detect_tissue(image, 16.0)
        assert not mask.mask.any() and mask.area_mm2(0.25) == 0.0
        assert not mask.touches((0, 0, 10**6, 10**6))


def test_full_mask_covers_the_slide_exactly():
    mask = tissue.full_mask((10_000, 3_000))
    assert mask.source == "none" and mask.mask.all()
    assert mask.touches((9_999, 2_999, 1, 1)) and not mask.touches((10_000, 0, 5, 5))
    assert mask.area_mm2(0.5) == pytest.approx(10_000 * 3_000 * 0.25 / 1e6)


def test_image_mask_of_another_size_is_scaled_to_the_slide(tmp_path):
    small = np.zeros((50, 80), dtype=np.uint8)
    small[10:20, 40:60] = 255
    Image.fromarray(small).save(tmp_path / "mask.png")
    mask = tissue.read_tissue_mask(tmp_path / "mask.png", (8000, 5000))  # 100x the mask
    assert mask.downsample == pytest.approx(100.0) and mask.source == str(tmp_path / "mask.png")
    assert mask.touches((4000, 1000, 1, 1)) and mask.touches((5999, 1999, 1, 1))
    assert not mask.touches((3990, 990, 10, 10)) and not mask.touches((6000, 1000, 100, 100))
    assert mask.area_mm2(0.25) == pytest.approx(200 * 100 * 100 * 0.0625 / 1e6)
    # grey/binary variants: 0/1 PNG, bool TIFF and an RGB PNG whose channels are equal all give the same mask
    import tifffile

    Image.fromarray((small > 0).astype(np.uint8)).save(tmp_path / "ones.png")
    tifffile.imwrite(tmp_path / "mask.tif", small > 0)
    Image.fromarray(np.repeat(small[..., None], 3, axis=2)).save(tmp_path / "grey_rgb.png")
    for name in ("ones.png", "mask.tif", "grey_rgb.png"):
        np.testing.assert_array_equal(tissue.read_tissue_mask(tmp_path / name, (8000, 5000)).mask, small > 0)
    # JPEG noise in the black area does not count as tissue
    Image.fromarray(small).save(tmp_path / "mask.jpg", quality=70)
    jpeg = tissue.read_tissue_mask(tmp_path / "mask.jpg", (8000, 5000)).mask
    assert (jpeg != (small > 0)).sum() <= 4


def test_saved_png_round_trips(tmp_path):
    image, _ = _thumbnail()
    mask = tissue.detect_tissue(image, 32.0, mpp=0.25)
    mask.save_png(tmp_path / "tissue.png")
    again = tissue.read_tissue_mask(tmp_path / "tissue.png", (300 * 32, 200 * 32))
    np.testing.assert_array_equal(again.mask, mask.mask)
    assert again.downsample == pytest.approx(32.0)


def _qupath_feature(rings, kind="Polygon"):
    return {"type": "Feature", "id": "b0e4f1c2", "geometry": {"type": kind, "coordinates": rings},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}}


def test_qupath_geojson_polygons(tmp_path):
    square = [[250, 250], [750, 250], [750, 750], [250, 750], [250, 250]]
    hole = [[375, 375], [625, 375], [625, 625], [375, 625], [375, 375]]
    far = [[[[1500, 125], [1750, 125], [1750, 375], [1500, 125]]]]
    collection = {"type": "FeatureCollection",
                  "features": [_qupath_feature([square, hole]), _qupath_feature(far, "MultiPolygon"),
                               {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10, 10]},
                                "properties": {}}]}
    (tmp_path / "annotations.geojson").write_text(json.dumps(collection))
    mask = tissue.read_tissue_mask(tmp_path / "annotations.geojson", (2000, 1000))
    assert mask.downsample == 1.0 and mask.mask.shape == (1000, 2000)
    assert mask.touches((275, 275, 3, 3)) and mask.touches((1700, 150, 3, 3))
    assert not mask.touches((475, 475, 50, 50))  # inside the hole
    assert not mask.touches((1000, 875, 125, 100)) and not mask.touches((0, 0, 225, 225))
    expected = 500 * 500 - 250 * 250 + 250 * 250 / 2
    assert mask.area_mm2(1.0) * 1e6 == pytest.approx(expected, rel=0.01)
    # a big slide is drawn at a bounded resolution
    big = tissue.read_tissue_mask(tmp_path / "annotations.geojson", (80_000, 40_000))
    assert max(big.mask.shape) == tissue.GEOJSON_MAX_SIZE and big.downsample == pytest.approx(80_000 / 4096)
    # QuPath also writes a bare list of features; a single Feature or geometry works too
    (tmp_path / "list.json").write_text(json.dumps([_qupath_feature([square, hole])]))
    (tmp_path / "geometry.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [square, hole]}))
    for name in ("list.json", "geometry.geojson"):
        other = tissue.read_tissue_mask(tmp_path / name, (2000, 1000))
        np.testing.assert_array_equal(other.mask[:, :1000], mask.mask[:, :1000])


def test_mask_files_of_the_wrong_kind(tmp_path):
    (tmp_path / "notes.txt").write_text("tissue is on the left\n")
    (tmp_path / "points.geojson").write_text(json.dumps(
        {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
                                                    "geometry": {"type": "Point", "coordinates": [1, 2]}}]}))
    (tmp_path / "broken.geojson").write_text('{"type": "FeatureCollection", "features": [')
    (tmp_path / "bad_ring.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [1]]]}))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    Image.fromarray(np.zeros((100, 20), np.uint8)).save(tmp_path / "tall.png")
    cases = {"notes.txt": "not an image or GeoJSON tissue mask", "points.geojson": "no Polygon or MultiPolygon",
             "broken.geojson": "not a valid GeoJSON file", "bad_ring.geojson": "polygon ring",
             "photo.png": "a colour image, not a tissue mask", "tall.png": "aspect ratios differ",
             "missing.png": "file not found"}
    for name, message in cases.items():
        with pytest.raises(UserError, match=message) as info:
            tissue.read_tissue_mask(tmp_path / name, (600, 400))
        assert name in str(info.value) and "\n" not in str(info.value)


def test_real_tissue_is_found_whole(real_sample_dir):
    """A 4 x 4 mosaic of real NuInsSeg tiles (all tissue, pale and dark) on a white margin: the mask
    covers nearly all of the mosaic and none of the margin."""
    import sample_data

    image, _ = sample_data.real_sample_mosaic(real_sample_dir, n=4)
    thumb = np.full((700, 700, 3), 242, dtype=np.uint8)
    thumb[100:612, 100:612] = image[::4, ::4]
    mask = tissue.detect_tissue(thumb, downsample=4.0, mpp=0.25)
    inside = mask.mask[100:612, 100:612]
    assert inside.mean() > 0.97
    assert not mask.mask[:90].any() and not mask.mask[:, :90].any() and not mask.mask[622:].any()


def test_geojson_hole_cuts_only_its_own_polygon(tmp_path):
    """An island annotated inside another annotation's hole stays tissue whichever feature comes first."""
    ring = lambda x0, y0, x1, y1: [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    donut = {"type": "Feature", "geometry": {"type": "Polygon",
                                             "coordinates": [ring(10, 10, 190, 190), ring(60, 60, 140, 140)]}}
    island = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring(80, 80, 120, 120)]}}
    masks = []
    for order in ([donut, island], [island, donut]):
        path = tmp_path / f"m{len(masks)}.geojson"
        path.write_text(json.dumps({"type": "FeatureCollection", "features": order}))
        masks.append(tissue.read_tissue_mask(path, (200, 200)).mask)
    assert np.array_equal(masks[0], masks[1])
    assert masks[1][100, 100] and not masks[1][70, 70] and masks[1][30, 30]


def test_saturation_from_the_uint8_channels_equals_the_float_formula():
    """`_saturation` takes the channels' max and min on the uint8 pixels (8x faster on a thumbnail): the same float32
    values as (max - min) / max of the float pixels, 0 for black; float input still works."""
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    rgb[:5] = 0                      # black
    rgb[5:10] = 255                  # white
    rgb[10:15, :, 0] = 0             # one channel off
    f = rgb.astype(np.float32)
    top, bottom = f.max(axis=2), f.min(axis=2)
    expected = np.where(top > 0, (top - bottom) / np.maximum(top, 1e-6), 0.0).astype(np.float32)
    got = tissue._saturation(rgb)
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    assert np.all(got[:5] == 0) and np.all(got[5:10] == 0)
    assert np.array_equal(tissue._saturation(f), expected)
