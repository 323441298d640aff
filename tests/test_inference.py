"""The inference engine (inference.py): one blending implementation, bit-identical to the float32 numpy loop it
replaced; each window of a slide's grid runs once; the device path (resize, pad, network, resize back, blend as
torch ops on the maps' device) agrees with the CPU path; per-device batch sizes."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import dataset
import inference
import nuclei_model
import tissue
import utils
import wsi
from test_predict import PP, pure_maps, synthetic_slide  # noqa: F401
from test_wsi import _options, _predictor, small_slide  # noqa: F401  (fixture)


def textured_maps(tiles: list) -> list:
    """Maps that differ everywhere and depend only on the tile's pixels (so a window's maps are the same
    whichever region asks for it), with values that do not blend exactly in float32."""
    out = []
    for t in tiles:
        f = t.astype(np.float32)
        fg = (np.sin(f[..., 0] * 0.37 + f[..., 1] * 0.011) * 0.5 + 0.5).astype(np.float32)
        hv = np.stack([np.cos(f[..., 2] * 0.13), np.sin(f[..., 1] * 0.071 - 1.0)]).astype(np.float32)
        out.append((fg, hv))
    return out


def reference_stitch(image, tile, overlap, maps_fn):
    """The blending loop of predict.stitch_maps before issue 17, in numpy float32 (the independent reference)."""
    height, width = image.shape[:2]
    pad_h, pad_w = max(tile - height, 0), max(tile - width, 0)
    padded = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric") if pad_h or pad_w else image
    full_h, full_w = padded.shape[:2]
    fg_sum = np.zeros((full_h, full_w), np.float32)
    hv_sum = np.zeros((2, full_h, full_w), np.float32)
    w_sum = np.zeros((full_h, full_w), np.float32)
    for y in inference.tile_starts(full_h, tile, overlap):
        for x in inference.tile_starts(full_w, tile, overlap):
            (fg, hv), = maps_fn([np.ascontiguousarray(padded[y:y + tile, x:x + tile])])
            w = np.outer(inference.tile_weights(tile, y, tile, overlap, full_h),
                         inference.tile_weights(tile, x, tile, overlap, full_w))
            fg_sum[y:y + tile, x:x + tile] += w * fg
            w_sum[y:y + tile, x:x + tile] += w
            hv_sum[:, y:y + tile, x:x + tile] += w[None] * hv
    w_sum = np.maximum(w_sum, 1e-12)
    return (fg_sum / w_sum)[:height, :width], (hv_sum / w_sum[None])[:, :height, :width]


@pytest.mark.parametrize("shape, tile, overlap, batch", [((700, 530), 256, 64, 1), ((700, 530), 256, 64, 5),
                                                         ((300, 410), 128, 0, 3), ((90, 200), 128, 32, 2)])
def test_blending_is_bit_identical_to_the_numpy_loop(shape, tile, overlap, batch):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    fg, hv = inference.stitch_maps(image, tile, overlap, textured_maps, batch_size=batch)
    ref_fg, ref_hv = reference_stitch(image, tile, overlap, textured_maps)
    assert fg.dtype == np.float32 and fg.shape == shape and hv.shape == (2,) + shape
    assert np.array_equal(fg, ref_fg) and np.array_equal(hv, ref_hv)


def test_a_region_of_the_grid_blends_like_the_whole_image():
    """`Blender` over a box of the grid (as `wsi.stitch_region` uses it) = the whole-image maps there, bit for bit."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (640, 700, 3), dtype=np.uint8)
    whole, whole_hv = inference.stitch_maps(image, 256, 64, textured_maps, batch_size=4)
    ys, xs = inference.tile_starts(640, 256, 64), inference.tile_starts(700, 256, 64)
    box = (150, 220, 470, 610)
    keys = [(iy, ix) for iy, y in enumerate(ys) for ix, x in enumerate(xs)
            if y < box[2] and y + 256 > box[0] and x < box[3] and x + 256 > box[1]]
    blender = inference.Blender(box, (640, 700), 256, 64)
    ran = inference.blend_windows(blender, keys, lambda k: (ys[k[0]], xs[k[1]]),
                                  lambda k: image[ys[k[0]]:ys[k[0]] + 256, xs[k[1]]:xs[k[1]] + 256], textured_maps, 3)
    fg, hv = blender.maps()
    assert ran == len(keys)
    assert np.array_equal(fg, whole[150:470, 220:610]) and np.array_equal(hv, whole_hv[:, 150:470, 220:610])


def test_maps_end_the_blender():
    """`maps()` divides the sums in place (no second copy of the box): adding a window afterwards is an error."""
    blender = inference.Blender((0, 0, 64, 64), (64, 64), 64, 16)
    blender.add(0, 0, np.full((64, 64), 0.5, np.float32), np.zeros((2, 64, 64), np.float32))
    fg, hv = blender.maps()
    assert np.array_equal(fg, np.full((64, 64), 0.5, np.float32)) and not hv.any()
    with pytest.raises(RuntimeError, match="after maps"):
        blender.add(0, 0, np.zeros((64, 64), np.float32))


def test_a_window_adds_nothing_where_its_weight_is_zero():
    """The outer quarter of a shared overlap has weight 0: a NaN the network puts there stays out of the maps."""
    tile, overlap = 64, 16
    ys = inference.tile_starts(112, tile, overlap)   # [0, 48]: the windows share 16 rows, the outer 4 of weight 0
    blender = inference.Blender((0, 0, 112, 64), (112, 64), tile, overlap)
    first = np.full((tile, tile), 0.25, np.float32)
    first[-4:] = np.nan                   # rows 60..63 of the slide: the first window's weight is 0 there
    second = np.full((tile, tile), 0.75, np.float32)
    blender.add(ys[0], 0, first)
    blender.add(ys[1], 0, second)
    fg, _ = blender.maps()
    assert not np.isnan(fg).any()
    assert np.all(fg[:48] == 0.25) and np.all(fg[60:] == 0.75)


def test_cached_windows_are_not_run_again():
    calls = []

    def counting(tiles):
        calls.append(len(tiles))
        return textured_maps(tiles)

    image = np.random.default_rng(3).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    ys = inference.tile_starts(512, 256, 64)
    keys = [(iy, ix) for iy in range(len(ys)) for ix in range(len(ys))]
    pixels = lambda k: image[ys[k[0]]:ys[k[0]] + 256, ys[k[1]]:ys[k[1]] + 256]  # noqa: E731
    position = lambda k: (ys[k[0]], ys[k[1]])  # noqa: E731
    cache: dict = {}
    first = inference.Blender((0, 0, 300, 512), (512, 512), 256, 64)
    ran = inference.blend_windows(first, keys[:6], position, pixels, counting, 4, cache, keep={keys[3], keys[4]})
    assert ran == 6 and set(cache) == {keys[3], keys[4]}
    second = inference.Blender((0, 0, 512, 512), (512, 512), 256, 64)
    ran = inference.blend_windows(second, keys, position, pixels, counting, 4, cache)
    assert ran == len(keys) - 2 and sum(calls) == 6 + len(keys) - 2
    fg, _ = second.maps()
    assert np.array_equal(fg, inference.stitch_maps(image, 256, 64, textured_maps)[0])


def _count_windows(maps_fn):
    counter = {"windows": 0}

    def counting(tiles):
        counter["windows"] += len(tiles)
        return maps_fn(tiles)

    return counting, counter


@pytest.mark.parametrize("mask", ["none", "half"])
def test_every_window_of_a_slide_runs_once(small_slide, tmp_path, mask):
    """Windows run = the windows of the slide's global grid that touch tissue (before issue 17 the windows on
    the seams of region rows ran twice: here 45 runs of 25 windows with the whole slide as tissue)."""
    from PIL import Image

    path, image, _ = small_slide
    tissue_mask = "none"
    if mask == "half":  # tissue only in the left half
        m = np.zeros((90, 100), np.uint8)
        m[:, :50] = 255
        Image.fromarray(m).save(tmp_path / "mask.png")
        tissue_mask = str(tmp_path / "mask.png")
    options = _options(tissue_mask=tissue_mask)
    counting, counter = _count_windows(pure_maps)
    outcome = wsi.predict_slide(_predictor(options, counting), path, "small", tmp_path / "out", options)
    assert outcome.status == "ok", outcome.error
    height, width = image.shape[:2]
    geo = wsi.slide_geometry((width, height), 1.0, 256, 64, path)
    mask_obj = tissue.full_mask((width, height)) if mask == "none" else tissue.read_tissue_mask(tissue_mask,
                                                                                                  (width, height))
    expected = int(wsi.window_flags(geo, mask_obj).sum())
    assert counter["windows"] == outcome.windows == expected
    if mask == "none":
        assert expected == len(geo.ys) * len(geo.xs) == 25
        # several regions per row and per column: the old cache (right-hand neighbour only) ran more
        assert len(wsi.plan_regions(geo, wsi.window_flags(geo, mask_obj), 384)) == 9


def _wait_for(condition, timeout: float = 10.0) -> bool:
    end = time.time() + timeout
    while not condition():
        if time.time() > end:
            return False
        time.sleep(0.005)
    return True


def test_maps_ahead_runs_batches_in_order_ahead_of_the_caller_and_bounded():
    """`MapsAhead`: the batches run in the order added, in a thread of their own, the next one starting while the
    caller still holds the last one's maps, never more than `depth` computed and not taken; an error comes out of
    `take` for its batch; keys taken out of order are an error."""
    import threading

    started, threads = [], set()

    def fn(tiles):
        started.append(int(tiles[0][0, 0, 0]))
        threads.add(threading.current_thread().name)
        if int(tiles[0][0, 0, 0]) == 4:
            raise ValueError("damaged batch 4")
        return [(np.full((2, 2), t[0, 0, 0], np.float32), None) for t in tiles]

    ahead = inference.MapsAhead(fn, depth=2)
    try:
        for i in range(6):
            ahead.add([("k", i)], lambda i=i: [np.full((2, 2, 3), i, np.uint8)])
        assert _wait_for(lambda: len(started) == 2)
        time.sleep(0.1)
        assert started == [0, 1]                 # bounded: two batches computed, none taken yet
        keys, results = ahead.take([("k", 0)])
        assert keys == [("k", 0)] and float(results[0][0][0, 0]) == 0.0
        assert _wait_for(lambda: len(started) == 3)   # batch 2 runs while the caller holds batch 0's maps
        for i in (1, 2, 3):
            assert float(ahead.take([("k", i)])[1][0][0][0, 0]) == i
        with pytest.raises(ValueError, match="damaged batch 4"):
            ahead.take([("k", 4)])
        with pytest.raises(RuntimeError, match="expected"):
            ahead.take([("k", 9)])
        assert threads == {"maps-ahead_0"}
    finally:
        ahead.close()


def test_maps_ahead_gathers_the_next_tiles_while_the_device_works_and_a_read_error_reaches_take():
    """`MapsAhead` gathers a batch's tiles in a thread of its own: batch 1's tiles are gathered while the maps
    function still works on batch 0 (the device is not kept waiting for them), and an error of a batch's tiles
    (a failed read) comes out of `take` for that batch, the batches after it still running."""
    import threading

    release, gathered = threading.Event(), []

    def tiles_of(i):
        def tiles():
            gathered.append((i, threading.current_thread().name))
            if i == 2:
                raise OSError("unreadable region 2")
            return [np.full((2, 2, 3), i, np.uint8)]
        return tiles

    def fn(tiles):
        if int(tiles[0][0, 0, 0]) == 0:
            assert release.wait(10)
        return [(np.full((2, 2), t[0, 0, 0], np.float32), None) for t in tiles]

    ahead = inference.MapsAhead(fn, depth=4)
    try:
        for i in range(4):
            ahead.add([("k", i)], tiles_of(i))
        assert _wait_for(lambda: len(gathered) == 4)   # while batch 0 is still on the "device"
        assert {name for _, name in gathered} == {"maps-tiles_0"}
        release.set()
        assert [float(ahead.take([("k", i)])[1][0][0][0, 0]) for i in (0, 1)] == [0.0, 1.0]
        with pytest.raises(OSError, match="unreadable region 2"):
            ahead.take([("k", 2)])
        assert float(ahead.take([("k", 3)])[1][0][0][0, 0]) == 3.0
    finally:
        release.set()
        ahead.close()


def test_blending_maps_computed_ahead_equals_blending_in_line():
    image = np.random.default_rng(4).integers(0, 256, (700, 600, 3), dtype=np.uint8)
    ys, xs = inference.tile_starts(700, 256, 64), inference.tile_starts(600, 256, 64)
    keys = [(iy, ix) for iy in range(len(ys)) for ix in range(len(xs))]
    pixels = lambda k: image[ys[k[0]]:ys[k[0]] + 256, xs[k[1]]:xs[k[1]] + 256]  # noqa: E731
    position = lambda k: (ys[k[0]], xs[k[1]])  # noqa: E731
    inline = inference.Blender((0, 0, 700, 600), (700, 600), 256, 64)
    inference.blend_windows(inline, keys, position, pixels, textured_maps, 4)
    ahead = inference.MapsAhead(textured_maps)
    try:
        batches = [keys[i:i + 4] for i in range(0, len(keys), 4)]
        for batch in batches:
            ahead.add(batch, lambda batch=batch: [pixels(k) for k in batch])
        blended = inference.Blender((0, 0, 700, 600), (700, 600), 256, 64)
        never = lambda tiles: pytest.fail("the maps function was called in line")  # noqa: E731
        inference.blend_windows(blended, keys, position, pixels, never, 4,
                                batches=(ahead.take(batch) for batch in batches))
    finally:
        ahead.close()
    for a, b in zip(inline.maps(), blended.maps()):
        assert np.array_equal(a, b)


def test_symmetric_index_is_numpys_symmetric_padding():
    for length, total in [(5, 5), (5, 7), (5, 13), (3, 64), (1, 4)]:
        x = np.arange(length)
        assert np.array_equal(inference._symmetric_index(length, total, "cpu").numpy(),
                              np.pad(x, (0, total - length), mode="symmetric"))


@pytest.fixture(scope="module")
def two_networks():
    utils.set_seed(0)
    nets = []
    for input_size in (64, 128):
        config = {"input_size": input_size, "pretrained": None, "head": "hv", "lora_rank": 0, "lora_alpha": 1.0,
                  "train_only_lora": False, "mpp": dataset.NUINSSEG_MPP}
        nets.append(nuclei_model.prepare_for_inference(nuclei_model.build_model(config, pretrained=None)))
    return nets


@pytest.mark.parametrize("scale, exact", [(1.0, True), (2.0, False), (0.75, False)])
def test_device_path_agrees_with_the_cpu_path(two_networks, scale, exact):
    """The accelerator path (tiles uploaded, resized, padded, run, resized back and blended as torch ops on the
    maps' device), run here on the CPU, against the CPU path (PIL resizing, numpy maps): the same maps at scale
    1 (no resizing), within resampling differences otherwise (torch vs PIL bilinear, both rounded to uint8)."""
    net = two_networks[0]
    image, _ = synthetic_slide(200, 150, seed=4)
    cpu = inference.NetworkMaps([net], scale, "cpu", amp=False)
    dev = inference.NetworkMaps([net], scale, "cpu", amp=False)
    dev.keep_on_device = True
    assert inference.maps_device(cpu).type == "cpu" and not cpu.keep_on_device
    a_fg, a_hv = inference.stitch_maps(image, 64, 16, cpu, batch_size=4)
    b_fg, b_hv = inference.stitch_maps(image, 64, 16, dev, batch_size=4)
    assert a_fg.shape == b_fg.shape == (200, 150) and a_hv.shape == b_hv.shape == (2, 200, 150)
    if exact:
        np.testing.assert_allclose(b_fg, a_fg, atol=1e-6)
        np.testing.assert_allclose(b_hv, a_hv, atol=1e-6)
    else:
        assert np.abs(b_fg - a_fg).mean() < 0.01 and np.abs(b_hv - a_hv).mean() < 0.02
        assert np.corrcoef(a_fg.ravel(), b_fg.ravel())[0, 1] > 0.99


CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="no CUDA device here (these run in bench/gpu_checks.sh on a GPU machine)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_the_device_path_run_ahead_gives_the_maps_of_the_device_path_in_line(two_networks, small_slide, device):
    """`NetworkMaps.device_maps` (uploaded, resized, run, blended as torch ops: what a GPU runs; on the CPU here) in
    the thread of `MapsAhead`, fed every region's batches first as `wsi.run_regions` feeds them, against the same in
    line: every region's maps bit for bit on the CPU, to float32 rounding on CUDA (kernels may differ by call)."""
    import copy

    import slides

    path = small_slide[0]
    dev = inference.NetworkMaps([copy.deepcopy(two_networks[0]).to(device)], 0.25, device, amp=False)
    dev.keep_on_device = True
    assert dev.accelerator == (device != "cpu")
    with slides.open_slide(path) as slide:
        geo = wsi.slide_geometry(slide.dimensions, 1.0, 256, 64, path)
        regions = wsi.plan_regions(geo, wsi.window_flags(geo, tissue.full_mask(slide.dimensions)), 384)
        reads = [slide.read_scaled((b[1], b[0], b[3] - b[1], b[2] - b[0]), 1.0) for b in (r.box for r in regions)]
    last_use = {key: k for k, r in enumerate(regions) for key in r.windows}
    batches = wsi.region_batches(regions, 3)
    ahead = inference.MapsAhead(dev)
    try:
        for k, r in enumerate(regions):
            pixels = wsi.window_pixels(r, reads[k], geo, r.box[:2])
            for keys in batches[k]:
                ahead.add(keys, lambda keys=keys, pixels=pixels: [pixels(key) for key in keys])
        caches: tuple = ({}, {})
        for k, r in enumerate(regions):
            later = {key for key in r.windows if last_use[key] > k}
            a = wsi.stitch_region(r, reads[k], geo, dev, 3, caches[0], later)
            b = wsi.stitch_region(r, reads[k], geo, dev, 3, caches[1], later,
                                  batches=(ahead.take(keys) for keys in batches[k]))
            assert a[2] == b[2]
            if device == "cpu":
                assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
            else:
                np.testing.assert_allclose(b[0], a[0], atol=1e-5)
                np.testing.assert_allclose(b[1], a[1], atol=1e-5)
            for cache in caches:
                for key in r.windows:
                    if last_use[key] == k:
                        cache.pop(key, None)
    finally:
        ahead.close()


@CUDA
def test_on_cuda_the_device_path_agrees_with_the_cpu_path(two_networks):
    """The accelerator path on a real GPU (pinned upload on a side stream, resizing, network, blending on the device)
    against the CPU path at scale 1: the same maps within the GPU's float32 / TF32 rounding."""
    import copy

    image, _ = synthetic_slide(200, 150, seed=4)
    cpu = inference.NetworkMaps([two_networks[0]], 1.0, "cpu", amp=False)
    gpu = inference.NetworkMaps([copy.deepcopy(two_networks[0]).to("cuda")], 1.0, "cuda", amp=False)
    assert gpu.keep_on_device and gpu.accelerator and inference.maps_device(gpu).type == "cuda"
    a_fg, a_hv = inference.stitch_maps(image, 64, 16, cpu, batch_size=4)
    b_fg, b_hv = inference.stitch_maps(image, 64, 16, gpu, batch_size=4)
    assert np.abs(b_fg - a_fg).max() < 5e-3 and np.abs(b_hv - a_hv).max() < 5e-3


def test_batch_size_defaults():
    """CPU: 1, whatever the maps function; an explicit --batch_size wins."""
    assert inference.default_batch_size(pure_maps, 256) == inference.CPU_BATCH_SIZE == 1
    predictor = inference.load_predictor(_options(batch_size=None), maps_fn=pure_maps)
    assert predictor.batch_size == 1
    assert inference.load_predictor(_options(batch_size=6), maps_fn=pure_maps).batch_size == 6
    assert inference.default_num_workers("cpu") == 0
    assert 1 <= inference.default_num_workers("cuda") <= inference.MAX_DEFAULT_WORKERS


class _Timed:
    """A stand-in device network on a fake clock: each call takes batch / rate[batch] seconds (an OOM from
    `oom` on), so the probe's choice does not depend on the load of the machine."""

    def __init__(self, rates: dict, oom: int | None = None):
        self.rates, self.oom, self.device, self.keep_on_device = rates, oom, torch.device("cpu"), True
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def device_maps(self, tiles):
        n = len(tiles)
        if self.oom is not None and n >= self.oom:
            raise torch.cuda.OutOfMemoryError("simulated")
        self.now += n / self.rates[n]
        return None, None


@pytest.mark.parametrize("rates, oom, best", [({1: 100, 2: 200, 4: 400, 8: 415, 16: 2000}, None, 4),
                                              ({1: 100, 2: 200, 4: 400, 8: 800}, 8, 4),
                                              ({1: 100, 2: 100}, None, 1),
                                              ({2 ** k: 100 * 2 ** k for k in range(8)}, None, 64)])
def test_probe_stops_when_throughput_stops_rising(monkeypatch, rates, oom, best):
    """Batches 1, 2, 4, ...: the last that raised windows per second by more than 5 %, before the first that
    did not or ran out of memory; at most 64."""
    fake = _Timed(rates, oom)
    monkeypatch.setattr(inference, "time", fake)
    assert inference.probe_batch_size(fake, 8) == best
