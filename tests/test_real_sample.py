"""End-to-end sanity run on the real NuInsSeg excerpt (skipped when ../shared/data/nuinsseg_sample is absent).

Trains a tiny model (input 64, 1 epoch, random encoder) with 2-fold cross-validation on the 64 real images, then
evaluates it out-of-fold with the ambiguous-region protocol. This is not about accuracy: it proves the whole
pipeline handles the real files (RGBA image, ids with several pieces, skipped ids, vague-area masks, folder
names with spaces and parentheses).
"""
from __future__ import annotations

import numpy as np
import tifffile

import dataset
import main
import metrics
from utils import read_csv, read_json


def test_train_and_evaluate_on_real_sample(real_sample_dir, tmp_path, one_torch_thread):
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    assert main.main(["-q", "train", "--data_dir", str(real_sample_dir), "--output_dir", str(train_dir),
                      "--pretrained", "none", "--input_size", "64", "--epochs", "1", "--batch_size", "8",
                      "--lora_rank", "2", "--cross_validation", "--num_folds", "2", "--num_workers", "0",
                      "--device", "cpu"]) == 0
    folds = read_json(train_dir / "folds.json")
    assert len(folds["images"]) == 64
    assert main.main(["-q", "evaluate", "--data_dir", str(real_sample_dir), "--model_path",
                      str(train_dir / "best_model.pth"), "--output_dir", str(eval_dir), "--ignore_vague",
                      "--save_predictions", "--num_workers", "0", "--fg_threshold", "0.2"]) == 0
    rows = read_csv(eval_dir / "per_image.csv")
    samples = {s.rel_path: s for s in dataset.discover_nuinsseg(real_sample_dir)}
    assert sorted(r["image"] for r in rows) == sorted(samples)  # every image once, out of fold
    assert {r["fold"] for r in rows} == {"0", "1"}
    # the counts of true nuclei are the real ones (ids as given, vague-area nuclei removed where marked)
    for row in rows:
        sample = samples[row["image"]]
        image, labels, vague = dataset.load_sample(sample)
        if vague is not None:
            labels = metrics.apply_ignore_region(labels, vague)
        assert int(row["num_true"]) == len(np.setdiff1d(np.unique(labels), [0])), row["image"]
        pred = tifffile.imread(eval_dir / "predictions" / f"{sample.name}.tif")
        assert pred.shape == labels.shape == image.shape[:2]
