"""The folders layout (images/, labels/, ignore/, dataset.json, groups.csv): discovery and its errors, random
training windows at the model's pixel size, training and evaluating on non-square images of two sizes,
cross-dataset evaluation, and the NuInsSeg sample giving the same per-image metrics in both layouts."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import dataset
import main
import metrics
import sample_data
from utils import UserError, read_csv, read_json

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = ((96, 128), (120, 80))   # (H, W): two non-square sizes
FG_THRESHOLD = "0.15"            # a one-epoch random-encoder model's probabilities are low (see test_evaluate)


def make_folders_dataset(root: Path, sizes=SIZES, per_size: int = 4, seed: int = 0, mpp: float | None = None,
                         prefix: str = "img") -> Path:
    """Synthetic H&E images (sample_data's renderer, cropped to non-square sizes) in the folders layout, with
    groups.csv ("big"/"small") and optionally dataset.json."""
    for folder in ("images", "labels"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rows, i = [], 0
    for h, w in sizes:
        for _ in range(per_size):
            image, labels, _ = sample_data.render_tile(np.random.default_rng([seed, i]), max(h, w),
                                                       sample_data.ORGANS[i % 3])
            stem = f"{prefix}_{i:02d}"
            Image.fromarray(image[:h, :w]).save(root / "images" / f"{stem}.png")
            tifffile.imwrite(root / "labels" / f"{stem}.tif", labels[:h, :w].astype(np.uint16))
            rows.append(f"{stem},{'big' if h * w > 11000 else 'small'}\n")
            i += 1
    (root / "groups.csv").write_text("stem,group\n" + "".join(rows))
    if mpp is not None:
        (root / "dataset.json").write_text(json.dumps({"mpp": mpp}))
    return root


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------
def test_discover_folders_layout(tmp_path, synthetic_data_dir):
    root = make_folders_dataset(tmp_path / "d", per_size=2, mpp=0.5)
    (root / "ignore").mkdir()
    Image.fromarray(np.full((96, 128), 255, np.uint8)).save(root / "ignore" / "img_00.png")
    samples = dataset.discover(root)          # auto-detected
    assert dataset.detect_format(root) == "folders" and dataset.detect_format(synthetic_data_dir) == "nuinsseg"
    assert [s.rel_path for s in samples] == [f"images/img_{i:02d}.png" for i in range(4)]
    assert [s.tissue for s in samples] == ["big", "big", "small", "small"]   # groups.csv plays the tissue
    assert samples[0].vague_path == root / "ignore" / "img_00.png" and samples[1].vague_path is None
    assert dataset.dataset_mpp(root) == 0.5 and dataset.dataset_mpp(synthetic_data_dir) is None
    image, labels, ignore = dataset.load_sample(samples[0])
    assert image.shape == (96, 128, 3) and labels.shape == (96, 128) and ignore.all()
    # without groups.csv every image is in one group; --data_format nuinsseg refuses this folder
    (root / "groups.csv").unlink()
    assert {s.tissue for s in dataset.discover(root, "folders")} == {"all"}
    with pytest.raises(UserError, match="NuInsSeg"):
        dataset.discover(root, "nuinsseg")
    assert len(dataset.discover(synthetic_data_dir, "auto")) == 12   # the NuInsSeg layout is unchanged


@pytest.mark.parametrize("problem, expected", [
    ("missing_label", "images/img_01.png: no label map"),
    ("orphan_label", "labels/extra.tif: label map without an image"),
    ("size_mismatch", "labels/img_01.tif: label map is 10x12 but its image img_01.png is 80x120"),
    ("float_labels", "labels/img_01.tif: not an integer label image"),
    ("rgb_label_png", "labels/img_01.png: not an instance label image"),
    ("ignore_size", "ignore/img_01.png: ignore mask is 5x5"),
    ("unknown_group_stem", "groups.csv: line 2: no image 'nope'"),
    ("bad_json", "dataset.json: 'mpp' must be a positive number"),
])
def test_folders_layout_errors(run_error, tmp_path, capsys, problem, expected):
    root = make_folders_dataset(tmp_path / "d", per_size=1)
    label = root / "labels" / "img_01.tif"
    if problem == "missing_label":
        label.unlink()
    elif problem == "orphan_label":
        tifffile.imwrite(root / "labels" / "extra.tif", np.zeros((4, 4), np.uint16))
    elif problem == "size_mismatch":
        tifffile.imwrite(label, np.zeros((12, 10), np.uint16))
    elif problem == "float_labels":
        tifffile.imwrite(label, np.zeros((120, 80), np.float32))
    elif problem == "rgb_label_png":
        label.unlink()
        Image.fromarray(np.zeros((120, 80, 3), np.uint8)).save(root / "labels" / "img_01.png")
    elif problem == "ignore_size":
        (root / "ignore").mkdir()
        Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "ignore" / "img_01.png")
    elif problem == "unknown_group_stem":
        (root / "groups.csv").write_text("stem,group\nnope,a\n")
    elif problem == "bad_json":
        (root / "dataset.json").write_text('{"mpp": -1}')
    with pytest.raises(UserError) as info:
        dataset.discover(root)
    assert expected in str(info.value).replace("\\", "/")
    # the command line: one line, exit 2, nothing written
    out = tmp_path / "run"
    line = run_error(["train", "--data_dir", str(root), "--output_dir", str(out), "--pretrained", "none",
                               "--input_size", "64", "--epochs", "1", "--num_workers", "0", "--device", "cpu"])
    assert expected in line.replace("\\", "/") and not out.exists()


def test_parameter_search_reads_the_folders_layout(run_error, tmp_path, capsys):
    """parameter_search discovers through --data_format too: a folders-layout problem stops it before writing."""
    root = make_folders_dataset(tmp_path / "d", per_size=1)
    (root / "labels" / "img_00.tif").unlink()
    out = tmp_path / "search"
    line = run_error(["parameter_search", "--data_dir", str(root), "--output_dir", str(out),
                               "--pretrained", "none", "--input_size", "64", "--epochs", "1", "--lora_ranks", "2",
                               "--lora_alphas", "2", "--learning_rates", "1e-4", "--device", "cpu"])
    assert "images/img_00.png: no label map" in line.replace("\\", "/") and not out.exists()


# ----------------------------------------------------------------------------------------------
# Training windows
# ----------------------------------------------------------------------------------------------
def _sample(root: Path, stem: str, image: np.ndarray, labels: np.ndarray) -> dataset.Sample:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    tifffile.imwrite(root / "labels" / f"{stem}.tif", labels.astype(np.uint16))
    return dataset.discover_folders(root)[0]


def test_window_dataset_windows_padding_scale(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (192, 256, 3), dtype=np.uint8)
    labels = np.zeros((192, 256), np.uint16)
    labels[10:20, 10:20], labels[186:192, 248:256] = 1, 2        # nucleus 2 touches the bottom-right corner
    sample = _sample(tmp_path / "a", "a", image, labels)
    # tile 64: 192 * 256 / 64² = 12 windows per epoch, each a crop of the image (input size = tile: no resize)
    data = dataset.WindowDataset([sample], input_size=64, tile_size=64)
    assert len(data) == 12
    win, lab = data.item_arrays(3)
    assert win.shape == (64, 64, 3) and lab.shape == (64, 64)
    hits = [(y, x) for y, x in zip(*np.nonzero((image[:129, :193] == win[0, 0]).all(axis=2)))
            if np.array_equal(image[y:y + 64, x:x + 64], win)]
    assert len(hits) == 1
    y, x = hits[0]
    assert np.array_equal(labels[y:y + 64, x:x + 64], lab)          # image and labels cut at the same place
    again, _ = data.item_arrays(3)
    data.set_epoch(1)
    other, _ = data.item_arrays(3)
    assert np.array_equal(win, again) and not np.array_equal(win, other)   # (seed, epoch, item) decides
    item = data[0]
    assert item["image"].shape == (3, 64, 64) and item["hv"].shape == (2, 64, 64)
    # a centred window (validation loss) is exactly the image centre
    centre = dataset.WindowDataset([sample], input_size=64, tile_size=64, random_windows=False)
    assert len(centre) == 1 and np.array_equal(centre.item_arrays(0)[0], image[64:128, 96:160])
    # smaller than a window: mirror-padded; the mirrored copies of nuclei get new ids (id + largest id)
    padded = dataset.WindowDataset([sample], input_size=320, tile_size=320, random_windows=False)
    win, lab = padded.item_arrays(0)
    assert win.shape == (320, 320, 3) and np.array_equal(win[:192, :256], image)
    assert np.array_equal(lab[:192, :256], labels)
    assert set(np.unique(lab[192:])) <= {0, 3, 4} and (lab[192:198, 248:256] == 4).all()
    # scale 0.5 (pixels half the model's size, e.g. 0.125 µm/px for a 0.25 µm/px model): shrunk before cutting
    half = dataset.WindowDataset([sample], input_size=64, tile_size=64, scale=0.5)
    assert len(half) == 3 and half._load(0)[0].shape == (96, 128, 3)
    assert dataset.default_tile_size([sample]) == 192 and dataset.needs_windows([sample], 192)


def test_training_data_scale_tile_and_windows(tmp_path, synthetic_data_dir):
    """train's data set-up: the model's pixel size, the rescaling factor, the default tile and window mode."""
    import train

    data = make_folders_dataset(tmp_path / "d", per_size=1, mpp=0.5)

    def config(*extra):
        parser = argparse.ArgumentParser()
        train.add_arguments(parser)
        cfg = train.config_from_args(parser.parse_args(["--data_dir", str(data), *extra]))
        samples = train.discover_training_data(cfg)
        return cfg, samples

    cfg, samples = config()                       # the data's own pixel size: no rescaling
    assert (cfg["mpp"], cfg["data_mpp"], train.data_scale(cfg), cfg["tile_size"], cfg["windows"]) == \
        (0.5, 0.5, 1.0, 80, True) and len(samples) == 2
    cfg, _ = config("--mpp", "0.25")             # a 0.25 µm/px model: images enlarged 2x, smallest side 160
    assert (cfg["mpp"], train.data_scale(cfg), cfg["tile_size"], cfg["windows"]) == (0.25, 2.0, 160, True)
    cfg, _ = config("--tile_size", "64", "--data_format", "folders")
    assert cfg["tile_size"] == 64 and cfg["windows"] is True
    # NuInsSeg layout, every image one 128-px tile: the whole-image path, as before
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    cfg = train.config_from_args(parser.parse_args(["--data_dir", str(synthetic_data_dir)]))
    train.discover_training_data(cfg)
    assert (cfg["tile_size"], cfg["windows"], cfg["data_mpp"]) == (128, False, None)


# ----------------------------------------------------------------------------------------------
# Train and evaluate on non-square images of two sizes; cross-dataset evaluation
# ----------------------------------------------------------------------------------------------
def test_folders_dataset_trains_and_evaluates(run_error, tmp_path, capsys):
    import torch

    data = make_folders_dataset(tmp_path / "d1", mpp=0.5)
    run = tmp_path / "run"
    assert main.main(["-q", "train", "--data_dir", str(data), "--output_dir", str(run), "--pretrained", "none",
                      "--input_size", "64", "--batch_size", "2", "--lora_rank", "2", "--epochs", "1",
                      "--cross_validation", "--num_folds", "2", "--num_workers", "0", "--device", "cpu"]) == 0
    config = read_json(run / "config.json")
    # windows of the smallest side (80 px) at the data's own pixel size; non-square images need windows
    assert (config["tile_size"], config["mpp"], config["data_mpp"], config["windows"]) == (80, 0.5, 0.5, True)
    assert config["data_format"] == "auto"
    tested = [r for k in (0, 1) for r in read_csv(run / f"fold_{k}" / "test_per_image.csv")]
    assert sorted(r["image"] for r in tested) == [f"images/img_{i:02d}.png" for i in range(8)]
    assert {r["tissue"] for r in tested} == {"big", "small"}
    ckpt = torch.load(run / "fold_0" / "best_model.pth", weights_only=True)
    assert ckpt["config"]["tile_size"] == 80

    # out-of-fold evaluation on the training data: whole images through the tiled engine, scored at their size
    ev = tmp_path / "ev"
    assert main.main(["-q", "evaluate", "--data_dir", str(data), "--model_path", str(run), "--output_dir", str(ev),
                      "--num_workers", "0", "--device", "cpu", "--fg_threshold", FG_THRESHOLD,
                      "--save_predictions"]) == 0
    rows = read_csv(ev / "per_image.csv")
    assert len(rows) == 8 and {r["fold"] for r in rows} == {"0", "1"}
    assert sum(int(r["num_pred"]) for r in rows) > 0          # the scores are not trivially empty
    for r in rows:
        stem = Path(r["image"]).stem
        pred = tifffile.imread(ev / "predictions" / f"{stem}.tif")
        assert pred.shape == tifffile.imread(data / "labels" / f"{stem}.tif").shape
    assert [t["tissue"] for t in read_csv(ev / "per_tissue.csv")] == ["big", "small"]
    summary = read_json(ev / "summary.json")
    assert summary["protocol"].startswith("out-of-fold") and summary["cross_dataset"] is False
    assert summary["data_format"] == "folders" and "## Per group" in (ev / "summary.md").read_text()

    # another dataset at 0.25 µm/px (rescaled by half for the 0.5 µm/px model): cross-dataset, best fold model
    other = make_folders_dataset(tmp_path / "d2", per_size=2, seed=5, mpp=0.25, prefix="other")
    ev2 = tmp_path / "ev2"
    assert main.main(["-q", "evaluate", "--data_dir", str(other), "--model_path", str(run), "--output_dir",
                      str(ev2), "--num_workers", "0", "--device", "cpu", "--fg_threshold", FG_THRESHOLD,
                      "--save_predictions"]) == 0
    summary = read_json(ev2 / "summary.json")
    assert summary["cross_dataset"] is True and summary["never_seen"] is True and summary["mpp"] == 0.25
    assert summary["scored_by"].startswith("best fold model (fold ")
    text = (ev2 / "summary.md").read_text()
    assert "cross-dataset" in text and "never saw these images" in text and "out-of-fold:" not in text
    rows = read_csv(ev2 / "per_image.csv")
    assert len(rows) == 4 and {r["fold"] for r in rows} == {""}
    assert tifffile.imread(ev2 / "predictions" / "other_00.tif").shape == (96, 128)

    # the training images copied into the NuInsSeg layout: other relative paths, the same file names, so the
    # ensemble scores them but the summary must not claim the model never saw them
    nu = tmp_path / "nu"
    for i in range(3):
        organ = nu / "organ"
        (organ / "tissue images").mkdir(parents=True, exist_ok=True)
        (organ / "label masks modify").mkdir(parents=True, exist_ok=True)
        shutil.copy(data / "images" / f"img_{i:02d}.png", organ / "tissue images")
        shutil.copy(data / "labels" / f"img_{i:02d}.tif", organ / "label masks modify")
    ev3 = tmp_path / "ev3"
    assert main.main(["-q", "evaluate", "--data_dir", str(nu), "--model_path", str(run), "--output_dir", str(ev3),
                      "--num_workers", "0", "--device", "cpu", "--ensemble", "--mpp", "0.5"]) == 0
    summary = read_json(ev3 / "summary.json")
    assert summary["cross_dataset"] is True and summary["never_seen"] is False
    assert summary["scored_by"].startswith("ensemble of the 2 fold models")
    assert "may have been trained on them" in (ev3 / "summary.md").read_text()

    # demo on the other dataset goes through the same path
    demo_dir = tmp_path / "demo"
    assert main.main(["-q", "demo", "--data_dir", str(other), "--model_path", str(run), "--output_dir",
                      str(demo_dir), "--num_samples", "1", "--device", "cpu"]) == 0
    shown = read_json(demo_dir / "demo.json")["images"]
    assert len(shown) == 1 and shown[0]["image"].startswith("images/other_")
    assert "--mpp" in run_error(["evaluate", "--data_dir", str(other), "--model_path", str(run),
                                          "--output_dir", str(tmp_path / "ev4"), "--mpp", "-1"])


# ----------------------------------------------------------------------------------------------
# The NuInsSeg sample in both layouts: the same per-image metrics
# ----------------------------------------------------------------------------------------------
def test_nuinsseg_sample_same_metrics_in_folders_layout(real_sample_dir, tmp_path):
    import torch

    import nuclei_model
    import train

    samples = dataset.discover_nuinsseg(real_sample_dir)[::8]        # 8 images from different organs
    nu, folders = tmp_path / "nu", tmp_path / "folders"
    for folder in ("images", "labels"):
        (folders / folder).mkdir(parents=True)
    groups = ["stem,group"]
    for s in samples:
        organ = nu / s.tissue
        for sub, path in (("tissue images", s.image_path), ("label masks modify", s.label_path)):
            (organ / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, organ / sub)
        shutil.copy(s.image_path, folders / "images")
        shutil.copy(s.label_path, folders / "labels")
        groups.append(f"{s.name},{s.tissue}")
    (folders / "groups.csv").write_text("\n".join(groups) + "\n")
    (folders / "dataset.json").write_text(json.dumps({"mpp": dataset.NUINSSEG_MPP}))

    # one model (random encoder, input 64, 512-px tiles at NuInsSeg's pixel size) for both layouts
    config = train.default_config(str(nu))
    config.update(pretrained=None, input_size=64, lora_rank=2, tile_size=512, mpp=dataset.NUINSSEG_MPP)
    torch.manual_seed(0)
    net = nuclei_model.build_model(config)
    # a threshold inside the random model's own probabilities, so it predicts nuclei whatever its init
    fg, _ = nuclei_model.predict_maps([net], dataset.read_image(samples[0].image_path), 64, "cpu")
    threshold = f"{float(np.quantile(fg, 0.7)):.6f}"
    model_path = tmp_path / "model" / "best_model.pth"
    model_path.parent.mkdir()
    nuclei_model.save_checkpoint(model_path, net, config, train.default_postprocess("hv"))

    per_layout = {}
    for name, data in (("nuinsseg", nu), ("folders", folders)):
        out = tmp_path / f"ev_{name}"
        assert main.main(["-q", "evaluate", "--data_dir", str(data), "--model_path", str(model_path),
                          "--output_dir", str(out), "--num_workers", "0", "--device", "cpu",
                          "--fg_threshold", threshold, "--data_format", name]) == 0
        per_layout[name] = {Path(r["image"]).name: r for r in read_csv(out / "per_image.csv")}
    nu_rows, folder_rows = per_layout["nuinsseg"], per_layout["folders"]
    assert sorted(nu_rows) == sorted(folder_rows) == sorted(s.image_path.name for s in samples)
    assert sum(int(r["num_pred"]) for r in nu_rows.values()) > 0     # the model predicts nuclei: not trivial
    for image, row in nu_rows.items():
        other = folder_rows[image]
        assert row["tissue"] == other["tissue"]
        for key in list(metrics.METRICS) + ["num_true", "num_pred", "tp", "fp", "fn"]:
            assert row[key] == other[key], (image, key)
