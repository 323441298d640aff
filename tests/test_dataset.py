"""Tests for dataset.py: discovery/loading (real sample and hand-made errors), folds, targets, augmentation,
the torch Dataset and the DataLoader."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import dataset
from utils import UserError


# ---------------------------------------------------------------------------------------------- helpers
def _write_pair(root: Path, organ: str, name: str, image: np.ndarray, labels: np.ndarray,
                label_dir: str = "label masks modify") -> None:
    (root / organ / "tissue images").mkdir(parents=True, exist_ok=True)
    (root / organ / label_dir).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / organ / "tissue images" / f"{name}.png")
    tifffile.imwrite(root / organ / label_dir / f"{name}.tif", labels)


def _tiny(root: Path, n: int = 2, organ: str = "human liver") -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        labels = np.zeros((16, 16), np.uint16)
        labels[2:6, 2:6] = 3
        labels[9:12, 9:14] = 7
        _write_pair(root, organ, f"human_liver_{i + 1}", image, labels)
    return root


# ---------------------------------------------------------------------------------------------- real sample
def test_real_sample_discovery_and_loading(real_sample_dir):
    samples = dataset.discover_nuinsseg(real_sample_dir)
    assert len(samples) == 64
    assert len({s.tissue for s in samples}) == 31
    assert [s.rel_path for s in samples] == sorted(s.rel_path for s in samples)
    assert all(s.rel_path == f"{s.tissue}/tissue images/{s.image_path.name}" for s in samples)
    vague = [s for s in samples if s.vague_path is not None]
    assert len(vague) == 2 and all(s.tissue == "human bladder" for s in vague)
    by_name = {s.name: s for s in samples}
    with Image.open(by_name["human_liver_31"].image_path) as im:
        assert im.mode == "RGBA"
    for s in samples:
        image, labels, amb = dataset.load_sample(s)
        assert image.dtype == np.uint8 and image.shape == (512, 512, 3)
        assert labels.dtype == np.int32
        stored = tifffile.imread(s.label_path)
        assert np.array_equal(labels, stored.astype(np.int64))
        assert (amb is not None) == (s.vague_path is not None)
        if amb is not None:
            assert amb.dtype == bool and amb.shape == (512, 512) and amb.any()
    rgba = np.asarray(Image.open(by_name["human_liver_31"].image_path))
    assert np.array_equal(dataset.load_sample(by_name["human_liver_31"])[0], rgba[..., :3])


def test_real_sample_folds_equal_sklearn(real_sample_dir):
    from sklearn.model_selection import KFold

    n = len(dataset.discover_nuinsseg(real_sample_dir))
    ours = dataset.kfold_splits(n, 5, 19)
    ref = list(KFold(n_splits=5, shuffle=True, random_state=19).split(np.zeros(n)))
    assert len(ours) == 5
    for (tr, te), (rtr, rte) in zip(ours, ref):
        assert np.array_equal(tr, rtr) and np.array_equal(te, rte)


@pytest.mark.parametrize("n,k,seed", [(665, 5, 19), (10, 3, 0), (7, 7, 123), (11, 2, 5)])
def test_kfold_equals_sklearn(n, k, seed):
    from sklearn.model_selection import KFold

    ref = list(KFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(n)))
    for (tr, te), (rtr, rte) in zip(dataset.kfold_splits(n, k, seed), ref):
        assert np.array_equal(tr, rtr) and np.array_equal(te, rte)


def test_kfold_rejects_bad_counts():
    with pytest.raises(UserError):
        dataset.kfold_splits(3, 5)
    with pytest.raises(UserError):
        dataset.kfold_splits(10, 1)


# ---------------------------------------------------------------------------------------------- discovery
def test_discovery_synthetic(synthetic_data_dir):
    samples = dataset.discover_nuinsseg(synthetic_data_dir)
    assert len(samples) == 12
    assert any(s.vague_path is not None for s in samples)
    image, labels, _ = dataset.load_sample(samples[0])
    assert image.shape == (128, 128, 3) and labels.shape == (128, 128)


def test_missing_empty_and_foreign_dirs(tmp_path):
    with pytest.raises(UserError, match="not found"):
        dataset.discover_nuinsseg(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="empty"):
        dataset.discover_nuinsseg(empty)
    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "a.png").write_bytes(b"x")
    with pytest.raises(UserError, match="tissue images"):
        dataset.discover_nuinsseg(foreign)
    organ = _tiny(tmp_path / "one") / "human liver"
    with pytest.raises(UserError, match="single organ folder"):
        dataset.discover_nuinsseg(organ)


def test_image_without_mask_and_reverse(tmp_path):
    root = _tiny(tmp_path / "a")
    (root / "human liver" / "label masks modify" / "human_liver_2.tif").unlink()
    with pytest.raises(UserError, match="human_liver_2.png: no label mask"):
        dataset.discover_nuinsseg(root)
    root = _tiny(tmp_path / "b")
    (root / "human liver" / "tissue images" / "human_liver_1.png").unlink()
    with pytest.raises(UserError, match="human_liver_1.tif: label mask without an image"):
        dataset.discover_nuinsseg(root)


def test_fallback_label_dir_warns(tmp_path, caplog):
    root = tmp_path / "d"
    _write_pair(root, "mouse kidney", "mouse_kidney_1", np.zeros((8, 8, 3), np.uint8),
                np.ones((8, 8), np.uint16), label_dir="label masks")
    with caplog.at_level("WARNING"):
        samples = dataset.discover_nuinsseg(root)
    assert samples[0].label_path.parent.name == "label masks"
    assert "label masks modify" in caplog.text


def test_sorting_is_plain_string_sort_of_rel_path(tmp_path):
    root = tmp_path / "s"
    for organ, name in [("human liver", "human_liver_10"), ("human liver", "human_liver_9"),
                        ("human kidney", "human_kidney_01"), ("mouse fat (white and brown)_x", "m_1")]:
        _write_pair(root, organ, name, np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint16))
    rel = [s.rel_path for s in dataset.discover_nuinsseg(root)]
    assert rel == ["human kidney/tissue images/human_kidney_01.png", "human liver/tissue images/human_liver_10.png",
                   "human liver/tissue images/human_liver_9.png", "mouse fat (white and brown)_x/tissue images/m_1.png"]


def test_unreadable_truncated_and_mismatched_files(tmp_path):
    root = _tiny(tmp_path / "t")
    samples = dataset.discover_nuinsseg(root)
    img = samples[0].image_path
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="human_liver_1.png"):
        dataset.load_sample(samples[0])
    img.write_bytes(b"not an image at all")
    with pytest.raises(UserError, match="human_liver_1.png"):
        dataset.load_sample(samples[0])
    lab = samples[1].label_path
    lab.write_bytes(lab.read_bytes()[:20])
    with pytest.raises(UserError, match="human_liver_2.tif"):
        dataset.load_sample(samples[1])
    tifffile.imwrite(lab, np.zeros((10, 16), np.uint16))
    with pytest.raises(UserError, match="human_liver_2.tif.*10"):
        dataset.load_sample(samples[1])


@pytest.mark.parametrize("bad", [np.zeros((16, 16), np.float32), np.zeros((16, 16, 3), np.uint8),
                                 np.full((16, 16), -1, np.int16)])
def test_mask_not_integer_label_image(tmp_path, bad):
    root = _tiny(tmp_path / "m", n=1)
    sample = dataset.discover_nuinsseg(root)[0]
    tifffile.imwrite(sample.label_path, bad)
    with pytest.raises(UserError, match="human_liver_1.tif"):
        dataset.load_sample(sample)


def test_image_modes(tmp_path):
    root = _tiny(tmp_path / "g", n=1)
    sample = dataset.discover_nuinsseg(root)[0]
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(gray).save(sample.image_path)
    image = dataset.load_sample(sample)[0]
    assert image.shape == (16, 16, 3) and np.array_equal(image[..., 1], gray)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0  # fully transparent pixel -> white
    Image.fromarray(rgba).save(sample.image_path)
    image = dataset.load_sample(sample)[0]
    assert tuple(image[1, 1]) == (200, 0, 0) and tuple(image[0, 0]) == (255, 255, 255)
    Image.fromarray(np.full((16, 16), 4000, np.uint16)).save(sample.image_path)
    with pytest.raises(UserError, match="16-bit"):
        dataset.load_sample(sample)


def test_ids_kept_multi_piece(tmp_path):
    labels = np.zeros((16, 16), np.uint16)
    labels[1:3, 1:3] = 500
    labels[10:12, 10:12] = 500  # one nucleus in two pieces
    labels[5:7, 5:7] = 2
    root = tmp_path / "p"
    _write_pair(root, "human liver", "x_1", np.zeros((16, 16, 3), np.uint8), labels)
    _, loaded, _ = dataset.load_sample(dataset.discover_nuinsseg(root)[0])
    assert np.array_equal(loaded, labels.astype(np.int32))


def test_vague_mask_found_at_any_depth(tmp_path):
    root = _tiny(tmp_path / "v", n=2)
    vdir = root / "human liver" / "vague areas" / "mask binary"
    vdir.mkdir(parents=True)
    m = np.zeros((16, 16), np.uint8)
    m[4:8, 4:8] = 255
    Image.fromarray(m).save(vdir / "human_liver_2.png")
    samples = dataset.discover_nuinsseg(root)
    assert samples[0].vague_path is None and samples[1].vague_path == vdir / "human_liver_2.png"
    amb = dataset.load_sample(samples[1])[2]
    assert amb.sum() == 16
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(vdir / "human_liver_2.png")
    with pytest.raises(UserError, match="human_liver_2.png"):
        dataset.load_sample(samples[1])


# ---------------------------------------------------------------------------------------------- folds
def test_validation_split_stratified_and_disjoint():
    tissues = ["a"] * 40 + ["b"] * 20 + ["c"] * 10 + [f"t{i}" for i in range(10)]
    n = len(tissues)
    for train, test in dataset.kfold_splits(n, 5, 19):
        tr, va = dataset.validation_split(train, tissues, 0.1, seed=19)
        assert len(va) >= 1 and abs(len(va) - round(0.1 * len(train))) <= 1
        assert not set(va) & set(tr) and not set(va) & set(test) and not set(tr) & set(test)
        assert sorted(set(tr) | set(va)) == sorted(train)
    train = np.arange(70)  # a: 40, b: 20, c: 10 -> 4, 2, 1
    tr, va = dataset.validation_split(train, tissues, 0.1, seed=3)
    counts = {t: sum(tissues[i] == t for i in va) for t in "abc"}
    assert counts == {"a": 4, "b": 2, "c": 1}
    again = dataset.validation_split(train, tissues, 0.1, seed=3)
    assert np.array_equal(again[1], va)


def test_validation_split_small_sets():
    tissues = ["a", "b", "c"]
    tr, va = dataset.validation_split([0, 2], tissues, 0.1)
    assert len(va) == 1 and len(tr) == 1
    tr, va = dataset.validation_split([1], tissues, 0.1)
    assert len(va) == 0 and list(tr) == [1]


def test_folds_json_roundtrip(tmp_path, synthetic_data_dir):
    samples = dataset.discover_nuinsseg(synthetic_data_dir)
    folds = dataset.make_folds(samples, num_folds=3, seed=19)
    path = dataset.write_folds_json(tmp_path / "folds.json", samples, folds, seed=19)
    data = dataset.read_folds_json(path)
    assert data["images"] == [s.rel_path for s in samples]
    assert data["seed"] == 19 and data["num_folds"] == 3
    assert data["folds"] == folds
    dataset.check_folds_match(data, samples)
    with pytest.raises(UserError):
        dataset.check_folds_match(data, samples[:-1])
    all_test = sorted(i for f in folds for i in f["test"])
    assert all_test == list(range(len(samples)))
    (tmp_path / "bad.json").write_text('{"images": ["a"], "folds": [{"fold": 0, "train": [0], "val": [], "test": [0]}]}')
    with pytest.raises(UserError, match="overlap"):
        dataset.read_folds_json(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------------- targets
def test_hv_bar():
    labels = np.zeros((3, 7), np.int32)
    labels[1, 1:6] = 4
    hv = dataset.hv_targets(labels)
    assert hv.dtype == np.float32 and hv.shape == (2, 3, 7)
    np.testing.assert_allclose(hv[0, 1, 1:6], [-1, -0.5, 0, 0.5, 1])
    assert np.all(hv[1] == 0) and hv[0, 0].sum() == 0 and hv[0, 1, 0] == 0


def test_hv_two_touching_squares_and_asymmetric():
    labels = np.zeros((4, 6), np.int32)
    labels[0:2, 0:2] = 1
    labels[0:2, 2:4] = 2
    labels[0:3, 4] = 3  # vertical 3-pixel bar
    hv = dataset.hv_targets(labels)
    np.testing.assert_allclose(hv[0, 0, 0:4], [-1, 1, -1, 1])
    np.testing.assert_allclose(hv[1, 0:2, 0], [-1, 1])
    np.testing.assert_allclose(hv[1, 0:3, 4], [-1, 0, 1])
    # L shape: x coords 0,0,1 -> centre 1/3: offsets -1/3,-1/3,2/3 -> -1,-1,1
    labels = np.zeros((2, 2), np.int32)
    labels[0, 0] = labels[1, 0] = labels[1, 1] = 9
    hv = dataset.hv_targets(labels)
    np.testing.assert_allclose(hv[0], [[-1, 0], [-1, 1]], atol=1e-6)
    np.testing.assert_allclose(hv[1], [[-1, 0], [1, 1]], atol=1e-6)


def test_hv_multi_piece_id_uses_joint_centre():
    labels = np.zeros((1, 9), np.int32)
    labels[0, 0] = 5
    labels[0, 8] = 5
    labels[0, 4] = 6
    hv = dataset.hv_targets(labels)
    np.testing.assert_allclose(hv[0, 0], [-1, 0, 0, 0, 0, 0, 0, 0, 1])


def test_hv_matches_naive_on_random_instances():
    rng = np.random.default_rng(1)
    labels = np.zeros((64, 64), np.int64)
    for i in range(30):
        y, x = rng.integers(0, 58, 2)
        labels[y:y + rng.integers(1, 7), x:x + rng.integers(1, 7)] = rng.integers(1, 10**7)
    hv = dataset.hv_targets(labels)
    for i in np.unique(labels)[1:]:
        ys, xs = np.nonzero(labels == i)
        for ch, c in ((0, xs), (1, ys)):
            d = c - c.mean()
            ref = np.where(d < 0, d / max(-d.min(), 1e-12), d / max(d.max(), 1e-12))
            np.testing.assert_allclose(hv[ch, ys, xs], ref, atol=1e-5)
    assert np.all(hv[:, labels == 0] == 0) and np.abs(hv).max() <= 1


# ---------------------------------------------------------------------------------------------- resize/augment
def test_resize_labels_nearest_keeps_ids():
    labels = np.array([[0, 7], [300, 9]], np.int32)
    up = dataset.resize_labels(labels, 4)
    assert up.dtype == np.int32 and np.array_equal(up, np.kron(labels, np.ones((2, 2), np.int32)))
    assert np.array_equal(dataset.resize_labels(up, 2), labels)
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, 4:] = 200
    small = dataset.resize_image(img, 4)
    assert small.shape == (4, 4, 3) and small.dtype == np.uint8 and small[0, 0, 0] == 0 and small[0, 3, 0] == 200


def test_augment_label_safe():
    """Asymmetric pattern: image channel 0 encodes the label id, so any mismatch would show."""
    labels = np.zeros((12, 20), np.int32)
    labels[1:3, 1:9] = 1
    labels[5:11, 15:18] = 2
    labels[9, 2] = 3
    image = np.zeros((12, 20, 3), np.uint8)
    image[..., 0] = (labels * 60).astype(np.uint8)
    image[..., 1] = np.arange(20, dtype=np.uint8)[None, :] * 5
    cfg = dataset.AugmentConfig(stain_jitter=0, color_jitter=0, blur_prob=0, noise_std=0)
    shapes = set()
    for seed in range(40):
        img, lab = dataset.augment(image, labels, np.random.default_rng(seed), cfg)
        shapes.add(lab.shape)
        assert img.shape[:2] == lab.shape and lab.dtype == labels.dtype
        assert np.array_equal(img[..., 0], (lab * 60).astype(np.uint8))
        assert sorted(np.unique(lab)) == [0, 1, 2, 3]
        assert np.bincount(lab.ravel()).tolist() == np.bincount(labels.ravel()).tolist()
    assert shapes == {(12, 20), (20, 12)}


def test_augment_photometric_deterministic_and_bounded():
    rng = np.random.default_rng(0)
    image = rng.integers(40, 230, (32, 32, 3), dtype=np.uint8)
    labels = np.zeros((32, 32), np.int32)
    cfg = dataset.AugmentConfig(flip=False, rotate=False, stain_jitter=0.1, color_jitter=0.2, blur_prob=1.0,
                                noise_std=5.0)
    a, la = dataset.augment(image, labels, np.random.default_rng(5), cfg)
    b, _ = dataset.augment(image, labels, np.random.default_rng(5), cfg)
    assert np.array_equal(a, b) and a.dtype == np.uint8 and not np.array_equal(a, image)
    assert np.array_equal(la, labels)
    off = dataset.AugmentConfig(flip=False, rotate=False, stain_jitter=0.0001, color_jitter=0, blur_prob=0,
                                noise_std=0)
    c, _ = dataset.augment(image, labels, np.random.default_rng(1), off)
    assert np.abs(c.astype(int) - image).max() <= 2  # the stain round trip is (almost) exact


def test_augmentation_cli():
    parser = argparse.ArgumentParser()
    dataset.add_augmentation_arguments(parser)
    cfg = dataset.augment_config_from_args(parser.parse_args(["--no_flip", "--stain_jitter", "0.02",
                                                              "--blur_prob", "0.5", "--noise_std", "0"]))
    assert not cfg.flip and cfg.rotate and cfg.stain_jitter == 0.02 and cfg.blur_prob == 0.5 and cfg.noise_std == 0
    assert dataset.AugmentConfig.from_dict(cfg.to_dict()) == cfg
    off = dataset.augment_config_from_args(parser.parse_args(["--no_augment"]))
    assert not off.enabled
    with pytest.raises(UserError, match="--blur_prob"):
        dataset.augment_config_from_args(parser.parse_args(["--blur_prob", "2"]))
    with pytest.raises(UserError):
        dataset.AugmentConfig.from_dict({"bogus": 1})


# ---------------------------------------------------------------------------------------------- Dataset/loader
def test_dataset_items(synthetic_data_dir):
    samples = dataset.discover_nuinsseg(synthetic_data_dir)[:4]
    ds = dataset.NucleiDataset(samples, input_size=64, augment=dataset.AugmentConfig(), seed=3)
    assert len(ds) == 4
    item = ds[1]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 64, 64)
    assert item["foreground"].dtype == torch.float32 and item["foreground"].shape == (1, 64, 64)
    assert item["hv"].dtype == torch.float32 and item["hv"].shape == (2, 64, 64)
    assert item["index"] == 1
    assert torch.equal((item["hv"].abs().sum(0) > 0), (item["foreground"][0] > 0) & (item["hv"].abs().sum(0) > 0))
    again = ds[1]
    assert torch.equal(item["image"], again["image"]) and torch.equal(item["hv"], again["hv"])
    ds.set_epoch(1)
    other = [ds[1]["image"] for _ in range(2)]
    assert torch.equal(other[0], other[1])
    assert ds.epoch == 1
    plain = dataset.NucleiDataset(samples, input_size=128)
    image, labels, _ = dataset.load_sample(samples[1])
    assert np.array_equal(plain[1]["image"].numpy().transpose(1, 2, 0), image)
    assert np.array_equal(plain[1]["foreground"][0].numpy(), (labels > 0).astype(np.float32))
    with pytest.raises(UserError, match="--input_size"):
        dataset.NucleiDataset(samples, input_size=100)


def test_loader_with_workers(synthetic_data_dir):
    samples = dataset.discover_nuinsseg(synthetic_data_dir)[:6]
    ds = dataset.NucleiDataset(samples, input_size=64, augment=dataset.AugmentConfig(), seed=0)
    loader = dataset.make_loader(ds, batch_size=2, shuffle=True, num_workers=2, seed=7, device="cpu")
    assert loader.persistent_workers and not loader.pin_memory
    ds.set_epoch(0)
    first = {int(i): img for b in loader for i, img in zip(b["index"], b["image"])}
    assert sorted(first) == list(range(6))
    ds.set_epoch(1)  # persistent workers must see the new epoch
    second = {int(i): img for b in loader for i, img in zip(b["index"], b["image"])}
    direct = ds[0]["image"]
    assert torch.equal(second[0], direct)
    assert any(not torch.equal(first[i], second[i]) for i in range(6))
    batch = next(iter(dataset.make_loader(ds, 3, False, 0, 0, "cpu")))
    assert batch["image"].shape == (3, 3, 64, 64) and batch["hv"].shape == (3, 2, 64, 64)
