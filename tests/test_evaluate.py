"""Tests of evaluate.py: pairing images with fold models, scoring, reports, and the command end to end.

The end-to-end tests train a tiny 2-fold CV model (input 64, 1 epoch, random encoder) once per session on
the synthetic dataset.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile

import dataset
import evaluate
import export
import main
import metrics
import utils
from utils import UserError, read_csv

TRAIN_ARGS = ["--cross_validation", "--input_size", "64", "--num_folds", "2", "--epochs", "1",
              "--pretrained", "none", "--lora_rank", "2", "--batch_size", "2", "--num_workers", "0"]
# The tiny model's foreground probabilities sit around 0.1-0.2 (one epoch from a random encoder); this
# threshold makes it predict plenty of instances, so the scores are not trivially zero.
FG_THRESHOLD = "0.15"


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cv_model(tmp_path_factory, data_dir: Path) -> Path:
    """A tiny 2-fold CV training run (input 64, 1 epoch, random encoder); returns its best_model.pth.

    Made once per test run and shared by the test files (and, under pytest-xdist, by the workers: the
    first one trains under a lock, the others reuse the result). The synthetic dataset is the same in
    every worker, so the folds' relative image paths match any worker's copy.
    """
    import argparse
    import fcntl
    import os

    import train

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = root / "tiny_cv_model"
    with open(root / "tiny_cv_model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done").is_file():
            parser = argparse.ArgumentParser()
            train.add_arguments(parser)
            args = parser.parse_args(["--data_dir", str(data_dir), "--output_dir", str(out), "--overwrite",
                                      *TRAIN_ARGS])
            train.run_training(train.config_from_args(args), out, evaluate_test=False)
            (out / "done").write_text("ok")
    path = out / "best_model.pth"
    assert path.is_file()
    return path


@pytest.fixture(scope="session")
def cv_model(synthetic_data_dir, tmp_path_factory) -> Path:
    return tiny_cv_model(tmp_path_factory, synthetic_data_dir)


@pytest.fixture(scope="session")
def cv_evaluation(synthetic_data_dir, cv_model, tmp_path_factory) -> Path:
    """evaluate on the CV model set with every output switched on (one worker process)."""
    out = tmp_path_factory.mktemp("evaluation")
    code = main.main(["-q", "evaluate", "--data_dir", str(synthetic_data_dir), "--model_path", str(cv_model),
                      "--output_dir", str(out), "--save_predictions", "--visualize", "--plot",
                      "--num_workers", "1", "--batch_size", "3", "--device", "cpu",
                      "--fg_threshold", FG_THRESHOLD, "--no-ignore_vague"])
    assert code == 0
    return out


# ----------------------------------------------------------------------------------------------
# Units
# ----------------------------------------------------------------------------------------------
def _samples(names):
    return [SimpleNamespace(rel_path=f"{t}/tissue images/{n}.png", tissue=t, name=n) for t, n in names]


def test_assign_samples_cv_out_of_fold(caplog):
    samples = _samples([("a", "a_1"), ("a", "a_2"), ("b", "b_1"), ("b", "b_2"), ("b", "extra")])
    paths = [s.rel_path for s in samples]
    m0 = SimpleNamespace(fold=0, model=None, test_images=[paths[0], paths[2]])
    m1 = SimpleNamespace(fold=1, model=None, test_images=[paths[3], paths[1]])
    model_set = SimpleNamespace(members=[m0, m1], is_cv=True, output_dir=None)
    pairs = evaluate.assign_samples(model_set, samples)
    assert [(m.fold, f, [s.name for s in g]) for m, f, g in pairs] == [(0, 0, ["a_1", "b_1"]),
                                                                      (1, 1, ["a_2", "b_2"])]
    assert "belong to no fold" in caplog.text          # the extra image is reported, not scored
    only = evaluate.assign_samples(model_set, samples, fold=1)
    assert [(m.fold, [s.name for s in g]) for m, _, g in only] == [(1, ["a_2", "b_2"])]
    with pytest.raises(UserError, match="--fold 5: out of range"):
        evaluate.assign_samples(model_set, samples, fold=5)
    with pytest.raises(UserError, match=r"missing from .*a/tissue images/a_1\.png"):
        evaluate.assign_samples(model_set, samples[1:], data_dir="somewhere")


def test_assign_samples_single_model_with_folds_json(tmp_path):
    samples = _samples([("a", f"a_{i}") for i in range(6)])
    folds = [{"fold": 0, "train": [0, 1, 2], "val": [], "test": [3, 4, 5]},
             {"fold": 1, "train": [3, 4, 5], "val": [], "test": [0, 1, 2]}]
    dataset.write_folds_json(tmp_path / "folds.json", samples, folds)
    (tmp_path / "fold_1").mkdir()
    model_path = tmp_path / "fold_1" / "best_model.pth"
    member = SimpleNamespace(fold=1, model=None, test_images=None)
    model_set = SimpleNamespace(members=[member], is_cv=False, output_dir=tmp_path)
    pairs = evaluate.assign_samples(model_set, samples, fold=1, model_path=model_path)
    assert [(f, [s.name for s in g]) for _, f, g in pairs] == [(1, ["a_0", "a_1", "a_2"])]
    everything = evaluate.assign_samples(model_set, samples, model_path=model_path)
    assert everything[0][1] is None and len(everything[0][2]) == 6
    with pytest.raises(UserError, match="--fold 3: out of range"):
        evaluate.assign_samples(model_set, samples, fold=3, model_path=model_path)
    # test images given as indices into folds.json (as read from the training folder) work too
    member.test_images = [0, 1, 2]
    assert evaluate.member_test_images(member, model_set, model_path) == [s.rel_path for s in samples[:3]]


def test_output_stems_disambiguate_collisions():
    samples = _samples([("liver", "x_1"), ("brain", "x_1"), ("brain", "y")])
    stems = evaluate.output_stems(samples)
    assert stems == {"liver/tissue images/x_1.png": "liver_x_1", "brain/tissue images/x_1.png": "brain_x_1",
                     "brain/tissue images/y.png": "y"}


def test_score_image_binary_and_tiff(tmp_path):
    labels = np.zeros((40, 40), np.int32)
    labels[5:15, 5:15] = 3
    labels[20:30, 20:32] = 8
    labels[2:6, 30:36] = 9
    fg = (labels > 0).astype(np.float32) * 0.9
    fg[20:30, 20:32] = 0.0                                # one nucleus missed
    vague = np.zeros((40, 40), bool)
    vague[18:34, 18:34] = True                            # ... but inside an ambiguous region
    task = {"image": "t/tissue images/x.png", "tissue": "t", "fold": 1, "stem": "x", "foreground": fg,
            "hv": None, "postprocess": {"mode": "binary", "min_area": 2}, "labels": labels, "vague": vague,
            "ignore_vague": False, "rgb": np.full((40, 40, 3), 200, np.uint8),
            "predictions_dir": str(tmp_path / "pred"), "overlays_dir": str(tmp_path / "ov")}
    row = evaluate.score_image(task)
    assert list(row) == list(evaluate.PER_IMAGE_COLUMNS)
    assert row["num_true"] == 3 and row["tp"] == 2 and row["fn"] == 1 and row["fold"] == 1
    pred = tifffile.imread(tmp_path / "pred" / "x.tif")
    assert pred.dtype == np.uint16 and pred.shape == labels.shape
    assert metrics.instance_metrics(labels, pred)["pq"] == pytest.approx(row["pq"])
    assert (tmp_path / "ov" / "x.png").is_file()
    from PIL import Image

    overlay = np.asarray(Image.open(tmp_path / "ov" / "x.png").convert("RGB"))
    # a 40-px image is drawn 4x (nearest neighbour; white margin and legend around it): grey up to 160 px
    assert (overlay[150:160, 140:160] == 200).all() and (overlay[160:165, 140:160] == 255).all()
    assert (overlay[150:160, 160:170] == 255).all()
    vague_row = evaluate.score_image(dict(task, ignore_vague=True))
    assert vague_row["num_true"] == 2 and vague_row["fn"] == 0 and vague_row["pq"] > row["pq"]

    big = np.zeros((4, 4), np.int64)
    big[0, 0] = 70000
    export.save_label_tiff(tmp_path / "big.tif", big, smallest=True)
    back = tifffile.imread(tmp_path / "big.tif")
    assert back.dtype == np.uint32 and back[0, 0] == 70000


def _row(image, tissue, fold, pq, **extra):
    row = {"image": image, "tissue": tissue, "fold": fold, "num_true": 10, "num_pred": 10, "tp": 8, "fp": 2,
           "fn": 2, "iou_sum": 6.0}
    row.update({name: pq for name in metrics.METRICS})
    row.update(extra)
    return row


def test_reports(tmp_path):
    rows = [_row("a/1", "a", 0, 0.4), _row("a/2", "a", 1, 0.6), _row("b/1", "b", 0, 0.5),
            _row("b/2", "b", 1, 0.7)]
    meta = {"model_path": "m.pth", "data_dir": "d", "protocol": "out-of-fold", "comparable": True,
            "ignore_vague": False}
    summary = evaluate.write_reports(rows, tmp_path, meta)
    assert summary["overall"]["pq"] == pytest.approx(0.55)
    assert summary["across_folds"]["pq"]["mean"] == pytest.approx(0.55)
    assert summary["across_folds"]["pq"]["sd"] == pytest.approx(np.std([0.45, 0.65], ddof=1))
    doc = json.loads((tmp_path / "summary.json").read_text())       # strict JSON: no NaN
    assert doc["ignore_vague"] is False and doc["pooled"]["pooled_pq"] == pytest.approx(0.8 * 0.75)
    assert doc["environment"]["python"] and doc["published_pq"]["CellViT-256"] == 0.564
    tissues = read_csv(tmp_path / "per_tissue.csv")
    assert [(t["tissue"], t["n"]) for t in tissues] == [("a", "2"), ("b", "2")]
    assert float(tissues[0]["pq"]) == pytest.approx(0.5)
    assert float(tissues[0]["pq_sd"]) == pytest.approx(np.std([0.4, 0.6], ddof=1), rel=1e-5)
    md = (tmp_path / "summary.md").read_text()
    assert "simplified HoVer-style CNN of the NuInsSeg authors (masih4/nuc_eval) 0.534" in md
    assert "HoVer-Net 0.534" not in md and "HoVer-NeXt 0.542" in md and "CellViT-256 0.564" in md
    assert "0.550 ± 0.141" in md
    per_image = read_csv(tmp_path / "per_image.csv")
    assert list(per_image[0]) == list(evaluate.PER_IMAGE_COLUMNS)


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------
def test_evaluate_cv_scores_every_image_once_out_of_fold(synthetic_data_dir, cv_model, cv_evaluation):
    rows = read_csv(cv_evaluation / "per_image.csv")
    samples = dataset.discover_nuinsseg(synthetic_data_dir)
    assert sorted(r["image"] for r in rows) == sorted(s.rel_path for s in samples)
    assert len({r["image"] for r in rows}) == len(rows)
    folds = dataset.read_folds_json(cv_model.parent / "folds.json")
    fold_of = {folds["images"][i]: f["fold"] for f in folds["folds"] for i in f["test"]}
    assert {r["image"]: int(r["fold"]) for r in rows} == fold_of
    tissue_of = {s.rel_path: s.tissue for s in samples}
    assert all(r["tissue"] == tissue_of[r["image"]] for r in rows)

    for name in ("per_image.csv", "per_tissue.csv", "summary.json", "summary.md"):
        assert (cv_evaluation / name).is_file(), name
    stems = evaluate.output_stems(samples)
    assert sorted(p.name for p in (cv_evaluation / "overlays").iterdir()) == sorted(
        f"{s}.png" for s in stems.values())
    assert {p.name for p in (cv_evaluation / "plots").iterdir()} >= {"per_tissue.png", "distributions.png",
                                                                     "learning_curves.png"}
    summary = json.loads((cv_evaluation / "summary.json").read_text())
    assert summary["num_images"] == len(samples) and summary["comparable"] is False  # 2 folds, synthetic data
    assert [f["fold"] for f in summary["per_fold"]] == [0, 1]
    assert set(summary["across_folds"]["pq"]) == {"mean", "sd"}
    assert summary["model_config"]["input_size"] == 64 and summary["ignore_vague"] is False
    assert summary["postprocess"]["fg_threshold"] == float(FG_THRESHOLD)
    assert sum(int(r["num_pred"]) for r in rows) > 0                 # the tiny model does predict nuclei
    assert summary["overall"]["pq"] == pytest.approx(np.mean([float(r["pq"]) for r in rows]), abs=1e-5)


def test_saved_predictions_reproduce_per_image_scores(synthetic_data_dir, cv_evaluation):
    rows = {r["image"]: r for r in read_csv(cv_evaluation / "per_image.csv")}
    samples = dataset.discover_nuinsseg(synthetic_data_dir)
    stems = evaluate.output_stems(samples)
    for sample in samples:
        pred = tifffile.imread(cv_evaluation / "predictions" / f"{stems[sample.rel_path]}.tif")
        image, labels, _ = dataset.load_sample(sample)
        assert pred.shape == labels.shape and pred.dtype in (np.uint16, np.uint32)
        scores = metrics.instance_metrics(labels, pred)
        row = rows[sample.rel_path]
        for name in metrics.METRICS:
            assert float(row[name]) == pytest.approx(scores[name], rel=1e-5, abs=1e-6), (sample.rel_path, name)
        for name in ("num_true", "num_pred", "tp", "fp", "fn"):
            assert int(row[name]) == scores[name]


def test_ignore_vague_changes_scoring(synthetic_data_dir, cv_model, cv_evaluation, tmp_path):
    code = main.main(["-q", "evaluate", "--data_dir", str(synthetic_data_dir), "--model_path", str(cv_model),
                      "--output_dir", str(tmp_path), "--ignore_vague", "--num_workers", "0",
                      "--fg_threshold", FG_THRESHOLD])
    assert code == 0
    plain = {r["image"]: r for r in read_csv(cv_evaluation / "per_image.csv")}
    vague = {r["image"]: r for r in read_csv(tmp_path / "per_image.csv")}
    samples = dataset.discover_nuinsseg(synthetic_data_dir)
    with_mask = [s for s in samples if s.vague_path is not None]
    assert with_mask
    changed = 0
    for s in samples:
        a, b = plain[s.rel_path], vague[s.rel_path]
        if s.vague_path is None:
            assert a == b                                   # no mask: identical scoring
            continue
        changed += int(a != b)
        _, labels, mask = dataset.load_sample(s)
        assert int(b["num_true"]) == metrics.instance_metrics(labels, labels, ignore=mask)["num_true"]
        assert int(b["num_true"]) < int(a["num_true"])      # nuclei inside the region are dropped
    assert changed == len(with_mask)
    assert json.loads((tmp_path / "summary.json").read_text())["ignore_vague"] is True


def test_single_checkpoint_fold(synthetic_data_dir, cv_model, tmp_path):
    fold_ckpt = cv_model.parent / "fold_1" / "best_model.pth"
    code = main.main(["-q", "evaluate", "--data_dir", str(synthetic_data_dir), "--model_path", str(fold_ckpt),
                      "--fold", "1", "--output_dir", str(tmp_path), "--num_workers", "0",
                      "--fg_threshold", FG_THRESHOLD])
    assert code == 0
    folds = dataset.read_folds_json(cv_model.parent / "folds.json")
    expected = sorted(folds["images"][i] for i in folds["folds"][1]["test"])
    rows = read_csv(tmp_path / "per_image.csv")
    assert [r["image"] for r in rows] == expected and {r["fold"] for r in rows} == {"1"}


def test_user_errors(run_error, synthetic_data_dir, cv_model, tmp_path, capsys):
    base = ["evaluate", "--output_dir", str(tmp_path / "out"), "--num_workers", "0"]
    line = run_error(base + ["--data_dir", str(synthetic_data_dir),
                                      "--model_path", str(tmp_path / "nope.pth")])
    assert "nope.pth" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = run_error(base + ["--data_dir", str(empty), "--model_path", str(cv_model)])
    assert "empty" in line
    line = run_error(base + ["--data_dir", str(synthetic_data_dir), "--model_path", str(cv_model),
                                      "--fold", "7"])
    assert "--fold 7" in line
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    line = run_error(base + ["--data_dir", str(synthetic_data_dir), "--model_path", str(junk)])
    assert "junk.pth" in line
    # a data folder that lacks an image of the model's folds: named in the message
    partial = tmp_path / "partial"
    shutil.copytree(synthetic_data_dir, partial)
    victim = sorted(partial.glob("*/tissue images/*.png"))[0]
    victim.unlink()
    for label in (victim.parent.parent / "label masks modify").glob(victim.stem + ".*"):
        label.unlink()
    line = run_error(base + ["--data_dir", str(partial), "--model_path", str(cv_model)])
    assert victim.name in line and "missing" in line
    assert not (tmp_path / "out" / "per_image.csv").exists()


def test_refuses_to_write_reports_into_a_training_run(run_error, synthetic_data_dir, cv_model, tmp_path, capsys):
    """`--output_dir` = the training folder would replace the training run's own summary.json."""
    run_dir = tmp_path / "run"
    shutil.copytree(cv_model.parent, run_dir)
    (run_dir / "summary.json").write_text('{"training": "summary"}')
    line = run_error(["evaluate", "--data_dir", str(synthetic_data_dir), "--model_path", str(run_dir),
                               "--output_dir", str(run_dir), "--num_workers", "0"])
    assert str(run_dir) in line and "training run" in line
    assert (run_dir / "summary.json").read_text() == '{"training": "summary"}'
    assert not (run_dir / "per_image.csv").exists()


class DarkIsNucleus(__import__("torch").nn.Module):
    """A stand-in network: foreground logit from how dark (haematoxylin-like) a pixel is; no HV maps."""

    def forward(self, x):
        grey = x.float().mean(dim=1, keepdim=True)
        return {"foreground": (140.0 - grey) / 10.0}


def test_evaluate_model_set_library_with_worker_pool(synthetic_data_dir, tmp_path):
    samples = dataset.discover_nuinsseg(synthetic_data_dir)
    half = len(samples) // 2
    members = [SimpleNamespace(fold=0, model=DarkIsNucleus(), test_images=[s.rel_path for s in samples[::2]],
                               postprocess={}),
               SimpleNamespace(fold=1, model=DarkIsNucleus(), test_images=[s.rel_path for s in samples[1::2]],
                               postprocess={})]
    model_set = SimpleNamespace(members=members, is_cv=True, output_dir=tmp_path, input_size=128,
                                config={"input_size": 128}, postprocess={"mode": "binary", "min_area": 5})
    kwargs = dict(device="cpu", batch_size=3, postprocess_overrides={"fg_threshold": 0.5})
    in_process = evaluate.evaluate_model_set(model_set, samples, num_workers=0, progress=False, **kwargs)
    pooled = evaluate.evaluate_model_set(model_set, samples, num_workers=2, progress=False,
                                         predictions_dir=tmp_path / "pred", **kwargs)
    assert in_process == pooled
    assert [r["image"] for r in pooled] == sorted(s.rel_path for s in samples)
    assert [r["fold"] for r in pooled] == [i % 2 for i in range(len(samples))]
    assert len(list((tmp_path / "pred").glob("*.tif"))) == len(samples) > half
    assert np.mean([r["dice"] for r in pooled]) > 0.3          # the stand-in finds the dark nuclei


def test_recorded_data_dir_absolute_or_relative_to_where_train_ran(tmp_path, monkeypatch):
    """Issue 19: a model records its data folder absolute; an older model's relative one is looked up from the
    folders above the model (train ran in one of them), not from wherever evaluate runs."""
    from evaluate import recorded_data_dir

    data = tmp_path / "project" / "data"
    data.mkdir(parents=True)
    model = tmp_path / "project" / "runs" / "cv" / "fold_0" / "best_model.pth"
    model.parent.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert recorded_data_dir({"data_dir": str(data)}, model) == data
    assert recorded_data_dir({"data_dir": "data"}, model) == data  # old config, train ran in project/
    assert recorded_data_dir({"data_dir": "data"}, Path("..") / model.relative_to(tmp_path)) == data
    with pytest.raises(UserError, match=r"^--data_dir: not given, and the model's config records the data folder "
                                        r"'nowhere' relative to where train ran, which is not in any folder above"):
        recorded_data_dir({"data_dir": "nowhere"}, model)
    with pytest.raises(UserError, match=r"does not exist; give --data_dir$"):
        recorded_data_dir({"data_dir": str(tmp_path / "gone")}, model)


def _no_resize(*args, **kwargs):
    raise AssertionError("an image was resized: the --mpp check did not stop it first")


def test_data_pixel_size_beyond_memory_is_refused_before_any_work(run_error, synthetic_data_dir, cv_model, tmp_path,
                                                                   monkeypatch):
    """--mpp 100 for the tiny model (trained at 1 µm/px, the synthetic data's) resizes a 128-px image to
    12,800 x 12,800 pixels (about 10 GiB of maps): with 1 GiB available it is refused from the headers, exit 2,
    nothing written (before: the resize ran out of memory). (--mpp above 100 is refused as out of range.)"""
    monkeypatch.setattr(dataset, "resize_image", _no_resize)
    monkeypatch.setattr(utils, "available_memory", lambda: 2 ** 30)
    line = run_error(["evaluate", "--data_dir", str(synthetic_data_dir), "--model_path", str(cv_model),
                      "--output_dir", str(tmp_path / "out"), "--num_workers", "0", "--mpp", "100"])
    assert "--mpp 100 resizes this 128 x 128-pixel image by 100" in line and "12,800 x 12,800 pixels" in line
    assert "more than the 1.0 GiB of memory available" in line
    assert not (tmp_path / "out").exists()


def test_check_data_scale_warns_about_the_pixel_size_and_small_images(tmp_path, caplog):
    from PIL import Image

    paths = []
    for k, size in enumerate((64, 640)):
        paths.append(tmp_path / f"im{k}.png")
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(paths[-1])
    samples = [SimpleNamespace(image_path=p) for p in paths]
    model_set = SimpleNamespace(config={"mpp": 0.25, "tile_size": 64})
    with caplog.at_level("WARNING"):
        evaluate.check_data_scale(model_set, samples, 0.025, "data/dataset.json mpp")
    assert "data/dataset.json mpp 0.025: outside 0.05-5 micrometres per pixel" in caplog.text
    assert "shrinks 1 of 2 image(s) (e.g. " + str(paths[0]) + ") below one window (64 pixels" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        evaluate.check_data_scale(model_set, samples, 0.5)   # 2x larger: fits, plausible
        evaluate.check_data_scale(model_set, samples, None)
    assert caplog.text == ""
    with pytest.raises(UserError, match=r"im0\.png: --mpp 1000 resizes this 64 x 64-pixel image by 4000"):
        evaluate.check_data_scale(model_set, samples, 1000.0)
