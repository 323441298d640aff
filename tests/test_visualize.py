"""Tests of visualize.py: contours, fills, error classification on hand-made cases, files and plots."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import visualize


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _grey(shape=(64, 64)):
    return np.full(shape + (3,), 100, dtype=np.uint8)


def test_draw_contours_marks_only_boundaries():
    labels = np.zeros((20, 20), np.int32)
    labels[5:15, 5:15] = 7
    image = _grey((20, 20))
    out = visualize.draw_contours(image, labels, color=(0, 255, 0))
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert (image == 100).all()                               # input untouched
    green = (out == [0, 255, 0]).all(axis=2)
    assert green[5, 5:15].all() and green[14, 5:15].all() and green[5:15, 5].all()
    assert not green[8:12, 8:12].any()                        # interior untouched
    assert not green[:5].any()                                # background untouched
    thick = visualize.draw_contours(image, labels, thickness=3)
    assert (thick == [0, 255, 0]).all(axis=2).sum() > green.sum()


def test_draw_contours_separates_touching_instances():
    labels = np.zeros((10, 20), np.int32)
    labels[2:8, 2:10] = 1
    labels[2:8, 10:18] = 2
    out = visualize.draw_contours(_grey((10, 20)), labels, color=(255, 0, 0))
    red = (out == [255, 0, 0]).all(axis=2)
    assert red[4, 9] and red[4, 10]                           # both sides of the shared edge


def test_overlay_instances_colours_depend_on_id_only():
    labels = np.zeros((30, 30), np.int32)
    labels[2:12, 2:12] = 5
    labels[15:25, 15:25] = 9
    a = visualize.overlay_instances(_grey((30, 30)), labels, alpha=0.5)
    assert a.dtype == np.uint8
    assert (a[0, 0] == 100).all()                             # background unchanged
    assert not (a[6, 6] == a[20, 20]).all()                   # different ids, different colours
    relabelled = np.where(labels == 9, 0, labels)
    b = visualize.overlay_instances(_grey((30, 30)), relabelled, alpha=0.5)
    assert (a[6, 6] == b[6, 6]).all()                         # same id, same colour
    assert visualize.instance_colors(np.array([1, 2, 3])).shape == (3, 3)


def test_classify_errors_hand_made_cases():
    shape = (100, 100)
    true = np.zeros(shape, np.int32)
    pred = np.zeros(shape, np.int32)
    # 1: correctly found
    true[_disk(shape, 15, 15, 8)] = 1
    pred[_disk(shape, 15, 16, 8)] = 11
    # 2: missed (no prediction)
    true[_disk(shape, 15, 60, 8)] = 2
    # false positive prediction on background
    pred[_disk(shape, 85, 85, 6)] = 12
    # 3: split into two halves
    d = _disk(shape, 50, 20, 10)
    left = d.copy(); left[:, 19:] = False                    # halves with a gap: neither has IoU > 0.5
    right = d.copy(); right[:, :22] = False
    true[d] = 3
    pred[left] = 13
    pred[right] = 14
    # 4 and 5: merged by one prediction covering both
    true[_disk(shape, 50, 60, 6)] = 4
    true[_disk(shape, 50, 74, 6)] = 5
    merged = np.zeros(shape, bool)
    merged[43:58, 53:82] = True
    pred[merged & (true != 3)] = 15
    errors = visualize.classify_errors(true, pred)
    assert errors["matched_true"] == [1] and errors["matched_pred"] == [11]
    assert errors["missed"] == [2]
    assert errors["false_positive"] == [12]
    assert errors["split"] == [3]
    assert errors["merged"] == [15]

    image = _grey(shape)
    out, counts = visualize.error_overlay(image, true, pred)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert counts == {"matched": 1, "missed": 1, "false_positive": 1, "split": 1, "merged": 1,
                      "num_true": 5, "num_pred": 5}
    # inside the missed nucleus the red fill dominates, inside the false positive the blue one
    assert out[15, 60, 0] > out[15, 60, 2]
    assert out[85, 85, 2] > out[85, 85, 0]
    # correctly found nucleus interior is not filled
    assert (out[15, 15] == 100).all()
    with_legend, _ = visualize.error_overlay(image, true, pred, legend=True)
    assert with_legend.shape[0] > shape[0] and with_legend.shape[1] >= shape[1]
    assert (with_legend[:shape[0], :shape[1]] == out).all()


def test_classify_errors_empty_and_ids_kept():
    true = np.zeros((10, 10), np.int32)
    pred = np.zeros((10, 10), np.int32)
    assert all(v == [] for v in visualize.classify_errors(true, pred).values())
    true[2:5, 2:5] = 1000
    errors = visualize.classify_errors(true, pred)
    assert errors["missed"] == [1000] and errors["false_positive"] == []
    errors = visualize.classify_errors(pred, true)
    assert errors["false_positive"] == [1000] and errors["missed"] == []
    with pytest.raises(ValueError):
        visualize.classify_errors(true, np.zeros((5, 5), np.int32))


def test_save_png_and_figure_panels(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    path = visualize.save_png(tmp_path / "sub" / "x.png", image)
    assert np.array_equal(np.asarray(Image.open(path)), image)
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.endswith(".tmp")]
    labels = np.zeros((40, 50), np.int32)
    labels[10:20, 10:20] = 1
    fig = visualize.figure_panels([("image", image), ("labels", visualize.overlay_instances(image, labels)),
                                   ("mask", labels > 0)], tmp_path / "fig.png", suptitle="a title")
    with Image.open(fig) as im:
        assert im.size[0] > im.size[1] > 0


def test_plots(tmp_path):
    rng = np.random.default_rng(1)
    rows = [{"tissue": t, "pq": rng.random(), "aji": rng.random(), "dice": rng.random(), "sq": rng.random(),
             "rq": rng.random()} for t in ("liver", "kidney", "brain") for _ in range(4)]
    for path in (visualize.plot_tissue_bars(rows, tmp_path / "bars.png"),
                 visualize.plot_distributions(rows, tmp_path / "dist.png"),
                 visualize.plot_learning_curves(
                     {"fold 0": [{"epoch": "1", "train_loss": "1.0", "val_loss": "1.2", "val_pq": "0.2"},
                                 {"epoch": "2", "train_loss": "0.8", "val_loss": "1.0", "val_pq": "0.3"}],
                      "fold 1": [{"epoch": "1", "train_loss": "1.1", "val_loss": "1.3", "val_pq": ""}]},
                     tmp_path / "curves.png")):
        with Image.open(path) as im:
            assert im.size[0] > 100 and im.size[1] > 100


# ----------------------------------------------------------------------------------------------
# Whole-slide overview
# ----------------------------------------------------------------------------------------------
def test_nuclei_density_hand_computed():
    # slide 1000 x 600 px at 0.5 um/px = 500 x 300 um; bins of 250 um = 500 px: 2 x 2 bins, bottom row 100 px high
    centroids = np.array([[10, 10], [499, 499], [500, 10], [999, 599], [700, 550], [650, 520]])
    density, side = visualize.nuclei_density(centroids, (1000, 600), 0.5, bin_um=250)
    assert side == 500 and density.shape == (2, 2)
    full, edge = 0.25 * 0.25, 0.25 * 0.05  # mm^2
    np.testing.assert_allclose(density, [[2 / full, 1 / full], [0, 3 / edge]])


def test_tissue_density_hand_computed():
    """Nuclei per mm^2 of tissue: a bin half covered by tissue with 2 nuclei has twice the density of a full
    bin with 2; a bin with under a quarter tissue (a thin rim) is not shown."""
    import tissue

    # level 0: 1000 x 500 px at 0.5 um/px, bins of 250 um = 500 px: 1 row x 2 bins; mask at downsample 10
    mask = np.zeros((50, 100), bool)
    mask[:, :50] = True          # left bin full of tissue
    mask[:25, 50:100] = True     # right bin: top half
    centroids = np.array([[100, 100], [200, 300], [600, 100], [700, 200]])
    got, side = visualize.tissue_density(centroids, tissue.TissueMask(mask, 10.0, "auto", (1000, 500)),
                                         (1000, 500), 0.5, 250)
    bin_mm2 = 0.25 * 0.25
    assert side == 500 and not got.mask.any()
    np.testing.assert_allclose(got.data, [[2 / bin_mm2, 2 / (bin_mm2 / 2)]])
    mask[:, 50:] = False
    mask[:10, 50:100] = True     # 500 of 2500 mask pixels: a fifth, under a quarter
    got, _ = visualize.tissue_density(centroids, tissue.TissueMask(mask, 10.0, "auto", (1000, 500)),
                                      (1000, 500), 0.5, 250)
    assert got.mask.tolist() == [[False, True]]
    assert visualize.overview_bin_um(20000, 15000) == 250 and visualize.overview_bin_um(1000, 1000) == 50


def test_tissue_per_bin_counts_each_pixel_by_its_centre():
    """The tissue area per bin (one bincount) against a loop over the mask's pixels, with bins that do not fall on
    mask pixel borders (downsample 7.5, bins of 83 level-0 px) and a last, partial bin."""
    import tissue

    rng = np.random.default_rng(3)
    mask = rng.random((37, 53)) < 0.6
    dims, mpp0, bin_um = (53 * 7.5, 37 * 7.5), 0.5, 41.5   # bins of 83 px: 5 x 5, the last ones partial
    centres = np.array([[(c + 0.5) * 83, (r + 0.5) * 83] for r in range(4) for c in range(5)])
    centres = np.minimum(centres, np.array(dims) - 1)   # one nucleus in each bin
    got, side = visualize.tissue_density(centres, tissue.TissueMask(mask, 7.5, "auto", dims), dims, mpp0, bin_um)
    rows, cols = got.shape
    area = np.zeros((rows, cols))
    for r, c in zip(*np.nonzero(mask)):
        area[min(int((r + 0.5) * 7.5 // side), rows - 1), min(int((c + 0.5) * 7.5 // side), cols - 1)] += 7.5 ** 2
    bin_w = np.minimum((np.arange(cols) + 1) * side, dims[0]) - np.arange(cols) * side
    bin_h = np.minimum((np.arange(rows) + 1) * side, dims[1]) - np.arange(rows) * side
    assert side == 83 and got.shape == (4, 5)
    fraction = np.clip(area / np.outer(bin_h, bin_w), 0, 1)
    assert (~got.mask).tolist() == (fraction >= 0.25).tolist() and (~got.mask).sum() > 10
    per_mm2 = 1 / (np.outer(bin_h, bin_w) * (mpp0 / 1000) ** 2)   # one nucleus per bin
    np.testing.assert_allclose(got.data[~got.mask], (per_mm2 / fraction)[~got.mask], rtol=1e-12)


def test_tissue_outline_is_matplotlibs_contour():
    """`tissue_outline` (contourpy in pixel indices, scaled) gives the lines of matplotlib's `contour` at 0.5 over
    the pixels' centres: two pieces and a hole."""
    mask = _disk((60, 80), 30, 25, 18) | _disk((60, 80), 20, 65, 9)
    mask &= ~_disk((60, 80), 30, 25, 5)
    pixel = 0.0125
    fig = visualize.new_figure(4, 3)
    ax = fig.add_subplot(1, 1, 1)
    ys, xs = (np.arange(60) + 0.5) * pixel, (np.arange(80) + 0.5) * pixel
    contour = ax.contour(xs, ys, mask.astype(np.float32), levels=[0.5])
    theirs = sorted(contour.get_paths()[0].to_polygons(closed_only=False), key=len)
    ours = sorted(visualize.tissue_outline(mask, pixel), key=len)
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_slide_overview_draws_density_and_outline(tmp_path):
    import tissue

    thumb = np.full((60, 100, 3), 245, dtype=np.uint8)
    thumb[10:50, 20:70] = (210, 140, 190)
    mask = tissue.TissueMask(np.zeros((60, 100), bool), 20.0, "auto", (2000, 1200))
    mask.mask[10:50, 20:70] = True
    rng = np.random.default_rng(0)
    centroids = np.column_stack([rng.uniform(400, 1400, 500), rng.uniform(200, 1000, 500)])
    image = visualize.slide_overview(thumb, 20.0, mask, centroids, mpp0=0.5, bin_um=100)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[1] > 500
    empty = visualize.slide_overview(thumb, 20.0, mask, np.zeros((0, 2)), mpp0=0.5, bin_um=100)
    assert not np.array_equal(image[:, :image.shape[1] // 2], empty[:, :empty.shape[1] // 2])
    green = (image[..., 1] > 150) & (image[..., 0] < 60) & (image[..., 2] < 60)
    assert green.sum() > 100  # the tissue outline
    path = visualize.save_slide_overview(tmp_path / "overview.png", thumb, 20.0, mask, centroids, 0.5)
    from PIL import Image

    assert Image.open(path).size[0] > 500
    visualize.save_slide_overview(tmp_path / "again.png", thumb, 20.0, mask, centroids, 0.5)
    assert (tmp_path / "again.png").read_bytes() == path.read_bytes()  # deterministic


def test_an_overview_of_a_large_thumbnail_is_drawn_from_its_box_average_alike(monkeypatch):
    """A thumbnail over twice the figure's width is box-averaged before matplotlib draws it: the picture is the
    one drawn from the whole thumbnail, to within a grey level on average (stripes and a disc of tissue: anything
    drawn out of place would differ by far more at their edges), and the same size."""
    import tissue

    h, w = 1500, 1900                          # 1900 // 900 px of figure: reduced by 2
    yy, xx = np.mgrid[0:h, 0:w]
    thumb = np.full((h, w, 3), 240, np.uint8)
    thumb[(xx // 50) % 2 == 0] = (200, 120, 170)
    disc = (yy - 700) ** 2 + (xx - 900) ** 2 < 500 ** 2
    thumb[disc] = (90, 40, 120)
    mask = tissue.TissueMask(disc[::4, ::4].copy(), 8.0, "auto", (w * 2, h * 2))
    rng = np.random.default_rng(1)
    centroids = np.column_stack([rng.uniform(800, 2800, 3000), rng.uniform(600, 2400, 3000)])
    reduced = visualize.slide_overview(thumb, 2.0, mask, centroids, mpp0=0.25)
    monkeypatch.setattr(visualize, "REDUCE_FROM", 10 ** 6)
    whole = visualize.slide_overview(thumb, 2.0, mask, centroids, mpp0=0.25)
    assert reduced.shape == whole.shape
    diff = np.abs(reduced.astype(np.int16) - whole.astype(np.int16))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) < 40


def test_error_panel_is_outlines_not_fills_on_a_crowded_tile():
    """Issue 12, point 7: hundreds of nuclei in 256 px: errors are outlined in their colour (enlarged 2x), the
    inside of every nucleus keeps the tissue's colours, unlike error_overlay's fills."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    true = np.zeros((256, 256), np.int32)
    k = 0
    for y in range(4, 252, 12):
        for x in range(4, 252, 12):
            k += 1
            true[y:y + 9, x:x + 9] = k          # 441 nuclei, 3 px apart
    pred = np.where(rng.random(k + 1)[true] < 0.7, true, 0)   # ~30 % missed
    image = rng.integers(100, 200, (256, 256, 3), dtype=np.uint8)
    picture, counts = visualize.error_contours(image, true, pred, zoom_factor=2)
    assert picture.shape == (512, 512, 3) and counts["missed"] == k - len(np.unique(pred[pred > 0]))
    missed = int(true[(true > 0) & (pred == 0)][0])
    inside = ndimage.binary_erosion(visualize.zoom(true == missed, 2), iterations=3)
    big = visualize.zoom(image, 2)
    assert inside.any() and np.array_equal(picture[inside], big[inside])           # not filled
    outline = visualize.boundaries(visualize.zoom(np.where(true == missed, 1, 0), 2))
    assert (picture[outline] == visualize.ERROR_COLORS["missed"]).all()              # outlined in red
    filled, _ = visualize.error_overlay(image, true, pred)
    assert not np.array_equal(filled[inside[::2, ::2]], image[inside[::2, ::2]])     # the old panel tinted it


def test_low_confidence_fraction_per_bin():
    import visualize

    # 0.5 µm/px, bins of 100 µm = 200 px: bin (0, 0) has 5 nuclei, one below 0.5; bin (0, 1) has 5, all below;
    # bin (1, 0) has 2 (too few: masked)
    centroids = np.array([[10, 10], [20, 30], [50, 50], [60, 60], [100, 150], [250, 10], [260, 20], [270, 30], [280, 40],
                          [290, 50], [10, 250], [20, 260]], float)
    confidence = np.array([0.9, 0.8, 0.7, 0.95, 0.4, 0.1, 0.2, 0.3, 0.49, 0.0, 0.1, 0.9])
    fraction, side = visualize.low_confidence_fraction(centroids, confidence, (400, 400), 0.5, 100.0)
    assert side == 200 and fraction.shape == (2, 2)
    assert fraction[0, 0] == 0.2 and fraction[0, 1] == 1.0
    assert fraction.mask[1, 0] and fraction.mask[1, 1]


# Typical H&E stain colours (RGB): eosin pink and haematoxylin purple.
EOSIN, HAEMATOXYLIN = (230, 150, 190), (90, 60, 140)


def _lab(rgb):
    from skimage.color import rgb2lab

    return rgb2lab(np.asarray(rgb, dtype=np.float64).reshape(1, 1, 3) / 255.0)[0, 0]


def _hue(rgb):
    from skimage.color import rgb2hsv

    return float(rgb2hsv(np.asarray(rgb, dtype=np.float64).reshape(1, 1, 3) / 255.0)[0, 0, 0]) * 360.0


def test_overlay_colours_stand_out_on_he():
    """Issue 19: every overlay colour lies outside the purple-pink-magenta hues of H&E (haematoxylin purple,
    hue ~262 deg, to eosin pink, ~330 deg; the old merged magenta was at 300 deg), at CIE76 Delta E >= 50 from
    both stains, and the colours are >= 30 apart from each other."""
    from skimage.color import deltaE_cie76

    colours = {"true": visualize.TRUE_CONTOUR_COLOR, "pred": visualize.PRED_CONTOUR_COLOR,
               **visualize.ERROR_COLORS}
    assert _hue(EOSIN) == pytest.approx(330, abs=1) and _hue(HAEMATOXYLIN) == pytest.approx(262.5, abs=1)
    for name, rgb in colours.items():
        assert not 250 <= _hue(rgb) <= 345, (name, _hue(rgb))
        for stain in (EOSIN, HAEMATOXYLIN):
            assert deltaE_cie76(_lab(rgb), _lab(stain)) >= 50, (name, stain)
    names = list(colours)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert deltaE_cie76(_lab(colours[a]), _lab(colours[b])) >= 30, (a, b)
    # and the fills, blended over a haematoxylin-stained nucleus, stay apart and off the nucleus
    alpha = 0.6
    blended = {k: (1 - alpha) * np.array(HAEMATOXYLIN) + alpha * np.array(v) for k, v in visualize.ERROR_COLORS.items()}
    for i, a in enumerate(list(blended)):
        assert deltaE_cie76(_lab(blended[a]), _lab(HAEMATOXYLIN)) >= 30, a
        for b in list(blended)[i + 1:]:
            assert deltaE_cie76(_lab(blended[a]), _lab(blended[b])) >= 20, (a, b)


def test_error_overlay_enlarges_small_images_before_drawing_outlines():
    assert [visualize.overlay_zoom(s) for s in ((256, 256), (512, 512), (40, 40), (1000, 1000), (100, 3000))] == \
        [4, 2, 4, 1, 1]
    shape = (32, 32)
    true = np.zeros(shape, np.int32)
    pred = np.zeros(shape, np.int32)
    true[4:12, 4:12] = 1                        # missed
    true[20:28, 4:12] = 2                       # matched exactly
    pred[20:28, 4:12] = 7
    image = _grey(shape)
    small, counts1 = visualize.error_overlay(image, true, pred)
    big, counts4 = visualize.error_overlay(image, true, pred, zoom_factor=4)
    assert counts1 == counts4 and big.shape == (128, 128, 3)
    fill = np.rint(0.4 * 100 + 0.6 * np.array(visualize.ERROR_COLORS["missed"])).astype(np.uint8)
    assert (small[6, 6] == fill).all() and (big[16:48, 16:48][4:-4, 4:-4] == fill).all()
    # outlines are 2 enlarged pixels = half a source pixel wide (1 source pixel at zoom 1)
    true_line = (big == visualize.TRUE_CONTOUR_COLOR).all(axis=2)
    assert true_line[16:48, 16:18].all() and not true_line[20:44, 18:20].any() and not true_line[:16].any()
    pred_line = (big == visualize.PRED_CONTOUR_COLOR).all(axis=2)
    assert pred_line[80:112, 16:18].all() and not pred_line[84:108, 18:20].any()
    assert (big[88:104, 24:40] == 100).all()   # the matched nucleus is not filled
    assert (small[20:28, 4] == visualize.PRED_CONTOUR_COLOR).all()
