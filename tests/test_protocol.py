"""Issue 12, point 5: one scoring protocol for train's cv_summary and evaluate (ambiguous regions ignored),
named in both outputs, and `comparable` only for the paper's protocol on the real NuInsSeg file list."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import dataset
import evaluate
import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _nuinsseg_like(n_per_tissue: int = 0):
    samples = []
    for i in range(dataset.NUINSSEG_NUM_IMAGES):
        tissue = dataset.NUINSSEG_TISSUES[i % len(dataset.NUINSSEG_TISSUES)]
        name = f"{tissue.replace(' ', '_')}_{i:03d}"
        samples.append(SimpleNamespace(tissue=tissue, name=name, image_path=Path(f"/d/{tissue}/x/{name}.png"),
                                       rel_path=f"{tissue}/tissue images/{name}.png"))
    return samples


def test_comparable_only_for_the_paper_protocol():
    paper = SimpleNamespace(is_cv=True, config={"num_folds": 5, "fold_seed": 19}, members=[None] * 5)
    samples = _nuinsseg_like()
    assert evaluate.paper_protocol(paper, samples, None, True) == (True, "the paper's protocol")
    two_folds = SimpleNamespace(is_cv=True, config={"num_folds": 2, "fold_seed": 19}, members=[None] * 2)
    other_seed = SimpleNamespace(is_cv=True, config={"num_folds": 5, "fold_seed": 0}, members=[None] * 5)
    single = SimpleNamespace(is_cv=False, config={"num_folds": 5, "fold_seed": 19}, members=[None])
    for model_set, data, fold, vague, reason in (
            (two_folds, samples, None, True, "2 folds"), (other_seed, samples, None, True, "fold seed 0"),
            (single, samples, None, True, "single model"), (paper, samples[:-1], None, True, "664 images"),
            (paper, samples, 1, True, "only fold 1"), (paper, samples, None, False, "ambiguous regions scored")):
        comparable, why = evaluate.paper_protocol(model_set, data, fold, vague)
        assert not comparable and reason in why
    renamed = _nuinsseg_like()
    renamed[3] = SimpleNamespace(**{**vars(renamed[3]), "name": "synthetic_3"})
    assert not dataset.is_nuinsseg_file_list(renamed)


def test_train_and_evaluate_report_the_same_protocol_and_number(synthetic_data_dir, tmp_path):
    """The same models: train's cv_summary mean over folds == evaluate's default 'across folds' mean, and
    both files name the protocol (on today's code evaluate scored ambiguous regions by default)."""
    import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    out = tmp_path / "run"
    args = parser.parse_args(["--data_dir", str(synthetic_data_dir), "--output_dir", str(out), "--cross_validation",
                              "--input_size", "64", "--num_folds", "2", "--epochs", "1", "--pretrained", "none",
                              "--lora_rank", "2", "--batch_size", "2", "--num_workers", "0"])
    config = train.config_from_args(args)
    config["postprocess"]["fg_threshold"] = 0.15  # the tiny model's probabilities sit around 0.1-0.2
    trained = train.run_training(config, out)
    assert main.main(["-q", "evaluate", "--data_dir", str(synthetic_data_dir), "--model_path", str(out),
                      "--output_dir", str(tmp_path / "eval"), "--num_workers", "0", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["ignore_vague"] is True and summary["comparable"] is False
    for metric in ("pq", "aji", "dice"):
        assert summary["across_folds"][metric]["mean"] == pytest.approx(trained["test_mean"][metric], abs=1e-4)
    assert summary["across_folds"]["dice"]["mean"] > 0  # not a trivial 0 == 0
    oof = json.loads((out / "summary.json").read_text())["out_of_fold"]
    assert oof["num_images"] == summary["num_images"]
    for metric in ("pq", "aji", "dice"):                 # the headline: mean over all images
        assert summary["overall"][metric] == pytest.approx(oof[metric], abs=1e-4)
    assert f"Dice {oof['dice']:.4f}." in (out / "cv_summary.md").read_text()
    name = evaluate.vague_protocol(True)
    assert name in (tmp_path / "eval" / "summary.md").read_text() and summary["ambiguous_regions"] == name
    assert name in (out / "cv_summary.md").read_text()
    assert name in json.loads((out / "summary.json").read_text())["protocol"]
