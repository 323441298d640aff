"""The user's path with an official-format checkpoint: train LoRA only from `--pretrained mobile_sam.pt`,
then evaluate, demo and predict from the small adapter-only checkpoints.

The shared reference weights (random values in exactly the official `mobile_sam.pt` layout) stand in for the
official file, which cannot be downloaded here. Skipped when the reference folder is absent.
"""
from __future__ import annotations

import shutil

import numpy as np
import tifffile
import torch

import main
import nuclei_model
from utils import read_csv


def test_lora_only_from_official_checkpoint(reference_dir, synthetic_data_dir, tmp_path, one_torch_thread):
    weights = tmp_path / "weights" / "mobile_sam.pt"
    weights.parent.mkdir()
    shutil.copy(reference_dir / "mobile_sam_random_weights.pt", weights)
    out = tmp_path / "output_lora"
    assert main.main(["-q", "train", "--data_dir", str(synthetic_data_dir), "--output_dir", str(out),
                      "--pretrained", str(weights), "--train_only_lora", "--lora_rank", "4",
                      "--input_size", "64", "--epochs", "1", "--batch_size", "4", "--cross_validation",
                      "--num_folds", "2", "--num_workers", "0", "--device", "cpu"]) == 0

    # fold checkpoints hold only LoRA + head (a few hundred kB), read with weights_only=True
    ckpt = torch.load(out / "fold_0" / "best_model.pth", weights_only=True)
    assert ckpt["state_kind"] == "trainable"
    assert all("lora_" in k or k.startswith("head.") for k in ckpt["state_dict"])
    assert (out / "fold_0" / "best_model.pth").stat().st_size < 2_000_000
    assert ckpt["base_weights"]["size"] == weights.stat().st_size

    # the rebuilt model equals the trained one: frozen encoder weights come from the base file
    model_set = nuclei_model.load_model_set(out / "best_model.pth")
    base = torch.load(weights, weights_only=True)
    enc = model_set.members[0].model.encoder.state_dict()
    key = "layers.2.blocks.0.attn.qkv.base.weight"
    assert torch.equal(enc[key], base["image_encoder." + key.replace(".base", "")])

    assert main.main(["-q", "evaluate", "--data_dir", str(synthetic_data_dir), "--model_path",
                      str(out / "best_model.pth"), "--output_dir", str(tmp_path / "evaluation"),
                      "--num_workers", "0"]) == 0
    assert len(read_csv(tmp_path / "evaluation" / "per_image.csv")) == 12
    assert main.main(["-q", "demo", "--data_dir", str(synthetic_data_dir), "--model_path",
                      str(out / "best_model.pth"), "--output_dir", str(tmp_path / "demo"),
                      "--num_samples", "2"]) == 0
    image = next(synthetic_data_dir.glob("*/tissue images/*.png"))
    assert main.main(["-q", "predict", "--model_path", str(out / "best_model.pth"), "--input", str(image),
                      "--output_dir", str(tmp_path / "pred"), "--ensemble", "--no_overlay"]) == 0
    labels = tifffile.imread(tmp_path / "pred" / f"{image.stem}_labels.tif")
    assert labels.dtype == np.uint32 and labels.shape == (128, 128)

    # users move folders: without the base file the error says what to do; --pretrained points at it again
    moved = tmp_path / "elsewhere.pt"
    weights.rename(moved)
    assert main.main(["-q", "evaluate", "--data_dir", str(synthetic_data_dir), "--model_path",
                      str(out / "best_model.pth"), "--output_dir", str(tmp_path / "evaluation2"),
                      "--num_workers", "0"]) == 2
    assert main.main(["-q", "evaluate", "--data_dir", str(synthetic_data_dir), "--model_path",
                      str(out / "best_model.pth"), "--output_dir", str(tmp_path / "evaluation2"),
                      "--num_workers", "0", "--pretrained", str(moved)]) == 0
