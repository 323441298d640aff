"""Tests of postprocess.py: geometric cases with ideal maps, the binary baseline, the config, and the
round trip of real NuInsSeg labels through `dataset.hv_targets` and back."""
from __future__ import annotations

import numpy as np
import pytest

import metrics
import postprocess
import postprocess as pp
from postprocess import PostprocessConfig
from utils import UserError


def disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def ideal_hv(labels: np.ndarray) -> np.ndarray:
    """HV maps of a label map (offset from each instance's centre, each side scaled to [-1, 1])."""
    hv = np.zeros((2,) + labels.shape, dtype=np.float32)
    for k in np.unique(labels[labels > 0]):
        ys, xs = np.nonzero(labels == k)
        for c, d in ((0, xs - xs.mean()), (1, ys - ys.mean())):
            d = d.astype(np.float64)
            out = np.zeros_like(d)
            if (d < 0).any():
                out[d < 0] = d[d < 0] / -d[d < 0].min()
            if (d > 0).any():
                out[d > 0] = d[d > 0] / d[d > 0].max()
            hv[c][ys, xs] = out
    return hv


def two_touching_discs() -> np.ndarray:
    labels = np.zeros((64, 80), dtype=np.int32)
    labels[disc(labels.shape, 32, 25, 12)] = 1
    labels[disc(labels.shape, 32, 47, 12) & (labels == 0)] = 2  # overlaps -> a shared straight border
    return labels


def check_ids(out: np.ndarray) -> None:
    assert out.dtype == np.int32
    ids = np.unique(out[out > 0])
    assert np.array_equal(ids, np.arange(1, ids.size + 1))


def test_two_touching_discs_are_split():
    labels = two_touching_discs()
    fg = (labels > 0).astype(np.float32)
    out = postprocess.hv_to_instances(fg, ideal_hv(labels))
    check_ids(out)
    assert out.max() == 2
    r = metrics.instance_metrics(labels, out)
    assert r["pq"] > 0.95 and r["aji"] > 0.95
    # Soft probabilities: the same result with fg 0.8 inside and 0.1 outside.
    soft = np.where(labels > 0, 0.8, 0.1).astype(np.float32)
    assert np.array_equal(postprocess.hv_to_instances(soft, ideal_hv(labels)), out)


def test_single_disc_stays_one():
    labels = disc((48, 48), 24, 24, 14).astype(np.int32)
    out = postprocess.hv_to_instances(labels.astype(np.float32), ideal_hv(labels))
    check_ids(out)
    assert out.max() == 1
    assert np.array_equal(out > 0, labels > 0)


def test_small_objects_removed():
    labels = np.zeros((40, 40), dtype=np.int32)
    labels[disc(labels.shape, 12, 12, 8)] = 1
    labels[30:32, 30:33] = 2  # 6 pixels < min_area 10
    fg = (labels > 0).astype(np.float32)
    for out in (postprocess.hv_to_instances(fg, ideal_hv(labels), min_area=10),
                postprocess.binary_to_instances(fg, min_area=10)):
        check_ids(out)
        assert out.max() == 1
        assert not out[30:32, 30:33].any()
    # With min_area 1 the speck stays.
    assert postprocess.binary_to_instances(fg, min_area=1).max() == 2


def test_holes_filled():
    ring = disc((50, 50), 25, 25, 15) & ~disc((50, 50), 25, 25, 5)  # hole of ~80 px > min_area
    labels = ring.astype(np.int32)
    fg = ring.astype(np.float32)
    full = disc((50, 50), 25, 25, 15)
    out = postprocess.binary_to_instances(fg, min_area=10)
    check_ids(out)
    assert out.max() == 1 and np.array_equal(out > 0, full)
    out_hv = postprocess.hv_to_instances(fg, ideal_hv(labels), min_area=10)
    assert np.array_equal(out_hv > 0, full)
    kept = postprocess.binary_to_instances(fg, min_area=10, fill_holes=False)
    assert np.array_equal(kept > 0, ring)


def test_hole_between_instances_is_not_filled():
    # Four squares around a background gap: the gap touches four instances, so it is no one's hole.
    labels = np.zeros((40, 40), dtype=np.int32)
    labels[5:20, 5:20] = 1
    labels[5:20, 20:35] = 2
    labels[20:35, 5:20] = 3
    labels[20:35, 20:35] = 4
    labels[17:23, 17:23] = 0
    fg = (labels > 0).astype(np.float32)
    out = postprocess.hv_to_instances(fg, ideal_hv(labels), min_area=10)
    assert out.max() == 4
    assert not out[17:23, 17:23].any()


def test_binary_mode_merges_without_watershed_and_splits_with_it():
    labels = two_touching_discs()
    fg = (labels > 0).astype(np.float32)
    merged = postprocess.binary_to_instances(fg)
    check_ids(merged)
    assert merged.max() == 1
    split = postprocess.binary_to_instances(fg, watershed=True)
    check_ids(split)
    assert split.max() == 2
    assert metrics.instance_metrics(labels, split)["pq"] > 0.9


def test_empty_maps():
    zeros = np.zeros((32, 32), dtype=np.float32)
    hv = np.zeros((2, 32, 32), dtype=np.float32)
    for out in (postprocess.hv_to_instances(zeros, hv), postprocess.binary_to_instances(zeros),
                postprocess.binary_to_instances(zeros, watershed=True),
                postprocess.postprocess(zeros, hv, PostprocessConfig())):
        assert out.dtype == np.int32 and out.shape == (32, 32) and not out.any()


def test_flat_hv_maps_give_connected_components():
    labels = two_touching_discs()
    fg = (labels > 0).astype(np.float32)
    out = postprocess.hv_to_instances(fg, np.zeros((2,) + fg.shape, np.float32))
    assert out.max() == 1


def test_postprocess_dispatch_and_config():
    labels = two_touching_discs()
    fg = (labels > 0).astype(np.float32)
    hv = ideal_hv(labels)
    assert postprocess.postprocess(fg, hv, PostprocessConfig()).max() == 2
    assert postprocess.postprocess(fg, None, PostprocessConfig(mode="binary")).max() == 1
    assert postprocess.postprocess(fg, None, PostprocessConfig(mode="binary", watershed=True)).max() == 2
    with pytest.raises(UserError):
        postprocess.postprocess(fg, None, PostprocessConfig(mode="hv"))
    with pytest.raises(UserError):
        postprocess.hv_to_instances(fg, hv[:1])


def test_config_round_trip_and_validation():
    cfg = PostprocessConfig(mode="binary", fg_threshold=0.4, watershed=True, min_area=20)
    d = cfg.to_dict()
    assert d["mode"] == "binary" and d["fg_threshold"] == 0.4
    assert PostprocessConfig.from_dict(d) == cfg
    import json
    assert PostprocessConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(UserError, match="unknown"):
        PostprocessConfig.from_dict({"mode": "hv", "fg_treshold": 0.5})
    for bad in ({"mode": "foo"}, {"fg_threshold": 1.5}, {"sobel_ksize": 4}, {"min_area": -1},
                {"watershed": "yes"}, {"min_area": 2.5}, {"fg_threshold": "high"}):
        with pytest.raises(UserError):
            PostprocessConfig.from_dict(bad)


def test_roundtrip_real_labels(real_sample_dir, report):
    """Ideal maps of the real ground truth must come back as the ground truth (mean PQ and AJI >= 0.95).

    What is lost is expected: a true id made of several disconnected pieces comes back as several
    instances, and nuclei under `min_area` are removed."""
    import dataset

    samples = dataset.discover_nuinsseg(real_sample_dir)
    assert samples
    config = PostprocessConfig()
    rows = []
    for sample in samples:
        _, labels, _ = dataset.load_sample(sample)
        fg = (labels > 0).astype(np.float32)
        out = postprocess.postprocess(fg, dataset.hv_targets(labels), config)
        check_ids(out)
        rows.append(metrics.instance_metrics(labels, out))
    means = metrics.mean_over_images(rows)
    report(f"round trip on {len(rows)} real label maps: mean PQ {means['pq']:.4f}, mean AJI {means['aji']:.4f}")
    assert means["pq"] >= 0.95, means
    assert means["aji"] >= 0.95, means


# ----------------------------------------------------------------------------------------------
# The faster watershed and opening (issue 17) give the label maps of the former implementation
# ----------------------------------------------------------------------------------------------
def test_opening_by_shifted_passes_equals_binary_opening():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    for _ in range(300):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        mask = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.3, 2)) > rng.uniform(0.4, 0.6)
        for radius in (1, 2, 3):
            assert np.array_equal(pp._binary_opening_disk(mask, radius),
                                  ndi.binary_opening(mask, structure=pp._disk(radius)))


def _reference_watershed_per_box(energy, smooth_sigma, markers, components, n_comp, orphan_base):
    """The former `_watershed_by_component`: one smoothing and one watershed call per component to split, on its
    own box (with a margin of energy for the Gaussian)."""
    from scipy import ndimage as ndi
    from skimage import segmentation

    inside = markers > 0
    comp_of_marker = np.zeros(int(markers.max()) + 1, dtype=np.int64)
    comp_of_marker[markers[inside]] = components[inside]
    marker_ids = np.flatnonzero(np.bincount(markers[inside]))
    per_comp = np.bincount(comp_of_marker[marker_ids], minlength=n_comp + 1)
    single_owner = np.zeros(n_comp + 1, dtype=np.int32)
    single_owner[comp_of_marker[marker_ids]] = marker_ids
    single_owner[per_comp != 1] = 0
    orphan = per_comp == 0
    orphan[0] = False
    single_owner[orphan] = np.flatnonzero(orphan) + int(orphan_base)
    labels = single_owner[components]
    multi_ids = np.flatnonzero(per_comp >= 2)
    boxes = ndi.find_objects(components)
    h, w = energy.shape
    margin = int(np.ceil(4 * smooth_sigma)) + 1
    for k in multi_ids[multi_ids > 0].tolist():
        box = boxes[k - 1]
        oy, ox = max(box[0].start - margin, 0), max(box[1].start - margin, 0)
        surface = energy[oy:min(box[0].stop + margin, h), ox:min(box[1].stop + margin, w)]
        if smooth_sigma > 0:
            surface = ndi.gaussian_filter(surface, smooth_sigma)
        local = (slice(box[0].start - oy, box[0].stop - oy), slice(box[1].start - ox, box[1].stop - ox))
        mask = components[box] == k
        sub = segmentation.watershed(surface[local], markers=np.where(mask, markers[box], 0), mask=mask)
        target = labels[box]
        target[mask] = sub[mask]
    return labels


def _former_normalise(channel, mask):
    lo = float(np.min(channel, where=mask, initial=np.inf))
    hi = float(np.max(channel, where=mask, initial=-np.inf))
    if hi - lo < 1e-6:
        return np.zeros_like(channel)
    out = np.subtract(channel, lo, dtype=channel.dtype)
    out /= hi - lo
    return np.clip(out, 0.0, 1.0, out=out)


def _former_edge_energy(hv, foreground, sobel_ksize):
    """The former `edge_energy`: whole-image `correlate1d` along both axes."""
    from scipy import ndimage as ndi

    deriv, smooth = pp._sobel_kernels(int(sobel_ksize))
    energy = np.zeros(foreground.shape, dtype=np.float32)
    for channel, axis in ((0, 1), (1, 0)):
        ch = _former_normalise(hv[channel].astype(np.float32, copy=False), foreground)
        d = ndi.correlate1d(ch, deriv, axis=axis, mode="nearest")
        d = ndi.correlate1d(d, smooth, axis=1 - axis, mode="nearest")
        np.maximum(energy, -d, out=energy)
    return energy


def _former_hv_to_instances(prob, hv, config=None, counts=None):
    """The former hv post-processing, step by step through the reference versions of every step: foreground
    cleaning by bincount, whole-image edge energy, `ndi.binary_opening`, `_remove_small` of the markers, labelling of
    the cleaned foreground, the per-box watershed, removal + hole filling by a labelling of the background +
    renumbering."""
    from scipy import ndimage as ndi

    c = config or PostprocessConfig()
    fg = _reference_clean_foreground(np.asarray(prob, np.float32) > c.fg_threshold, c.min_area)
    if not fg.any():
        return np.zeros(fg.shape, np.int32)
    energy = _former_edge_energy(hv, fg, c.sobel_ksize)
    cores = fg & (energy < c.marker_threshold)
    if c.marker_opening > 0:
        cores = ndi.binary_opening(cores, structure=pp._disk(c.marker_opening))
    markers, n_markers = ndi.label(cores)
    markers = pp._remove_small(markers, c.min_marker_area)
    components, n_comp = ndi.label(fg)
    if counts is not None:
        has_marker = np.zeros(n_comp + 1, dtype=bool)
        has_marker[components[markers > 0]] = True
        counts["orphans"] = counts.get("orphans", 0) + int((~has_marker[1:]).sum())
    labels = _reference_watershed_per_box(energy, float(c.smooth_sigma), markers, components, n_comp, n_markers)
    labels = pp._remove_small(labels.astype(np.int32), c.min_area)
    if c.fill_holes:
        labels = _reference_fill_instance_holes(labels)
    return pp._relabel_sequential(labels)


def _real_maps(real_sample_dir, shape=(1024, 1536), seed=5):
    """Maps of real nuclei: 512² NuInsSeg label tiles side by side; foreground = the masks blurred (and scaled by a
    smooth random field, as bench_cpu_side's), HV maps of the label map (`dataset.hv_targets`)."""
    import tifffile
    from scipy import ndimage as ndi

    import dataset

    files = sorted(real_sample_dir.glob("*/label masks modify/*.tif"))
    labels = np.zeros(shape, np.int32)
    per_row = shape[1] // 512
    for k, f in enumerate(files[:(shape[0] // 512) * per_row]):
        tile = tifffile.imread(f).astype(np.int32)
        y, x = (k // per_row) * 512, (k % per_row) * 512
        labels[y:y + 512, x:x + 512] = np.where(tile > 0, tile + labels.max(), 0)
    hv = dataset.hv_targets(labels)
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.random(labels.shape).astype(np.float32), 16)
    field = (field - field.min()) / (field.max() - field.min())
    blurred = ndi.gaussian_filter((labels > 0).astype(np.float32), 1.0)
    noisy = np.clip(blurred * (0.6 + 0.4 * field) + rng.normal(0, 0.15, labels.shape).astype(np.float32), 0, 1)
    return blurred, blurred * (0.6 + 0.4 * field), noisy, hv


def test_fast_post_processing_equals_the_former_one_on_real_nuclei(real_sample_dir, monkeypatch):
    """Maps of real nuclei (touching nuclei split by the watershed; with noise: specks, holes, nuclei without a
    marker core): the label maps are identical, pixel for pixel, to the former implementation's (every step through
    its reference version), for the default parameters and others; the components to split go through mosaics (far
    fewer watershed calls than components), the hole filling both through the cleaning's background labelling and,
    where an instance is removed, through its own."""
    from skimage import segmentation

    blurred, fielded, noisy, hv = _real_maps(real_sample_dir)
    counts = {}
    calls = []
    backgrounds = []

    watershed = segmentation.watershed

    def counting_watershed(*args, **kwargs):
        calls.append(1)
        return watershed(*args, **kwargs)

    fill = pp._fill_instance_holes

    def spying_fill(labels, background=None):
        backgrounds.append(background is not None)
        return fill(labels, background)

    monkeypatch.setattr(pp.segmentation, "watershed", counting_watershed)
    monkeypatch.setattr(pp, "_fill_instance_holes", spying_fill)
    cases = [(blurred, None), (fielded, None), (noisy, None),
             (blurred, PostprocessConfig(min_marker_area=150)), (blurred, PostprocessConfig(marker_threshold=0.02)),
             (noisy, PostprocessConfig(marker_opening=3)), (fielded, PostprocessConfig(min_area=40)),
             (noisy, PostprocessConfig(smooth_sigma=2.3)), (blurred, PostprocessConfig(smooth_sigma=0.0)),
             (fielded, PostprocessConfig(marker_threshold=0.3, min_marker_area=1, marker_opening=0, min_area=25)),
             (noisy, PostprocessConfig(min_area=1)), (fielded, PostprocessConfig(fill_holes=False))]
    for fg, config in cases:
        calls.clear()
        fast = pp.postprocess(fg, hv, config)
        n_calls = len(calls)
        slow = _former_hv_to_instances(fg, hv, config, counts)
        assert fast.dtype == np.int32 and fast.max() > 100 and np.array_equal(fast, slow), config
        if config is None:
            assert 0 < n_calls < (len(calls) - n_calls) / 10   # the former: one call per component to split
    assert counts["orphans"] > 5
    assert True in backgrounds and False in backgrounds


def _reference_fill_instance_holes(labels):
    """The former `_fill_instance_holes`: neighbour pairs over the whole image."""
    from scipy import ndimage as ndi

    holes, n = ndi.label(labels == 0)
    if n == 0:
        return labels
    border = np.zeros(n + 1, dtype=bool)
    for edge in (holes[0, :], holes[-1, :], holes[:, 0], holes[:, -1]):
        border[edge] = True
    pairs = []
    for a, b in ((holes[:, :-1], labels[:, 1:]), (holes[:, 1:], labels[:, :-1]),
                 (holes[:-1, :], labels[1:, :]), (holes[1:, :], labels[:-1, :])):
        sel = (a > 0) & (b > 0)
        pairs.append(np.stack([a[sel], b[sel]], axis=1))
    pairs = np.concatenate(pairs).astype(np.int64)
    if pairs.size == 0:
        return labels
    base = int(labels.max()) + 1
    keys = np.unique(pairs[:, 0] * base + pairs[:, 1])
    pairs = np.stack([keys // base, keys % base], axis=1)
    count = np.bincount(pairs[:, 0], minlength=n + 1)
    owner = np.zeros(n + 1, dtype=labels.dtype)
    owner[pairs[:, 0]] = pairs[:, 1]
    fill = (count == 1) & ~border
    fill[0] = False
    return np.where(fill[holes], owner[holes], labels) if fill.any() else labels


def test_hole_filling_on_hole_pixels_only_equals_the_former_one():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(4)
    filled = 0
    for _ in range(200):
        shape = (int(rng.integers(3, 50)), int(rng.integers(3, 50)))
        mask = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.5, 2)) > rng.uniform(0.3, 0.5)
        labels, _ = ndi.label(mask)
        labels = np.where(rng.random(shape) < 0.1, 0, labels).astype(np.int32)   # holes of every kind
        new, old = pp._fill_instance_holes(labels.copy()), _reference_fill_instance_holes(labels.copy())
        assert np.array_equal(new, old)
        filled += int((new != labels).sum())
    assert filled > 100


def _reference_clean_foreground(mask, min_area):
    """The former `_clean_foreground`: areas by `bincount` and gathers over the whole image."""
    from scipy import ndimage as ndi

    if min_area <= 1:
        return mask
    comp, n = ndi.label(mask)
    if n:
        keep = np.bincount(comp.ravel()) >= min_area
        keep[0] = False
        mask = keep[comp]
    holes, n = ndi.label(~mask)
    if n:
        small = np.bincount(holes.ravel()) < min_area
        small[0] = False
        for edge in (holes[0, :], holes[-1, :], holes[:, 0], holes[:, -1]):
            small[edge] = False
        mask = mask | small[holes]
    return mask


def test_specks_and_holes_by_bounding_boxes_equal_the_former_bincount_on_real_nuclei(real_sample_dir):
    """`_clean_foreground` (binary mode; small components found through their bounding boxes) gives the same masks
    as the former whole-image `bincount` version: on thresholded blurred
    real NuInsSeg masks with noise (specks and holes of every size, on and off the border) and on random
    masks of every shape."""
    import tifffile
    from scipy import ndimage as ndi

    rng = np.random.default_rng(7)
    changed = 0
    for f in sorted(real_sample_dir.glob("*/label masks modify/*.tif"))[:4]:
        labels = tifffile.imread(f).astype(np.int32)
        prob = ndi.gaussian_filter((labels > 0).astype(np.float32), 1.0) + rng.normal(0, 0.25, labels.shape)
        mask = prob > 0.5
        for min_area in (0, 1, 2, 4, 10, 30):
            new, old = pp._clean_foreground(mask, min_area), _reference_clean_foreground(mask, min_area)
            assert np.array_equal(new, old)
            changed += int((new != mask).sum())
    assert changed > 1000
    for _ in range(300):
        shape = (int(rng.integers(1, 30)), int(rng.integers(1, 30)))
        mask = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.3, 1.5)) > rng.uniform(0.4, 0.6)
        min_area = int(rng.integers(0, 15))
        assert np.array_equal(pp._clean_foreground(mask, min_area), _reference_clean_foreground(mask, min_area))


def _reference_finish(labels, min_area, fill_holes):
    """The former `_finish`: removal, hole filling and renumbering as three passes."""
    labels = labels.astype(np.int32, copy=False)
    labels = pp._remove_small(labels, min_area)
    if fill_holes:
        labels = pp._fill_instance_holes(labels)
    return pp._relabel_sequential(labels)


def test_finish_with_one_lookup_equals_remove_fill_relabel_on_real_nuclei(real_sample_dir):
    """`_finish` (removal and renumbering by one lookup, then hole filling) equals the former three passes: on
    real NuInsSeg label maps with holes punched and ids thinned out (gaps in the ids, small pieces, holes
    touching one or two instances) and on random label maps."""
    import tifffile
    from scipy import ndimage as ndi

    rng = np.random.default_rng(11)
    cases = []
    for f in sorted(real_sample_dir.glob("*/label masks modify/*.tif"))[:4]:
        labels = tifffile.imread(f).astype(np.int32)
        labels = np.where(rng.random(labels.shape) < 0.03, 0, labels) * 3   # holes, gaps in the ids
        labels[ndi.binary_erosion(labels > 0, iterations=3) & (rng.random(labels.shape) < 0.002)] = 0
        cases.append(labels)
    for _ in range(150):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        mask = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.3, 2)) > rng.uniform(0.3, 0.6)
        labels, _ = ndi.label(mask)
        cases.append(np.where(rng.random(shape) < 0.1, 0, labels * int(rng.integers(1, 4))).astype(np.int32))
    changed = 0
    for labels in cases:
        for min_area in (0, 1, 10, 40):
            for fill in (True, False):
                new, old = pp._finish(labels.copy(), min_area, fill), _reference_finish(labels.copy(), min_area, fill)
                assert new.dtype == old.dtype == np.int32 and np.array_equal(new, old)
                changed += int((new != labels).sum())
    assert changed > 10000


# ----------------------------------------------------------------------------------------------
# Issue 17, third step: the watershed over mosaics, the components from the first labelling, the
# filtering along the columns in strips give the former results exactly
# ----------------------------------------------------------------------------------------------
def _random_case(rng, shape, levels):
    """Components (blobs, many cut by the image border), markers inside them (some small, some components
    without any), an energy quantised to `levels` values (many exact ties in the surface)."""
    from scipy import ndimage as ndi

    fg = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.8, 2.5)) > rng.uniform(0.45, 0.55)
    components, n_comp = ndi.label(fg)
    cores = fg & (ndi.gaussian_filter(rng.random(shape), rng.uniform(0.5, 1.5)) > rng.uniform(0.5, 0.6))
    markers, n_markers = ndi.label(cores)
    energy = (rng.integers(0, levels, shape) / max(levels - 1, 1)).astype(np.float32)
    if rng.random() < 0.3:
        energy = ndi.gaussian_filter(energy, 1.0)
    return energy, markers, n_markers, components, n_comp


def test_watershed_over_mosaics_equals_one_call_per_component_box(monkeypatch):
    """Random components, markers and surfaces with many ties (quantised energies, sigma 0), components cut by the
    image border, images down to 1 x N, several mosaics per call: the labels equal the former per-box calls'."""
    from scipy import ndimage as ndi
    from skimage import segmentation

    rng = np.random.default_rng(17)
    watershed = segmentation.watershed
    calls, multi = [], []

    def counting_watershed(*args, **kwargs):
        calls.append(1)
        return watershed(*args, **kwargs)

    monkeypatch.setattr(pp.segmentation, "watershed", counting_watershed)
    for i in range(400):
        shape = (int(rng.integers(1, 70)), int(rng.integers(1, 70)))
        energy, markers, n_markers, components, n_comp = _random_case(rng, shape, int(rng.integers(1, 5)))
        if i % 5 == 0:
            energy = energy.astype(np.float64)   # any float type: smoothed and compared in it
        sigma = float(rng.choice([0.0, 0.1, 0.6, 1.0, 2.3]))
        min_marker_area = int(rng.choice([0, 1, 4, 12]))
        monkeypatch.setattr(pp, "_MOSAIC_PIXELS", int(rng.choice([1, 300, 1 << 17])))
        boxes = ndi.find_objects(components) if i % 2 else None
        fast = pp._watershed_by_component(energy, sigma, markers, components, n_comp, orphan_base=n_markers,
                                          boxes=boxes, min_marker_area=min_marker_area)
        calls_fast = len(calls)
        calls.clear()
        slow = _reference_watershed_per_box(energy, sigma, pp._remove_small(markers.copy(), min_marker_area),
                                            components, n_comp, n_markers)
        assert np.array_equal(fast, slow), (i, shape, sigma, min_marker_area)
        if pp._MOSAIC_PIXELS == 1 << 17 and len(calls) > 2:
            multi.append((calls_fast, len(calls)))
        calls.clear()
    assert len(multi) > 30
    assert sum(f for f, _ in multi) < sum(s for _, s in multi) / 2   # most components share a call


def test_mosaic_keeps_components_with_tied_marker_pixels_of_two_labels_to_themselves():
    """Two markers whose edge pixels have the same value compete for the pixel between them: a call of its own
    gives it to the marker that comes first in raster order; in one call with another component placed before it,
    the heap hands out the tied marker pixels in another order and the pixel goes to the other marker. The mosaic
    floods such components alone, so the result is the per-box one (remove that rule and this test fails)."""
    from scipy import ndimage as ndi
    from skimage import segmentation

    components = np.zeros((3, 12), np.int32)
    markers = np.zeros((3, 12), np.int32)
    for k, x in enumerate((1, 7)):   # two strips of 3 pixels: marker, free pixel, marker
        components[1, x:x + 3] = k + 1
        markers[1, x], markers[1, x + 2] = 2 * k + 1, 2 * k + 2
    energy = np.zeros((3, 12), np.float32)   # a flat surface: every marker pixel has the value 0
    alone = segmentation.watershed(energy[1:2, 7:10], markers=markers[1:2, 7:10], mask=components[1:2, 7:10] > 0)
    assert alone[0, 1] == 3   # the first marker of the strip wins
    side_by_side = segmentation.watershed(energy[1:2, 1:10], markers=markers[1:2, 1:10],
                                          mask=components[1:2, 1:10] > 0)
    assert side_by_side[0, 7] == 4   # with another strip before it, the second one does
    expected = _reference_watershed_per_box(energy, 1.0, markers, components, 2, 4)
    assert expected[1, 8] == 3 and expected[1, 2] == 1
    for sigma in (0.0, 1.0):
        got = pp._watershed_by_component(energy, sigma, markers, components, 2, orphan_base=4,
                                         boxes=ndi.find_objects(components))
        assert np.array_equal(got, _reference_watershed_per_box(energy, sigma, markers, components, 2, 4))


def test_column_filtering_in_bands_equals_correlate1d(monkeypatch):
    """`_correlate1d` along axis 0 in bands of rows (bands down to 1 row, narrower than the kernel's reach; the last
    band shorter): `ndi.correlate1d`'s values."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(2)
    for band in (48, 7, 2, 1):
        monkeypatch.setattr(pp, "_BAND", band)
        for _ in range(60):
            shape = (int(rng.integers(1, 200)), int(rng.integers(1, 90)))
            image = rng.normal(size=shape).astype(np.float32)
            for ksize in (3, 7, 11):
                for weights in pp._sobel_kernels(ksize):
                    for axis in (0, 1):
                        assert np.array_equal(pp._correlate1d(image, weights, axis),
                                              ndi.correlate1d(image, weights, axis=axis, mode="nearest"))


def _check_clean_components(mask, min_area):
    from scipy import ndimage as ndi

    clean, comp, n, boxes, background = pp._clean_foreground_components(mask, min_area)
    assert np.array_equal(clean, _reference_clean_foreground(mask, min_area))
    relabelled, _ = ndi.label(clean)
    # the same components, numbered in the same order (ids with gaps)
    assert np.array_equal(pp._relabel_sequential(comp), relabelled)
    assert len(boxes) == n
    found = ndi.find_objects(comp)
    assert [b for b in boxes[:len(found)]] == found and all(b is None for b in boxes[len(found):])
    if background is not None:
        holes, n_holes, filled, hole_boxes = background
        assert np.array_equal((holes > 0) & ~filled[holes], ~clean)
        assert np.array_equal(holes, ndi.label(holes > 0)[0]) and hole_boxes == ndi.find_objects(holes)
    return comp, clean


def test_components_of_the_cleaned_foreground_from_the_first_labelling(real_sample_dir, monkeypatch):
    """`_clean_foreground_components`: the mask of `_clean_foreground`'s former version, its components numbered
    as `ndi.label`'s up to gaps, their boxes, the background's labelling; on thresholded noisy real masks (specks and
    hundreds to thousands of holes: holes filled one by one and all at once), random masks, a hole touching two
    components (they merge), empty and full masks."""
    import tifffile
    from scipy import ndimage as ndi

    rng = np.random.default_rng(8)
    for f in sorted(real_sample_dir.glob("*/label masks modify/*.tif"))[:3]:
        labels = tifffile.imread(f).astype(np.int32)
        for noise in (0.0, 0.1, 0.25):
            mask = ndi.gaussian_filter((labels > 0).astype(np.float32), 1.0) + rng.normal(0, noise, labels.shape) > 0.5
            for few in (0, 512):
                monkeypatch.setattr(pp, "_FEW_HOLES", few)
                for min_area in (0, 1, 10, 30):
                    _check_clean_components(mask, min_area)
    for _ in range(300):
        shape = (int(rng.integers(1, 30)), int(rng.integers(1, 30)))
        mask = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.3, 1.5)) > rng.uniform(0.4, 0.6)
        monkeypatch.setattr(pp, "_FEW_HOLES", int(rng.choice([0, 512])))
        _check_clean_components(mask, int(rng.integers(0, 15)))
    # a one-pixel hole whose 4-neighbours belong to two components (joined only at diagonal corners)
    mask = np.zeros((9, 9), bool)
    mask[3:6, 3:6] = True
    mask[4, 4] = mask[3, 5] = mask[5, 3] = False
    mask[1:4, 3] = mask[5:8, 5] = True   # arms, so that each half has 5 pixels
    assert ndi.label(mask)[1] == 2
    for few in (0, 512):
        monkeypatch.setattr(pp, "_FEW_HOLES", few)
        comp, clean = _check_clean_components(mask, 5)
        assert clean[4, 4] and comp.max() == 1
    # a one-pixel hole below a vertical bar (the first component: the hole lies outside its box) and inside a U
    mask = np.zeros((12, 9), bool)
    mask[1:6, 4] = True   # the bar, rows 1-5
    mask[6:8, 3] = mask[6:8, 5] = mask[7, 4] = True   # the U around (6, 4)
    assert ndi.label(mask)[1] == 2
    for few in (0, 512):
        monkeypatch.setattr(pp, "_FEW_HOLES", few)
        comp, clean = _check_clean_components(mask, 5)
        assert clean[6, 4] and comp.max() == 1
    # a chain: hole (3, 3) joins C and A, hole (6, 4) joins A and B and lies outside A's box; C has the first id
    mask = np.zeros((10, 9), bool)
    for y, x in ((0, 2), (1, 2), (2, 2), (2, 3), (3, 2),   # C
                 (3, 4), (4, 4), (5, 4), (4, 3), (3, 5),   # A
                 (6, 3), (7, 3), (7, 4), (7, 5), (6, 5)):  # B
        mask[y, x] = True
    assert ndi.label(mask)[1] == 3
    for few in (0, 512):
        monkeypatch.setattr(pp, "_FEW_HOLES", few)
        comp, clean = _check_clean_components(mask, 5)
        assert clean[3, 3] and clean[6, 4] and comp.max() == 1
    for mask in (np.zeros((5, 6), bool), np.ones((5, 6), bool), np.ones((1, 1), bool)):
        _check_clean_components(mask, 10)


def test_finish_with_the_cleanings_background_labelling_equals_the_former_one(real_sample_dir):
    """`_finish` given a labelling of the background (as the foreground cleaning hands over): the result of the
    former `_finish` (which labels the background itself), also where a removed small instance leaves a hole inside
    another one (then the given labelling is out of date and is not used); on real label maps with holes punched
    and small pieces, and on random label maps."""
    import tifffile
    from scipy import ndimage as ndi

    def background_of(labels, rng):
        holes, n = ndi.label(labels == 0)
        # ids of regions that are no longer background (as the cleaning's filled holes): extra regions marked gone
        extra = ndi.label(rng.random(labels.shape) < 0.02)[0]
        extra = np.where((extra > 0) & (labels > 0), extra + n, 0)
        gone = np.zeros(int(extra.max(initial=n)) + 1, bool)
        gone[n + 1:] = True
        holes = np.where(extra > 0, extra, holes)
        return holes, gone.size - 1, gone, ndi.find_objects(holes, gone.size - 1) if rng.random() < 0.5 else None

    rng = np.random.default_rng(13)
    labels = np.zeros((30, 30), np.int32)
    labels[5:25, 5:25] = 1
    labels[12:14, 12:14] = 2   # 4 pixels inside instance 1: removed, then a hole of instance 1
    labels[2:4, 27:29] = 3
    new = pp._finish(labels.copy(), 10, True, background_of(labels, rng))
    assert np.array_equal(new, _reference_finish(labels.copy(), 10, True)) and (new[12:14, 12:14] == 1).all()
    # nothing removed: the given labelling is used; a region marked gone (here the one pixel of instance 2, inside
    # instance 1) is no background, so it is not filled
    labels[12:14, 12:14] = 1
    labels[12, 12] = 2
    holes, n = ndi.label(labels == 0)
    holes[12, 12] = n + 1
    gone = np.zeros(n + 2, bool)
    gone[n + 1] = True
    new = pp._finish(labels.copy(), 0, True, (holes, n + 1, gone, ndi.find_objects(holes)))
    assert np.array_equal(new, _reference_finish(labels.copy(), 0, True)) and new[12, 12] == 2
    cases = []
    for f in sorted(real_sample_dir.glob("*/label masks modify/*.tif"))[:3]:
        labels = tifffile.imread(f).astype(np.int32)
        cases.append(np.where(rng.random(labels.shape) < 0.03, 0, labels))
    for _ in range(150):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        mask = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.3, 2)) > rng.uniform(0.3, 0.6)
        cases.append(np.where(rng.random(shape) < 0.1, 0, ndi.label(mask)[0]).astype(np.int32))
    for labels in cases:
        for min_area in (0, 10):
            new = pp._finish(labels.copy(), min_area, True, background_of(labels, rng))
            assert np.array_equal(new, _reference_finish(labels.copy(), min_area, True))


# ----------------------------------------------------------------------------------------------
# Issue 17, fourth step: the energy on a mosaic of the components' boxes, the final ids by one lookup of the
# components, the foreground's bounding box on sparse tissue give the former results exactly
# ----------------------------------------------------------------------------------------------
def _grown_cover(shape, boxes, frame):
    cover = np.zeros(shape, bool)
    for b in boxes:
        if b is not None:
            cover[max(b[0].start - frame, 0):b[0].stop + frame, max(b[1].start - frame, 0):b[1].stop + frame] = True
    return cover


def _same_bits(a, b):
    return a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_energy_on_a_mosaic_of_boxes_equals_the_whole_image_energy(real_sample_dir, monkeypatch):
    """`_edge_energy_on_boxes`: on every box grown by the frame, the whole image's energy bit for bit (0 elsewhere);
    random blobs cut by the image border, images down to 1 x N, Sobel sizes 3 to 11, frames 1 to 9, float64 maps,
    NaN in the maps, gaps (None) in the boxes, flat maps; and maps of real nuclei. With the share of the image the
    tiles may cover set to 0, the whole image is computed (the same values everywhere)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(23)
    mosaics = 0
    for i in range(300):
        shape = (int(rng.integers(1, 60)), int(rng.integers(1, 60)))
        fg = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.5, 2.0)) > rng.uniform(0.45, 0.6)
        if not fg.any():
            continue
        hv = ndi.gaussian_filter(rng.normal(size=(2,) + shape), (0, 1.5, 1.5)).astype(np.float32)
        if i % 7 == 0:
            hv = hv.astype(np.float64)
        if i % 11 == 0:
            hv[0] = 0.25   # a flat channel: normalised to 0
        if i % 5 == 0:
            hv[int(rng.integers(0, 2)), int(rng.integers(0, shape[0])), int(rng.integers(0, shape[1]))] = np.nan
        components, _ = ndi.label(fg)
        boxes = ndi.find_objects(components) + [None] * int(rng.integers(0, 3))
        ksize, frame = int(rng.choice([3, 5, 7, 11])), int(rng.choice([1, 2, 4, 9]))
        share = float(rng.choice([0.0, 0.6, 100.0]))
        monkeypatch.setattr(pp, "_ENERGY_MOSAIC_SHARE", share)
        whole = pp.edge_energy(hv, fg, ksize)
        got = pp._edge_energy_on_boxes(hv, fg, ksize, boxes, frame)
        cover = _grown_cover(shape, boxes, frame)
        if share == 0.0:
            assert _same_bits(got, whole)
        else:
            assert _same_bits(got[cover], whole[cover]), (i, shape, ksize, frame, share)
            if share == 100.0:   # always the mosaic: 0 outside the grown boxes
                assert not got[~cover].any()
                mosaics += 1
    assert mosaics > 50
    _, _, _, hv = _real_maps(real_sample_dir)
    blurred = _real_maps(real_sample_dir)[0]
    for fg in (blurred > 0.5, (blurred > 0.5) & (np.arange(1536) < 700)):   # the second: a third of the tissue
        fg, _, _, boxes, _ = pp._clean_foreground_components(fg, 10)
        monkeypatch.setattr(pp, "_ENERGY_MOSAIC_SHARE", 100.0)
        got = pp._edge_energy_on_boxes(hv, fg, 7, boxes, 4)
        whole = _former_edge_energy(hv, fg, 7)
        cover = _grown_cover(fg.shape, boxes, 4)
        assert cover.mean() < 0.9 and np.array_equal(got[cover], whole[cover]) and not got[~cover].any()


def _watershed_then_finish(energy, sigma, markers, n_markers, components, n_comp, boxes, min_marker_area, min_area):
    """The former last steps: `_watershed_by_component` (the instances' lookup over the whole image), then `_finish`
    without the hole filling (an area count and the renumbering's lookup over the whole image); and whether an
    instance was removed."""
    labels = pp._watershed_by_component(energy, sigma, markers, components, n_comp, orphan_base=n_markers,
                                        boxes=boxes, min_marker_area=min_marker_area)
    areas = np.bincount(labels.ravel())
    present = areas[1:] > 0
    removed = bool(min_area > 1 and (present & (areas[1:] < min_area)).any())
    return pp._finish(labels, min_area, False), removed


def test_final_ids_by_one_lookup_of_the_components_equal_watershed_then_finish(real_sample_dir):
    """`_instances` (the final ids by one lookup of the components, the watershed's pieces counted on their boxes)
    equals `_watershed_by_component` then `_finish`, and says when an instance was removed: on maps of real nuclei
    (with noise: nuclei without a marker core) and on random masks and energies with many ties, for several
    `min_area`, `min_marker_area`, smoothing values (small pieces removed in some cases, in others not)."""
    from scipy import ndimage as ndi

    blurred, _, noisy, hv = _real_maps(real_sample_dir, shape=(512, 1024))
    cases = []
    for prob in (blurred, noisy):
        for min_area, min_marker_area, threshold in ((10, 4, 0.1), (60, 1, 0.3), (1, 0, 0.1), (0, 12, 0.2)):
            fg = pp._clean_foreground_components(prob > 0.5, min_area)
            energy = pp.edge_energy(hv, fg[0], 7)
            cores = fg[0] & (energy < threshold)
            cases.append((fg, energy, cores, min_area, min_marker_area, 1.0))
    rng = np.random.default_rng(29)
    for _ in range(300):
        shape = (int(rng.integers(1, 50)), int(rng.integers(1, 50)))
        mask = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.8, 2.5)) > rng.uniform(0.45, 0.55)
        min_area = int(rng.choice([0, 1, 5, 10, 25]))
        fg = pp._clean_foreground_components(mask, min_area)
        energy = (rng.integers(0, int(rng.integers(1, 5)), shape) / 3).astype(np.float32)
        cores = fg[0] & (ndi.gaussian_filter(rng.random(shape), rng.uniform(0.5, 1.5)) > rng.uniform(0.5, 0.6))
        cases.append((fg, energy, cores, min_area, int(rng.choice([0, 1, 4, 12])),
                      float(rng.choice([0.0, 0.6, 1.0, 2.3]))))
    removed_seen = set()
    for (fg, components, n_comp, boxes, _), energy, cores, min_area, min_marker_area, sigma in cases:
        if not fg.any():
            continue
        markers, n_markers = ndi.label(cores)
        got, removed = pp._instances(energy, sigma, markers, n_markers, cores, components, n_comp, boxes,
                                     min_marker_area, min_area)
        expected, expected_removed = _watershed_then_finish(energy, sigma, markers, n_markers, components, n_comp,
                                                            list(boxes), min_marker_area, min_area)
        assert got.dtype == np.int32 and np.array_equal(got, expected) and removed == expected_removed
        removed_seen.add(removed)
    assert removed_seen == {True, False}


def test_sparse_tissue_on_the_foreground_box_equals_the_whole_maps(real_sample_dir, monkeypatch):
    """Sparse tissue (maps of real nuclei with most of the foreground zeroed: a patch inside, a patch in a corner,
    one nucleus cut by the border, a band across the whole width, nuclei at two opposite corners; NaN in the maps far
    from the tissue) goes through the foreground's bounding box: the labels of the former whole-image steps, for
    the default and other parameters (Sobel sizes, smoothing 0 and 2.3, no opening, no hole filling, min_area 1);
    empty maps give zeros without any work."""
    from scipy import ndimage as ndi

    blurred, _, noisy, hv = _real_maps(real_sample_dir, shape=(512, 1024))
    h, w = blurred.shape
    nucleus = ndi.label(blurred > 0.5)[0]
    edges = np.concatenate([nucleus[:, -1], nucleus[0], nucleus[-1], nucleus[:, 0]])
    right = np.argmax(np.bincount(edges, minlength=nucleus.max() + 1)[1:]) + 1   # the nucleus most cut by the border
    regions = [(slice(100, 300), slice(100, 400)), (slice(0, 200), slice(0, 260)), (slice(300, 512), slice(0, 1024))]
    shapes = []
    real = pp._hv_instances

    def spying(mask, *args):
        shapes.append(mask.shape)
        return real(mask, *args)

    monkeypatch.setattr(pp, "_hv_instances", spying)
    configs = [None, PostprocessConfig(sobel_ksize=3), PostprocessConfig(sobel_ksize=11, smooth_sigma=2.3),
               PostprocessConfig(smooth_sigma=0.0), PostprocessConfig(marker_opening=0, fill_holes=False),
               PostprocessConfig(min_area=1, marker_opening=3)]
    for k, prob in enumerate((blurred, noisy)):
        sparse = [np.where(nucleus == right, prob, 0).astype(np.float32)]
        for region in regions:
            part = np.zeros_like(prob)
            part[region] = prob[region]
            sparse.append(part)
        corners = np.zeros_like(prob)
        corners[:120, :150] = prob[:120, :150]
        corners[-100:, -130:] = prob[-100:, 382:512]   # (the HV maps there are others': no matter)
        sparse.append(corners)
        maps = hv.copy()
        maps[:, 260:262, 800:803] = np.nan   # far from the tissue of sparse[0] and [2]
        for i, fg in enumerate(sparse):
            for config in configs[k::2] + [None]:
                shapes.clear()
                use = maps if i in (0, 2) else hv
                fast = pp.postprocess(fg, use, config)
                assert np.array_equal(fast, _former_hv_to_instances(fg, use, config)), (k, i, config)
                assert fast.max() > 0
                if i != len(sparse) - 1:   # the corners' box is the whole image
                    assert shapes and shapes[0][0] * shapes[0][1] < h * w
    shapes.clear()
    assert not pp.postprocess(np.zeros((40, 50), np.float32), np.zeros((2, 40, 50), np.float32)).any()
    assert shapes == []


def test_random_maps_through_every_path_equal_the_former_steps(monkeypatch):
    """Small random maps (blobs cut by the image border, one component touching the border, sparse corners, noise;
    random parameters) through the whole post-processing, with the energy's mosaic forced on or off: the labels of
    the former whole-image steps."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(31)
    nonzero = 0
    for i in range(150):
        shape = (int(rng.integers(8, 70)), int(rng.integers(8, 70)))
        prob = ndi.gaussian_filter(rng.random(shape), rng.uniform(1.0, 3.0)).astype(np.float32)
        prob = (prob - prob.min()) / max(float(prob.max() - prob.min()), 1e-6)
        if i % 3 == 0:   # sparse: only one corner keeps its tissue
            keep = np.zeros(shape, bool)
            keep[:shape[0] // 3, :shape[1] // 2] = True
            prob = np.where(np.roll(keep, int(rng.integers(0, 2)) * (shape[0] * 2 // 3), axis=0), prob, 0)
        hv = ndi.gaussian_filter(rng.normal(size=(2,) + shape), (0, 2, 2)).astype(np.float32)
        config = PostprocessConfig(fg_threshold=float(rng.uniform(0.4, 0.6)),
                                   marker_threshold=float(rng.choice([0.05, 0.1, 0.3])),
                                   min_marker_area=int(rng.choice([0, 4, 10])),
                                   marker_opening=int(rng.choice([0, 1, 2])), min_area=int(rng.choice([1, 10, 20])),
                                   sobel_ksize=int(rng.choice([3, 5, 7])),
                                   smooth_sigma=float(rng.choice([0.0, 1.0, 2.3])),
                                   fill_holes=bool(rng.random() < 0.8))
        monkeypatch.setattr(pp, "_ENERGY_MOSAIC_SHARE", float(rng.choice([0.0, 100.0])))
        fast = pp.postprocess(prob, hv, config)
        assert np.array_equal(fast, _former_hv_to_instances(prob, hv, config)), (i, config)
        nonzero += fast.max() > 0
    assert nonzero > 100


def test_labelling_through_cc3d_equals_scipy_label(monkeypatch):
    """`pp._label4` (cc3d's two raster passes) gives `ndi.label`'s array and count: a V whose two arms meet below a
    component between them (provisional labels joined after a later one was made), random masks from speckle to
    one region with holes, views that are not contiguous, an empty and a full mask, the background of real nuclei;
    and the whole post-processing is the same with the labelling left to scipy."""
    from scipy import ndimage as ndi

    if pp.cc3d is None:
        pytest.skip("connected-components-3d is not installed (pip install -r requirements.txt)")

    def same(mask):
        ours, n = pp._label4(mask)
        ref, m = ndi.label(mask)
        assert ours.dtype == np.int32 and n == m and np.array_equal(ours, ref)

    v = np.zeros((8, 11), bool)
    v[0:6, 1] = v[0:6, 9] = True   # two arms, joined by the bottom row
    v[6, 1:10] = True
    v[1:3, 5] = True               # between the arms: first seen after both arms began
    ours, n = pp._label4(v)
    assert n == 2 and ours[0, 1] == 1 and ours[0, 9] == 1 and ours[1, 5] == 2
    same(v)
    rng = np.random.default_rng(5)
    for i in range(60):
        shape = (int(rng.integers(1, 90)), int(rng.integers(1, 90)))
        noise = ndi.gaussian_filter(rng.random(shape), float(rng.uniform(0.0, 4.0)))
        mask = noise > np.quantile(noise, float(rng.uniform(0.05, 0.95)))
        same(mask)
        same(~mask)
        same(mask[::2, 1:])   # a strided view
        same(np.asfortranarray(mask))
    same(np.zeros((7, 9), bool))
    same(np.ones((7, 9), bool))
    from PIL import Image   # the background of real nuclei (where the sample is): one large region and its holes
    from conftest import REAL_SAMPLE_DIR
    image = next(iter(sorted(REAL_SAMPLE_DIR.glob("*/tissue images/*.png"))), None)
    if image is not None:
        rgb = np.asarray(Image.open(image).convert("L"), np.float32)
        same(rgb < rgb.mean() - rgb.std())
        same(rgb >= rgb.mean() - rgb.std())
    prob = ndi.gaussian_filter(rng.random((160, 200)), 2.0).astype(np.float32)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    hv = ndi.gaussian_filter(rng.normal(size=(2, 160, 200)), (0, 2, 2)).astype(np.float32)
    fast = pp.postprocess(prob, hv, PostprocessConfig())
    monkeypatch.setattr(pp, "cc3d", None)
    assert np.array_equal(fast, pp.postprocess(prob, hv, PostprocessConfig())) and fast.max() > 0
