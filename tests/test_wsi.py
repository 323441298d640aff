"""Whole-slide inference (issue 10): slide path = whole-image path, resume, scale, bad inputs.

Slides are written by the tests as tiled pyramidal TIFFs with mpp metadata (`sample_data.write_pyramidal_tiff`)
and read back through OpenSlide / tiffslide (`slides.py`). The maps function is the pure one of test_predict
(dark pixels + their HV maps) unless the test is about the network.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

import dataset
import inference
import main
import metrics
import predict
import sample_data
import utils
import wsi
from test_predict import PP, pure_maps, synthetic_slide, tiny_model  # noqa: F401  (fixture)


def _options(**kw) -> predict.PredictOptions:
    base = dict(model_path="unused", tile_size=256, overlap=64, tissue_mask="none", region_size=384,
                num_workers=0, read_threads=2, batch_size=6, label_image=True)
    base.update(kw)
    return predict.PredictOptions(**base)


def _predictor(options, maps_fn=pure_maps):
    predictor = inference.load_predictor(options, maps_fn=maps_fn)
    predictor.postprocess = dict(PP)
    return predictor


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    image, truth = synthetic_slide(900, 1000, seed=5)
    path = tmp_path_factory.mktemp("slide") / "small.tif"
    sample_data.write_pyramidal_tiff(path, image, dataset.NUINSSEG_MPP, tile_size=256)
    return path, image, truth


def _outputs(out: Path, name: str) -> dict:
    return {f: (out / f).read_bytes() for f in (f"{name}.geojson", f"{name}_nuclei.csv", f"{name}_labels.tif")}


def test_slide_path_equals_whole_image_path(small_slide, tmp_path, monkeypatch):
    path, image, truth = small_slide
    options = _options()
    outcome = wsi.predict_slide(_predictor(options), path, "small", tmp_path, options)
    assert outcome.status == "ok", outcome.error
    labels = tifffile.imread(tmp_path / "small_labels.tif")
    assert labels.shape == image.shape[:2] and labels.dtype == np.uint32
    whole = inference.predict_image(None, image, 256, 64, maps_fn=pure_maps, postprocess=PP)
    m = metrics.instance_metrics(whole, labels)
    assert m["num_pred"] == m["num_true"] == outcome.nuclei and m["fp"] == 0 and m["fn"] == 0
    assert m["iou_sum"] / m["tp"] > 0.99
    assert metrics.instance_metrics(truth, labels)["num_pred"] == int(truth.max())  # and it is right
    # the vector outputs agree with the label image: ids 1..N, one polygon and one CSV row each
    rows = utils.read_csv(tmp_path / "small_nuclei.csv")
    features = json.loads((tmp_path / "small.geojson").read_text())["features"]
    assert [int(r["id"]) for r in rows] == list(range(1, outcome.nuclei + 1))
    assert sorted(f["properties"]["id"] for f in features) == list(range(1, outcome.nuclei + 1))
    assert sorted(np.unique(labels[labels > 0]).tolist()) == list(range(1, outcome.nuclei + 1))
    r = rows[len(rows) // 2]  # a centroid in level-0 pixels lies on its own nucleus in the label image
    assert labels[int(round(float(r["centroid_y"]))), int(round(float(r["centroid_x"])))] == int(r["id"])
    assert "area_um2" in rows[0] and (tmp_path / "small_tissue.png").is_file()
    assert (tmp_path / "small_overview.png").is_file()
    assert outcome.windows > 0 and outcome.tissue_area_mm2 > 0 and outcome.mpp == pytest.approx(0.25)
    # post-processing in a worker process gives the same bytes (and --geojson_gzip the same GeoJSON, gzipped)
    import gzip

    out2 = tmp_path / "workers"
    options2 = _options(num_workers=1, geojson_gzip=True)
    drawn = []
    draw = wsi.draw_pictures

    def spy(pool, *args):
        drawn.append(pool is not None)
        return draw(pool, *args)

    monkeypatch.setattr(wsi, "draw_pictures", spy)
    assert wsi.predict_slide(_predictor(options2), path, "small", out2, options2).status == "ok"
    assert gzip.decompress((out2 / "small.geojson.gz").read_bytes()) == (tmp_path / "small.geojson").read_bytes()
    # the pictures are drawn by the worker (while this process writes the label image): the same pictures
    assert drawn == [True]
    for f in ("small_nuclei.csv", "small_labels.tif", "small_overview.png", "small_confidence.png",
              "small_tissue.png"):
        assert (out2 / f).read_bytes() == (tmp_path / f).read_bytes()


def test_region_maps_are_the_whole_image_maps_bit_for_bit(small_slide):
    """Every region's stitched maps (crop = core + margin), with the window cache carried from region to
    region as in a run, equal the whole-image `stitch_maps` there exactly."""
    import slides
    import tissue

    path, image, _ = small_slide
    fg, hv = inference.stitch_maps(image, 256, 64, pure_maps, batch_size=5)
    with slides.open_slide(path) as slide:
        geo = wsi.slide_geometry(slide.dimensions, 1.0, 256, 64, path)
        regions = wsi.plan_regions(geo, wsi.window_flags(geo, tissue.full_mask(slide.dimensions)), 384)
        assert len(regions) == 9
        cache: dict = {}
        ran = 0
        for k, region in enumerate(regions):
            y0, x0, y1, x1 = region.box
            rgb = slide.read_scaled((x0, y0, x1 - x0, y1 - y0), 1.0)
            following = set(regions[k + 1].windows) if k + 1 < len(regions) else set()
            rfg, rhv, n = wsi.stitch_region(region, rgb, geo, pure_maps, 5, cache, following)
            ran += n
            cy0, cx0, cy1, cx1 = region.crop
            assert np.array_equal(rfg, fg[cy0:cy1, cx0:cx1]) and np.array_equal(rhv, hv[:, cy0:cy1, cx0:cx1])
    assert ran < sum(len(r.windows) for r in regions)  # shared windows were not run twice


def test_a_run_reads_only_the_crop_and_the_windows_it_runs(small_slide):
    """`run_boxes`: each region of a run reads its crop and the windows not run by an earlier region (their maps
    come from the cache), less than `Region.box` in all, and its maps are still the whole-image maps."""
    import slides
    import tissue

    path, image, _ = small_slide
    fg, hv = inference.stitch_maps(image, 256, 64, pure_maps, batch_size=5)
    with slides.open_slide(path) as slide:
        geo = wsi.slide_geometry(slide.dimensions, 1.0, 256, 64, path)
        regions = wsi.plan_regions(geo, wsi.window_flags(geo, tissue.full_mask(slide.dimensions)), 384)
        boxes = wsi.run_boxes(regions, geo)
        area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
        assert boxes[0] == regions[0].box and sum(map(area, boxes)) < sum(area(r.box) for r in regions)
        cache: dict = {}
        for k, (region, box) in enumerate(zip(regions, boxes)):
            c = region.crop
            assert box[0] <= c[0] and box[1] <= c[1] and box[2] >= c[2] and box[3] >= c[3]
            rgb = slide.read_scaled((box[1], box[0], box[3] - box[1], box[2] - box[0]), 1.0)
            if k == 1:   # without the cache this region's windows reach outside what it read
                with pytest.raises(RuntimeError, match="outside the pixels read"):
                    wsi.stitch_region(region, rgb, geo, pure_maps, 5, {}, set(), box[:2])
            later = set().union(*(r.windows for r in regions[k + 1:]))
            rfg, rhv, _ = wsi.stitch_region(region, rgb, geo, pure_maps, 5, cache, later, box[:2])
            cy0, cx0, cy1, cx1 = c
            assert np.array_equal(rfg, fg[cy0:cy1, cx0:cx1]) and np.array_equal(rhv, hv[:, cy0:cy1, cx0:cx1])


@pytest.mark.parametrize("room", ["shared memory", "none"])
def test_workers_get_the_maps_through_shared_memory_or_pickles_with_the_same_bytes(small_slide, tmp_path,
                                                                                     monkeypatch, room):
    """With workers, each region's maps and RGB go through a file in shared memory (`utils.ArrayHandoff`), or by
    pickle where there is none; the outputs are the in-process run's bytes (the files rewritten region after
    region), and no file is left behind."""
    path, _, _ = small_slide
    shm = tmp_path / "shm"
    if room == "shared memory":
        shm.mkdir()
    monkeypatch.setattr(utils, "SHARED_MEMORY_DIR", str(shm))
    packed = []
    pack = utils.ArrayHandoff.pack

    files = set()

    def counting(self, arrays):
        result = pack(self, arrays)
        packed.append(result is not None)
        if result is not None:
            files.add(result["file"])
        return result

    monkeypatch.setattr(utils.ArrayHandoff, "pack", counting)
    options = _options(num_workers=1)
    assert wsi.predict_slide(_predictor(options), path, "s", tmp_path / "w", options).status == "ok"
    assert len(packed) == 9 and all(packed) == (room == "shared memory") and not any(packed) == (room == "none")
    if room == "shared memory":
        assert list(shm.iterdir()) == []
        # one worker: at most 1 + QUEUED_REGIONS + 1 regions handed over at once, their files rewritten for the next
        assert len(files) <= 2 + wsi.QUEUED_REGIONS
    options0 = _options()
    assert wsi.predict_slide(_predictor(options0), path, "s", tmp_path / "p", options0).status == "ok"
    assert _outputs(tmp_path / "w", "s") == _outputs(tmp_path / "p", "s")


def test_reused_columns_hand_cases():
    assert wsi.reused_columns(None, (0, 0, 10, 10)) == 0
    assert wsi.reused_columns((0, 0, 10, 30), (0, 20, 10, 50)) == 10      # the left neighbour's last 10 columns
    assert wsi.reused_columns((0, 0, 10, 30), (2, 20, 8, 25)) == 5        # all of a box inside it
    assert wsi.reused_columns((1, 0, 10, 30), (0, 20, 10, 50)) == 0       # not over the box's whole height
    assert wsi.reused_columns((0, 0, 9, 30), (0, 20, 10, 50)) == 0
    assert wsi.reused_columns((0, 0, 10, 30), (0, 30, 10, 50)) == 0       # side by side, nothing shared
    assert wsi.reused_columns((0, 25, 10, 60), (0, 20, 10, 50)) == 0      # shared columns not on the left


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.73])
def test_a_read_that_shares_columns_with_the_previous_one_gives_the_same_pixels(small_slide, scale):
    """`read_box`: the columns shared with the previous region's box are copied from its pixels and only the rest
    is read, at the slide's own pixel size and resampled; the pixels are those of a read of the whole box."""
    import slides

    path, _, _ = small_slide
    asked = []
    with slides.open_slide(path) as slide:
        def read(b):
            asked.append(b)
            return slide.read_scaled(b, scale)

        first, second, inside = (3, 5, 300, 250), (3, 200, 300, 420), (40, 260, 120, 400)
        rgb1 = wsi.read_box(read, first)
        rgb2 = wsi.read_box(read, second, (first, rgb1))
        assert asked == [(5, 3, 245, 297), (250, 3, 170, 297)]   # (x, y, w, h): 50 columns not read again
        assert np.array_equal(rgb2, slide.read_scaled((200, 3, 220, 297), scale))
        asked.clear()
        rgb3 = wsi.read_box(read, inside, (second, lambda: rgb2))
        assert asked == [] and np.array_equal(rgb3, slide.read_scaled((260, 40, 140, 80), scale))


class Interrupt(KeyboardInterrupt):
    pass


def _stop_after(n: int):
    """An `on_region_done` that interrupts the run after its n-th region."""
    def stop(k):
        if k == n:
            raise Interrupt

    return stop


def test_resume_after_interruption_equals_uninterrupted_run(small_slide, tmp_path):
    path, _, _ = small_slide
    options = _options()
    full = tmp_path / "full"
    assert wsi.predict_slide(_predictor(options), path, "s", full, options).status == "ok"

    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        wsi.predict_slide(_predictor(options), path, "s", out, options, on_region_done=_stop_after(2))
    state = utils.read_json(wsi.progress_dir(out, "s") / "state.json")
    assert len(state["regions"]) == 2 and not state["complete"]
    assert not (out / "s.geojson").exists()
    # the GeoJSON and CSV written while the regions ran are dropped: no temporary file left beside the outputs
    assert sorted(p.name for p in out.iterdir()) == [".progress"]
    seen = []
    outcome = wsi.predict_slide(_predictor(options), path, "s", out, options, on_region_done=seen.append)
    assert outcome.status == "ok" and len(seen) == 9 - 2  # 3 x 3 regions, 2 were done
    assert _outputs(out, "s") == _outputs(full, "s")
    # complete: skipped; --overwrite: done again, same bytes
    again = wsi.predict_slide(_predictor(options), path, "s", out, options, on_region_done=seen.append)
    assert again.status == "skipped" and again.nuclei == outcome.nuclei and len(seen) == 7
    redo = _options(overwrite=True)
    assert wsi.predict_slide(_predictor(redo), path, "s", out, redo, on_region_done=seen.append).status == "ok"
    assert len(seen) == 16 and _outputs(out, "s") == _outputs(full, "s")


class _AcceleratorStandIn:
    """`pure_maps` as a maps function on an accelerator (`accelerator`): a slide's batches run ahead of the
    blending in a thread of their own (`inference.MapsAhead`)."""
    accelerator = True

    def __init__(self) -> None:
        import threading

        self.threads: set = set()
        self.windows = 0
        self.lock = threading.Lock()

    def __call__(self, tiles: list) -> list:
        import threading

        with self.lock:
            self.threads.add(threading.current_thread().name)
            self.windows += len(tiles)
        return pure_maps(tiles)


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_run_ahead_on_an_accelerator_give_the_same_bytes_and_resume(small_slide, tmp_path, workers):
    path = small_slide[0]
    options = _options(num_workers=workers)
    inline = wsi.predict_slide(_predictor(options), path, "s", tmp_path / "inline", options)
    stand_in = _AcceleratorStandIn()
    outcome = wsi.predict_slide(_predictor(options, stand_in), path, "s", tmp_path / "ahead", options)
    assert inline.status == outcome.status == "ok", outcome.error
    assert _outputs(tmp_path / "ahead", "s") == _outputs(tmp_path / "inline", "s")
    assert stand_in.windows == outcome.windows == inline.windows     # every window once
    assert stand_in.threads == {"maps-ahead_0"}                      # never in line

    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        wsi.predict_slide(_predictor(options, _AcceleratorStandIn()), path, "s", out, options,
                          on_region_done=_stop_after(3))
    again = wsi.predict_slide(_predictor(options, _AcceleratorStandIn()), path, "s", out, options)
    assert again.status == "ok" and _outputs(out, "s") == _outputs(tmp_path / "inline", "s")


def test_slide_at_another_pixel_size_is_read_at_the_models(tmp_path):
    """A 0.5 µm/px slide: windows at the model's 0.25 µm/px (read_scaled 2x), outputs in level-0 pixels."""
    image, truth = synthetic_slide(900, 800, seed=6)
    small = dataset.resize_image(image, (450, 400))
    path = tmp_path / "half.tif"
    sample_data.write_pyramidal_tiff(path, small, 2 * dataset.NUINSSEG_MPP, tile_size=128)
    options = _options(region_size=256)
    outcome = wsi.predict_slide(_predictor(options), path, "half", tmp_path, options)
    assert outcome.status == "ok", outcome.error
    labels = tifffile.imread(tmp_path / "half_labels.tif")
    assert labels.shape == (450, 400) and outcome.mpp == pytest.approx(0.5)
    whole = inference.predict_image(None, small, 256, 64, mpp=0.5, maps_fn=pure_maps, postprocess=PP)
    m = metrics.instance_metrics(whole, labels)
    assert abs(m["num_pred"] - m["num_true"]) <= 0.02 * m["num_true"] and m["iou_sum"] / m["tp"] > 0.85
    rows = utils.read_csv(tmp_path / "half_nuclei.csv")
    areas_um2 = np.array([float(r["area_um2"]) for r in rows])
    areas_px = np.array([float(r["area_px"]) for r in rows])
    assert np.allclose(areas_um2, areas_px * 0.25)  # level-0 pixels of 0.5 µm
    assert 10 < np.median(areas_px) < 80  # discs of radius 5-9 at 0.25 µm/px -> r 2.5-4.5 here


def test_bad_inputs_one_line_each_the_rest_finish(tiny_model, tmp_path, capsys):  # noqa: F811
    from PIL import Image

    image, _ = synthetic_slide(600, 700, seed=7)
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(image[:200, :200]).save(d / "plain.png")
    sample_data.write_pyramidal_tiff(d / "good.tif", image, 0.25, tile_size=256)
    sample_data.write_pyramidal_tiff(d / "aperio.svs", image[:, ::-1].copy(), 0.25, tile_size=256,
                                     description=sample_data.aperio_description(700, 600, 0.25, 256))
    sample_data.write_pyramidal_tiff(d / "nompp.tif", image, None, tile_size=256)
    sample_data.write_pyramidal_tiff(d / "blank.tif", np.full((600, 700, 3), 245, np.uint8), 0.25, tile_size=256)
    sample_data.write_pyramidal_tiff(d / "tiny.tif", image[:160, :160], 0.25, tile_size=128)
    good = (d / "good.tif").read_bytes()
    (d / "truncated.tif").write_bytes(good[: len(good) // 2])
    (d / "garbage.svs").write_bytes(b"not a slide at all" * 100)
    out = tmp_path / "out"
    args = ["-q", "predict", "--model_path", str(tiny_model), "--input", str(d / "*"), "--output_dir", str(out),
            "--tile_size", "256", "--overlap", "64", "--device", "cpu", "--region_size", "512"]
    status = main.main(args)
    err = capsys.readouterr().err
    assert status == 1
    lines = [line for line in err.splitlines() if line.startswith("error: ") and "(skipped)" in line]
    failed = {name: [line for line in lines if name in line] for name in
              ("garbage.svs", "truncated.tif", "nompp.tif", "tiny.tif")}
    assert all(len(v) == 1 for v in failed.values()), lines
    assert "--mpp" in failed["nompp.tif"][0] and "window" in failed["tiny.tif"][0]
    assert len(lines) == 4
    summary = {Path(r["image"]).name: r for r in utils.read_csv(out / "summary.csv")}
    assert {k for k, r in summary.items() if r["status"] == "ok"} == {"plain.png", "good.tif", "aperio.svs",
                                                                       "blank.tif"}
    assert summary["aperio.svs"]["kind"] == "slide" and summary["plain.png"]["kind"] == "image"
    assert summary["blank.tif"]["nuclei"] == "0" and float(summary["blank.tif"]["tissue_area_mm2"]) == 0.0
    assert summary["plain.png"]["tissue_area_mm2"] == "" and summary["good.tif"]["mpp"] == "0.25"
    assert (out / "blank.geojson").is_file() and (out / "blank_tissue.png").is_file()
    # a tissue mask of the wrong kind: one line, exit 2 before any work, nothing written
    (tmp_path / "mask.txt").write_text("not a mask")
    out2 = tmp_path / "out2"
    assert main.main(args[:-10] + ["--output_dir", str(out2), "--tissue_mask", str(tmp_path / "mask.txt"),
                                   "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "mask.txt" in err[0]
    assert not out2.exists()


def test_real_network_on_the_real_sample_mosaic(real_sample_dir, tmp_path, one_torch_thread, report):
    """The 8 x 8 mosaic of the real NuInsSeg sample (4096², 0.25 µm/px, pyramidal TIFF) through a real
    network (small, random weights: this checks that the two paths agree, not accuracy): slide path vs
    whole-image path, nuclei counts within 1 %, PQ between the two >= 0.97. A random network's foreground
    is low everywhere, so the threshold is set at its 70th percentile (~900 'nuclei')."""
    import time

    import nuclei_model

    start = time.time()
    image, _ = sample_data.real_sample_mosaic(real_sample_dir, n=8)
    path = tmp_path / "mosaic.tif"
    sample_data.write_pyramidal_tiff(path, image, dataset.NUINSSEG_MPP, tile_size=256)
    config = {"input_size": 64, "pretrained": None, "head": "hv", "lora_rank": 2, "lora_alpha": 2.0,
              "train_only_lora": False, "mpp": dataset.NUINSSEG_MPP, "tile_size": 512}
    utils.set_seed(0)
    net = nuclei_model.build_model(config, pretrained=None)
    model_path = tmp_path / "tiny.pth"
    nuclei_model.save_checkpoint(model_path, net, config, dict(PP), fold=0, epoch=1, val={"pq": 0.1}, monitor="pq")
    options = predict.PredictOptions(model_path=str(model_path), device="cpu", tissue_mask="none",
                                     label_image=True, num_workers=0, region_size=2048, batch_size=8)
    predictor = inference.load_predictor(options)
    assert predictor.tile_size == 512 and predictor.overlap == 128
    fg, hv, _ = inference.image_maps(predictor.model_set, image, 512, 128, maps_fn=predictor.maps_fn, batch_size=8)
    settings = dict(PP, fg_threshold=float(np.percentile(fg, 70)))
    whole = inference.labels_from_maps(fg, hv, settings, image.shape[:2])
    del fg, hv
    predictor.postprocess = settings
    outcome = wsi.predict_slide(predictor, path, "mosaic", tmp_path, options)
    assert outcome.status == "ok", outcome.error
    labels = tifffile.imread(tmp_path / "mosaic_labels.tif")
    m = metrics.instance_metrics(whole, labels)
    report(f"mosaic 4096^2, real network: whole-image {m['num_true']} vs slide {m['num_pred']} nuclei, "
           f"PQ {m['pq']:.4f}, {time.time() - start:.0f} s")
    assert m["num_true"] > 500
    assert abs(m["num_pred"] - m["num_true"]) <= 0.01 * m["num_true"], (m["num_pred"], m["num_true"])
    assert m["pq"] >= 0.97, m["pq"]


def test_tissue_mask_file_of_any_size_and_aspect(tiny_model, tmp_path):  # noqa: F811
    """A non-square binary mask image passes the early check of the command and restricts the windows."""
    from PIL import Image

    image, _ = synthetic_slide(600, 900, seed=8)
    path = tmp_path / "wide.tif"
    sample_data.write_pyramidal_tiff(path, image, 0.25, tile_size=256)
    mask = np.zeros((60, 90), np.uint8)
    mask[:, :30] = 255  # the left third is tissue
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert main.main(["-q", "predict", "--model_path", str(tiny_model), "--input", str(path), "--output_dir",
                      str(tmp_path / "cli"), "--tile_size", "256", "--overlap", "64", "--device", "cpu",
                      "--tissue_mask", str(tmp_path / "mask.png")]) == 0
    options = _options(tissue_mask=str(tmp_path / "mask.png"), region_size=256)
    outcome = wsi.predict_slide(_predictor(options), path, "wide", tmp_path, options)
    assert outcome.status == "ok", outcome.error
    rows = utils.read_csv(tmp_path / "wide_nuclei.csv")
    assert rows and max(float(r["centroid_x"]) for r in rows) < 300 + 256  # only windows touching the left third
    assert outcome.tissue_area_mm2 == pytest.approx(600 * 300 * 0.25 ** 2 / 1e6, rel=0.05)


def test_killed_command_resumes_to_the_same_bytes(tmp_path):
    """`python main.py predict` on a slide, killed (SIGKILL) after a few regions, then run again: the outputs
    equal those of an uninterrupted run byte for byte. Real (tiny, random) network, its threshold lowered
    so it finds 'nuclei'."""
    import subprocess
    import sys
    import time

    import nuclei_model

    image, _ = synthetic_slide(1280, 1280, seed=9)
    slide = tmp_path / "k.tif"
    sample_data.write_pyramidal_tiff(slide, image, dataset.NUINSSEG_MPP, tile_size=256)
    config = {"input_size": 64, "pretrained": None, "head": "hv", "lora_rank": 2, "lora_alpha": 2.0,
              "train_only_lora": False, "mpp": dataset.NUINSSEG_MPP, "tile_size": 256}
    utils.set_seed(0)
    model = tmp_path / "m.pth"
    nuclei_model.save_checkpoint(model, nuclei_model.build_model(config, pretrained=None), config,
                                 dict(PP, fg_threshold=0.19), fold=0, epoch=1, val={"pq": 0.1}, monitor="pq")

    def command(out):
        return [sys.executable, str(Path(main.__file__)), "-q", "predict", "--model_path", str(model), "--input",
                str(slide), "--output_dir", str(out), "--tile_size", "256", "--overlap", "64", "--region_size",
                "256", "--device", "cpu", "--tissue_mask", "none", "--label_image"]

    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert subprocess.run(command(full), env=env, capture_output=True).returncode == 0
    state_path = wsi.progress_dir(resumed, "k") / "state.json"
    proc = subprocess.Popen(command(resumed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = len(utils.read_json(state_path)["regions"])
        except Exception:  # not written yet
            done = 0
        if done >= 3:
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    state = utils.read_json(state_path)
    assert 3 <= len(state["regions"]) < 25 and not state["complete"]  # killed in the middle (5 x 5 regions)
    assert not (resumed / "k.geojson").exists()
    assert subprocess.run(command(resumed), env=env, capture_output=True).returncode == 0
    assert utils.read_json(state_path)["complete"]
    assert int(utils.read_csv(full / "summary.csv")[0]["nuclei"]) > 20
    for f in ("k.geojson", "k_nuclei.csv", "k_labels.tif"):
        assert (resumed / f).read_bytes() == (full / f).read_bytes(), f


def _graded_maps(tiles: list) -> list:
    """`pure_maps`, with the foreground probability 0.9 on blue nuclei and 0.55 on the others."""
    out = []
    for tile, (fg, hv) in zip(tiles, pure_maps(tiles)):
        out.append((fg * np.where(tile[..., 2] > 90, 0.9, 0.55).astype(np.float32), hv))
    return out


def test_slide_confidence_columns_overview_and_min_confidence(tmp_path):
    image, truth = synthetic_slide(700, 800, seed=9)
    ids = np.arange(1, int(truth.max()) + 1)
    centres = np.array(ndimage.center_of_mass(truth > 0, truth, ids)).reshape(-1, 2)
    weak_ids = ids[centres[:, 1] < 400]       # nuclei on the left: another colour, weaker maps
    image[np.isin(truth, weak_ids)] = (90, 40, 60)
    path = tmp_path / "graded.tif"
    sample_data.write_pyramidal_tiff(path, image, dataset.NUINSSEG_MPP, tile_size=256)
    options = _options()
    out = tmp_path / "all"
    outcome = wsi.predict_slide(_predictor(options, _graded_maps), path, "graded", out, options)
    assert outcome.status == "ok", outcome.error and outcome.dropped_low_confidence == 0
    rows = utils.read_csv(out / "graded_nuclei.csv")
    assert list(rows[0])[:4] == ["id", "centroid_x", "centroid_y", "confidence"]
    confidence = np.array([float(r["confidence"]) for r in rows])
    left = np.array([truth[int(round(float(r["centroid_y"]))), int(round(float(r["centroid_x"])))] in weak_ids
                     for r in rows])
    assert left.any() and (~left).any()
    assert np.allclose(confidence[left], 0.55, atol=1e-5) and np.allclose(confidence[~left], 0.9, atol=1e-5)
    features = json.loads((out / "graded.geojson").read_text())["features"]
    by_id = {f["properties"]["id"]: {m["name"]: m["value"] for m in f["properties"]["measurements"]} for f in features}
    assert all(by_id[int(r["id"])]["confidence"] == pytest.approx(float(r["confidence"]), rel=1e-5) for r in rows)
    picture = out / "graded_confidence.png"
    assert picture.is_file() and picture.stat().st_size > 1000
    # --min_confidence 0.7 drops exactly the weak nuclei; the others keep their order with ids 1..N
    strict = _options(min_confidence=0.7)
    out2 = tmp_path / "strict"
    outcome2 = wsi.predict_slide(_predictor(strict, _graded_maps), path, "graded", out2, strict)
    assert outcome2.status == "ok", outcome2.error
    assert outcome2.nuclei == int((~left).sum()) and outcome2.dropped_low_confidence == int(left.sum())
    rows2 = utils.read_csv(out2 / "graded_nuclei.csv")
    assert [int(r["id"]) for r in rows2] == list(range(1, outcome2.nuclei + 1))
    kept = [r for r, weak_one in zip(rows, left) if not weak_one]
    assert [(r["centroid_x"], r["centroid_y"]) for r in rows2] == [(r["centroid_x"], r["centroid_y"]) for r in kept]
    labels = tifffile.imread(out2 / "graded_labels.tif")
    assert sorted(np.unique(labels[labels > 0]).tolist()) == list(range(1, outcome2.nuclei + 1))


def test_confidence_picture_counts_the_lower_half_above_the_foreground_threshold():
    """Nucleus pixels all lie above fg_threshold, so confidences start there: the slide's confidence picture
    counts a nucleus as doubtful below halfway between the threshold and 1 (a fixed 0.5 would never count one)."""
    assert wsi.confidence_review_threshold(None) == 0.75
    assert wsi.confidence_review_threshold({}) == 0.75
    assert wsi.confidence_review_threshold({"fg_threshold": 0.3}) == pytest.approx(0.65)


def _real_label_regions(real_sample_dir):
    """Three real NuInsSeg label crops as overlapping regions (one at the slide's edge): crops, origins, id offsets."""
    crops = [tifffile.imread(f).astype(np.uint16)
             for f in sorted(real_sample_dir.glob("*/label masks modify/*.tif"))[:3]]
    origins = [(0, 0), (300, 200), (700, 650)]
    offsets = [0, int(crops[0].max()), int(crops[0].max()) + int(crops[1].max())]
    return crops, origins, offsets


def test_label_tiles_by_views_equal_the_gathers_on_real_labels(real_sample_dir, monkeypatch):
    """`_RegionLabels.read_tile`'s view path (one target pixel per region pixel) gives the same tiles as the
    `np.ix_` gather path it replaces, on real NuInsSeg label crops as regions (overlapping boxes, one at the
    slide's edge, ids offset per region), at scale 1 (views) and at other scales (gathers, unchanged)."""
    crops, origins, offsets = _real_label_regions(real_sample_dir)
    for scale in (1.0, 0.5, 1.7):
        boxes = [(oy, ox, oy + c.shape[0], ox + c.shape[1]) for c, (oy, ox) in zip(crops, origins)]
        raster = wsi._RegionLabels([Path(f"r{i}") for i in range(3)], offsets, boxes, scale)
        monkeypatch.setattr(raster, "_get", lambda i: (crops[i], origins[i]))
        tiles = [(y, x, 256, 320) for y in range(0, int(1300 / scale), 256) for x in range(0, int(1300 / scale), 320)]
        fast = [raster.read_tile(*t) for t in tiles]
        with monkeypatch.context() as m:
            m.setattr(wsi, "_consecutive", lambda index: None)
            slow = [raster.read_tile(*t) for t in tiles]
        assert all(a.dtype == np.uint32 and np.array_equal(a, b) for a, b in zip(fast, slow))
        assert sum(int((a > 0).sum()) for a in fast) > 10000
    assert wsi._consecutive(np.array([3, 4, 5])) == slice(3, 6)
    assert wsi._consecutive(np.array([3, 3, 5])) is None and wsi._consecutive(np.array([], int)) is None


def test_region_file_equals_the_former_composition_on_real_nuclei(real_sample_dir, monkeypatch, tmp_path):
    """`finish_region` after the post-processing (measurements and outlines from one scan, polygon texts from
    digits, rows and measurement texts by templates) writes what the former steps wrote: rows =
    `json.dumps` of `measure_nuclei`'s rows moved to the slide, geometry = `polygon_json` of each
    `ring_table` ring, measurements = `measurements_json` of each row; on a mosaic of real NuInsSeg label maps
    as the post-processing's output, at scale 1 (whole-number corners) and 0.8 (fractions)."""
    import export
    import postprocess

    maps = [tifffile.imread(f).astype(np.int32)[:512, :512]
            for f in sorted(real_sample_dir.glob("*/label masks modify/*.tif"))[:24]]
    maps = sorted(maps, key=lambda m: -len(np.unique(m)))[:4]          # the densest
    labels = np.zeros((1024, 1024), np.int32)
    top = 0
    for k, lab in enumerate(maps):
        y, x = 512 * (k // 2), 512 * (k % 2)
        labels[y:y + lab.shape[0], x:x + lab.shape[1]] = np.where(lab > 0, lab + top, 0)
        top = int(labels.max())
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, labels.shape + (3,)).astype(np.uint8)
    fg = np.where(labels > 0, 0.6 + 0.4 * rng.random(labels.shape), 0.1).astype(np.float32)
    monkeypatch.setattr(postprocess, "postprocess", lambda *a, **k: labels.copy())
    for scale in (1.0, 0.8):
        crop, core = (300, 500, 1324, 1524), (428, 628, 1196, 1396)
        job = {"fg": fg, "hv": None, "rgb": rgb, "settings": PP, "crop": crop, "core": core, "scale": scale,
               "mpp": 0.25, "file": str(tmp_path / f"region_{scale}.npz"), "min_confidence": 0.0}
        result = wsi.finish_region(job)
        data = wsi.read_region_file(Path(job["file"]))
        assert result["nuclei"] == data["nuclei"] > 100
        kept = np.zeros(labels.shape, np.uint32)
        (oy, ox), (h, w) = data["origin"], data["labels_shape"]
        kept[oy - crop[0]:oy - crop[0] + h, ox - crop[1]:ox - crop[1] + w] = data["labels"]
        rows = export.measure_nuclei(kept, rgb, mpp=0.25, foreground=fg)
        for row in rows:
            row["centroid_x"] += crop[1]
            row["centroid_y"] += crop[0]
        rows = [wsi._scale_row(r, scale) for r in rows]
        corners, _, spans = export.ring_table(kept)
        xy = (corners.astype(np.float64) + np.array([crop[1], crop[0]], np.float64)) / scale
        with np.load(job["file"]) as raw:
            assert raw["rows"].tobytes().decode() == json.dumps(rows)
            assert raw["geometry"].tobytes().decode() == "\n".join(export.polygon_json(xy[a:b].tolist())
                                                                   for a, b in spans)
            assert raw["measurements"].tobytes().decode() == "\n".join(export.measurements_json(r) for r in rows)


def test_geojson_and_csv_are_written_while_the_regions_run(small_slide, tmp_path, monkeypatch):
    """`Assembly.feed` runs after every recorded region and adds the regions in order as they come, so that the
    writing overlaps the regions still running (with workers) instead of following the last one; same bytes."""
    path, _, _ = small_slide
    progress = []
    feed = wsi.Assembly.feed

    def watched(self):
        feed(self)
        progress.append((self.added, len(self.state["regions"])))

    monkeypatch.setattr(wsi.Assembly, "feed", watched)
    options = _options(num_workers=1)
    out = tmp_path / "stream"
    assert wsi.predict_slide(_predictor(options), path, "s", out, options).status == "ok"
    during = progress[1:-2]   # the first feed is before any region, the last two are collect's and finish's
    assert progress[0] == (0, 0) and [added for added, _ in during] == list(range(1, 10))
    assert progress[-2:] == [(9, 9), (9, 9)]
    assert all(added == recorded for added, recorded in during)   # regions are recorded in order here
    monkeypatch.setattr(wsi.Assembly, "feed", feed)
    at_once = tmp_path / "at_once"
    options0 = _options()
    assert wsi.predict_slide(_predictor(options0), path, "s", at_once, options0).status == "ok"
    assert _outputs(out, "s") == _outputs(at_once, "s")


def test_with_workers_the_label_image_is_written_while_the_regions_run(small_slide, tmp_path, monkeypatch):
    """`Assembly.stream_labels`: with post-processing workers the label image's tiles are made as soon as the regions
    that reach them are in, before the last region; the same bytes as written at the end, and an interrupted run
    leaves no label image or temporary file behind."""
    import time

    path = small_slide[0]
    tiles = []
    read_tile = wsi._RegionLabels.read_tile

    def counting(self, *args):
        tiles.append(args)
        return read_tile(self, *args)

    monkeypatch.setattr(wsi._RegionLabels, "read_tile", counting)
    seen = []

    def before_the_last_regions(k):
        if k == 8:   # of 9: the first tile rows need 6 regions; their tiles come without waiting for the last
            end = time.time() + 20
            while not tiles and time.time() < end:
                time.sleep(0.01)
            seen.append(len(tiles))

    options = _options(num_workers=1)
    out = tmp_path / "stream"
    assert wsi.predict_slide(_predictor(options), path, "s", out, options,
                             on_region_done=before_the_last_regions).status == "ok"
    assert seen and seen[0] > 0
    at_end = tmp_path / "at_end"
    options0 = _options()
    assert wsi.predict_slide(_predictor(options0), path, "s", at_end, options0).status == "ok"
    assert _outputs(out, "s") == _outputs(at_end, "s")

    stopped = tmp_path / "stopped"
    with pytest.raises(Interrupt):
        wsi.predict_slide(_predictor(options), path, "s", stopped, options, on_region_done=_stop_after(7))
    assert sorted(p.name for p in stopped.iterdir()) == [".progress"]


# ----------------------------------------------------------------------------------------------
# Issue 17, fourth step: finish_region on the kept nuclei's pixel list, rows as columns, assembly
# ----------------------------------------------------------------------------------------------
def _former_finish_region(job: dict, labels: np.ndarray) -> None:
    """`wsi.finish_region` before the pixel-list step (commit fde7839), the post-processing result given."""
    import io
    import zlib

    import export

    fg = np.asarray(job["fg"])
    cy0, cx0, cy1, cx1 = job["crop"]
    ky0, kx0, ky1, kx1 = job["core"]
    min_confidence = float(job.get("min_confidence", 0.0) or 0.0)
    width = labels.shape[1]
    flat = labels.ravel()
    pix = np.flatnonzero(flat != 0)   # (on a bool array: several times faster than on the labels)
    n = dropped = 0
    kept = np.zeros(labels.shape, np.uint32)
    if pix.size:
        lab = flat[pix]
        top = int(lab.max())
        area = np.bincount(lab, minlength=top + 1).astype(np.float64)
        present = area > 0
        safe = np.where(present, area, 1.0)
        # centroid of every instance (the same sums as ndimage.center_of_mass), rounded to its pixel
        cy = np.bincount(lab, weights=pix // width, minlength=top + 1) / safe
        cx = np.bincount(lab, weights=pix % width, minlength=top + 1) / safe
        gy = np.floor(cy + 0.5).astype(np.int64) + cy0
        gx = np.floor(cx + 0.5).astype(np.int64) + cx0
        in_core = present & (gy >= ky0) & (gy < ky1) & (gx >= kx0) & (gx < kx1)
        in_core[0] = False
        if min_confidence > 0:
            confidence = np.bincount(lab, weights=fg.ravel()[pix].astype(np.float64), minlength=top + 1) / safe
            low = in_core & (confidence < min_confidence)
            dropped = int(low.sum())
            in_core &= ~low
        n = int(in_core.sum())
        lut = np.zeros(top + 1, np.uint16 if n < 65536 else np.uint32)   # already the region file's label dtype
        lut[in_core] = np.arange(1, n + 1, dtype=lut.dtype)
        kept = lut[labels]
    scale = float(job["scale"])
    rows: list[dict] = []
    geometry: list[str] = []
    if n:
        # measurements and outlines from one scan of the kept labels
        rows, (corners, _, spans) = export.measure_and_outline(kept, job["rgb"], mpp=job["mpp"], foreground=fg)
    for row in rows:  # region crop -> target grid of the whole slide
        row["centroid_x"] += cx0
        row["centroid_y"] += cy0
    rows = [wsi._scale_row(r, scale) for r in rows]
    if n:
        xy = corners.astype(np.float64) + np.array([cx0, cy0], np.float64)
        if scale != 1.0:
            xy = xy / scale
        geometry = export.polygons_json(xy, spans)
    rows_text, measurements = export.rows_and_measurements_json(rows)
    # the kept instances' bounding box in target pixels, as compact as their count allows
    if n:
        rr = np.flatnonzero(kept.any(axis=1))
        cc = np.flatnonzero(kept.any(axis=0))
        by0, by1, bx0, bx1 = int(rr[0]), int(rr[-1]) + 1, int(cc[0]), int(cc[-1]) + 1
        crop_labels = kept[by0:by1, bx0:bx1]
    else:
        by0 = bx0 = 0
        crop_labels = np.zeros((0, 0), np.uint32)
    crop_labels = np.ascontiguousarray(crop_labels.astype(np.uint16 if n < 65536 else np.uint32, copy=False))
    path = Path(job["file"])
    buffer = io.BytesIO()
    # the label crop is mostly zeros: zlib level 1 packs it about as well as the default level, several times faster
    np.savez(buffer, labels_z=np.frombuffer(zlib.compress(crop_labels.tobytes(), 1), np.uint8),
             labels_shape=np.array(crop_labels.shape, np.int64), labels_dtype=np.array(crop_labels.dtype.str),
             origin=np.array([by0 + cy0, bx0 + cx0], np.int64), nuclei=np.array(n, np.int64),
             dropped=np.array(dropped, np.int64),
             rows=np.frombuffer(rows_text.encode(), np.uint8),
             geometry=np.frombuffer("\n".join(geometry).encode(), np.uint8),
             measurements=np.frombuffer("\n".join(measurements).encode(), np.uint8))
    utils.atomic_write_bytes(path, buffer.getvalue())  # flushed to disk before state.json records the region


def _former_read_tile(self, y: int, x: int, h: int, w: int) -> np.ndarray:
    """`wsi._RegionLabels.read_tile` before this step (commit fde7839)."""
    out = np.zeros((h, w), np.uint32)
    if not len(self.boxes):
        return out
    s = self.scale
    ty0, ty1 = math.floor((y + 0.5) * s), math.floor((y + h - 0.5) * s) + 1
    tx0, tx1 = math.floor((x + 0.5) * s), math.floor((x + w - 0.5) * s) + 1
    b = self.boxes
    hits = np.flatnonzero((b[:, 0] < ty1) & (b[:, 2] > ty0) & (b[:, 1] < tx1) & (b[:, 3] > tx0)
                          & (b[:, 2] > b[:, 0]))
    rows_t = np.floor((np.arange(y, y + h) + 0.5) * s).astype(np.int64)
    cols_t = np.floor((np.arange(x, x + w) + 0.5) * s).astype(np.int64)
    for i in hits.tolist():
        labels, (oy, ox) = self._get(i)
        r = rows_t - oy
        c = cols_t - ox
        rv = np.flatnonzero((r >= 0) & (r < labels.shape[0]))
        cv = np.flatnonzero((c >= 0) & (c < labels.shape[1]))
        if not rv.size or not cv.size:
            continue
        rs, cs = wsi._consecutive(r[rv]), wsi._consecutive(c[cv])
        if rs is not None and cs is not None:
            # one target pixel per region pixel (scale 1, or any run of distinct rows / columns): views,
            # no gathers; rv and cv are runs too (r and c never decrease)
            sub = labels[rs, cs]
            target = out[rv[0]:rv[-1] + 1, cv[0]:cv[-1] + 1]
            np.add(sub, np.uint32(self.offsets[i]), out=target, where=sub > 0, casting="unsafe")
            continue
        sub = labels[np.ix_(r[rv], c[cv])].astype(np.uint32)
        target = out[np.ix_(rv, cv)]
        nz = sub > 0
        target[nz] = sub[nz] + np.uint32(self.offsets[i])
        out[np.ix_(rv, cv)] = target
    return out


def _real_mosaic(real_sample_dir, side: int = 1024) -> np.ndarray:
    """The densest real NuInsSeg label maps side by side (ids made distinct), as a post-processing result."""
    maps = [tifffile.imread(f).astype(np.int32)[:512, :512]
            for f in sorted(real_sample_dir.glob("*/label masks modify/*.tif"))[:24]]
    maps = sorted(maps, key=lambda m: -len(np.unique(m)))[:(side // 512) ** 2]
    labels = np.zeros((side, side), np.int32)
    top = 0
    for k, lab in enumerate(maps):
        y, x = 512 * (k // (side // 512)), 512 * (k % (side // 512))
        labels[y:y + lab.shape[0], x:x + lab.shape[1]] = np.where(lab > 0, lab + top, 0)
        top = int(labels.max())
    return labels


def _region_cases(real_sample_dir):
    """(labels, job) pairs: real nuclei with the core inside the crop, the core = the crop (nuclei cut by the crop
    border kept), min_confidence, scale 0.8, no nucleus in the core, an empty map, > 65,535 instances (uint32)."""
    rng = np.random.default_rng(0)
    labels = _real_mosaic(real_sample_dir)
    rgb = rng.integers(0, 256, labels.shape + (3,)).astype(np.uint8)
    fg = np.where(labels > 0, 0.6 + 0.4 * rng.random(labels.shape), 0.1).astype(np.float32)
    crop = (300, 500, 1324, 1524)
    base = {"fg": fg, "hv": None, "rgb": rgb, "settings": PP, "crop": crop, "mpp": 0.25, "min_confidence": 0.0}
    yield labels, dict(base, core=(428, 628, 1196, 1396), scale=1.0)
    yield labels, dict(base, core=crop, scale=1.0)
    yield labels, dict(base, core=(428, 628, 1196, 1396), scale=1.0, min_confidence=0.8)
    yield labels, dict(base, core=(428, 628, 1196, 1396), scale=0.8)
    yield labels, dict(base, core=(300, 500, 301, 501), scale=1.0)
    yield np.zeros_like(labels), dict(base, core=crop, scale=1.0)
    many = np.zeros((600, 700), np.int32)
    many[::2, ::2] = np.arange(1, 300 * 350 + 1).reshape(300, 350)       # 105,000 one-pixel nuclei
    many[50:60, 40:49] = 7
    yield many, {"fg": rng.random(many.shape).astype(np.float32), "hv": None, "settings": PP,
                 "rgb": rng.integers(0, 256, many.shape + (3,)).astype(np.uint8), "crop": (20, 30, 620, 730),
                 "core": (20, 30, 620, 730), "mpp": 0.5, "scale": 1.0, "min_confidence": 0.0}


def test_region_file_from_the_pixel_list_equals_the_former_finish_region(real_sample_dir, monkeypatch, tmp_path):
    """`finish_region` (the kept nuclei as a pixel list, measured over their bounding box with the seam rule's
    sums; the rows also stored as typed columns) writes every array of the former `finish_region` unchanged (label
    crop, origin, rows, geometry, measurements, ...; the label crop's zlib stream inflates to the same bytes), and
    its columns are the rows' values themselves; on real NuInsSeg nuclei and the edge cases of `_region_cases`."""
    import zlib

    import postprocess

    sizes = []
    for k, (labels, job) in enumerate(_region_cases(real_sample_dir)):
        monkeypatch.setattr(postprocess, "postprocess", lambda *a, **kw: labels.copy())
        job = dict(job, file=str(tmp_path / f"new_{k}.npz"))
        result = wsi.finish_region(job)
        _former_finish_region(dict(job, file=str(tmp_path / f"old_{k}.npz")), labels.copy())
        with np.load(tmp_path / f"old_{k}.npz") as old, np.load(job["file"]) as new:
            assert set(old.files) <= set(new.files)
            for key in old.files:
                if key == "labels_z":   # zlib's stream then, zlib-ng's now (`utils.deflate`): the same bytes inflated
                    assert zlib.decompress(old[key].tobytes()) == zlib.decompress(new[key].tobytes()), k
                    continue
                assert old[key].dtype == new[key].dtype and np.array_equal(old[key], new[key]), (k, key)
            assert np.array_equal(wsi._region_labels(old), wsi._region_labels(new))
            rows = json.loads(old["rows"].tobytes().decode())
            added = sorted(set(new.files) - set(old.files))
            assert added == sorted(wsi.COLUMN_PREFIX + key for key in (rows[0] if rows else {}))
            for key in (rows[0] if rows else {}):
                values = new[wsi.COLUMN_PREFIX + key].tolist()
                assert values == [row[key] for row in rows]
                assert [type(v) for v in values] == [type(row[key]) for row in rows]
            sizes.append((int(old["nuclei"]), str(old["labels_dtype"])))
        data = wsi.read_region_file(Path(job["file"]), rows=False)
        assert data["rows"] is None and result["nuclei"] == data["nuclei"]
    assert sizes[0][0] > 100 and sizes[1][0] > sizes[0][0] and sizes[2][0] < sizes[0][0] and sizes[4][0] == 0
    assert sizes[5] == (0, "<u2") and sizes[6][0] > 65535 and sizes[6][1] == "<u4"


def test_coordinate_sums_in_one_bincount_equal_two():
    """`_coordinate_sums` (rows and columns packed into one float64 weight when they fit in 53 bits) gives the
    two `bincount`s' sums exactly; with a huge instance, where they do not fit, it takes two `bincount`s."""
    rng = np.random.default_rng(4)
    for shape, big in (((300, 410), False), ((5000, 5000), True)):
        if big:   # one instance of 5000 * 5000 pixels: (H - 1) * count * 2**k > 2**53
            pix = np.arange(shape[0] * shape[1], dtype=np.int64)
            lab = np.ones(pix.size, np.int32)
        else:
            flat = rng.integers(0, 200, shape[0] * shape[1]).astype(np.int32)
            flat[rng.random(flat.size) < 0.5] = 0
            pix = np.flatnonzero(flat)
            lab = flat[pix]
        count = np.bincount(lab)
        sum_r, sum_c = wsi._coordinate_sums(pix, lab, shape, count)
        assert np.array_equal(sum_r, np.bincount(lab, weights=pix // shape[1], minlength=len(count)))
        assert np.array_equal(sum_c, np.bincount(lab, weights=pix % shape[1], minlength=len(count)))
        assert sum_r.dtype == sum_c.dtype == np.float64


def test_region_labels_inflated_by_libdeflate_equal_zlib(real_sample_dir, monkeypatch, tmp_path):
    """The region labels inflated by imagecodecs' libdeflate are zlib's bytes; without imagecodecs zlib is used."""
    import sys
    import zlib

    labels = _real_mosaic(real_sample_dir).astype(np.uint16)[100:900, 50:1000]
    for dtype in (np.uint16, np.uint32):
        crop = np.ascontiguousarray(labels.astype(dtype))
        np.savez(tmp_path / "r.npz", labels_z=np.frombuffer(zlib.compress(crop.tobytes(), 1), np.uint8),
                 labels_shape=np.array(crop.shape, np.int64), labels_dtype=np.array(crop.dtype.str))
        with np.load(tmp_path / "r.npz") as data:
            fast = wsi._region_labels(data)
            with monkeypatch.context() as m:
                m.setitem(sys.modules, "imagecodecs", None)     # import fails: zlib
                slow = wsi._region_labels(data)
        assert fast.dtype == slow.dtype == dtype and np.array_equal(fast, crop) and np.array_equal(slow, crop)
    np.savez(tmp_path / "e.npz", labels_z=np.frombuffer(zlib.compress(b"", 1), np.uint8),
             labels_shape=np.array((0, 0), np.int64), labels_dtype=np.array("<u2"))
    with np.load(tmp_path / "e.npz") as data:
        assert wsi._region_labels(data).shape == (0, 0)


def test_label_tiles_equal_the_former_read_tile_on_real_labels(real_sample_dir):
    """`_RegionLabels.read_tile` (at scale 1 the rows and columns taken as runs without checking) gives the
    former `read_tile`'s tiles, on real NuInsSeg label crops as overlapping regions, at scales 1, 0.5 and 1.7."""
    crops, origins, offsets = _real_label_regions(real_sample_dir)
    for scale in (1.0, 0.5, 1.7):
        boxes = [(oy, ox, oy + c.shape[0], ox + c.shape[1]) for c, (oy, ox) in zip(crops, origins)]
        raster = wsi._RegionLabels([Path(f"r{i}") for i in range(3)], offsets, boxes, scale)
        raster._get = lambda i: (crops[i], origins[i])
        tiles = [(y, x, 256, 320) for y in range(0, int(1300 / scale), 256) for x in range(0, int(1300 / scale), 320)]
        tiles += [(5, 7, 1, 1), (0, 0, 2000, 13)]
        for t in tiles:
            new, old = raster.read_tile(*t), _former_read_tile(raster, *t)
            assert new.dtype == old.dtype == np.uint32 and np.array_equal(new, old)


def test_assembly_from_row_columns_equals_assembly_from_row_json(real_sample_dir, monkeypatch, tmp_path):
    """`Assembly` reading the rows' columns writes the bytes it writes from the rows' JSON (region files without
    the columns, as before this step): GeoJSON, CSV, label pyramid, and the same centroids and confidences."""
    import postprocess
    from types import SimpleNamespace

    labels = _real_mosaic(real_sample_dir, 1024)
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, labels.shape + (3,)).astype(np.uint8)
    fg = np.where(labels > 0, 0.6 + 0.4 * rng.random(labels.shape), 0.1).astype(np.float32)
    geo = wsi.slide_geometry((1100, 1000), 1.0, 256, 64, tmp_path / "slide.tif")
    regions = wsi.plan_regions(geo, np.ones((len(geo.ys), len(geo.xs)), bool), 512)
    assert len(regions) > 2
    with_columns, without = tmp_path / "with", tmp_path / "without"
    with_columns.mkdir()
    without.mkdir()
    state = {"regions": {}}
    for region in regions:
        (y0, x0, y1, x1), core = region.crop, region.core
        job = {"fg": fg[:y1 - y0, :x1 - x0], "hv": None, "rgb": rgb[:y1 - y0, :x1 - x0], "settings": PP,
               "crop": region.crop, "core": core, "scale": 1.0, "mpp": 0.25, "min_confidence": 0.0,
               "file": str(with_columns / f"region_{region.index:06d}.npz")}
        monkeypatch.setattr(postprocess, "postprocess",
                            lambda *a, _h=y1 - y0, _w=x1 - x0, **kw: labels[:_h, :_w].copy())
        wsi.finish_region(job)
        with np.load(job["file"]) as data:
            arrays = {k: data[k] for k in data.files if not k.startswith(wsi.COLUMN_PREFIX)}
        np.savez(without / f"region_{region.index:06d}.npz", **arrays)
        state["regions"][str(region.index)] = {"file": f"region_{region.index:06d}.npz"}
    results = []
    for pdir in (with_columns, without):
        out = tmp_path / f"out_{pdir.name}"
        out.mkdir()
        outputs = {"geojson": out / "s.geojson", "csv": out / "s_nuclei.csv", "labels": out / "s_labels.tif"}
        total, centroids, confidence = wsi.assemble(out, "s", outputs, regions, dict(state), pdir, geo, 0.25,
                                                    (1000, 1100), SimpleNamespace(geojson_gzip=False))
        results.append((total, centroids, confidence, [p.read_bytes() for p in outputs.values()]))
    (n1, c1, f1, b1), (n2, c2, f2, b2) = results
    assert n1 == n2 > 100 and np.array_equal(c1, c2) and np.array_equal(f1, f2) and c1.dtype == np.float32
    assert b1 == b2


def test_warm_worker_imports_what_regions_and_pictures_need():
    # a worker pays its imports while it waits for its first region, not at the end of the slide where the device
    # is done and everything waits on the pictures (matplotlib: about 0.3 s of CPU); it loads (or compiles) the
    # post-processing's compiled kernels there too, for the types a region uses, and then freezes the objects made
    code = ("import gc, sys, wsi, jit_kernels; before = set(sys.modules); wsi.warm_worker(); "
            "print(sorted(m for m in ('export', 'postprocess', 'matplotlib.figure', "
            "'matplotlib.backends.backend_agg') if m in sys.modules and m not in before)); "
            "print(gc.get_freeze_count() > 10000); "
            "print(not jit_kernels.AVAILABLE or all(getattr(jit_kernels, k).signatures for k in "
            "('_energy', '_boxes', '_correlate_axis0', '_correlate_axis1', '_instance_sums')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True).stdout
    assert out.split("\n")[:3] == [str(['export', 'matplotlib.backends.backend_agg', 'matplotlib.figure', 'postprocess']),
                                    "True", "True"]


def test_warm_post_processing_finds_the_two_discs():
    assert wsi.warm_post_processing() == 2


def _pids(pool, n: int) -> set:
    import os

    return {f.result() for f in [pool.submit(os.getpid) for _ in range(4 * n)]}


def test_a_runs_workers_serve_every_slide_and_a_dead_one_is_replaced(small_slide, tmp_path, monkeypatch):
    """`wsi.Workers`: one pool for all the slides of a run (started once; each slide's outputs the same bytes as with
    a pool of the slide's own), and a pool broken by a killed worker is replaced before the next slide."""
    import os
    import signal

    path = small_slide[0]
    options = _options(num_workers=1)
    own = wsi.predict_slide(_predictor(options), path, "s", tmp_path / "own", options)
    assert own.status == "ok", own.error
    started = []
    start = wsi.start_workers
    monkeypatch.setattr(wsi, "start_workers", lambda n: started.append(n) or start(n))
    with wsi.Workers(1) as workers:
        first = workers.pool()
        pid = _pids(first, 1)
        for k in range(2):
            out = tmp_path / f"run{k}"
            outcome = wsi.predict_slide(_predictor(options), path, "s", out, options, workers=workers)
            assert outcome.status == "ok", outcome.error
            assert _outputs(out, "s") == _outputs(tmp_path / "own", "s")
            assert (out / "s_overview.png").read_bytes() == (tmp_path / "own" / "s_overview.png").read_bytes()
        assert started == [1] and workers.pool() is first and _pids(first, 1) == pid
        os.kill(pid.pop(), signal.SIGKILL)   # as the kernel's out-of-memory killer would
        deadline = time.time() + 30
        while workers.pool() is first and time.time() < deadline:   # the pool notices the death within moments
            time.sleep(0.05)
        assert started == [1, 1]
        again = wsi.predict_slide(_predictor(options), path, "s", tmp_path / "after", options, workers=workers)
        assert again.status == "ok", again.error
        assert _outputs(tmp_path / "after", "s") == _outputs(tmp_path / "own", "s")
        last = _pids(workers.pool(), 1)
    assert not any(Path(f"/proc/{p}").exists() for p in last)   # the end of the block ends the processes


def test_workers_submit_replaces_a_pool_that_breaks_between_the_check_and_the_task(monkeypatch):
    """`Workers.submit`: a pool that a worker's death breaks after `pool()` checked it (its test task went in, the real
    one is refused) is shut down and the task goes to new processes, once."""
    from concurrent.futures.process import BrokenProcessPool

    class Pool:
        def __init__(self, breaks_after: int | None) -> None:
            self.breaks_after, self.tasks, self.down = breaks_after, [], False

        def submit(self, fn, *args):
            if self.breaks_after is not None and len(self.tasks) >= self.breaks_after:
                raise BrokenProcessPool("a worker died")
            self.tasks.append((fn, args))
            return (fn, args)

        def shutdown(self, wait=True, cancel_futures=False):
            self.down = True

    fresh = Pool(None)
    monkeypatch.setattr(wsi, "start_workers", lambda n: fresh)
    workers = wsi.Workers(2)
    broken = workers._pool = Pool(breaks_after=1)   # `pool()`'s test task goes in, the next is refused
    assert workers.submit(max, 3, 4) == (max, (3, 4))
    assert broken.down and fresh.tasks == [(max, (3, 4))] and workers.pool() is fresh


def test_predict_starts_the_workers_once_for_all_its_slides(small_slide, tmp_path, monkeypatch):
    """`predict` on two slides with a worker: one pool, started before the model is loaded, and the same outputs as
    each slide alone."""
    import shutil

    path = small_slide[0]
    second = tmp_path / "other.tif"
    shutil.copy(path, second)
    events = []
    start, load = wsi.start_workers, predict.load_predictor
    monkeypatch.setattr(wsi, "start_workers", lambda n: events.append(("workers", n)) or start(n))

    def loading(options, *a, **k):
        events.append(("model", options.num_workers))
        predictor = inference.load_predictor(options, maps_fn=pure_maps)
        predictor.postprocess = dict(PP)
        return predictor

    monkeypatch.setattr(predict, "load_predictor", loading)
    model = tmp_path / "model.pth"
    model.write_bytes(b"")   # exists (the options check it); the stand-in network above replaces it
    args = main.build_parser().parse_args(
        ["predict", "--model_path", str(model), "--input", str(path), str(second), "--output_dir", str(tmp_path / "out"),
         "--tile_size", "256", "--overlap", "64", "--tissue_mask", "none", "--region_size", "384", "--num_workers",
         "1", "--batch_size", "6", "--label_image"])
    assert predict.run(args) == 0
    assert events == [("workers", 1), ("model", 1)]
    alone = _options(num_workers=0)
    for name, slide in (("small", path), ("other", second)):
        assert wsi.predict_slide(_predictor(alone), slide, name, tmp_path / "alone", alone).status == "ok"
        assert _outputs(tmp_path / "out", name) == _outputs(tmp_path / "alone", name)
