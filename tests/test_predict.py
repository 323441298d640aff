"""Tests of predict.py.

Seamless stitching is tested with a deterministic stand-in for the network (`pure_maps`): foreground =
dark pixels of the tile, HV maps = `dataset.hv_targets` of the tile's connected dark components. Like a real
network it sees only its tile, so a nucleus cut by a tile border gets wrong HV maps in that tile (the centre
of mass of the visible part), and the test shows that blending overlapping tiles removes that effect: the
tiled result equals the whole-image result, and without overlap it does not. A random network cannot be
used for this comparison: it resizes whatever it gets to its input size, so the whole image and a tile are
seen at different scales. The real (tiny, random) network is used through the command line for the output
files, bad inputs and pixel-size rescaling.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

import dataset
import export
import inference
import main
import metrics
import postprocess
import predict
import utils

PP = postprocess.PostprocessConfig().to_dict()


def synthetic_slide(height: int = 1500, width: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pink image with ~2800 non-touching dark discs (radius 5-9) at random places, many across tile borders."""
    rng = np.random.default_rng(seed)
    image = np.clip(np.array([236, 190, 215]) + rng.integers(-8, 9, (height, width, 3)), 0, 255).astype(np.uint8)
    truth = np.zeros((height, width), np.int32)
    k = 0
    for _ in range(6000):
        y, x, r = int(rng.integers(0, height)), int(rng.integers(0, width)), int(rng.integers(5, 10))
        if truth[max(y - r - 3, 0):y + r + 4, max(x - r - 3, 0):x + r + 4].any():
            continue
        y0, x0 = max(y - r, 0), max(x - r, 0)
        yy, xx = np.mgrid[y0:min(y + r + 1, height), x0:min(x + r + 1, width)]
        disc = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
        k += 1
        truth[yy[disc], xx[disc]] = k
        image[yy[disc], xx[disc]] = (90, 40, 120)
    return image, truth


def pure_maps(tiles: list) -> list:
    out = []
    for tile in tiles:
        dark = tile.mean(axis=2) < 150
        out.append((dark.astype(np.float32), dataset.hv_targets(ndimage.label(dark)[0])))
    return out


@pytest.fixture(scope="module")
def slide():
    return synthetic_slide()


def _matched_iou(true: np.ndarray, pred: np.ndarray) -> tuple[dict, float]:
    m = metrics.instance_metrics(true, pred)
    return m, m["iou_sum"] / max(m["tp"], 1)


def test_tiled_equals_untiled(slide):
    image, truth = slide
    fg, hv = pure_maps([image])[0]
    untiled = postprocess.postprocess(fg, hv, postprocess.PostprocessConfig.from_dict(PP))
    tiled = inference.predict_image(None, image, 256, 64, maps_fn=pure_maps, postprocess=PP, batch_size=7)
    assert tiled.shape == image.shape[:2] and tiled.dtype == np.int32
    m, iou = _matched_iou(untiled, tiled)
    assert abs(m["num_pred"] - m["num_true"]) <= 0.01 * m["num_true"]
    assert iou > 0.99 and m["fp"] == 0 and m["fn"] == 0
    m_truth, iou_truth = _matched_iou(truth, tiled)  # and it is the right answer
    assert m_truth["num_pred"] == int(truth.max()) and iou_truth > 0.99
    # control: without overlap, nuclei cut by tile borders are split in two (the test can fail)
    no_overlap = inference.predict_image(None, image, 256, 0, maps_fn=pure_maps, postprocess=PP)
    assert metrics.instance_metrics(untiled, no_overlap)["fp"] > 20
    # one GeoJSON polygon per instance
    collection = json.loads(json.dumps(export.labels_to_geojson(tiled)))
    ids = [f["properties"]["id"] for f in collection["features"]]
    assert sorted(ids) == sorted(np.unique(tiled[tiled > 0]).tolist())
    assert all(f["geometry"]["type"] == "Polygon" for f in collection["features"])


@pytest.mark.parametrize("length", [16, 100, 256, 257, 600, 1001])
def test_tiles_cover_with_positive_weight(length):
    tile, overlap = 64, 16
    total = np.zeros(max(length, tile))
    for start in inference.tile_starts(max(length, tile), tile, overlap):
        total[start:start + tile] += inference.tile_weights(tile, start, tile, overlap, max(length, tile))
    assert total.min() > 0.05
    starts = inference.tile_starts(max(length, tile), tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == max(length, tile)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_small_image_and_mpp_rescaling():
    image, truth = synthetic_slide(150, 110, seed=3)
    seen = []

    def maps(tiles):
        seen.extend(t.shape for t in tiles)
        return pure_maps(tiles)

    labels = inference.predict_image(None, image, 128, 32, maps_fn=maps, postprocess=PP)
    assert labels.shape == (150, 110) and set(seen) == {(128, 128, 3)}
    seen.clear()
    # input at 0.5 µm/px, model at NuInsSeg's 0.25: the image is doubled for the network, output at input size
    doubled = inference.predict_image(None, image, 128, 32, mpp=2 * dataset.NUINSSEG_MPP, maps_fn=maps, postprocess=PP)
    assert doubled.shape == (150, 110) and len(seen) > 4
    m, iou = _matched_iou(truth, doubled)
    assert m["num_pred"] == int(truth.max()) and iou > 0.8


def test_arrays_follow_the_file_readers_alpha_and_depth_policy():
    """An RGBA array given to the library is composited over white, like an RGBA file (image_io's one
    policy); a 16-bit array is refused like a 16-bit file."""
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = synthetic_slide(64, 64, seed=5)[0]
    rgba[..., 3] = 255
    rgba[:32, :, 3] = 0  # the top half transparent: white, not the colours underneath
    composited = rgba[..., :3].copy()
    composited[:32] = 255
    seen = []

    def maps(tiles):
        seen.extend(tiles)
        return pure_maps(tiles)

    inference.predict_image(None, rgba, 64, 16, maps_fn=maps, postprocess=PP)
    assert np.array_equal(seen[0], composited)
    with pytest.raises(utils.UserError, match="16-bit"):
        inference.predict_image(None, rgba[..., :3].astype(np.uint16) * 257, 64, 16, maps_fn=pure_maps, postprocess=PP)


def test_read_image_variants(tmp_path):
    import tifffile
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 255, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    tifffile.imwrite(tmp_path / "chw.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    Image.fromarray(rgb).save(tmp_path / "plain.jpg", quality=95)
    assert np.array_equal(predict.read_image(tmp_path / "rgba.png"), rgb)
    assert np.array_equal(predict.read_image(tmp_path / "grey.png"), np.repeat(rgb[..., :1], 3, axis=2))
    assert np.array_equal(predict.read_image(tmp_path / "chw.tif"), rgb)  # 16-bit: tests/test_image_io.py
    assert predict.read_image(tmp_path / "plain.jpg").shape == (20, 30, 3)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(utils.UserError, match="broken.png"):
        predict.read_image(tmp_path / "broken.png")
    with pytest.raises(utils.UserError, match="missing.png: file not found"):
        predict.read_image(tmp_path / "missing.png")


def test_inputs_and_unique_names(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        for name in ("x.png", "y.tif"):
            (tmp_path / sub / name).write_bytes(b"")
    paths = predict.expand_inputs([str(tmp_path / "a" / "*.png"), str(tmp_path / "b" / "*"),
                                   str(tmp_path / "a" / "x.png"), str(tmp_path / "none*.png")])
    assert [p.name for p in paths] == ["x.png", "x.png", "y.tif", "none*.png"]
    assert predict.output_stems(paths) == ["a_x", "b_x", "y", "none*"]


# ----------------------------------------------------------------------------------------------
# Command line with a real (tiny, random) network
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import nuclei_model

    config = {"input_size": 64, "pretrained": None, "head": "hv", "lora_rank": 2, "lora_alpha": 2.0,
              "train_only_lora": False, "mpp": dataset.NUINSSEG_MPP}
    utils.set_seed(0)
    net = nuclei_model.build_model(config, pretrained=None)
    path = tmp_path_factory.mktemp("model") / "tiny.pth"
    pp = dict(PP, fg_threshold=0.5)
    nuclei_model.save_checkpoint(path, net, config, pp, fold=0, epoch=1, val={"pq": 0.1}, monitor="pq")
    return path


def test_command_outputs_bad_file_and_mpp(tiny_model, tmp_path, capsys):
    from PIL import Image
    import tifffile

    image, _ = synthetic_slide(150, 130, seed=1)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.fromarray(image).save(tmp_path / "in" / "region.png")
    tifffile.imwrite(tmp_path / "in" / "sub" / "other.tif", image[:90, :100])
    (tmp_path / "in" / "corrupt.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "out"
    status = main.main(["-q", "predict", "--model_path", str(tiny_model), "--input", str(tmp_path / "in" / "*.png"),
                        str(tmp_path / "in" / "sub" / "*.tif"), str(tmp_path / "in" / "missing.png"),
                        "--output_dir", str(out), "--tile_size", "64", "--overlap", "16", "--device", "cpu",
                        "--batch_size", "4", "--mpp", "0.3"])
    captured = capsys.readouterr()
    assert status == 1
    assert "corrupt.png" in captured.err and "missing.png" in captured.err
    assert str(out.resolve()) in captured.out
    for stem, shape in (("region", (150, 130)), ("other", (90, 100))):
        labels = tifffile.imread(out / f"{stem}_labels.tif")
        assert labels.dtype == np.uint32 and labels.shape == shape
        ids = sorted(np.unique(labels[labels > 0]).tolist())
        collection = json.loads((out / f"{stem}.geojson").read_text())
        assert sorted(f["properties"]["id"] for f in collection["features"]) == ids
        rows = utils.read_csv(out / f"{stem}_nuclei.csv")
        assert [int(r["id"]) for r in rows] == ids
        assert "area_um2" in (out / f"{stem}_nuclei.csv").read_text().splitlines()[0]
        from PIL import Image as _I
        assert _I.open(out / f"{stem}_overlay.png").size == (shape[1], shape[0])
    summary = utils.read_csv(out / "summary.csv")
    assert [r["status"] for r in summary].count("ok") == 2 and len(summary) == 4
    assert utils.read_json(out / "predict_config.json")["tile_size"] == 64


def test_worker_processes_give_the_same_files(tiny_model, tmp_path, capsys):
    """Plain images post-processed in worker processes (`--num_workers 2`, the GPU default) while the network
    segments the next image: the same files as everything in this process, a bad input reported, exit 1."""
    from PIL import Image

    (tmp_path / "in").mkdir()
    for k in range(3):
        Image.fromarray(synthetic_slide(96, 80 + 16 * k, seed=10 + k)[0]).save(tmp_path / "in" / f"im{k}.png")
    (tmp_path / "in" / "im9.png").write_bytes(b"\x89PNG garbage")
    outputs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"out{workers}"
        status = main.main(["-q", "predict", "--model_path", str(tiny_model), "--input", str(tmp_path / "in"),
                            "--output_dir", str(out), "--tile_size", "64", "--overlap", "16", "--device", "cpu",
                            "--num_workers", workers, "--threads", "1"])
        assert status == 1 and "im9.png" in capsys.readouterr().err
        outputs[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())
                            if p.name not in ("summary.csv", "predict_config.json")}
        summary = utils.read_csv(out / "summary.csv")
        assert [r["status"] for r in summary] == ["ok", "ok", "ok", "failed"]
    assert len(outputs["0"]) == 12 and outputs["0"] == outputs["2"]


def test_command_rejects_bad_options(tiny_model, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(synthetic_slide(64, 64, seed=2)[0]).save(tmp_path / "x.png")
    status = main.main(["predict", "--model_path", str(tiny_model), "--input", str(tmp_path / "x.png"),
                        "--output_dir", str(tmp_path / "out"), "--tile_size", "64", "--overlap", "40", "--device",
                        "cpu"])
    assert status == 2 and "--overlap 40" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # no empty output folder left behind


def test_command_rejects_bad_output_dir_and_pretrained(tiny_model, tmp_path, capsys):
    """A file where the output folder should be, or a missing --pretrained: one error line, no traceback."""
    image, _ = synthetic_slide(64, 64, seed=2)
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "region.png")
    (tmp_path / "afile").write_text("not a folder")
    base = ["predict", "--model_path", str(tiny_model), "--input", str(tmp_path / "region.png"), "--device", "cpu"]
    for output_dir in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        capsys.readouterr()
        assert main.main(base + ["--output_dir", str(output_dir)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --output_dir {output_dir}: "), err
    assert (tmp_path / "afile").read_text() == "not a folder"
    assert main.main(base + ["--output_dir", str(tmp_path / "out"), "--pretrained", str(tmp_path / "no.pt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --pretrained {tmp_path / 'no.pt'}: file not found"


def test_confidence_and_min_confidence_on_plain_images(tmp_path):
    """Two nuclei of known mean foreground probability (0.9 and 0.3): both reported with their confidence in
    the CSV and GeoJSON; `--min_confidence 0.5` drops exactly the weak one, ids stay 1..N."""
    fg = np.zeros((40, 40), np.float32)
    fg[5:15, 5:15] = 0.9
    fg[25:35, 22:32] = 0.6
    hv = np.zeros((2, 40, 40), np.float32)
    image = np.full((40, 40, 3), 200, np.uint8)
    settings = dict(PP, fg_threshold=0.5)
    nuclei, _, error, dropped = predict.finish_image(Path("a.png"), tmp_path, "a", image, fg, hv, settings)
    assert (nuclei, error, dropped) == (2, "", 0)
    # hand-built: nucleus 1 with probabilities 0.2 / 0.4 on its two halves (mean 0.3), nucleus 2 at 0.9
    labels = np.zeros((40, 40), np.int32)
    labels[5:15, 5:15] = 1
    labels[25:35, 22:32] = 2
    probs = np.zeros((40, 40), np.float32)
    probs[5:15, 5:10], probs[5:15, 10:15], probs[25:35, 22:32] = 0.2, 0.4, 0.9
    kept, confidence, dropped = predict.nucleus_confidence(labels, probs, 0.0)
    assert dropped == 0 and np.array_equal(kept, labels)
    assert confidence == {1: pytest.approx(0.3), 2: pytest.approx(0.9)}
    kept, confidence, dropped = predict.nucleus_confidence(labels, probs, 0.5)
    assert dropped == 1 and confidence == {1: pytest.approx(0.9)}       # ids assigned after the drop
    assert np.array_equal(kept, np.where(labels == 2, 1, 0))
    rows = utils.read_csv(tmp_path / "a_nuclei.csv")
    assert list(rows[0])[:4] == ["id", "centroid_x", "centroid_y", "confidence"]
    assert sorted(round(float(r["confidence"]), 4) for r in rows) == [0.6, 0.9]
    features = json.loads((tmp_path / "a.geojson").read_text())["features"]
    names = {m["name"]: m["value"] for m in features[0]["properties"]["measurements"]}
    assert names["confidence"] == pytest.approx(float(rows[0]["confidence"]))
    nuclei, _, error, dropped = predict.finish_image(Path("a.png"), tmp_path, "b", image, fg, hv, settings,
                                                     min_confidence=0.7)
    assert (nuclei, error, dropped) == (1, "", 1)
    assert [r["id"] for r in utils.read_csv(tmp_path / "b_nuclei.csv")] == ["1"]
    assert float(utils.read_csv(tmp_path / "b_nuclei.csv")[0]["confidence"]) == pytest.approx(0.9)


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_min_confidence_out_of_range_is_a_usage_error(tiny_model, tmp_path, capsys, value):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    code = main.main(["predict", "--model_path", str(tiny_model), "--input", str(image), "--output_dir",
                      str(tmp_path / "out"), "--min_confidence", value])
    assert code == 2 and "--min_confidence" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
