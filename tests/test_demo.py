"""Tests of demo.py: the random choice, index.html, and the command end to end on a tiny CV model."""
from __future__ import annotations

import html
import re
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

import dataset
import demo
import main
from test_evaluate import FG_THRESHOLD, tiny_cv_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
from utils import read_json


@pytest.fixture(scope="session")
def demo_cv_model(synthetic_data_dir, tmp_path_factory) -> Path:
    return tiny_cv_model(tmp_path_factory, synthetic_data_dir)


def _samples(n):
    return [SimpleNamespace(rel_path=f"t/tissue images/s{i:02d}.png", tissue="t", name=f"s{i:02d}")
            for i in range(n)]


def test_choose_images_seeded_and_bounded():
    samples = _samples(10)
    assignments = [("m0", 0, samples[:5]), ("m1", 1, samples[5:])]
    a = demo.choose_images(assignments, 4, seed=3)
    assert a == demo.choose_images(assignments, 4, seed=3)
    assert len(a) == 4 and len({s.rel_path for _, _, s in a}) == 4
    assert all((m, f) == (("m0", 0) if s in samples[:5] else ("m1", 1)) for m, f, s in a)
    assert demo.choose_images(assignments, 4, seed=4) != a
    assert len(demo.choose_images(assignments, 50, seed=0)) == 10


def test_render_index_escapes_text():
    entry = {"image": "a<b>/tissue images/x&y.png", "tissue": "<script>", "fold": 0, "stem": "x&y",
             "figure": "x&y #1.png", "pq": 0.5, "aji": 0.4, "dice": 0.8, "num_true": 3, "num_pred": 4}
    page = demo.render_index([entry], "demo <1>", {"model": "m&m.pth"})
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "demo &lt;1&gt;" in page and "m&amp;m.pth" in page
    assert 'src="x%26y%20%231.png"' in page


def test_demo_end_to_end(synthetic_data_dir, demo_cv_model, tmp_path, capsys):
    out = tmp_path / "demo"
    code = main.main(["-q", "demo", "--data_dir", str(synthetic_data_dir), "--model_path", str(demo_cv_model),
                      "--output_dir", str(out), "--num_samples", "3", "--seed", "1", "--device", "cpu",
                      "--fg_threshold", FG_THRESHOLD])
    assert code == 0
    assert str(out) in capsys.readouterr().out
    figures = sorted(p.name for p in out.glob("*.png"))
    assert len(figures) == 3
    for name in figures:
        with Image.open(out / name) as im:
            assert im.size[0] > 3 * im.size[1] / 2          # four panels side by side
    page = (out / "index.html").read_text(encoding="utf-8")
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(urllib.parse.unquote(html.unescape(s)) for s in sources) == figures
    record = read_json(out / "demo.json")
    folds = dataset.read_folds_json(demo_cv_model.parent / "folds.json")
    test_fold = {folds["images"][i]: f["fold"] for f in folds["folds"] for i in f["test"]}
    assert len(record["images"]) == 3
    for entry in record["images"]:
        assert entry["fold"] == test_fold[entry["image"]]   # predicted by the model that never saw it
        assert html.escape(entry["tissue"]) in page and f"{entry['pq']:.3f}" in page


def test_demo_user_errors(synthetic_data_dir, tmp_path, capsys):
    code = main.main(["demo", "--data_dir", str(synthetic_data_dir), "--model_path", str(tmp_path / "none.pth"),
                      "--output_dir", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "none.pth" in err[0]
    code = main.main(["demo", "--data_dir", str(synthetic_data_dir), "--model_path", str(tmp_path / "none.pth"),
                      "--num_samples", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--num_samples" in err[0]


def test_demo_negative_seed_is_a_user_error(synthetic_data_dir, tmp_path, capsys):
    code = main.main(["demo", "--data_dir", str(synthetic_data_dir), "--model_path", str(tmp_path / "none.pth"),
                      "--output_dir", str(tmp_path / "d"), "--seed", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --seed -1: must be 0 or more"]


def test_demo_single_fold_model_shows_only_its_test_images(synthetic_data_dir, demo_cv_model, tmp_path, caplog):
    out = tmp_path / "demo_fold1"
    fold_model = demo_cv_model.parent / "fold_1" / "best_model.pth"
    assert main.main(["demo", "--data_dir", str(synthetic_data_dir), "--model_path", str(fold_model),
                      "--output_dir", str(out), "--num_samples", "50", "--device", "cpu"]) == 0
    folds = read_json(demo_cv_model.parent / "folds.json")
    fold1 = next(f for f in folds["folds"] if int(f["fold"]) == 1)
    test_stems = {Path(folds["images"][i]).stem for i in fold1["test"]}
    assert {p.stem for p in out.glob("*.png")} == test_stems
    assert "images it was trained on" not in caplog.text
