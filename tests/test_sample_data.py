"""Tests for sample_data.py: layout, determinism, label properties, safety of the output folder, CLI."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import dataset
import sample_data
from utils import UserError


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != sample_data.MARKER}


def test_layout_and_content(synthetic_data_dir):
    samples = dataset.discover_nuinsseg(synthetic_data_dir)
    assert len(samples) == 12
    tissues = {s.tissue for s in samples}
    assert len(tissues) >= 4 and any("(" in t and " " in t for t in tissues)
    assert all(s.name.rsplit("_", 1)[1].isdigit() and not s.name.endswith("_01") for s in samples)
    vague = [s for s in samples if s.vague_path is not None]
    assert 1 <= len(vague) < len(samples)
    assert all(s.vague_path.parent.name == "mask binary" for s in vague)
    for s in samples:
        stored = tifffile.imread(s.label_path)
        assert stored.dtype == np.uint16
        image, labels, amb = dataset.load_sample(s)
        assert image.shape == (128, 128, 3)
        ids = np.unique(labels)[1:]
        assert len(ids) >= 5 and np.array_equal(ids, np.arange(1, len(ids) + 1))
        # nuclei are darker and less red (hematoxylin) than the pink eosin background
        fg, bg = image[labels > 0].astype(float), image[labels == 0].astype(float)
        red_share = lambda px: (px[:, 0] / (px.sum(1) + 1)).mean()  # noqa: E731
        assert fg.mean() < bg.mean() - 30 and red_share(fg) < red_share(bg)
        if amb is not None:
            assert amb.any() and set(np.unique(np.asarray(Image.open(s.vague_path)))) <= {0, 255}


def test_touching_nuclei_and_sizes(tmp_path):
    out = sample_data.make_sample_dataset(tmp_path / "d", num_images=6, seed=1, image_size=256)
    touching = 0
    diameters = []
    for s in dataset.discover_nuinsseg(out):
        _, labels, _ = dataset.load_sample(s)
        right = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
        down = (labels[1:] != labels[:-1]) & (labels[1:] > 0) & (labels[:-1] > 0)
        touching += int(right.sum() + down.sum())
        areas = np.bincount(labels.ravel())[1:]
        diameters.extend(2 * np.sqrt(areas[areas > 0] / np.pi))
    assert touching > 50
    d = np.median(diameters) * 512 / 256  # in 512-px units
    assert 8 <= d <= 30


def test_deterministic(tmp_path):
    a = sample_data.make_sample_dataset(tmp_path / "a", num_images=3, seed=5, image_size=64)
    b = sample_data.make_sample_dataset(tmp_path / "b", num_images=3, seed=5, image_size=64)
    c = sample_data.make_sample_dataset(tmp_path / "c", num_images=3, seed=6, image_size=64)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_refuses_foreign_non_empty_dir(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        sample_data.make_sample_dataset(target, num_images=2, image_size=64)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "precious"


def test_rerun_replaces_previous_sample(tmp_path):
    target = tmp_path / "s"
    sample_data.make_sample_dataset(target, num_images=8, seed=0, image_size=64)
    (target / "extra_user_file.txt").write_text("keep me")
    sample_data.make_sample_dataset(target, num_images=3, seed=0, image_size=64)
    assert len(dataset.discover_nuinsseg(target)) == 3
    assert (target / "extra_user_file.txt").read_text() == "keep me"
    assert not list(target.rglob("*.tmp"))


def test_cli(tmp_path, capsys):
    import main

    out = tmp_path / "cli"
    assert main.main(["make_sample_data", "--output_dir", str(out), "--num_images", "2", "--image_size", "64",
                      "--seed", "3"]) == 0
    assert len(dataset.discover_nuinsseg(out)) == 2
    capsys.readouterr()
    assert main.main(["make_sample_data", "--output_dir", str(tmp_path / "x"), "--num_images", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --num_images"), err


def test_negative_seed_is_a_user_error_and_writes_nothing(tmp_path):
    with pytest.raises(UserError, match=r"^--seed -1: must be 0 or more$"):
        sample_data.make_sample_dataset(tmp_path / "out", num_images=2, seed=-1, image_size=64)
    assert not (tmp_path / "out").exists()


def test_synthetic_pixel_size_is_recorded_and_used_by_train(tmp_path):
    """Issue 12, point 6: a 256 px synthetic tile is drawn at 0.5 um/px (nuclei half as many pixels wide as at
    512 px); sample_data.json records it and train records it with the model unless --mpp is given."""
    import argparse

    import dataset
    import sample_data
    import train

    sizes = {}
    for size in (128, 256):
        out = sample_data.make_sample_dataset(tmp_path / f"d{size}", num_images=3, seed=1, image_size=size)
        mpp = sample_data.recorded_mpp(out)
        assert mpp == pytest.approx(0.25 * 512 / size)
        widths = []
        for s in dataset.discover_nuinsseg(out):
            labels = dataset.read_label_mask(s.label_path)
            areas = np.bincount(labels.ravel())[1:]
            widths += list(np.sqrt(areas[areas > 0]) * mpp)  # micrometres
        sizes[size] = np.median(widths)
        parser = argparse.ArgumentParser()
        train.add_arguments(parser)
        assert train.config_from_args(parser.parse_args(["--data_dir", str(out)]))["mpp"] == pytest.approx(mpp)
        assert train.config_from_args(parser.parse_args(["--data_dir", str(out), "--mpp", "0.3"]))["mpp"] == 0.3
    assert sizes[128] == pytest.approx(sizes[256], rel=0.25)  # the same physical nucleus size at both scales
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    assert train.config_from_args(parser.parse_args(["--data_dir", str(tmp_path)]))["mpp"] == 0.25  # real data


def test_synthetic_slide_opens_with_its_pixel_size(tmp_path, capsys):
    """make_sample_data --slide: an Aperio-layout pyramid both readers open at the synthetic tiles' pixel size,
    tissue in the middle and glass at the corners; a wrong file name is one line before anything is written."""
    import main
    import slides

    path = tmp_path / "slide.svs"
    assert main.main(["-q", "make_sample_data", "--output_dir", str(tmp_path / "d"), "--num_images", "2",
                      "--image_size", "64", "--slide", str(path), "--slide_tiles", "5"]) == 0
    for backend in ("openslide", "tiffslide"):
        with slides.open_slide(path, backend=backend) as slide:
            assert slide.dimensions == (320, 320) and slide.mpp == pytest.approx(sample_data.tile_mpp(64))
            corner, middle = slide.read_region(0, 0, 64, 64), slide.read_region(128, 128, 64, 64)
            assert corner.min() > 200 and middle.mean() < corner.mean() - 20
    assert main.main(["make_sample_data", "--output_dir", str(tmp_path / "e"), "--slide",
                      str(tmp_path / "slide.tif")]) == 2
    assert ".svs" in capsys.readouterr().err and not (tmp_path / "e").exists()
