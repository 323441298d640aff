"""predict --mpp: a scale that would resize an input beyond memory is refused from the file's header before the
image is read or resized (plain images: `dataset.check_resize`; slides: the window grid at the model's pixel
size), naming --mpp and the sizes; an --mpp outside the brightfield range, and a resize below one window, warn.

The resize itself is replaced by a function that fails loudly, so that on code without the check these tests
fail quickly instead of allocating tens of gigabytes."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

import dataset
import inference
import main
import predict
import sample_data
import utils
import wsi
from test_predict import PP, pure_maps, synthetic_slide, tiny_model  # noqa: F401  (fixture)


def _no_resize(*args, **kwargs):
    raise AssertionError("the input was resized: the --mpp check did not stop it first")


def _options(**kw) -> predict.PredictOptions:
    base = dict(model_path="unused", tile_size=256, overlap=64, tissue_mask="none", region_size=384,
                num_workers=0, read_threads=1, batch_size=4, overlay=False)
    base.update(kw)
    return predict.PredictOptions(**base)


def _predict_one(path, tmp_path, **kw) -> predict.Outcome:
    options = _options(**kw)
    predictor = predict.load_predictor(options, maps_fn=pure_maps)
    predictor.postprocess = dict(PP)
    return predict.predict_one(predictor, path, path.stem, tmp_path, options)


def test_check_resize_bounds():
    # 256 px at 100 um/px for a 0.25 um/px model: 102,400 x 102,400 pixels, beyond 2^31 on any machine
    with pytest.raises(utils.UserError, match=r"x\.png: --mpp 100 resizes this 256 x 256-pixel image by 400 .*"
                                              r"102,400 x 102,400 pixels: more than the limit"):
        dataset.check_resize("x.png", (256, 256), 400.0, "--mpp 100", available=2 ** 60)
    # below the pixel limit, the estimate (64 bytes per resized pixel) against the memory available
    need = 2000 * 2000 * dataset.BYTES_PER_RESIZED_PIXEL
    assert dataset.check_resize("x.png", (1000, 1000), 2.0, "--mpp 0.5", available=need) == (2000, 2000)
    with pytest.raises(utils.UserError, match=r"about 244 MiB, more than the 122 MiB of memory available"):
        dataset.check_resize("x.png", (1000, 1000), 2.0, "--mpp 0.5", available=need // 2)
    # an unchanged size, and shrinking, are never refused here
    assert dataset.check_resize("x.png", (100, 100), 1.0, "--mpp 0.25", available=0) == (100, 100)
    assert dataset.check_resize("x.png", (100, 300), 0.01, "--mpp 0.0025", available=0) == (1, 3)
    assert utils.available_memory() is None or utils.available_memory() > 0


def test_plain_image_beyond_memory_fails_that_input_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "resize_image", _no_resize)
    Image.fromarray(synthetic_slide(256, 256, seed=1)[0]).save(tmp_path / "tile.png")
    outcome = _predict_one(tmp_path / "tile.png", tmp_path, mpp=100.0)
    assert outcome.status == "failed"
    assert outcome.error.startswith(f"{tmp_path / 'tile.png'}: --mpp 100 resizes this 256 x 256-pixel image")
    assert "102,400 x 102,400 pixels" in outcome.error and "\n" not in outcome.error
    # the memory estimate: 512 x 512 pixels need 16 MiB; with 10 MiB available the input is refused
    monkeypatch.setattr(utils, "available_memory", lambda: 10 * 2 ** 20)
    outcome = _predict_one(tmp_path / "tile.png", tmp_path, mpp=0.5)
    assert outcome.status == "failed" and "512 x 512 pixels: about 16 MiB, more than the 10 MiB" in outcome.error


def test_command_reports_the_refused_input_and_goes_on(tiny_model, tmp_path, capsys, caplog, monkeypatch):  # noqa: F811
    monkeypatch.setattr(dataset, "resize_image", _no_resize)
    (tmp_path / "in").mkdir()
    Image.fromarray(synthetic_slide(256, 256, seed=1)[0]).save(tmp_path / "in" / "big.png")
    Image.fromarray(synthetic_slide(128, 128, seed=2)[0]).save(tmp_path / "in" / "small.png")
    out = tmp_path / "out"
    # two inputs and a worker: the plain images go through segment_images' own read path, checked there too
    status = main.main(["-q", "predict", "--model_path", str(tiny_model), "--input", str(tmp_path / "in"),
                        "--output_dir", str(out), "--tile_size", "64", "--overlap", "16", "--device", "cpu",
                        "--mpp", "100", "--num_workers", "1"])
    err = capsys.readouterr().err
    assert status == 1
    assert "--mpp 100: outside 0.05-5 micrometres per pixel" in caplog.text
    assert "big.png: --mpp 100 resizes this 256 x 256-pixel image" in err
    assert "small.png: --mpp 100 resizes this 128 x 128-pixel image by 400 to the model's pixel size, " \
           "51,200 x 51,200 pixels: more than the limit" in err
    rows = utils.read_csv(out / "summary.csv")
    assert [r["status"] for r in rows] == ["failed", "failed"] and "102,400 x 102,400" in rows[0]["error"]


def test_tiny_mpp_warns_about_the_option_and_the_window(tmp_path, caplog):
    Image.fromarray(synthetic_slide(256, 256, seed=1)[0]).save(tmp_path / "tile.png")
    with caplog.at_level(logging.WARNING):
        predict.check_options(_options(model_path=str(tmp_path / "tile.png"), mpp=0.0001))
        outcome = _predict_one(tmp_path / "tile.png", tmp_path, mpp=0.0001)
    assert outcome.status == "ok" and outcome.nuclei == 0
    text = caplog.text
    assert "--mpp 0.0001: outside 0.05-5 micrometres per pixel" in text
    assert "--mpp 0.0001 shrinks it from 256 x 256 to 1 x 1 pixels, smaller than one window (256 pixels" in text
    # a plausible pixel size that keeps the image at least one window: no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        predict.check_options(_options(model_path=str(tmp_path / "tile.png"), mpp=0.5))
        assert _predict_one(tmp_path / "tile.png", tmp_path, mpp=0.5).status == "ok"
    assert caplog.text == ""


def test_non_finite_mpp_is_refused(tmp_path):
    with pytest.raises(utils.UserError, match=r"--mpp inf: must be a finite number"):
        predict.check_options(_options(model_path=str(tmp_path), mpp=float("inf")))


def test_slide_grid_beyond_the_window_limit_fails_that_slide(tmp_path, monkeypatch):
    def no_geometry(*args, **kwargs):
        raise AssertionError("the slide's grid was planned: the --mpp check did not stop it first")

    monkeypatch.setattr(wsi, "slide_geometry", no_geometry)
    image, _ = synthetic_slide(600, 500, seed=5)
    path = tmp_path / "slide.tif"
    sample_data.write_pyramidal_tiff(path, image, dataset.NUINSSEG_MPP, tile_size=256)
    # 500 x 600 level-0 pixels at 300 um/px for a 0.25 um/px model: 600,000 x 720,000 pixels, 3125 x 3750 windows
    # of 256 pixels with 64 overlap
    outcome = _predict_one(path, tmp_path, mpp=300.0)
    assert outcome.status == "failed" and outcome.kind == "slide"
    assert (f"{path}: --mpp 300 scales this 500 x 600-pixel slide by 1200 to the model's pixel size, "
            f"600,000 x 720,000 pixels = 11,718,750 windows of 256 pixels, more than the limit of 4,194,304") \
        in outcome.error
    assert predict._window_count(720_000, 256, 64) == len(inference.tile_starts(720_000, 256, 64))
    assert all(predict._window_count(n, 256, 64) == len(inference.tile_starts(n, 256, 64)) for n in range(1, 2000))
    assert np.isfinite(outcome.seconds)
